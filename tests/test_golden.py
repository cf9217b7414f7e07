"""The driver's numbers do not move when its code is reshaped.

`tests/golden/*.csv` are the `metrics.csv` files of three small runs
(3 rounds of FedDST with readjustment every round and client failures,
3 rounds of FedAvg, 4 rounds of structured_feddst across both phases),
recorded with the commands below before the driver was rewritten. They were
recorded with TensorFlow's default CPU kernels and per-client execution, so
they run that way (`TF_ENABLE_ONEDNN_OPTS=0`).

Every column that counts (bits, FLOPs, sparsity, clients, readjustments,
skipped rounds) must be equal. The bit columns were updated once since:
when mask messages became bytes (10 bits of padding per mask on the MNIST
network, 7 on structured_feddst's found network), each round's bits grew
by exactly the padding times the masks it sent, and FedDST's uploads and
downloads are now measured on its compact messages (docs/algorithms.md
section 6.1). The measured floats (loss, accuracies) come
from kernels that pick their code path by the processor's instruction set
(the matrix products go through oneDNN's sgemm even with oneDNN's ops off),
and different paths add in another order. So they compare within
tolerances by round, set at about 10 times the largest gap measured across
three instruction sets: the machine that recorded the goldens, an AVX-only
EPYC, and the same EPYC under `ONEDNN_MAX_CPU_ISA=SSE41`:

    round                      1        2        3        4
    train_loss (relative)   2.2e-5   1.7e-3   6.1e-3   9.5e-5
    test/clients accuracy    3e-4     1e-4     1e-3      0
    train_accuracy            0      3.3e-3   3.3e-3     0

Training amplifies the last-bit differences, round after round, so the
tolerances grow with the round; round 1 (tight) is where a change to the
training shows first. Small changes to the algorithm each break the test
(docs/testing.md lists the mutations tried).
"""

import csv
import math
import os
import pathlib

import pytest

import run_server

# Compares training results within tolerances: also run under another
# instruction set (`make test`; see the marker in pyproject.toml).
pytestmark = pytest.mark.portability

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
LOSS_COLUMNS = {"train_loss"}
ACCURACY_COLUMNS = {"clients_accuracy", "test_accuracy", "train_accuracy"}
# Per run, the tolerance of the measured floats in rounds 1, 2, ... (the last
# one for later rounds): relative for the loss, absolute for the accuracies
# (one test example in 10,000 is 1e-4; one training example of a round's 600
# is 1.7e-3). Each is about 10 times the largest gap measured (docstring);
# FedDST's sparse runs drift far less than FedAvg's dense ones, so its
# tolerances are tighter and catch a change to its masks.
TOLERANCES = {
    # measured: loss 0, 1.0e-6, 8.0e-7; accuracies equal
    "feddst": dict(loss=(2e-5,), accuracy=(2e-3,)),
    # measured: loss 2.2e-5, 1.7e-3, 6.1e-3; accuracy 3e-4, 0, 3.3e-3
    "fedavg": dict(loss=(2e-4, 2e-2, 5e-2), accuracy=(3e-3, 2e-2)),
    # measured: loss 2.2e-5, 2.9e-4, 1.0e-4, 9.5e-5; accuracy 0, 3.3e-3, 1.7e-3, 0
    "structured_feddst": dict(loss=(2e-4, 3e-3, 1e-3), accuracy=(3e-3, 2e-2)),
}
ENV = dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0")


def _rows(path):
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


def _same(a: str, b: str, rel_tol: float = 0.0, abs_tol: float = 0.0) -> bool:
  if a == b:
    return True
  try:
    x, y = float(a), float(b)
  except ValueError:
    return False
  if math.isnan(x) or math.isnan(y):
    return math.isnan(x) and math.isnan(y)
  return math.isclose(x, y, rel_tol=rel_tol, abs_tol=abs_tol)


def _tolerance(name: str, column: str, round_num: int) -> tuple[float, float]:
  """(relative, absolute) tolerance of `column` in round `round_num` of run `name`."""
  kind = "loss" if column in LOSS_COLUMNS else "accuracy" if column in ACCURACY_COLUMNS else None
  if kind is None:
    return 0.0, 0.0
  table = TOLERANCES[name][kind]
  tol = table[min(round_num, len(table)) - 1]
  return (tol, 0.0) if kind == "loss" else (0.0, tol)


def mismatches(name: str, got_csv, want_csv) -> list[str]:
  """What differs between two metrics.csv files beyond the tolerances."""
  want_columns, want = _rows(want_csv)
  got_columns, got = _rows(got_csv)
  if got_columns != want_columns or len(got) != len(want):
    return [f"columns {got_columns} x {len(got)} rows != {want_columns} x {len(want)} rows"]
  found = []
  for want_row, got_row in zip(want, got):
    for column in want_columns:
      if column in TIMING_COLUMNS:
        continue
      rel_tol, abs_tol = _tolerance(name, column, int(want_row["round"]))
      if not _same(got_row[column], want_row[column], rel_tol, abs_tol):
        found.append(f"round {want_row['round']} {column}: {got_row[column]} != {want_row[column]}")
  return found


@pytest.mark.parametrize("name", sorted(RUNS))
def test_metrics_equal_the_recorded_ones(name, tmp_path, fashion_mnist_available):
  out = tmp_path / name
  result = run_server.run(
      [*RUNS[name], *COMMON, "--client_execution=per_client", f"--output_dir={out}"],
      env=ENV, timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert not mismatches(name, out / "metrics.csv", GOLDEN_DIR / f"{name}.csv")


def test_the_tolerances_accept_drift_and_reject_a_changed_value():
  """The comparison itself, on rows written here."""
  import tempfile  # pylint: disable=g-import-not-at-top

  header = ["round", "train_loss", "test_accuracy", "round_upload_bits", "round_seconds"]

  def csv_file(directory, rows):
    path = pathlib.Path(directory) / f"{len(list(pathlib.Path(directory).iterdir()))}.csv"
    with open(path, "w", newline="") as f:
      csv.writer(f).writerows([header, *rows])
    return path

  with tempfile.TemporaryDirectory() as d:
    want = csv_file(d, [[1, 2.0, 0.5, 100, 1.0], [2, 1.5, 0.6, 100, 1.0]])
    drift = csv_file(d, [[1, 2.0001, 0.5001, 100, 9.0], [2, 1.51, 0.61, 100, 2.0]])
    assert mismatches("fedavg", drift, want) == []
    assert mismatches("feddst", drift, want) == [
        "round 1 train_loss: 2.0001 != 2.0", "round 2 train_loss: 1.51 != 1.5",
        "round 2 test_accuracy: 0.61 != 0.6",
    ]
    bits = csv_file(d, [[1, 2.0, 0.5, 101, 1.0], [2, 1.5, 0.6, 100, 1.0]])
    assert mismatches("fedavg", bits, want) == ["round 1 round_upload_bits: 101 != 100"]
    loss = csv_file(d, [[1, 2.001, 0.5, 100, 1.0], [2, 1.5, 0.6, 100, 1.0]])
    assert mismatches("fedavg", loss, want) == ["round 1 train_loss: 2.001 != 2.0"]
