"""The TFF simulation runtime's lifetime.

`tensorflow_federated` runs client computations in a child process,
`worker_binary`, which it stops only from a finaliser; in practice the
child outlives Python (re-parented to init, still holding its port and the
parent's stdout). `stop_tff_workers` stops it explicitly; `managed_runtime`
makes sure that happens when a run ends, fails or is interrupted.
"""

import asyncio
import atexit
import contextlib
import ctypes
import gc
import signal
import subprocess
import sys
import threading
import time

import psutil

WORKER_NAME = "worker_binary"


def tff_worker_processes() -> list[psutil.Process]:
  """The TFF worker processes started by this Python process."""
  found = []
  for child in psutil.Process().children(recursive=True):
    try:
      if child.name() == WORKER_NAME:
        found.append(child)
    except psutil.NoSuchProcess:
      pass
  return found


def compile_for_cpu(comp):
  """TFF's native compile without its static Grappler pass.

  `tff.backends.native.desugar_and_transform_to_native` replaces intrinsics
  with TensorFlow, brings the computation to call-dominant form, runs
  Grappler (function inlining, constant folding, arithmetic, loop and memory
  optimisers, all aggressive) over every TensorFlow computation in Python,
  then marks the computations' call ops so that the worker runs no Grappler
  on them. This does the same without the Grappler pass. TFF runs that pass
  for GPUs (inlining keeps data sets off them); on a CPU it costs each new
  computation its first call: a paper-setting FedDST round's first call
  took 3.8 s instead of 5.4 s, while the rounds after it took the same
  time within the noise (docs/testing.md, "Where the suite's time goes").

  The steps of `tff.backends.native.transform_to_native_form` are taken on
  the desugared building block itself: that function starts by reading it
  back from its proto, which for a FedDST round (a few thousand nested
  types) is 0.3 s of a 1 s compile. `compile_for_cpu_reference` is that
  function as TFF has it; tests/test_feddst_process.py checks the two
  give the same proto.
  """
  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff
  from tensorflow_federated.python.core.environments.tensorflow_backend import (
      compiled_computation_transformations,
  )
  from tensorflow_federated.python.core.impl.compiler import transformations

  desugared = _desugared(comp)
  try:
    form = transformations.to_call_dominant(desugared)
    form, _ = compiled_computation_transformations.transform_tf_call_ops_to_disable_grappler(form)
    form, _ = compiled_computation_transformations.transform_tf_add_ids(form)
  except ValueError:  # as TFF's: the desugared computation, uncompiled
    form = desugared
  return tff.framework.ConcreteComputation(
      computation_proto=form.proto, context_stack=_context_stack()
  )


def compile_for_cpu_reference(comp):
  """`compile_for_cpu` through `tff.backends.native.transform_to_native_form`."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  return tff.backends.native.transform_to_native_form(
      tff.framework.ConcreteComputation(
          computation_proto=_desugared(comp).proto, context_stack=_context_stack()
      ),
      grappler_config=None,
  )


def _desugared(comp):
  """`comp`'s building block with TFF's intrinsics replaced by their bodies."""
  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.environments.tensorflow_backend import (
      tensorflow_tree_transformations,
  )

  desugared, _ = tensorflow_tree_transformations.replace_intrinsics_with_bodies(
      comp.to_building_block()
  )
  return desugared


def _context_stack():
  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

  return context_stack_impl.context_stack


def native_compiler():
  """The compile for computations run here: TFF's own where TensorFlow sees a
  GPU, `compile_for_cpu` otherwise."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  if tf.config.list_physical_devices("GPU"):
    return tff.backends.native.desugar_and_transform_to_native
  return compile_for_cpu


# How the local worker is waited for (`connect_to_local_worker_quickly`).
WORKER_POLL_SECONDS = 0.01
WORKER_RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 100),
)


def connect_to_local_worker_quickly() -> None:
  """Makes the local context find its new worker within about 0.2 s, not 1.2.

  TFF 0.87's local C++ context (`tff.framework.local_cpp_executor_factory`)
  starts `worker_binary`, opens a gRPC channel to it, and then sleeps 1 s at
  a time until the channel is ready. The channel's first attempt comes before
  the worker listens, and gRPC's default backoff retries after about 1 s; so
  every run, and every restart of the worker (`stop_tff_workers`), waited
  1.0-1.5 s with nothing to do (measured: a trivial computation's first call
  1.22 s, with these settings 0.33 s, and 0.19 s after a restart). This
  polls every 10 ms and lets the channel retry after 20-100 ms. Only the
  local worker's channel takes these options (`--workers` channels are
  `remote`'s own). Does nothing where that module lacks the two settings.
  """
  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.core.impl.executor_stacks import executor_factory

  options = getattr(executor_factory, "_GRPC_CHANNEL_OPTIONS", None)
  if not hasattr(executor_factory, "_LOCALHOST_SERVER_WAIT_TIME_SEC") or not isinstance(
      options, list
  ):
    return
  executor_factory._LOCALHOST_SERVER_WAIT_TIME_SEC = WORKER_POLL_SECONDS  # pylint: disable=protected-access
  options.extend([o for o in WORKER_RECONNECT_OPTIONS if o not in options])


def install_local_context() -> None:
  """Installs TFF's local C++ execution context (its worker starts when a
  computation first runs), compiling with `native_compiler()`. Keeps one
  installed already, and its worker."""
  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff
  from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation

  if getattr(tff.framework.get_context_stack().current, "feddst_local", False):
    return
  connect_to_local_worker_quickly()
  context = tff.framework.SyncExecutionContext(
      executor_fn=tff.framework.local_cpp_executor_factory(),
      compiler_fn=native_compiler(),
      transform_args=tensorflow_computation.transform_args,
      transform_result=tensorflow_computation.transform_result,
  )
  context.feddst_local = True
  tff.framework.set_default_context(context)


def _reset_tff_context(fresh: bool) -> None:
  """Drops TFF's execution context so its worker manager is finalised now.

  With `fresh`, a new local C++ context is installed (it starts a new worker
  only when a computation next runs); otherwise none is left. Done while the
  interpreter is intact, TFF's own finaliser stops the worker quietly instead
  of failing during interpreter teardown.
  """
  if "tensorflow_federated" not in sys.modules:
    return
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  tff.test.set_no_default_context()
  gc.collect()
  if fresh:
    install_local_context()


def _wait_until_exited(procs, timeout: float) -> list[psutil.Process]:
  """Waits for `procs` to exit without reaping them; returns those alive.

  They are left as zombies for their `subprocess.Popen` owner (TFF's
  service manager) to reap, so its own clean-up finds them.
  """
  deadline = time.monotonic() + timeout
  alive = list(procs)
  while alive and time.monotonic() < deadline:
    still = []
    for proc in alive:
      try:
        if proc.status() != psutil.STATUS_ZOMBIE:
          still.append(proc)
      except psutil.NoSuchProcess:
        pass
    alive = still
    if alive:
      time.sleep(0.02)
  return alive


def stop_tff_workers(timeout: float = 5.0, restartable: bool = True) -> int:
  """Stops this process's TFF workers (SIGTERM, then SIGKILL); returns how many.

  The workers are stopped before TFF's context is dropped: TFF's own
  clean-up sends SIGINT and waits, which never returns when the worker
  inherited an ignored SIGINT (a run started in the background by a
  non-interactive shell, or under nohup). With `restartable`, TFF can run
  computations again afterwards (a new worker is started on demand).
  """
  workers = tff_worker_processes()
  for proc in workers:
    with contextlib.suppress(psutil.NoSuchProcess):
      proc.terminate()
  alive = _wait_until_exited(workers, timeout)
  for proc in alive:
    with contextlib.suppress(psutil.NoSuchProcess):
      proc.kill()
  _wait_until_exited(alive, timeout)
  _reset_tff_context(fresh=restartable)
  return len(workers)


_PR_SET_PDEATHSIG = 1


try:  # Resolved now: the forked child must not load libraries.
  _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (AttributeError, OSError):
  _PRCTL = None


def _die_with_parent() -> None:
  """Runs in the forked child before exec.

  The kernel SIGKILLs the worker when its parent dies, and SIGINT gets its
  default action back (a background shell or nohup may have set it to
  ignored, and TFF stops its worker with SIGINT).
  """
  if _PRCTL is not None:
    _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
  signal.signal(signal.SIGINT, signal.SIG_DFL)


class _PopenDyingWithParent(subprocess.Popen):
  """`subprocess.Popen` whose child is killed by the kernel when we die."""

  def __init__(self, *args, **kwargs):
    if sys.platform.startswith("linux") and kwargs.get("preexec_fn") is None:
      kwargs["preexec_fn"] = _die_with_parent
    super().__init__(*args, **kwargs)


def popen_dying_with_parent(args, **kwargs) -> subprocess.Popen:
  """Starts `args` as a child that the kernel kills when this process dies."""
  return _PopenDyingWithParent(args, **kwargs)


class _SubprocessWithParentDeath:
  """`subprocess` as seen by TFF's worker start-up: workers die with us.

  Covers what no handler can: a run killed by SIGKILL (or the OOM killer).
  The kernel then stops the worker too, instead of leaving an orphan.
  """

  Popen = _PopenDyingWithParent  # pylint: disable=invalid-name

  def __getattr__(self, name):
    return getattr(subprocess, name)


def tie_workers_to_this_process() -> None:
  """Makes TFF start its workers so that they die when this process dies."""
  try:
    # pylint: disable=g-import-not-at-top
    from tensorflow_federated.python.core.impl.executor_stacks import executor_factory
  except ImportError:
    return
  if getattr(executor_factory, "subprocess", None) is subprocess:
    executor_factory.subprocess = _SubprocessWithParentDeath()


def _raise_on_sigterm(signum, frame):
  del frame
  # Unwinds like Ctrl-C does, so `finally` blocks and atexit run.
  raise SystemExit(128 + signum)


_installed = False


def install_shutdown_handlers() -> None:
  """Stops the TFF worker at interpreter exit and on SIGTERM (idempotent).

  Needs no TensorFlow: a command line installs it before checking its
  flags. If TFF is imported already, workers started afterwards are also
  killed by the kernel should this process be killed outright;
  `managed_runtime` (or `tie_workers_to_this_process`) sees to that
  otherwise.
  """
  global _installed
  if "tensorflow_federated" in sys.modules:
    tie_workers_to_this_process()
  if _installed:
    return
  # A run started in the background by a non-interactive shell inherits an
  # ignored SIGINT; Ctrl-C / kill -INT must still end it (cleanly).
  if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  atexit.register(stop_tff_workers, restartable=False)
  if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
  _installed = True


_loops = threading.local()


def run_coroutine(coro):
  """Runs `coro` to its end on this thread's event loop and returns its value.

  For the driver's `tff.program` managers (metrics, checkpoints), which are
  coroutines. `asyncio.run` would install its own SIGINT handler and shut a
  fresh loop down on each call; a Ctrl-C arriving just as its coroutine
  finished (after the coroutine ran a step on the loop's thread pool, as
  TFF's release managers do) ended in `RuntimeError: Event loop stopped
  before Future completed` during that shutdown, and the run stopped with a
  traceback instead of its one-line "rerun to resume". Here an interrupt
  (KeyboardInterrupt, or SIGTERM's SystemExit) reaches the caller as it is,
  wherever it lands; the loop it interrupted, with what was left on it, is
  dropped and the next call starts a new one.
  """
  loop = getattr(_loops, "loop", None)
  if loop is None or loop.is_closed():
    loop = _loops.loop = asyncio.new_event_loop()
  try:
    return loop.run_until_complete(coro)
  except BaseException:
    _loops.loop = None
    raise


@contextlib.contextmanager
def managed_runtime():
  """Context in which TFF may start its worker; it is stopped on the way out
  (and killed by the kernel if this process is)."""
  install_shutdown_handlers()
  install_local_context()
  tie_workers_to_this_process()
  try:
    yield
  finally:
    stop_tff_workers()
    sys.stdout.flush()
