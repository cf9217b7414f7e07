"""A run's outputs: metrics through TFF release managers, and the directory lock."""

import csv
import fractions
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from tff_feddst import config as config_lib
from tff_feddst import outputs
from tff_feddst import phases
from tff_feddst import training
from tff_feddst.rounds import METRIC_COLUMNS
from tflite_export import evaluate as tfl_evaluate

import run_server

ROOT = pathlib.Path(__file__).resolve().parent.parent


def read_scalars(tensorboard_dir) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} of every scalar in the event files."""
  accumulator = event_accumulator.EventAccumulator(
      str(tensorboard_dir), size_guidance={event_accumulator.TENSORS: 0}
  )
  accumulator.Reload()
  scalars = {}
  for tag in accumulator.Tags()["tensors"]:
    scalars[tag] = [
        (event.step, float(tf.make_ndarray(event.tensor_proto)))
        for event in accumulator.Tensors(tag)
    ]
  return scalars


def _rows(out_dir):
  with open(os.path.join(out_dir, "metrics.csv"), newline="") as f:
    return list(csv.DictReader(f))


def test_tensorboard_holds_every_numeric_column_at_its_round(tmp_path, small_fashion_mnist):
  config = config_lib.ExperimentConfig(
      data_dir=small_fashion_mnist,  # the first Fashion-MNIST images (conftest)
      algorithm="feddst", total_clients=20, clients_per_round=3, local_epochs=1,
      rounds=3, eval_every=2, output_dir=str(tmp_path / "run"),
  )
  training.run_experiment(config, log=lambda line: None)
  rows = _rows(config.output_dir)
  scalars = read_scalars(tmp_path / "run" / outputs.TENSORBOARD_DIR)
  # Evaluated in rounds 2 (eval_every) and 3 (the last) only.
  assert [step for step, _ in scalars["clients_accuracy"]] == [2, 3]
  for step, value in scalars["clients_accuracy"]:
    assert value == pytest.approx(float(rows[step - 1]["clients_accuracy"]), rel=1e-6)
  for column in ("cumulative_upload_bits", "sparsity", "train_loss", "round_upload_bits"):
    assert [step for step, _ in scalars[column]] == [1, 2, 3], column
    for step, value in scalars[column]:
      assert value == pytest.approx(float(rows[step - 1][column]), rel=1e-6), column
  assert scalars["sparsity"][0][1] == pytest.approx(0.8, abs=1e-4)
  # Every metrics.csv column but the key is a scalar.
  assert set(scalars) == set(rows[0]) - {"round"}


def _released(out_dir, rows, resume_round):
  """Releases `rows` through a MetricsReleaser of a run resumed at `resume_round`."""
  columns = tuple(rows[0])
  releaser = outputs.MetricsReleaser(
      str(out_dir), lambda line: None, 9, resume_round, lambda: "", columns
  )
  for row in rows:
    releaser.release(row)


def test_a_resumed_run_has_each_round_once_in_tensorboard(tmp_path):
  """Rounds 3-4 ran, the run was killed after its checkpoint at round 2,
  and the rerun releases rounds 3-4 again: TensorBoard holds each round
  once, with the rerun's values (there: other seconds), and keeps the
  evaluation columns only where they were released."""
  def row(r, seconds):
    values = dict.fromkeys(METRIC_COLUMNS, 0)
    accuracy = 0.5 + r / 100 if r % 2 == 0 else ""
    values.update(
        round=r, clients_accuracy=accuracy, test_accuracy=accuracy, train_loss=0.25,
        round_upload_bits=1000 * r, round_seconds=seconds,
    )
    return values

  _released(tmp_path, [row(r, 1.0) for r in range(1, 5)], None)
  _released(tmp_path, [row(r, 2.0) for r in range(3, 6)], 2)
  scalars = read_scalars(tmp_path / outputs.TENSORBOARD_DIR)
  assert scalars["round_seconds"] == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0), (5, 2.0)]
  assert scalars["round_upload_bits"] == [(r, 1000.0 * r) for r in range(1, 6)]
  assert [s for s, _ in scalars["clients_accuracy"]] == [2, 4]
  assert scalars["clients_accuracy"][0][1] == pytest.approx(0.52)
  assert [int(r["round"]) for r in _rows(tmp_path)] == [1, 2, 3, 4, 5]


def test_clients_accuracy_is_the_exact_mean_rounded_once():
  """400 clients of 25 test images: the mean is k / 10000, so its float is
  the one nearest to it (a float mean of the 400 ratios often is not)."""
  rng = np.random.default_rng(0)
  hits = rng.random(400 * 25) < 0.4
  indices = [np.arange(25 * c, 25 * (c + 1)) for c in range(400)]
  exact = float(fractions.Fraction(int(hits.sum()), hits.size))
  evaluator = object.__new__(phases.Evaluator)
  evaluator.client_indices = indices
  evaluator.correct = lambda weights: hits
  assert evaluator.evaluate(None)["clients_accuracy"] == exact
  labels = np.zeros(hits.size, dtype=np.int64)
  predictions = np.where(hits, 0, 1)
  assert tfl_evaluate.mean_client_accuracy(predictions, labels, indices) == exact
  # A client without test images does not count.
  assert tfl_evaluate.mean_client_accuracy(predictions, labels, indices + [np.arange(0)]) == exact


# ------------------------------------------------------------------ the lock

_HOLDER = textwrap.dedent("""
    import sys, time
    from tff_feddst import outputs
    outputs.RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def _hold_lock(directory):
  proc = subprocess.Popen(
      [sys.executable, "-c", _HOLDER, str(directory)], cwd=ROOT,
      stdout=subprocess.PIPE, text=True,
  )
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_a_held_lock_is_refused_naming_the_directory_and_process(tmp_path):
  holder = _hold_lock(tmp_path)
  try:
    with pytest.raises(config_lib.ConfigError) as raised:
      outputs.RunLock(str(tmp_path)).acquire()
    message = str(raised.value)
    assert str(tmp_path) in message and f"process {holder.pid}" in message
    assert "\n" not in message
  finally:
    holder.kill()
    holder.wait()


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
  holder = _hold_lock(tmp_path)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  lock_path = tmp_path / outputs.LOCK_FILE
  assert lock_path.read_text().strip() == str(holder.pid)  # left behind
  lock = outputs.RunLock(str(tmp_path))
  lock.acquire()
  assert lock_path.read_text().strip() == str(os.getpid())
  lock.release()
  assert not lock_path.exists()


def test_a_second_run_on_the_same_directory_is_refused(tmp_path, fashion_mnist_available):
  out = tmp_path / "shared"
  args = [
      "--algorithm=fedavg", "--total_clients=20", "--clients_per_round=3", "--local_epochs=1",
      "--rounds=8", "--eval_every=4", f"--output_dir={out}",
  ]
  first = run_server.start(args, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  deadline = time.time() + 300
  while not (out / "metrics.csv").exists():
    assert first.poll() is None and time.time() < deadline, first.communicate()
    time.sleep(0.05)
  # The second run, in this process (what run.py does after its flags; it
  # prints the ConfigError as its one `error:` line).
  second = config_lib.ExperimentConfig(
      algorithm="fedavg", total_clients=20, clients_per_round=3, local_epochs=1, rounds=8,
      eval_every=4, output_dir=str(out),
  )
  with pytest.raises(config_lib.ConfigError) as refused:
    training.run_experiment(second, log=lambda line: None)
  assert first.poll() is None, "the first run ended before the second was refused"
  assert str(refused.value) == (
      f"{out} is in use by another run (process {first.pid}); "
      "wait for it to end or use another --output_dir"
  )
  stdout, stderr = first.communicate(timeout=600)
  assert first.returncode == 0, stderr[-3000:]
  assert [int(r["round"]) for r in _rows(out)] == list(range(1, 9))
  assert not (out / outputs.LOCK_FILE).exists()


def test_cohorts_packed_ahead_give_the_run_packed_in_turn(tmp_path, monkeypatch, small_fashion_mnist):
  """Each round's cohorts are packed in a background thread while the
  round before trains (`RoundStep.prefetch`); the run is the one whose
  cohorts are packed when their round comes, bit for bit."""
  from tff_feddst import rounds  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top

  settings = dict(
      algorithm="feddst", total_clients=12, clients_per_round=4, examples_per_class=5,
      local_epochs=1, rounds=4, eval_every=4, client_failure_rate=0.25,
      rounds_between_readjustments=2, seed=7,
      data_dir=small_fashion_mnist,  # the first Fashion-MNIST images (conftest)
  )
  packed_in = []
  pack = rounds.RoundStep._pack_cohorts  # pylint: disable=protected-access

  def spy(self, clients):
    packed_in.append(threading.current_thread().name.startswith("feddst-pack"))
    return pack(self, clients)

  monkeypatch.setattr(rounds.RoundStep, "_pack_cohorts", spy)
  ahead = tmp_path / "ahead"
  training.run_experiment(
      config_lib.ExperimentConfig(output_dir=str(ahead), **settings), log=lambda line: None
  )
  # Round 1 is packed in turn, rounds 2-4 ahead (none after the last).
  assert packed_in == [False, True, True, True]

  packed_in.clear()
  monkeypatch.setattr(rounds.RoundStep, "prefetch", lambda self, round_num: None)
  in_turn = tmp_path / "in_turn"
  training.run_experiment(
      config_lib.ExperimentConfig(output_dir=str(in_turn), **settings), log=lambda line: None
  )
  assert packed_in == [False] * 4
  for a, b in zip(_rows(ahead), _rows(in_turn)):
    a.pop("round_seconds"), b.pop("round_seconds")
    assert a == b
  for a, b in zip(
      tf.keras.models.load_model(ahead / "final_model.keras").get_weights(),
      tf.keras.models.load_model(in_turn / "final_model.keras").get_weights(),
  ):
    np.testing.assert_array_equal(a, b)
