"""The driver's numbers do not move when its code is reshaped.

`tests/golden/*.csv` are the `metrics.csv` files of three small runs
(3 rounds of FedDST with readjustment every round and client failures,
3 rounds of FedAvg, 4 rounds of structured_feddst across both phases),
recorded with the commands below before the driver was rewritten. The same
commands must give the same values in every column but `round_seconds`.
They were recorded with TensorFlow's default CPU kernels and per-client
execution, so they run that way (oneDNN kernels round differently).
"""

import csv
import math
import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
GOLDEN_DIR = pathlib.Path(__file__).resolve().parent / "golden"
COMMON = [
    "--total_clients=40", "--clients_per_round=5", "--local_epochs=3",
    "--eval_every=1", "--seed=3", "--client_lr=0.02",
]
RUNS = {
    "feddst": [
        "--algorithm=feddst", "--rounds=3", "--readjustment_ratio=0.2",
        "--rounds_between_readjustments=1", "--readjustment_end_round=3",
        "--client_failure_rate=0.3",
    ],
    "fedavg": ["--algorithm=fedavg", "--rounds=3"],
    "structured_feddst": [
        "--algorithm=structured_feddst", "--rounds=4", "--structured_search_rounds=2",
        "--readjustment_ratio=0.2", "--rounds_between_readjustments=1",
    ],
}
TIMING_COLUMNS = {"round_seconds"}
ENV = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0")


def _rows(path):
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


def _same(a: str, b: str) -> bool:
  if a == b:
    return True
  try:
    x, y = float(a), float(b)
  except ValueError:
    return False
  return x == y or (math.isnan(x) and math.isnan(y))


@pytest.mark.parametrize("name", sorted(RUNS))
def test_metrics_equal_the_recorded_ones(name, tmp_path, fashion_mnist_available):
  out = tmp_path / name
  result = subprocess.run(
      [sys.executable, str(REPO_ROOT / "run.py"), *RUNS[name], *COMMON,
       "--client_execution=per_client", f"--output_dir={out}"],
      cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  want_columns, want = _rows(GOLDEN_DIR / f"{name}.csv")
  got_columns, got = _rows(out / "metrics.csv")
  assert got_columns == want_columns
  assert len(got) == len(want)
  for want_row, got_row in zip(want, got):
    for column in want_columns:
      if column in TIMING_COLUMNS:
        continue
      assert _same(got_row[column], want_row[column]), (
          f"round {want_row['round']} {column}: {got_row[column]} != {want_row[column]}"
      )
