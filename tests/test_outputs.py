"""A run's outputs: metrics through TFF release managers, and the directory lock."""

import csv
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from tff_feddst import config as config_lib
from tff_feddst import outputs
from tff_feddst import training

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


def test_tensorboard_holds_every_numeric_column_at_its_round(tmp_path, fashion_mnist_available):
  config = config_lib.ExperimentConfig(
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
      sys.executable, "run.py", "--algorithm=fedavg", "--total_clients=20",
      "--clients_per_round=3", "--local_epochs=1", "--rounds=8", "--eval_every=4",
      f"--output_dir={out}",
  ]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not (out / "metrics.csv").exists():
    assert first.poll() is None and time.time() < deadline, first.communicate()
    time.sleep(0.05)
  second = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert first.poll() is None, "the first run ended before the second was refused"
  assert second.returncode == 1
  lines = second.stderr.strip().splitlines()
  assert lines == [
      f"error: {out} is in use by another run (process {first.pid}); "
      "wait for it to end or use another --output_dir"
  ]
  stdout, stderr = first.communicate(timeout=600)
  assert first.returncode == 0, stderr[-3000:]
  assert [int(r["round"]) for r in _rows(out)] == list(range(1, 9))
  assert not (out / outputs.LOCK_FILE).exists()
