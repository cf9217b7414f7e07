"""Forks `python run.py ARGS` runs from a process that has made run.py's
imports, so that a test's run does not pay for them (about 5 s of CPU).

    python tests/cli_runner.py --serve        (tests/run_server.py starts it)

This process makes the imports that `run.py` makes, reads Fashion-MNIST
(numpy only) and runs no TensorFlow op. For each request it forks a child
that executes run.py as `__main__` with that `sys.argv`, its stdout and
stderr going to files, and ends as the interpreter would (exit handlers,
then the exit status of its `SystemExit`). What the child does is what
`python run.py ARGS` does after its imports (tests/test_cli.py compares
the two).

Requests come one JSON object per line on stdin: {"id", "args", "cwd",
"env", "stdout", "stderr"}, and "module" to run `python -m module ARGS`
instead (tflite_export). The child takes `env` as its whole environment,
`cwd` as its directory, and writes its stdout and stderr to those two files.
On stdout the server answers {"id", "pid"} when the child is forked and
{"id", "returncode"} when it has ended (-N: killed by signal N), so that a
test can watch, signal or kill a run while it runs. When stdin closes, the
server kills the runs still going and exits.
"""

import atexit
import gc
import json
import os
import pathlib
import runpy
import select
import signal
import sys
import threading
import traceback

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
RUN_PY = str(REPO_ROOT / "run.py")

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(REPO_ROOT))  # as `python run.py` has it

# pylint: disable=g-import-not-at-top,unused-import
import tff_feddst  # noqa: E402,F401  (sets TensorFlow's environment first)
import tensorflow  # noqa: E402,F401
import tensorflow_federated  # noqa: E402,F401
from absl import app  # noqa: E402,F401
from tff_feddst import algorithms, checkpoint, config, data, runtime, training  # noqa: E402,F401
from tensorflow_federated.python.common_libs import async_utils  # noqa: E402


def _exit_status(code) -> int:
  """What the interpreter makes of `SystemExit(code)` (it prints a string)."""
  if code is None:
    return 0
  if isinstance(code, int):
    return code
  print(code, file=sys.stderr)
  return 1


def _child(args, out_fd: int, err_fd: int, module=None) -> None:
  """Runs run.py (or `python -m module`) with `args`; never returns."""
  os.dup2(out_fd, 1)
  os.dup2(err_fd, 2)
  sys.argv = [module or RUN_PY, *args]
  runtime.install_local_context()
  status = 1
  try:
    if module:
      runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
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


def _no_thread_but_this_one() -> None:
  """Stops the thread of TFF's default context before the first fork.

  `import tensorflow_federated` installs the local C++ execution context,
  whose event loop runs on a thread of its own. A fork copies only the
  forking thread, so a child would wait for that loop forever. The server
  drops the context and stops the loop (the thread's closure keeps the
  runner alive, so dropping it is not enough); each child then installs the
  context the import installs (`_child`).
  """
  tensorflow_federated.test.set_no_default_context()
  gc.collect()
  for runner in [o for o in gc.get_objects() if isinstance(o, async_utils.AsyncThreadRunner)]:
    loop, thread = runner._event_loop, runner._thread  # pylint: disable=protected-access
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
  others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
  if others:
    sys.exit(f"cli_runner: cannot fork safely; threads running: {others}")


def _send(message: dict) -> None:
  os.write(1, (json.dumps(message) + "\n").encode())


def _fork_request(request: dict) -> int:
  out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  pid = os.fork()
  if pid == 0:
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    _child(request["args"], out, err, request.get("module"))
  os.close(out)
  os.close(err)
  return pid


def _reap(running: dict) -> None:
  while running:
    try:
      pid, status = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
      return
    if pid == 0:
      return
    _send({"id": running.pop(pid), "returncode": os.waitstatus_to_exitcode(status)})


def _read_fashion_mnist() -> None:
  """Reads Fashion-MNIST from the Debian package's directory, where run.py
  finds it first (numpy only, no TensorFlow op), so that every forked run
  has the arrays already (`data.loaders` keeps them while the files are
  unchanged). Elsewhere each run reads or reports it as run.py does."""
  from tff_feddst.data import loaders
  directory = loaders.DEBIAN_FASHION_MNIST_DIR
  if all(os.path.exists(os.path.join(directory, f"{base}.gz")) for base in loaders.IDX_FILES.values()):
    data.load_arrays("fashion_mnist", directory)


def serve() -> None:
  """The loop of `--serve` (see the module's docstring)."""
  _read_fashion_mnist()
  _no_thread_but_this_one()
  # The 425,000 objects of the imports, moved out of the collector's reach
  # (Python's advice for a server that forks): a full collection in a child
  # no longer walks them (0.18 s each; a run makes several, two at its end).
  gc.freeze()
  running = {}  # pid -> request id
  pending = b""
  while True:
    ready, _, _ = select.select([0], [], [], 0.01)
    if ready:
      chunk = os.read(0, 1 << 16)
      if not chunk:
        break
      pending += chunk
      while b"\n" in pending:
        line, pending = pending.split(b"\n", 1)
        request = json.loads(line)
        pid = _fork_request(request)
        running[pid] = request["id"]
        _send({"id": request["id"], "pid": pid})
    _reap(running)
  for pid in running:
    os.kill(pid, signal.SIGKILL)
  for pid in list(running):
    os.waitpid(pid, 0)
  os._exit(0)


if __name__ == "__main__":
  if sys.argv[1:] != ["--serve"]:
    sys.exit("usage: python tests/cli_runner.py --serve  (see tests/run_server.py)")
  serve()
