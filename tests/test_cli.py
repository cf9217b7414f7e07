"""run.py rejects bad settings before any training starts.

Every case runs `python run.py ...` and expects: a non-zero exit status, a
one-line style error that names the offending flag or problem, no Python
traceback on stderr, and nothing written into --output_dir. Flag errors run
as plain `python run.py` (0.1 s each); cases that get past the flags (a data
error, say) are forked from the run server (`tests/run_server.py`), which
makes run.py's imports once (each run alone would take TensorFlow's import
time, about 5 s); one test checks that a forked run gives what a plain
`python run.py` gives. Flag errors of every
command line answer before TensorFlow is imported (checked with
`python -X importtime`).
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

import run_server

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
    ("workers_not_host_port", ["--workers=localhost:8000,nohost"], ["workers", "nohost"]),
    (
        "structured_search_rounds_not_below_rounds",
        ["--algorithm=structured", "--rounds=10", "--structured_search_rounds=10"],
        ["structured_search_rounds"],
    ),
    ("structured_boundary_negative", ["--structured_boundary=-1"], ["structured_boundary"]),
    ("structured_relative_to_unknown", ["--structured_relative_to=median"], ["structured_relative_to"]),
    ("positional_argument", ["surplus_argument"], ["surplus_argument"]),
]


ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")


def _run(args, tmp_path=None, timeout=300):
  """`python run.py ARGS`, a process of its own."""
  return subprocess.run(
      [sys.executable, str(RUN_PY), *args],
      cwd=REPO_ROOT,
      env=ENV,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


def _run_all(cases: list[list[str]]) -> list[subprocess.CompletedProcess]:
  """`python run.py ARGS` for each ARGS, forked from the test process's run
  server (tests/run_server.py), as the suite's other runs are."""
  return [run_server.run(args, env=ENV, timeout=120) for args in cases]


def _assert_rejected(result, out_dir, mentions):
  stderr = result.stderr
  assert result.returncode != 0, f"exit status 0\nstdout:\n{result.stdout}\nstderr:\n{stderr}"
  assert any(m in stderr for m in mentions), f"stderr names none of {mentions}:\n{stderr}"
  # Nothing was written: no training started.
  assert not (out_dir / "metrics.csv").exists()
  assert not out_dir.exists() or not any(out_dir.iterdir()), list(out_dir.iterdir())
  # Checked last so that the checks above are reported independently.
  assert "Traceback" not in stderr, f"traceback on stderr:\n{stderr}"


@pytest.fixture(scope="module")
def rejected(tmp_path_factory):
  """{case id: (its result, its --output_dir)} for every case of BAD_INPUTS.

  Plain `python run.py` processes: a flag error answers before TensorFlow is
  imported, in about 0.1 s.
  """
  root = tmp_path_factory.mktemp("cli")
  out_dirs = {name: root / name / "out" for name, _, _ in BAD_INPUTS}
  return {
      name: (_run([*args, f"--output_dir={out_dirs[name]}"], timeout=60), out_dirs[name])
      for name, args, _ in BAD_INPUTS
  }


@pytest.mark.parametrize(
    "name, mentions", [(c[0], c[2]) for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_flag_is_rejected(name, mentions, rejected):
  result, out_dir = rejected[name]
  _assert_rejected(result, out_dir, mentions)


@pytest.fixture(scope="module")
def past_the_flags(tmp_path_factory):
  """Cases that fail after TensorFlow's import, all in one runner call.

  {case id: (result, its paths)}; the paths hold `empty` (an empty data
  directory), `missing` (none), `a_file` (a file) and `out` (an output prefix).
  """
  root = tmp_path_factory.mktemp("past_flags")
  paths = {"empty": root / "empty_data", "missing": root / "no_such_dir", "a_file": root / "a_file",
           "out": root / "out"}
  paths["empty"].mkdir()
  paths["a_file"].write_text("keep me")
  empty, missing, a_file, out = (str(paths[k]) for k in ("empty", "missing", "a_file", "out"))
  cases = {
      "mnist_empty": ["--dataset=mnist", f"--data_dir={empty}", f"--output_dir={out}1"],
      "mnist_missing": ["--dataset=mnist", f"--data_dir={missing}", f"--output_dir={out}2"],
      # Fashion-MNIST has built-in places, used only without --data_dir.
      "fashion_mnist_empty": ["--dataset=fashion_mnist", f"--data_dir={empty}", f"--output_dir={out}3"],
      "fashion_mnist_missing": ["--dataset=fashion_mnist", f"--data_dir={missing}", f"--output_dir={out}4"],
      "output_dir_is_a_file": [f"--output_dir={a_file}"],
      "output_dir_under_a_file": [f"--output_dir={a_file}/run"],
      # Flag errors too, to compare the runner with plain runs.
      **{name: [*args, f"--output_dir={out}_{name}"] for name, args, _ in BAD_INPUTS
         if name in ("sparsity_one", "unknown_flag", "positional_argument")},
  }
  results = dict(zip(cases, _run_all(list(cases.values()))))
  return {name: (results[name], cases[name]) for name in cases}, paths


def test_the_runner_gives_what_a_plain_run_gives(past_the_flags):
  """A range error (our ConfigError), a flag absl rejects, a usage error, and
  a data error (after TensorFlow's import: what the runner is used for)."""
  results, _ = past_the_flags
  for name in ("sparsity_one", "unknown_flag", "positional_argument", "mnist_missing"):
    got, args = results[name]
    plain = _run(args)
    assert (got.returncode, got.stdout, got.stderr) == (plain.returncode, plain.stdout, plain.stderr)
    assert got.returncode == 1 and got.stderr.strip(), name


def test_missing_data_is_a_one_line_error(past_the_flags):
  results, paths = past_the_flags
  empty, missing, out = paths["empty"], paths["missing"], paths["out"]
  _assert_rejected(results["mnist_empty"][0], pathlib.Path(f"{out}1"), [str(empty)])
  assert "MNIST" in results["mnist_empty"][0].stderr
  assert "error:" in results["mnist_empty"][0].stderr
  # A --data_dir that does not exist.
  _assert_rejected(results["mnist_missing"][0], pathlib.Path(f"{out}2"), [str(missing)])


def test_a_wrong_data_dir_or_output_dir_is_one_line(past_the_flags):
  results, paths = past_the_flags
  empty, missing, a_file, out = (paths[k] for k in ("empty", "missing", "a_file", "out"))
  names = ("fashion_mnist_empty", "fashion_mnist_missing", "output_dir_is_a_file",
           "output_dir_under_a_file")
  for name in names:
    result = results[name][0]
    assert result.returncode == 1, (name, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, result.stderr)
  stderr = {name: results[name][0].stderr for name in names}
  assert f"error: {empty} has none of the Fashion-MNIST IDX files" in stderr["fashion_mnist_empty"]
  assert f"error: {missing} is not a directory with" in stderr["fashion_mnist_missing"]
  for written in (pathlib.Path(f"{out}3"), pathlib.Path(f"{out}4")):
    assert not written.exists() or not any(written.iterdir())
  assert stderr["output_dir_is_a_file"].strip() == (
      f"error: --output_dir {a_file} is a file, not a directory"
  )
  assert stderr["output_dir_under_a_file"].strip() == (
      f"error: --output_dir {a_file / 'run'} cannot be created: Not a directory"
  )
  assert a_file.read_text() == "keep me"


# (command after `python`, substring of the one error line). None of these
# checks needs TensorFlow, so none may import it.
FAST_FLAG_ERRORS = [
    (["run.py", "--rounds=-1"], "error: --rounds=-1 must be >= 1"),
    (["run.py", "--algorithm=nope"], "flag --algorithm=nope: value should be one of"),
    (["run.py", "--model=nope"], "flag --model=nope: value should be one of"),
    (["run.py", "--workers=nohost"], "error: --workers=nohost: 'nohost' is not host:port"),
    (["run.py", "--algorithm=fedavg", "--upload_dtype=float16"], "error: --upload_dtype=float16"),
    (["run.py", "surplus"], "unexpected arguments: surplus"),
    (["-m", "tflite_export", "--test_examples=-5"], "error: --test_examples must be >= 0"),
    (["-m", "tflite_export", "--quantization=int4", "--checkpoint=c", "--output=o"],
     "error: unknown quantization 'int4'"),
    (["-m", "tflite_export", "--checkpoint=/no/such/model.keras", "--output=o"],
     "error: checkpoint not found: /no/such/model.keras"),
    (["-m", "benchmarks", "--rounds=0"], "flag --rounds=0"),
    (["-m", "benchmarks", "--algorithms=nope"], "error: unknown --algorithms nope"),
    (["-m", "benchmarks", "--ablations=beta"], "error: unknown --ablations beta; choose from alpha,"),
    (["-m", "benchmarks", "--round_figures=x"], "error: --round_figures must be integers, got x"),
    (["-m", "benchmarks", "--runs_dir=r"], "error: --runs_dir needs --report_only"),
    (["-m", "benchmarks", "--runs_csv=r.csv"], "error: --runs_csv needs --report_only"),
    (["-m", "benchmarks.speed", "--rounds=1"], "--rounds must be >= 2"),
]


@pytest.mark.parametrize("command, message", FAST_FLAG_ERRORS, ids=[" ".join(c[0]) for c in FAST_FLAG_ERRORS])
def test_a_flag_error_answers_before_tensorflow_is_imported(command, message, tmp_path):
  """`-X importtime` lists every module the command imported (on stderr)."""
  if command[0] == "run.py":
    command = [str(RUN_PY), *command[1:]]
  result = subprocess.run(
      [sys.executable, "-X", "importtime", *command],
      cwd=tmp_path, env=dict(ENV, PYTHONPATH=str(REPO_ROOT)), capture_output=True, text=True,
      timeout=120,
  )
  imported = re.findall(r"^import time:.*\|\s*([\w.]+)$", result.stderr, re.M)
  others = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
  assert result.returncode == 1, result.stderr[-2000:]
  assert any(message in line for line in others), others
  assert "Traceback" not in result.stderr
  assert "absl" in imported  # the listing is there
  heavy = sorted({m for m in imported if m.split(".")[0] in ("tensorflow", "tensorflow_federated", "keras")})
  assert not heavy, heavy[:5]
