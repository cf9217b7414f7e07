"""`python run.py ARGS` for the tests, forked from a process that has made
run.py's imports already (`tests/cli_runner.py --serve`).

A fresh `python run.py` spends about 5 s of CPU on its imports before it
reads its flags; the suite starts twenty such runs. Each test process starts
one server, on its first request, and every run after that is a fork of it:
a process of its own, with its own pid, environment, directory, output,
signals and TFF worker, that does what `python run.py ARGS` does after its
imports (`tests/test_cli.py` checks a forked run against a plain one).

    proc = run_server.start(args, env=...)   # like subprocess.Popen(text=True)
    result = run_server.run(args, env=..., timeout=600)  # like subprocess.run

This module imports no TensorFlow.
"""

import atexit
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
RUNNER = REPO_ROOT / "tests" / "cli_runner.py"


class ForkedRun:
  """A run forked by the server, with the parts of `subprocess.Popen` the
  tests use (stdout and stderr come as text from `communicate`)."""

  def __init__(self, server, request_id: int, args, out_dir: str):
    self._server = server
    self._id = request_id
    self._out_dir = out_dir
    self.args = args
    self.pid = server.wait_for(request_id, "pid", timeout=300)  # the server imports first
    self.returncode = None

  def poll(self):
    if self.returncode is None:
      self.returncode = self._server.result(self._id)
    return self.returncode

  def wait(self, timeout=None):
    if self.returncode is None:
      try:
        self.returncode = self._server.wait_for(self._id, "returncode", timeout)
      except TimeoutError:
        raise subprocess.TimeoutExpired(self.args, timeout) from None
    return self.returncode

  def send_signal(self, signum) -> None:
    if self.poll() is None:
      os.kill(self.pid, signum)

  def kill(self) -> None:
    self.send_signal(signal.SIGKILL)

  def communicate(self, timeout=None):
    self.wait(timeout)
    texts = []
    for name in ("stdout", "stderr"):
      with open(os.path.join(self._out_dir, name), errors="replace") as f:
        texts.append(f.read())
    return tuple(texts)


class RunServer:
  """One `cli_runner.py --serve` process and the answers it sends."""

  def __init__(self):
    self._proc = None
    self._answers = {}  # request id -> {"pid": ..., "returncode": ...}
    self._changed = threading.Condition()
    self._next_id = 0
    self._tmp = None

  def _ensure_started(self) -> None:
    if self._proc is not None:
      return
    self._tmp = tempfile.TemporaryDirectory(prefix="run_server_")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("TF2_BEHAVIOR", None)  # as a fresh shell has it (tests/conftest.py)
    self._proc = subprocess.Popen(
        [sys.executable, str(RUNNER), "--serve"], cwd=REPO_ROOT, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    threading.Thread(target=self._read, daemon=True).start()
    atexit.register(self.close)

  def _read(self) -> None:
    for line in self._proc.stdout:
      answer = json.loads(line)
      with self._changed:
        self._answers.setdefault(answer.pop("id"), {}).update(answer)
        self._changed.notify_all()
    with self._changed:
      self._changed.notify_all()

  def wait_for(self, request_id: int, key: str, timeout=None):
    with self._changed:
      if not self._changed.wait_for(
          lambda: key in self._answers.get(request_id, {}) or self._proc.poll() is not None,
          timeout,
      ):
        raise TimeoutError(f"run {request_id}: no {key} within {timeout} s")
      answer = self._answers.get(request_id, {})
      if key not in answer:
        raise RuntimeError(f"the run server ended (status {self._proc.returncode})")
      return answer[key]

  def result(self, request_id: int):
    with self._changed:
      return self._answers.get(request_id, {}).get("returncode")

  def start(self, args, env=None, cwd=REPO_ROOT, module=None) -> ForkedRun:
    self._ensure_started()
    self._next_id += 1
    out_dir = os.path.join(self._tmp.name, str(self._next_id))
    os.mkdir(out_dir)
    request = {
        "id": self._next_id, "args": [str(a) for a in args], "cwd": str(cwd),
        "env": dict(os.environ if env is None else env),
        "stdout": os.path.join(out_dir, "stdout"), "stderr": os.path.join(out_dir, "stderr"),
        "module": module,
    }
    self._proc.stdin.write((json.dumps(request) + "\n").encode())
    self._proc.stdin.flush()
    return ForkedRun(self, self._next_id, request["args"], out_dir)

  def close(self) -> None:
    """Ends the server; it kills the runs still going."""
    if self._proc is None:
      return
    self._proc.stdin.close()
    self._proc.wait(timeout=60)
    self._proc.stdout.close()
    self._proc = None
    self._tmp.cleanup()


_SERVER = RunServer()


def start(args, env=None, cwd=REPO_ROOT, module=None) -> ForkedRun:
  """`subprocess.Popen([python, "run.py", *args], env=env, cwd=cwd, text=True,
  stdout=PIPE, stderr=PIPE)`, forked from the server; with `module`,
  `python -m module ARGS`."""
  return _SERVER.start(args, env, cwd, module)


def run(args, env=None, cwd=REPO_ROOT, timeout=None) -> subprocess.CompletedProcess:
  """`subprocess.run([python, "run.py", *args], capture_output=True, text=True,
  ...)`, forked from the server; on timeout the run is killed."""
  proc = start(args, env, cwd)
  try:
    stdout, stderr = proc.communicate(timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def close() -> None:
  _SERVER.close()
