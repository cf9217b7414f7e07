"""Runs `python run.py ARGS` for many ARGS, paying for the imports once.

    python tests/cli_runner.py < cases.json > results.json

`cases.json` is a JSON list of argument lists; the output is a JSON list of
{"returncode", "stdout", "stderr"}, one per case, in order. This process
makes the imports that `run.py` makes and runs no TensorFlow op; each case
is a forked child that executes run.py as `__main__` with that `sys.argv`,
its stdout and stderr going to files, and ends as the interpreter would
(exit handlers, then the exit status of its `SystemExit`). What the child
does is what `python run.py ARGS` does after its imports, and the imports
take most of the time of a run that stops at a bad flag.
"""

import atexit
import json
import os
import pathlib
import runpy
import sys
import tempfile
import time
import traceback

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN_PY = str(REPO_ROOT / "run.py")
CASE_TIMEOUT_S = 120

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(REPO_ROOT))  # as `python run.py` has it

# pylint: disable=g-import-not-at-top,unused-import
import tff_feddst  # noqa: E402,F401  (sets TensorFlow's environment first)
import tensorflow  # noqa: E402,F401
import tensorflow_federated  # noqa: E402,F401
from absl import app  # noqa: E402,F401
from tff_feddst import algorithms, checkpoint, config, data, runtime, training  # noqa: E402,F401


def _exit_status(code) -> int:
  """What the interpreter makes of `SystemExit(code)` (it prints a string)."""
  if code is None:
    return 0
  if isinstance(code, int):
    return code
  print(code, file=sys.stderr)
  return 1


def _child(args, out_fd: int, err_fd: int) -> None:
  os.dup2(out_fd, 1)
  os.dup2(err_fd, 2)
  sys.argv = [RUN_PY, *args]
  status = 1
  try:
    runpy.run_path(RUN_PY, run_name="__main__")
    status = 0
  except SystemExit as e:
    status = _exit_status(e.code)
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
  finally:
    try:
      atexit._run_exitfuncs()  # pylint: disable=protected-access
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(status)


def run_case(args) -> dict:
  with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
    pid = os.fork()
    if pid == 0:
      _child(args, out.fileno(), err.fileno())
    deadline = time.monotonic() + CASE_TIMEOUT_S
    while True:
      done, status = os.waitpid(pid, os.WNOHANG)
      if done:
        break
      if time.monotonic() > deadline:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        status = None
        break
      time.sleep(0.01)
    out.seek(0)
    err.seek(0)
    stderr = err.read().decode(errors="replace")
    if status is None:
      returncode = None
      stderr += f"\n[cli_runner: no exit within {CASE_TIMEOUT_S} s; killed]"
    else:
      returncode = os.waitstatus_to_exitcode(status)
    return {"returncode": returncode, "stdout": out.read().decode(errors="replace"),
            "stderr": stderr}


def main() -> None:
  cases = json.load(sys.stdin)
  results = [run_case(args) for args in cases]
  sys.stdout.write(json.dumps(results))
  sys.stdout.flush()
  os._exit(0)  # TFF's import-time executor objects need no clean-up here


if __name__ == "__main__":
  main()
