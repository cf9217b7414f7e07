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


def test_a_run_on_a_process_built_earlier_equals_one_on_a_fresh_build(
    tmp_path, fashion_mnist_available
):
  """`phases.build_algorithm` hands a second run with the same settings the
  process built for the first; it trains exactly as a freshly built one."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from tff_feddst import config as config_lib  # pylint: disable=g-import-not-at-top
  from tff_feddst import phases  # pylint: disable=g-import-not-at-top
  from tff_feddst import training  # pylint: disable=g-import-not-at-top

  def run(name):
    config = config_lib.ExperimentConfig(
        algorithm="feddst", total_clients=20, clients_per_round=3, local_epochs=1,
        rounds=1, eval_every=1, rounds_between_readjustments=1,
        readjustment_end_round=2, seed=6, output_dir=str(tmp_path / name),
    )
    training.run_experiment(config, log=lambda line: None)
    with open(tmp_path / name / "metrics.csv") as f:
      rows = [{k: v for k, v in r.items() if k != "round_seconds"} for r in csv.DictReader(f)]
    model = tf.keras.models.load_model(tmp_path / name / "final_model.keras")
    return rows, model.get_weights()

  phases.clear_built_cache()
  fresh = run("fresh")
  (key,) = phases._BUILT  # pylint: disable=protected-access
  built = phases._BUILT[key]  # pylint: disable=protected-access
  reused = run("reused")
  assert list(phases._BUILT) == [key] and phases._BUILT[key] is built  # pylint: disable=protected-access
  assert reused[0] == fresh[0]
  for a, b in zip(reused[1], fresh[1]):
    np.testing.assert_array_equal(a, b)


def test_the_build_key_holds_what_the_build_reads():
  import dataclasses  # pylint: disable=g-import-not-at-top
  import functools  # pylint: disable=g-import-not-at-top

  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  import keras_models  # pylint: disable=g-import-not-at-top
  from tff_feddst import algorithms  # pylint: disable=g-import-not-at-top
  from tff_feddst import phases  # pylint: disable=g-import-not-at-top

  def spec_of(shape):
    return {"x": tf.TensorSpec([None, *shape], tf.float32), "y": tf.TensorSpec([None], tf.int32)}

  def key(algorithm="feddst", config=algorithms.AlgorithmConfig(), model="mnist_cnn",
          shape=(28, 28, 1), classes=10, widths=None):
    keras_fn = functools.partial(keras_models.build_model, model, shape, classes, widths=widths)
    return phases._build_key(algorithms.get(algorithm), config, keras_fn, spec_of(shape))  # pylint: disable=protected-access

  base = key()
  assert key() == base
  assert hash(key(widths={"conv1": 4, "dense1": 20})) == hash(key(widths={"dense1": 20, "conv1": 4}))
  others = [
      key(algorithm="randommask"),
      key(config=dataclasses.replace(algorithms.AlgorithmConfig(), seed=1)),
      key(config=dataclasses.replace(algorithms.AlgorithmConfig(), readjustment_ratio=0.1)),
      key(config=dataclasses.replace(algorithms.AlgorithmConfig(), client_execution="cohort")),
      key(model="cifar10_cnn"),
      key(shape=(32, 32, 3)),
      key(classes=62),
      key(widths={"conv1": 4}),
  ]
  assert len({base, *others}) == 1 + len(others)
