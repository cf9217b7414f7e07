"""Runs on remote TFF workers (`--workers`, `python -m tff_feddst.worker`).

- `--workers` is validated like every flag; an unreachable worker stops the
  run with one line naming it, before anything is trained;
- two loopback workers give the one-machine run's metrics and final weights
  (FedAvg, and FedDST with readjustment through the cohort engine), both
  workers do client work, `round_grpc_bytes` counts at least the model
  state sent to each worker, and the driver starts no TFF worker of its own;
- a worker killed mid-run ends the run with one line naming it and exit
  status 1; the checkpoint stays valid and the rerun on the surviving
  worker ends with the uninterrupted run's weights;
- no worker, and no child of the driver, is left afterwards.
"""

import contextlib
import csv
import os
import pathlib
import signal
import subprocess
import sys
import time
import uuid

import grpc
import numpy as np
import portpicker
import psutil
import pytest
import tensorflow as tf

from tff_feddst import checkpoint
from tff_feddst import config as config_lib
from tff_feddst import names
from tff_feddst import remote
from tff_feddst import rounds
from tff_feddst import runtime
from tff_feddst import training

import run_server

# `portability` (pyproject.toml): the test that compares the remote run's
# training results with the local one's, within tolerances, also runs under
# another instruction set (`make test`); the fault tests compare the same way
# and need not run twice.

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARK = "FEDDST_WORKERS_TEST_MARK"
IGNORED_COLUMNS = ("round_seconds", rounds.GRPC_COLUMN)

# A tiny run: 4 of 8 clients per round, 5 images per class, 1 local epoch,
# on the first images of Fashion-MNIST (conftest.small_fashion_mnist).
SETTINGS = dict(
    dataset="fashion_mnist",
    total_clients=8,
    clients_per_round=4,
    examples_per_class=5,
    local_epochs=1,
    rounds=3,
    eval_every=1,
    checkpoint_every=1,
    rounds_between_readjustments=1,
    readjustment_end_round=3,
    seed=3,
)


# ------------------------------------------------------------- helpers


def _marked_processes(mark: str) -> list[psutil.Process]:
  """Processes whose environment carries `MARK=mark` (and their children)."""
  found = []
  for proc in psutil.process_iter():
    with contextlib.suppress(psutil.Error):
      if proc.environ().get(MARK) == mark:
        found.append(proc)
  return found


def _assert_gone(procs, timeout=15):
  _, alive = psutil.wait_procs(procs, timeout=timeout)
  alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
  assert not alive, [p.cmdline() for p in alive]


class Worker:
  """One `python -m tff_feddst.worker` on a free loopback port."""

  def __init__(self, mark: str):
    """Starts the worker; `wait_ready` waits until it serves."""
    self.port = portpicker.pick_unused_port()
    self.address = f"localhost:{self.port}"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **{MARK: mark})
    self.launcher = subprocess.Popen(
        [sys.executable, "-m", "tff_feddst.worker", f"--port={self.port}"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

  def wait_ready(self) -> None:
    # Retries every 20-100 ms while the worker starts (gRPC's default
    # backoff, 1 s growing by 1.6x, found it up to seconds late).
    channel = grpc.insecure_channel(self.address, options=runtime.WORKER_RECONNECT_OPTIONS)
    try:
      grpc.channel_ready_future(channel).result(timeout=120)
    finally:
      channel.close()

  def binary(self) -> psutil.Process:
    (child,) = psutil.Process(self.launcher.pid).children()
    assert child.name() == runtime.WORKER_NAME
    return child

  def stop(self) -> None:
    procs = []
    with contextlib.suppress(psutil.Error):
      launcher = psutil.Process(self.launcher.pid)
      procs = [launcher, *launcher.children(recursive=True)]
    if self.launcher.poll() is None:
      self.launcher.terminate()
    self.launcher.wait(timeout=30)
    _assert_gone(procs)


@contextlib.contextmanager
def _workers(count: int):
  mark = uuid.uuid4().hex
  started = []
  try:
    for _ in range(count):  # all start together; then each is waited for
      started.append(Worker(mark))
    for worker in started:
      worker.wait_ready()
    yield started
  finally:
    for worker in started:
      worker.stop()
    _assert_gone(_marked_processes(mark))


def _rows(out_dir):
  with open(os.path.join(out_dir, "metrics.csv"), newline="") as f:
    return list(csv.DictReader(f))


def _final_weights(out_dir):
  model = tf.keras.models.load_model(os.path.join(out_dir, "final_model.keras"))
  return model.get_weights()


def _assert_same_run(out_dir, reference_dir):
  rows, expected = _rows(out_dir), _rows(reference_dir)
  assert [r["round"] for r in rows] == [r["round"] for r in expected]
  for row, ref in zip(rows, expected):
    for key, value in ref.items():
      if key in IGNORED_COLUMNS:
        continue
      if value in ("", "nan"):
        assert row[key] == value, key
      else:
        np.testing.assert_allclose(float(row[key]), float(value), rtol=1e-5, err_msg=key)
  for a, b in zip(_final_weights(out_dir), _final_weights(reference_dir)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


# Runs by name: the algorithm, and "_per_client" for per-client execution
# (FedDST's compact messages: the mask goes by tff.federated_select).
PER_CLIENT = "_per_client"


def _config(out_dir, algorithm, workers=(), data_dir=None):
  extra = {}
  if algorithm.endswith(PER_CLIENT):
    algorithm, extra = algorithm[:-len(PER_CLIENT)], dict(client_execution="per_client")
  return config_lib.ExperimentConfig(
      algorithm=algorithm, output_dir=str(out_dir), workers=",".join(workers),
      data_dir=data_dir, **SETTINGS, **extra,
  )


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory, small_fashion_mnist):
  """The one-machine runs, made on first use: {algorithm: output dir}."""
  made = {}

  def get(algorithm):
    if algorithm not in made:
      out = tmp_path_factory.mktemp(f"local_{algorithm}")
      training.run_experiment(
          _config(out, algorithm, data_dir=small_fashion_mnist), log=lambda line: None
      )
      made[algorithm] = out
    return made[algorithm]

  return get


# ------------------------------------------------------------- settings


def test_workers_flag_is_validated():
  assert names.parse_workers("") == ()
  assert names.parse_workers("a.example:1, 10.0.0.2:8000,[::1]:9") == (
      "a.example:1", "10.0.0.2:8000", "[::1]:9",
  )
  for bad in ("host", "host:0", "host:70000", ":80", "a:1,,b:2", "a:1,a:1", "a b:1"):
    with pytest.raises(config_lib.ConfigError, match="--workers"):
      config_lib.ExperimentConfig(workers=bad).resolve()
  assert "workers" in config_lib.RESUMABLE_CHANGES


def test_an_unreachable_worker_is_one_line_before_any_training(tmp_path, monkeypatch):
  monkeypatch.setattr(remote, "CONNECT_TIMEOUT_S", 0.5)
  dead = f"localhost:{portpicker.pick_unused_port()}"
  config = _config(tmp_path / "run", "fedavg", [dead])
  with pytest.raises(remote.WorkerError) as raised:
    training.run_experiment(config, log=lambda line: None)
  message = str(raised.value)
  assert dead in message and "unreachable" in message and "\n" not in message
  assert not (tmp_path / "run" / "metrics.csv").exists()
  assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_worker_launcher_forwards_signals_and_passes_on_onednn(signum, monkeypatch):
  # The cohort engine needs oneDNN's grouped-convolution gradients on the
  # worker, even where the shell that starts it did not ask for them.
  monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
  with _workers(1) as (worker,):
    binary = worker.binary()
    assert binary.environ().get("TF_ENABLE_ONEDNN_OPTS") == "1"
    worker.launcher.send_signal(signum)
    assert worker.launcher.wait(timeout=30) == 128 + signum
    _assert_gone([binary])


# ------------------------------------------------- same run, two workers


@pytest.fixture(scope="module")
def two_workers():
  """Two workers serving every run of the parametrized test below, one run
  after another, as long-lived workers serve a user's runs."""
  with _workers(2) as workers:
    yield workers


@pytest.mark.portability
@pytest.mark.parametrize("algorithm", ["fedavg", "feddst", "feddst_per_client"])
def test_two_workers_give_the_local_run(
    tmp_path, local_runs, two_workers, algorithm, small_fashion_mnist
):
  reference = local_runs(algorithm)
  own_workers = {p.pid for p in runtime.tff_worker_processes()}
  binaries = [w.binary() for w in two_workers]
  cpu_before = [sum(b.cpu_times()[:2]) for b in binaries]
  out = tmp_path / "remote"
  config = _config(out, algorithm, [w.address for w in two_workers], small_fashion_mnist)
  training.run_experiment(config, log=lambda line: None)
  cpu_used = [sum(b.cpu_times()[:2]) - c for b, c in zip(binaries, cpu_before)]
  # Both workers trained clients; the driver started no worker of its own.
  assert min(cpu_used) > 0.2, cpu_used
  assert {p.pid for p in runtime.tff_worker_processes()} <= own_workers
  _assert_same_run(out, reference)
  # Each round sends the global model to both workers (float32 values).
  params = sum(w.size for w in _final_weights(out))
  for row in _rows(out):
    assert int(row[rounds.GRPC_COLUMN]) > 2 * 4 * params
  if algorithm.startswith("feddst"):
    assert [int(r["readjusted"]) for r in _rows(out)][:2] == [1, 1]


# ------------------------------------------------- a worker dies mid-run


def _start_run(out_dir, workers, mark, data_dir):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **{MARK: mark})
  args = [f"--{k}={v}" for k, v in SETTINGS.items()] + [f"--data_dir={data_dir}"]
  return run_server.start(
      ["--algorithm=feddst", *args, f"--workers={','.join(workers)}", f"--output_dir={out_dir}"],
      env=env,
  )


def _wait_for_rows(out_dir, proc, count, timeout=300):
  path = os.path.join(out_dir, "metrics.csv")
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()
    if os.path.exists(path) and len(_rows(out_dir)) >= count:
      return
    time.sleep(0.02)
  raise AssertionError(f"no {count} rows within {timeout} s")


def test_a_killed_worker_stops_the_run_and_the_rerun_resumes(tmp_path, local_runs, small_fashion_mnist):
  out = tmp_path / "run"
  mark = uuid.uuid4().hex
  with _workers(2) as (survivor, victim):
    proc = _start_run(out, [survivor.address, victim.address], mark, small_fashion_mnist)
    try:
      _wait_for_rows(out, proc, 1)
      victim.binary().send_signal(signal.SIGKILL)
      _, stderr = proc.communicate(timeout=300)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    _assert_gone(_marked_processes(mark))
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert victim.address in lines[0] and "rerun" in lines[0]
    assert survivor.address not in lines[0]
    # The last checkpoint is intact: it loads, and the rerun resumes from it.
    ckpts = checkpoint.RunCheckpoints(os.path.join(out, "checkpoints"))
    saved = ckpts.latest_round()
    assert saved is not None and 1 <= saved < SETTINGS["rounds"]
    lines = []
    training.run_experiment(
        _config(out, "feddst", [survivor.address], small_fashion_mnist), log=lines.append
    )
  assert any(f"at round {saved}" in line for line in lines), lines
  _assert_same_run(out, local_runs("feddst"))
