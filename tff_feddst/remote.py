"""Client work on remote TFF workers (`run.py --workers=host:port,...`).

TFF's own engine does the work; this module only connects it:
- one `tff.framework.AsyncExecutionContext` per worker, over a
  `tff.framework.RemoteExecutor` that talks to the worker's gRPC port
  (`python -m tff_feddst.worker`), as TFF's local context does for its own
  worker;
- `tff.framework.MergeableCompExecutionContext` over those: a computation
  with client-placed arguments (the round, `process.next`) is compiled to
  `tff.framework.MergeableCompForm` (`tff.backends.native.
  compile_to_mergeable_comp_form`), the clients are split into one
  contiguous slice per worker, each worker computes its slice up to the
  aggregation, and the partial aggregates are merged (sums, so the result is
  the one-machine result up to floating-point rounding order);
- every other computation (initialisation, reading and writing model
  weights) runs on the first worker, so the driver starts no worker of its
  own.

TFF's `RemoteExecutor` calls its stub synchronously inside coroutines, so
each worker's context runs on its own thread and event loop (otherwise the
workers would take turns). The stub here counts the serialized bytes of
every gRPC request and response, and turns a failed call into
`WorkerError` naming the worker (TFF would retry an unreachable worker
forever).
"""

import asyncio
import contextlib
import threading

import grpc
import tensorflow_federated as tff
# pylint: disable=g-direct-tensorflow-import
from tensorflow_federated.proto.v0 import executor_pb2
from tensorflow_federated.proto.v0 import executor_pb2_grpc
from tensorflow_federated.python.common_libs import async_utils
from tensorflow_federated.python.core.environments.tensorflow_frontend import tensorflow_computation

# Seconds to wait for every worker to accept a connection at start.
CONNECT_TIMEOUT_S = 5.0
_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000
_CHANNEL_OPTIONS = (
    ("grpc.max_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
)


class WorkerError(RuntimeError):
  """A worker that cannot be reached or stopped answering (one line)."""


class CountingStub(tff.framework.RemoteExecutorStub):
  """The executor service of one worker, counting the bytes on the wire.

  `sent` and `received` are the serialized sizes of the requests and
  responses (protobuf messages; gRPC's framing and HTTP/2 headers are not
  counted). A failed call raises `WorkerError` naming the worker.
  """

  def __init__(self, address: str, channel: grpc.Channel):
    self.address = address
    self._channel = channel
    self._stub = executor_pb2_grpc.ExecutorGroupStub(channel)
    self._lock = threading.Lock()
    self.sent = 0
    self.received = 0

  def _call(self, method: str, request):
    try:
      response = getattr(self._stub, method)(request)
    except ValueError as e:  # the channel was closed: the run is ending
      raise WorkerError(f"worker {self.address}: {e}") from None
    except grpc.RpcError as e:
      code = e.code().name if isinstance(e, grpc.Call) else "error"
      detail = e.details() if isinstance(e, grpc.Call) else str(e)
      raise WorkerError(
          f"worker {self.address} failed ({code}: {detail.splitlines()[0] if detail else ''})"
      ) from None
    with self._lock:
      self.sent += request.ByteSize()
      self.received += response.ByteSize()
    return response

  def get_executor(self, request):
    return self._call("GetExecutor", request)

  def create_value(self, request):
    return self._call("CreateValue", request)

  def create_struct(self, request):
    return self._call("CreateStruct", request)

  def create_call(self, request):
    return self._call("CreateCall", request)

  def create_selection(self, request):
    return self._call("CreateSelection", request)

  def compute(self, request):
    return self._call("Compute", request)

  def dispose(self, request):
    # Releases values on the worker; also called from finalizers, where an
    # exception could only be printed. A lost worker shows in the next call.
    with contextlib.suppress(WorkerError):
      return self._call("Dispose", request)
    return executor_pb2.DisposeResponse()

  def dispose_executor(self, request):
    with contextlib.suppress(WorkerError):
      return self._call("DisposeExecutor", request)
    return executor_pb2.DisposeExecutorResponse()

  def close(self) -> None:
    self._channel.close()

  @property
  def is_ready(self) -> bool:
    try:
      grpc.channel_ready_future(self._channel).result(timeout=0)
      return True
    except grpc.FutureTimeoutError:
      return False


def _executor_factory(stub: CountingStub):
  """TFF's executor factory over one worker (as its local context builds it)."""

  def stack_fn(cardinalities):
    cardinalities.setdefault(tff.CLIENTS, 0)
    executor = tff.framework.RemoteExecutor(stub)
    executor.set_cardinalities(cardinalities)
    return executor

  return tff.framework.ResourceManagingExecutorFactory(executor_stack_fn=stack_fn)


class _ThreadedContext(tff.framework.AsyncContext):
  """A worker's `AsyncExecutionContext`, run on the worker's own thread."""

  def __init__(self, stub: CountingStub):
    self.stub = stub
    self.context = tff.framework.AsyncExecutionContext(
        executor_fn=_executor_factory(stub),
        # TFF's own compile, Grappler included: a worker may have a GPU
        # (runtime.compile_for_cpu is for this machine's CPU).
        compiler_fn=tff.backends.native.desugar_and_transform_to_native,
        transform_args=tensorflow_computation.transform_args,
        transform_result=tensorflow_computation.transform_result,
    )
    self.runner = async_utils.AsyncThreadRunner()
    self.closed = False

  async def invoke(self, comp, arg):
    try:
      return await self.runner.await_coro_and_return_result(
          self.context.invoke(comp, arg)
      )
    except WorkerError:
      # A part of a round abandoned when another worker failed ends when the
      # channels close; it ends cancelled, not as an unread failure.
      if self.closed:
        raise asyncio.CancelledError() from None
      raise

  def invoke_sync(self, comp, arg):
    return self.runner.run_coro_and_return_result(self.context.invoke(comp, arg))


def _has_client_values(type_spec) -> bool:
  """Whether a computation's parameter holds values placed at clients."""
  if type_spec is None:
    return False
  return tff.types.contains(
      type_spec,
      lambda t: isinstance(t, tff.FederatedType)
      and t.placement is tff.CLIENTS
      and not t.all_equal,
  )


class WorkersContext(tff.framework.SyncContext):
  """Runs TFF computations on remote workers (see the module docstring)."""

  def __init__(self, stubs: list[CountingStub]):
    self.stubs = stubs
    self._workers = [_ThreadedContext(stub) for stub in stubs]
    self._mergeable = tff.framework.MergeableCompExecutionContext(self._workers)
    self._forms = {}

  def close(self) -> None:
    """Closes the channels; computations still running on a worker end."""
    for worker in self._workers:
      worker.closed = True
    for stub in self.stubs:
      stub.close()

  @property
  def wire_bytes(self) -> int:
    """Bytes sent to and received from every worker so far."""
    return sum(stub.sent + stub.received for stub in self.stubs)

  def mergeable_form(self, comp) -> tff.framework.MergeableCompForm:
    """`comp` compiled for splitting across workers (once per computation);
    WorkerError with the reason where it cannot be split."""
    if comp not in self._forms:
      try:
        self._forms[comp] = tff.backends.native.compile_to_mergeable_comp_form(comp)
      except (ValueError, TypeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WorkerError(
            "this process cannot be split across --workers (TFF's mergeable "
            f"form needs independent, mergeable aggregations): {reason}"
        ) from None
    return self._forms[comp]

  def invoke(self, comp, arg):
    if _has_client_values(comp.type_signature.parameter):
      return self._mergeable.invoke(self.mergeable_form(comp), arg)
    return self._workers[0].invoke_sync(comp, arg)


def connect(addresses, timeout: float | None = None) -> list[CountingStub]:
  """A stub per worker once every one accepts connections; WorkerError naming
  the first that does not within `timeout` seconds (CONNECT_TIMEOUT_S)."""
  timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
  stubs = []
  for address in addresses:
    channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
    try:
      grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
      channel.close()
      for stub in stubs:
        stub.close()
      raise WorkerError(
          f"worker {address} is unreachable (no connection within {timeout:g} s); "
          "start it with `python -m tff_feddst.worker --port=PORT` on that host"
      ) from None
    stubs.append(CountingStub(address, channel))
  return stubs


_active: WorkersContext | None = None


def wire_bytes() -> int | None:
  """Bytes exchanged with the workers so far (None when running locally)."""
  return None if _active is None else _active.wire_bytes


def check_splittable(comp) -> None:
  """On workers: compiles `comp` (a round) for splitting now, so that a
  process that cannot be split fails before its first round (WorkerError)."""
  if _active is not None:
    _active.mergeable_form(comp)


@contextlib.contextmanager
def execution(addresses):
  """TFF computations inside run on `addresses` (none given: locally, as before)."""
  global _active
  if not addresses:
    yield None
    return
  context = WorkersContext(connect(addresses))
  _active = context
  try:
    with tff.framework.get_context_stack().install(context):
      yield context
  finally:
    _active = None
    context.close()
