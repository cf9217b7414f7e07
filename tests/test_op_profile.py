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


def test_thread_settings_parse_and_bad_ones_are_refused():
  import pytest  # pylint: disable=g-import-not-at-top

  from benchmarks.op_profile import parse_threads  # pylint: disable=g-import-not-at-top

  assert parse_threads("default") is None
  assert parse_threads("1:2") == (1, 2)
  assert parse_threads("2:1") == (2, 1)
  for bad in ("2", "0:1", "1:0", "a:b", "1:2:3", "-1:2", ""):
    with pytest.raises(ValueError):
      parse_threads(bad)


def test_threads_report_orders_by_median_relative_to_the_fastest():
  from benchmarks.op_profile import threads_report  # pylint: disable=g-import-not-at-top

  text = threads_report(
      {"default": [1.5, 1.4, 1.6], "1:1": [2.8, 2.9, 2.7, 3.5], "1:2": [1.8, 1.6, 1.7]},
      clients=20, cores=2,
  )
  rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
  assert [row.split(" | ")[0] for row in rows] == ["| default", "| 1:2", "| 1:1"]
  assert rows[0] == "| default | 3 | 1.500 | 1.400-1.600 | 1.00 |"
  assert rows[1] == "| 1:2 | 3 | 1.700 | 1.600-1.800 | 1.13 |"
  # 1:1: median of four calls (2.8 + 2.9) / 2 = 2.85; 2.85 / 1.5 = 1.90.
  assert rows[2] == "| 1:1 | 4 | 2.850 | 2.700-3.500 | 1.90 |"


def test_a_thread_sweep_times_each_setting_in_its_own_process():
  import math  # pylint: disable=g-import-not-at-top

  from benchmarks.op_profile import sweep_threads  # pylint: disable=g-import-not-at-top

  lines = []
  times = sweep_threads(["1:1"], clients=1, total_clients=20, sparsity=0.8, repeats=2,
                        sweeps=1, log=lines.append)
  assert list(times) == ["1:1"] and len(times["1:1"]) == 2
  assert all(math.isfinite(t) and t > 0 for t in times["1:1"])
  assert lines and lines[0].startswith("[op_profile] threads 1:1, sweep 1/1: ")
