"""One end-to-end run of run.py: real Fashion-MNIST, FedDST, TFLite export."""

import contextlib
import csv
import json
import os
import pathlib
import subprocess
import sys
import uuid

import psutil
import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]


MARK = "FEDDST_TEST_RUN_MARK"


def _worker_pids(mark: str):
  """TFF workers started by the run whose environment carries `mark` (other
  tests may run TFF workers at the same time, under pytest-xdist)."""
  pids = set()
  for proc in psutil.process_iter(["name"]):
    if proc.info["name"] == "worker_binary":
      with contextlib.suppress(psutil.Error):
        if proc.environ().get(MARK) == mark:
          pids.add(proc.pid)
  return pids


def test_feddst_run_writes_outputs_and_leaves_no_worker(tmp_path, fashion_mnist_available):
  out = tmp_path / "run"
  mark = uuid.uuid4().hex
  cmd = [
      sys.executable,
      "run.py",
      "--algorithm=feddst",
      "--dataset=fashion_mnist",
      "--sparsity=0.8",
      "--readjustment_ratio=0.05",
      "--rounds_between_readjustments=2",
      "--readjustment_end_round=3",
      "--rounds=3",
      "--total_clients=40",
      "--clients_per_round=5",
      "--local_epochs=1",
      "--eval_every=2",
      "--export_tflite",
      f"--output_dir={out}",
  ]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **{MARK: mark})
  proc = subprocess.run(
      cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  # One progress line per round.
  assert sum(line.startswith("round ") for line in proc.stdout.splitlines()) == 3

  config = json.loads((out / "config.json").read_text())
  assert config["algorithm"] == "feddst" and config["rounds"] == 3
  assert config["model"] == "mnist_cnn"

  with open(out / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  assert [int(r["round"]) for r in rows] == [1, 2, 3]
  for column in (
      "round", "clients_accuracy", "test_accuracy", "train_loss", "sparsity",
      "round_upload_bits", "round_download_bits", "cumulative_upload_bits",
      "cumulative_download_bits", "round_seconds",
  ):
    assert column in rows[0]
  # Evaluated every 2 rounds and on the last.
  assert [bool(r["test_accuracy"]) for r in rows] == [False, True, True]
  for r in rows:
    assert abs(float(r["sparsity"]) - 0.8) < 1e-3
  cumulative = 0
  for r in rows:
    cumulative += int(r["round_upload_bits"])
    assert int(r["cumulative_upload_bits"]) == cumulative
  # Rounds 1 and 3 are on the schedule but alpha_3 = 0 (R_end = 3): only round 1.
  assert int(rows[0]["clients_mask_uploaded"]) == 5
  assert int(rows[1]["clients_mask_uploaded"]) == 0
  assert int(rows[0]["round_upload_bits"]) > int(rows[1]["round_upload_bits"])

  summary = json.loads((out / "summary.json").read_text())
  assert summary["final_test_accuracy"] == pytest.approx(float(rows[-1]["test_accuracy"]))
  assert summary["cumulative_upload_bits"] == cumulative
  assert summary["wall_seconds"] > 0

  assert (out / "final_model.keras").stat().st_size > 0
  assert (out / "model.tflite").stat().st_size > 0
  report = json.loads((out / "tflite_report.json").read_text())
  assert report  # contents are checked by tests/test_tflite_export.py
  assert not list(out.glob("*.tmp*"))

  # The run stopped its TFF worker.
  assert _worker_pids(mark) == set()
