"""run.py rejects bad settings before any training starts.

Every case runs `python run.py ...` as a subprocess and expects: a non-zero
exit status, a one-line style error that names the offending flag or
problem, no Python traceback on stderr, and nothing written into
--output_dir. These fail at flag parsing (or, for the data case, while the
data is loaded), so each takes about the import time.
"""

import os
import pathlib
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN_PY = REPO_ROOT / "run.py"

# (id, extra arguments, substrings of which at least one must be in stderr)
BAD_INPUTS = [
    ("sparsity_one", ["--sparsity=1.0"], ["sparsity"]),
    ("sparsity_negative", ["--sparsity=-0.1"], ["sparsity"]),
    ("readjustment_ratio_above_one", ["--readjustment_ratio=1.5"], ["readjustment_ratio"]),
    (
        "clients_per_round_above_total",
        ["--clients_per_round=50", "--total_clients=40"],
        ["clients_per_round"],
    ),
    ("rounds_zero", ["--rounds=0"], ["rounds"]),
    ("local_epochs_zero", ["--local_epochs=0"], ["local_epochs"]),
    ("batch_size_zero", ["--batch_size=0"], ["batch_size"]),
    ("client_lr_zero", ["--client_lr=0"], ["client_lr"]),
    ("client_momentum_two", ["--client_momentum=2"], ["client_momentum"]),
    ("server_lr_zero", ["--server_lr=0"], ["server_lr"]),
    ("server_momentum_negative", ["--server_momentum=-0.5"], ["server_momentum"]),
    ("dirichlet_beta_zero", ["--dirichlet_beta=0"], ["dirichlet_beta"]),
    ("algorithm_unknown", ["--algorithm=nope"], ["algorithm"]),
    ("dataset_unknown", ["--dataset=nope"], ["dataset"]),
    ("distribution_unknown", ["--sparsity_distribution=nope"], ["sparsity_distribution"]),
    (
        "natural_partition_on_fashion_mnist",
        ["--partition=natural", "--dataset=fashion_mnist"],
        ["partition"],
    ),
    (
        "float16_upload_with_fedavg",
        ["--upload_dtype=float16", "--algorithm=fedavg"],
        ["upload_dtype"],
    ),
    ("eval_every_zero", ["--eval_every=0"], ["eval_every"]),
    ("min_votes_zero", ["--min_votes=0"], ["min_votes"]),
    ("rounds_between_readjustments_zero", ["--rounds_between_readjustments=0"], ["rounds_between_readjustments"]),
    ("seed_negative", ["--seed=-1"], ["seed"]),
    ("total_clients_zero", ["--total_clients=0"], ["total_clients"]),
    ("unknown_flag", ["--no_such_flag=3"], ["no_such_flag"]),
    ("client_failure_rate_one", ["--client_failure_rate=1.0"], ["client_failure_rate"]),
    ("client_failure_rate_negative", ["--client_failure_rate=-0.2"], ["client_failure_rate"]),
    ("checkpoint_every_zero", ["--checkpoint_every=0"], ["checkpoint_every"]),
    (
        "structured_search_rounds_not_below_rounds",
        ["--algorithm=structured", "--rounds=10", "--structured_search_rounds=10"],
        ["structured_search_rounds"],
    ),
    ("structured_boundary_negative", ["--structured_boundary=-1"], ["structured_boundary"]),
    ("structured_relative_to_unknown", ["--structured_relative_to=median"], ["structured_relative_to"]),
    ("positional_argument", ["surplus_argument"], ["surplus_argument"]),
]


def _run(args, tmp_path, timeout=300):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run(
      [sys.executable, str(RUN_PY), *args],
      cwd=REPO_ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def _assert_rejected(result, out_dir, mentions):
  stderr = result.stderr
  assert result.returncode != 0, f"exit status 0\nstdout:\n{result.stdout}\nstderr:\n{stderr}"
  assert any(m in stderr for m in mentions), f"stderr names none of {mentions}:\n{stderr}"
  # Nothing was written: no training started.
  assert not (out_dir / "metrics.csv").exists()
  assert not out_dir.exists() or not any(out_dir.iterdir()), list(out_dir.iterdir())
  # Checked last so that the checks above are reported independently.
  assert "Traceback" not in stderr, f"traceback on stderr:\n{stderr}"


@pytest.mark.parametrize(
    "args, mentions", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_flag_is_rejected(args, mentions, tmp_path):
  out_dir = tmp_path / "out"
  result = _run([*args, f"--output_dir={out_dir}"], tmp_path)
  _assert_rejected(result, out_dir, mentions)


def test_missing_data_is_a_one_line_error(tmp_path):
  empty = tmp_path / "empty_data"
  empty.mkdir()
  out_dir = tmp_path / "out"
  result = _run(
      ["--dataset=mnist", f"--data_dir={empty}", f"--output_dir={out_dir}"], tmp_path
  )
  _assert_rejected(result, out_dir, [str(empty)])
  assert "MNIST" in result.stderr
  assert "error:" in result.stderr


def test_data_dir_that_does_not_exist(tmp_path):
  missing = tmp_path / "no_such_dir"
  out_dir = tmp_path / "out"
  result = _run(
      ["--dataset=mnist", f"--data_dir={missing}", f"--output_dir={out_dir}"], tmp_path
  )
  _assert_rejected(result, out_dir, [str(missing)])
