"""Runs that survive: faults injected at every level, interrupts, resume.

- the server rejects non-finite and over-budget updates (hand-computed
  aggregates), and a NaN client changes nothing in a real round;
- failed clients and rounds with no update left (run_experiment);
- SIGKILL at a random round and resume gives the uninterrupted run's
  weights and metrics; SIGINT and SIGTERM end a run quickly, non-zero, with a
  checkpoint and no worker left;
- damaged checkpoints, metrics or data, and changed flags on resume, give
  one line and a non-zero exit status.
"""

import collections
import csv
import dataclasses
import functools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tff_feddst import aggregation
from tff_feddst import algorithms
from tff_feddst import compact_download
from tff_feddst import checkpoint
from tff_feddst import config as config_lib
from tff_feddst import data as data_lib
from tff_feddst import outputs
from tff_feddst import phases
from tff_feddst import remote
from tff_feddst import rounds
from tff_feddst import training

import run_server
from test_outputs import read_scalars

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMING_COLUMNS = ("round_seconds",)


# ------------------------------------------------ the server rejects updates


def _sparse_type(values, masks):
  return tff.types.tensorflow_to_type(
      collections.OrderedDict(
          values=[tf.TensorSpec(np.shape(v), tf.float32) for v in values],
          masks=[tf.TensorSpec(np.shape(m), tf.float32) for m in masks],
      )
  )


def test_sparse_server_rejects_nan_and_over_budget_updates():
  kernels = [
      [[1.0, 2.0, 0.0], [4.0, 0.0, 6.0]],  # 4 kept: over the budget of 3
      [[3.0, 0.0, 0.0], [0.0, 5.0, 9.0]],  # valid
      [[5.0, 7.0, 0.0], [0.0, 0.0, 3.0]],  # valid kernel, NaN bias
      [[2.0, 1.0, 0.0], [0.0, 0.0, 1.0]],  # valid
  ]
  masks = [
      [[1, 1, 0], [1, 0, 1]],
      [[1, 0, 0], [0, 1, 1]],
      [[1, 1, 0], [0, 0, 1]],
      [[1, 1, 0], [0, 0, 1]],
  ]
  biases = [[1.0, -1.0], [2.0, 0.0], [np.nan, 3.0], [4.0, 2.0]]
  weights = [10.0, 1.0, 5.0, 3.0]
  factory = aggregation.SparseVotingFactory(budgets={0: 3})
  process = factory.create(
      _sparse_type([kernels[0], biases[0]], [masks[0], 1.0]),
      tff.TensorType(np.float32),
  )
  clients = [
      collections.OrderedDict(
          values=[np.asarray(k, np.float32), np.asarray(b, np.float32)],
          masks=[np.asarray(m, np.float32), np.float32(1.0)],
      )
      for k, b, m in zip(kernels, biases, masks)
  ]
  out = process.next(process.initialize(), clients, weights)
  kernel, bias = out.result["values"]
  # Only clients 1 (weight 1) and 3 (weight 3) count.
  expected_kernel = [
      [(1 * 3 + 3 * 2) / 4, (3 * 1) / 3, 0.0],
      [0.0, 5.0, (1 * 9 + 3 * 1) / 4],
  ]
  np.testing.assert_allclose(kernel, expected_kernel, rtol=1e-6)
  np.testing.assert_allclose(bias, [(1 * 2 + 3 * 4) / 4, (0 + 3 * 2) / 4], rtol=1e-6)
  assert out.measurements["voting"]["rejected"] == 2
  # Vote shares are over the accepted weight only.
  np.testing.assert_allclose(out.result["masks"][0][0], [1.0, 0.75, 0.0], rtol=1e-6)


def test_sparse_server_with_every_update_rejected_gives_no_contribution():
  process = aggregation.SparseVotingFactory(budgets={0: 1}).create(
      _sparse_type([[1.0, 2.0]], [[1.0, 1.0]]), tff.TensorType(np.float32)
  )
  client = collections.OrderedDict(
      values=[np.asarray([1.0, 2.0], np.float32)],
      masks=[np.asarray([1.0, 1.0], np.float32)],
  )
  out = process.next(process.initialize(), [client, client], [1.0, 2.0])
  np.testing.assert_array_equal(out.result["values"][0], [0.0, 0.0])
  np.testing.assert_array_equal(out.result["masks"][0], [0.0, 0.0])
  assert out.measurements["voting"]["rejected"] == 2


def test_dense_server_rejects_non_finite_updates():
  value_type = tff.types.tensorflow_to_type(
      [tf.TensorSpec([3], tf.float32), tf.TensorSpec([], tf.float32)]
  )
  process = aggregation.ValidatingMeanFactory().create(
      value_type, tff.TensorType(np.float32)
  )
  clients = [
      [np.asarray([1.0, 2.0, 3.0], np.float32), np.float32(1.0)],
      [np.asarray([np.inf, 0.0, 0.0], np.float32), np.float32(5.0)],
      [np.asarray([3.0, 6.0, 9.0], np.float32), np.float32(np.nan)],
      [np.asarray([5.0, 2.0, 1.0], np.float32), np.float32(3.0)],
  ]
  out = process.next(process.initialize(), clients, [1.0, 4.0, 4.0, 3.0])
  np.testing.assert_allclose(out.result[0], [(1 + 15) / 4, (2 + 6) / 4, (3 + 3) / 4])
  np.testing.assert_allclose(out.result[1], (1 + 9) / 4)
  assert out.measurements["rejected"] == 2


def _tiny_keras():
  layers = tf.keras.layers
  return tf.keras.Sequential(
      [
          layers.InputLayer(input_shape=(6, 6, 1)),
          layers.Conv2D(3, 3, activation="relu", name="conv"),
          layers.Flatten(),
          layers.Dense(3, name="logits"),
      ]
  )


def _tiny_datasets(poisoned: int | None):
  rng = np.random.default_rng(5)
  out = []
  for c in range(3):
    x = rng.random((12 + 4 * c, 6, 6, 1), dtype=np.float32)
    y = rng.integers(0, 3, len(x)).astype(np.int32)
    if c == poisoned:
      x[0, 0, 0, 0] = np.nan  # a faulty sensor: the client's update goes NaN
    ds = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y))
    out.append(ds.batch(4))
  return out


@pytest.mark.parametrize("algorithm", ["fedavg", "randommask"])
def test_a_nan_client_is_rejected_and_changes_nothing(algorithm):
  spec = collections.OrderedDict(
      x=tf.TensorSpec([None, 6, 6, 1], tf.float32), y=tf.TensorSpec([None], tf.int32)
  )
  config = algorithms.AlgorithmConfig(
      algorithm=algorithm, local_epochs=1, sparsity=0.5 if algorithm != "fedavg" else 0.0
  )
  built = algorithms.get(algorithm).build(config, _tiny_keras, spec)
  state = built.process.initialize()
  state = built.process.set_model_weights(state, built.initial_weights)
  def inputs(datasets):  # RandomMask per client: compact downloads
    if not built.compact_download:
      return datasets
    return [compact_download.client_data(d, None, built.layout) for d in datasets]

  with_nan = built.process.next(state, inputs(_tiny_datasets(poisoned=1)))
  clean = _tiny_datasets(poisoned=None)
  without = built.process.next(state, inputs([clean[0], clean[2]]))
  # Per client, RandomMask's compact uploads are summed by
  # `compact_voting.CompactVotingFactory`, which reports `rejected` as
  # FedAvg's validating mean does.
  assert with_nan.metrics["aggregator"]["rejected"] == 1
  a = built.process.get_model_weights(with_nan.state).trainable
  b = built.process.get_model_weights(without.state).trainable
  for x, y, w0 in zip(a, b, built.initial_weights.trainable):
    assert np.all(np.isfinite(x))
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert any(not np.allclose(x, w0) for x, w0 in zip(a, built.initial_weights.trainable))


# ---------------------------------------- failed clients and skipped rounds


def _tiny_config(out_dir, data_dir, **overrides):
  """`data_dir`: the first Fashion-MNIST images (conftest.small_fashion_mnist)."""
  values = dict(
      data_dir=data_dir,
      algorithm="feddst",
      dataset="fashion_mnist",
      total_clients=20,
      clients_per_round=3,
      local_epochs=1,
      rounds=3,
      eval_every=1,
      rounds_between_readjustments=1,
      readjustment_end_round=4,
      checkpoint_every=1,
      output_dir=str(out_dir),
  )
  values.update(overrides)
  return config_lib.ExperimentConfig(**values)


def _rows(out_dir):
  with open(os.path.join(out_dir, "metrics.csv"), newline="") as f:
    return list(csv.DictReader(f))


def _failures(seed, round_num, clients, rate):
  rng = np.random.default_rng(rounds.seed(seed, 5, round_num))
  return rng.random(clients) < rate


def _seed_with_pattern(rate, clients):
  """A seed whose round 2 keeps some clients and whose round 3 keeps none."""
  for seed in range(1000):
    if (not _failures(seed, 2, clients, rate).all()) and _failures(seed, 3, clients, rate).all():
      return seed
  raise AssertionError("no such seed")


def test_failed_clients_upload_nothing_and_an_empty_round_is_skipped(
    tmp_path, small_fashion_mnist
):
  rate, clients = 0.6, 3
  seed = _seed_with_pattern(rate, clients)
  config = _tiny_config(
      tmp_path / "run", small_fashion_mnist, client_failure_rate=rate, clients_per_round=clients, seed=seed
  )
  lines = []
  training.run_experiment(config, log=lines.append)
  rows = _rows(config.output_dir)
  ckpts = checkpoint.RunCheckpoints(os.path.join(config.output_dir, "checkpoints"))
  for row in rows:
    r = int(row["round"])
    failed = _failures(seed, r, clients, rate)
    assert int(row["failed_clients"]) == failed.sum()
    survivors = clients - failed.sum()
    assert int(row["round_skipped"]) == int(survivors == 0)
    if survivors == 0:
      assert int(row["round_upload_bits"]) == 0
      assert np.isnan(float(row["train_loss"]))
    else:
      assert int(row["round_upload_bits"]) > 0
    # Every sampled client downloaded the model, failed or not.
    assert int(row["round_download_bits"]) > 0
  assert int(rows[2]["round_skipped"]) == 1
  assert rows[2]["clients_accuracy"] == rows[1]["clients_accuracy"]
  # Round 3 kept round 2's weights, and its round counter still advanced.
  spec = collections.OrderedDict(
      x=tf.TensorSpec([None, 28, 28, 1], tf.float32), y=tf.TensorSpec([None], tf.int32)
  )
  import keras_models  # pylint: disable=g-import-not-at-top

  # The run's own process (built with these arguments, so kept by `phases`).
  kept = len(phases._BUILT)  # pylint: disable=protected-access
  built = phases.build_algorithm(
      algorithms.get(config.algorithm),
      config.resolve().algorithm_config(),
      functools.partial(keras_models.build_model, "mnist_cnn", (28, 28, 1), 10, widths=None),
      spec,
  )
  assert len(phases._BUILT) == kept  # pylint: disable=protected-access
  template = built.process.initialize()
  r2 = ckpts.restore(2, template).state
  r3 = ckpts.restore(3, template).state
  for a, b in zip(
      built.process.get_model_weights(r2).trainable,
      built.process.get_model_weights(r3).trainable,
  ):
    np.testing.assert_array_equal(a, b)
  assert int(r3.client_work["round_num"]) == int(r2.client_work["round_num"]) + 1 == 4
  assert any("skipped" in line for line in lines)


# ------------------------------------------------ kill, interrupt, resume

CLI_ARGS = [
    "--algorithm=feddst",
    "--total_clients=20",
    "--clients_per_round=3",
    "--local_epochs=1",
    "--rounds=6",
    "--eval_every=2",
    "--rounds_between_readjustments=1",
    "--readjustment_end_round=4",
    "--checkpoint_every=1",
    "--seed=4",
]


def _cli_config(out_dir, data_dir):
  return _tiny_config(out_dir, data_dir, rounds=6, eval_every=2, seed=4)


def _start(out_dir, data_dir, extra=()):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  return run_server.start(
      [*CLI_ARGS, f"--data_dir={data_dir}", *extra, f"--output_dir={out_dir}"], env=env
  )


def _wait_for_rows(out_dir, proc, count, timeout=600):
  deadline = time.time() + timeout
  path = os.path.join(out_dir, "metrics.csv")
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()
    if os.path.exists(path):
      with open(path) as f:
        if sum(1 for _ in f) - 1 >= count:
          return
    time.sleep(0.05)
  raise AssertionError(f"no {count} rows within {timeout} s")


def _descendants(pid):
  try:
    return psutil.Process(pid).children(recursive=True)
  except psutil.NoSuchProcess:
    return []


def _assert_gone(procs, timeout=10):
  _, alive = psutil.wait_procs(procs, timeout=timeout)
  alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
  assert not alive, [p.cmdline() for p in alive]


def _comparable(rows):
  return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]


def _final_weights(out_dir):
  model = tf.keras.models.load_model(os.path.join(out_dir, "final_model.keras"))
  return model.get_weights()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_fashion_mnist):
  out = tmp_path_factory.mktemp("uninterrupted")
  training.run_experiment(_cli_config(out, small_fashion_mnist), log=lambda line: None)
  return out


def test_sigkill_at_a_random_round_then_resume_is_identical(
    tmp_path, uninterrupted, small_fashion_mnist
):
  kill_after = int(np.random.default_rng(2024).integers(2, 5))  # rows written
  out = tmp_path / "killed"
  proc = _start(out, small_fashion_mnist)
  _wait_for_rows(out, proc, kill_after)
  children = _descendants(proc.pid)
  assert any(c.name() == "worker_binary" for c in children)
  proc.kill()
  proc.communicate()
  # The kernel stops the TFF worker of a killed run too.
  _assert_gone(children)
  resumed_from = checkpoint.RunCheckpoints(str(out / "checkpoints")).latest_round()
  assert resumed_from is not None and kill_after - 1 <= resumed_from <= kill_after
  # The killed run's lock file is left behind; the rerun takes it over.
  assert (out / outputs.LOCK_FILE).read_text().strip() == str(proc.pid)

  # The rerun (in this process: what run.py does after its flags).
  lines = []
  training.run_experiment(_cli_config(out, small_fashion_mnist), log=lines.append)
  assert f"resumed from {out / 'checkpoints'} at round {resumed_from}" in "\n".join(lines)

  rows = _rows(out)
  assert [int(r["round"]) for r in rows] == list(range(1, 7))  # no duplicates
  assert _comparable(rows) == _comparable(_rows(uninterrupted))
  assert not (out / outputs.LOCK_FILE).exists()
  # TensorBoard has every round once, the rounds run twice included.
  scalars = read_scalars(out / outputs.TENSORBOARD_DIR)
  for column in ("cumulative_upload_bits", "train_loss", "sparsity"):
    assert [step for step, _ in scalars[column]] == list(range(1, 7))
    for step, value in scalars[column]:
      assert value == pytest.approx(float(rows[step - 1][column]), rel=1e-6)
  for a, b in zip(_final_weights(out), _final_weights(uninterrupted)):
    np.testing.assert_array_equal(a, b)

  # Rerunning a finished run does nothing.
  lines = []
  training.run_experiment(_cli_config(out, small_fashion_mnist), log=lines.append)
  assert any("nothing to do" in line for line in lines), lines
  assert len(_rows(out)) == 6


# A coroutine as TFF's release managers run them: a step on the loop's thread
# pool, and then (the timing that broke runs) Ctrl-C arrives just as it ends.
_INTERRUPTED_AS_IT_ENDS = """
import asyncio, signal, sys, time
from tff_feddst import runtime

async def release(interrupt_at_end):
  loop = asyncio.get_running_loop()
  await loop.run_in_executor(None, time.sleep, 0)
  if interrupt_at_end:
    loop.call_soon(signal.raise_signal, signal.SIGINT)
  return 7

def outcome(run):
  try:
    return f"returned {run(release(True))}"
  except KeyboardInterrupt:
    return "KeyboardInterrupt"
  except BaseException as e:
    return f"{type(e).__name__}: {e}"

handler = signal.getsignal(signal.SIGINT)
print(outcome(asyncio.run))
print(outcome(runtime.run_coroutine))
print(runtime.run_coroutine(release(False)), signal.getsignal(signal.SIGINT) is handler)
"""


def test_an_interrupt_as_a_release_ends_is_a_keyboard_interrupt():
  """`runtime.run_coroutine` (metrics and checkpoints) passes on Ctrl-C as
  KeyboardInterrupt even when it lands as the coroutine ends, where
  `asyncio.run` raised a RuntimeError from its shutdown (a run then stopped
  with a traceback: test_interrupt_stops_quickly... failed now and then);
  the next call runs on a new loop, and the SIGINT handler is untouched."""
  result = subprocess.run(
      [sys.executable, "-c", _INTERRUPTED_AS_IT_ENDS], cwd=ROOT, capture_output=True,
      text=True, timeout=60, check=True,
  )
  lines = result.stdout.splitlines()
  assert lines[0] == "RuntimeError: Event loop stopped before Future completed.", lines
  assert lines[1:] == ["KeyboardInterrupt", "7 True"], result.stdout + result.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_stops_quickly_keeps_a_checkpoint_and_no_worker(tmp_path, signum, small_fashion_mnist):
  out = tmp_path / "interrupted"
  proc = _start(out, small_fashion_mnist)
  _wait_for_rows(out, proc, 2)
  children = _descendants(proc.pid)
  sent = time.time()
  proc.send_signal(signum)
  _, stderr = proc.communicate(timeout=60)
  elapsed = time.time() - sent
  assert proc.returncode != 0
  assert elapsed < 30, f"took {elapsed:.1f} s to stop"
  assert "resume" in stderr and "Traceback" not in stderr, stderr[-2000:]
  _assert_gone(children)
  latest = checkpoint.RunCheckpoints(str(out / "checkpoints")).latest_round()
  assert latest is not None and latest >= 1
  assert not (out / "summary.json").exists()


# ------------------------------------------ damaged inputs: one line, exit 1


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, small_fashion_mnist):
  out = tmp_path_factory.mktemp("finished") / "run"
  training.run_experiment(
      _tiny_config(out, small_fashion_mnist, rounds=2, seed=4), log=lambda line: None
  )
  return out


def _cli(out_dir, data_dir, *extra):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  args = [a for a in CLI_ARGS if not a.startswith(("--rounds=", "--eval_every="))]
  return run_server.run(
      [*args, "--eval_every=1", f"--data_dir={data_dir}", *extra, f"--output_dir={out_dir}"],
      env=env, timeout=600,
  )


def _damaged_copy(finished_run, tmp_path, damage):
  out = tmp_path / "run"
  shutil.copytree(finished_run, out)
  damage(out)
  return out


def _corrupt_checkpoint(out):
  variables = out / "checkpoints" / "round_2" / "variables"
  for f in variables.iterdir():
    if f.name.startswith("variables.data"):
      f.write_bytes(b"\0garbage" * 10)


def _truncate_index(out):
  for f in (out / "checkpoints" / "round_2").rglob("*.index"):
    f.write_bytes(f.read_bytes()[:20])


# (id, damage, changed settings of the rerun, substrings of its error)
DAMAGE = [
    ("corrupt_checkpoint", _corrupt_checkpoint, {}, ["cannot be read"]),
    ("truncated_checkpoint", _truncate_index, {}, ["cannot be read"]),
    ("missing_metrics", lambda o: (o / "metrics.csv").unlink(), {}, ["metrics.csv"]),
    (
        "truncated_metrics",
        lambda o: (o / "metrics.csv").write_text((o / "metrics.csv").read_text()[:200]),
        {},
        ["metrics.csv"],
    ),
    ("corrupt_config", lambda o: (o / "config.json").write_text("{"), {}, ["config.json"]),
    ("changed_sparsity", lambda o: None, {"sparsity": 0.5}, ["--sparsity=0.5"]),
    ("changed_algorithm", lambda o: None, {"algorithm": "randommask"}, ["--algorithm=randommask"]),
    ("changed_failure_rate", lambda o: None, {"client_failure_rate": 0.1}, ["client_failure_rate"]),
    ("rounds_below_checkpoint", lambda o: None, {"rounds": 1}, ["past --rounds=1"]),
]
# What run.py turns into one `error:` line (tests/test_cli.py checks it does).
ONE_LINE_ERRORS = (
    config_lib.ConfigError, data_lib.DataError, checkpoint.CheckpointError, remote.WorkerError,
)


def _file_list(out):
  return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


@pytest.mark.parametrize(
    "damage, changes, mentions", [d[1:] for d in DAMAGE], ids=[d[0] for d in DAMAGE]
)
def test_damaged_or_mismatched_resume_is_one_line(
    finished_run, tmp_path, monkeypatch, damage, changes, mentions, small_fashion_mnist
):
  """In this process: the rerun raises one of the errors run.py prints as
  one line, before it builds the learning process."""
  out = _damaged_copy(finished_run, tmp_path, damage)
  before = _file_list(out)
  config = _tiny_config(out, small_fashion_mnist, **{"rounds": 3, "seed": 4, **changes})

  def not_before_the_checks(*args, **kwargs):
    raise AssertionError("the process was built before the resume checks")

  monkeypatch.setattr(phases, "build_phase", not_before_the_checks)
  with pytest.raises(ONE_LINE_ERRORS) as raised:
    training.run_experiment(config, log=lambda line: None)
  message = str(raised.value)
  assert any(m in message for m in mentions), message
  assert "\n" not in message, message
  # Nothing was trained or overwritten.
  assert _file_list(out) == before


def test_a_damaged_checkpoint_is_one_line_from_the_command_line(
    finished_run, tmp_path, small_fashion_mnist
):
  out = _damaged_copy(finished_run, tmp_path, _corrupt_checkpoint)
  before = _file_list(out)
  result = _cli(out, small_fashion_mnist, "--rounds=3")
  assert result.returncode == 1, result.stdout[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "cannot be read" in lines[0], lines
  assert _file_list(out) == before


def test_truncated_data_file_is_one_line(tmp_path, small_fashion_mnist):
  source = pathlib.Path(small_fashion_mnist)
  data_dir = tmp_path / "data"
  shutil.copytree(source, data_dir)
  images = next(data_dir.glob("train-images*"))
  images.write_bytes(images.read_bytes()[: images.stat().st_size // 2])
  result = _cli(tmp_path / "out", data_dir, "--rounds=1")
  assert result.returncode != 0
  assert "error:" in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert not (tmp_path / "out" / "metrics.csv").exists()


def test_more_rounds_on_resume_keep_the_recorded_readjustment_end(tmp_path, small_fashion_mnist):
  """R_end defaults to half the rounds; growing --rounds on resume keeps the
  R_end the run started with (config.json), and an explicit other one is refused."""
  out = tmp_path / "run"
  first = _tiny_config(out, small_fashion_mnist, rounds=2, readjustment_end_round=None, eval_every=2)
  training.run_experiment(first, log=lambda line: None)
  saved = json.loads((out / "config.json").read_text())
  assert saved["readjustment_end_round"] == 1
  longer = dataclasses.replace(first, rounds=4)
  training.run_experiment(longer, log=lambda line: None)
  saved = json.loads((out / "config.json").read_text())
  assert saved["rounds"] == 4 and saved["readjustment_end_round"] == 1
  assert [int(r["round"]) for r in _rows(out)] == [1, 2, 3, 4]
  with pytest.raises(config_lib.ConfigError, match=r"readjustment end round 3 \(was 1"):
    training.run_experiment(
        dataclasses.replace(longer, rounds=6, readjustment_end_round=3), log=lambda line: None
    )
