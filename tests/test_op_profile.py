"""benchmarks.op_profile: trace events are grouped by op kind."""

from benchmarks.op_profile import op_kind
from benchmarks.op_profile import op_seconds
from benchmarks.op_profile import report


def test_op_kind_of_kernel_events_and_none_for_runtime_events():
  assert op_kind("gradient_tape/Conv2DBackpropFilter:_MklNativeConv2DBackpropFilter") == "Conv2DBackpropFilter"
  assert op_kind("einsum/Einsum:_MklEinsum") == "Einsum"
  assert op_kind("mul_22:Mul") == "Mul"
  assert op_kind("ArithmeticOptimizer/AddOpsRewrite_add_13:AddN") == "AddN"
  assert op_kind("ExecutorState::Process") is None
  assert op_kind("KernelAndDeviceFunc::Run") is None
  assert op_kind("EagerLocalExecute: __inference_run_1726") is None
  assert op_kind("ReduceDatasetOp::DoCompute") is None


def test_op_seconds_of_a_real_trace(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  a = tf.random.stateless_normal([256, 256], seed=[0, 1])

  @tf.function
  def work(a):
    for _ in range(10):
      a = tf.matmul(a, a) * 0.01
    return a

  work(a)
  tf.profiler.experimental.start(str(tmp_path))
  work(a).numpy()
  tf.profiler.experimental.stop()
  seconds = op_seconds(str(tmp_path))
  assert seconds["MatMul"] > 0 and seconds["Mul"] > 0
  assert not {"Process", "Run", "DoCompute"} & set(seconds)
  text = report(
      {"op_seconds": seconds, "traced_seconds": 1.0, "cores": 2, "examples": 10,
       "median_seconds": 0.5, "all_seconds": [0.5]},
      clients=1, sparsity=0.8,
  )
  assert "| MatMul |" in text  # (rows under a millisecond are left out)
