"""Where a cohort's local training spends its time, by TensorFlow op kind.

    python -m benchmarks.op_profile --output_dir=runs/profile

Packs one cohort of --clients clients of the paper setting (Fashion-MNIST,
pathological split of --total_clients, seed 0, 10 local epochs of 40
images, batch 32) from the data arrays, as a FedDST round does, and runs
`cohort.train` on the MNIST network with ERK random masks at --sparsity in
a `tf.function`, outside TFF. Prints and writes (profile.md, profile.csv):

- the median seconds of --repeats calls (after a tracing one);
- one call traced with the TensorFlow profiler: the seconds that ops of
  each kind (Conv2DBackpropFilter, Einsum, Mul, ...) ran, summed over
  threads, their shares, and how busy the cores were (op seconds / (call
  seconds x cores)).

The trace (xplane.pb, readable by TensorBoard's profile plugin) stays in
--output_dir/trace.

    python -m benchmarks.op_profile --threads=default,1:2,2:1,2:2,1:1

compares TensorFlow's thread pools instead (no trace): each setting,
`default` or INTER:INTRA (the inter-op and intra-op pool sizes, which a
process sets before its first op), times --repeats calls in a process of
its own; the settings run --thread_sweeps times, in turn and in reverse
order on alternate sweeps, so that a slow spell of the machine does not
fall on one setting. Writes threads.md and threads.csv (every call).
"""

import collections
import glob
import importlib
import os
import re
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

_FLAGS = flags.FLAGS

# A kernel event of the trace is named "<op name>:<op type>" (one colon, no
# spaces); runtime events ("ExecutorState::Process", "EagerLocalExecute:
# __inference_f_12") are not ops.
_OP_EVENT = re.compile(r"^[^:\s]+:([A-Za-z0-9_]+)$")


def op_kind(event_name: str) -> str | None:
  """The op type of a trace event name, without oneDNN's `_Mkl` /
  `_MklNative` prefix; None for an event that is not an op's kernel."""
  match = _OP_EVENT.match(event_name)
  if match is None:
    return None
  return re.sub(r"^_Mkl(Native)?", "", match.group(1))


def op_seconds(trace_dir: str) -> dict[str, float]:
  """Seconds per op kind, summed over every thread of the newest trace
  under `trace_dir` (a `tf.profiler.experimental` log directory)."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top

  paths = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.xplane.pb")))
  if not paths:
    raise FileNotFoundError(f"no profiler trace under {trace_dir}")
  space = xplane_pb2.XSpace()
  with open(paths[-1], "rb") as f:
    space.ParseFromString(f.read())
  seconds = collections.Counter()
  for plane in space.planes:
    for line in plane.lines:
      for event in line.events:
        kind = op_kind(plane.event_metadata[event.metadata_id].name)
        if kind is not None:
          seconds[kind] += event.duration_ps / 1e12
  return dict(seconds)


def _cohort_call(clients: int, total_clients: int, sparsity: float):
  """A function running `cohort.train` on one packed cohort, and its
  number of examples."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  import keras_models  # pylint: disable=g-import-not-at-top
  from tff_feddst import client_work  # pylint: disable=g-import-not-at-top
  from tff_feddst import cohort  # pylint: disable=g-import-not-at-top
  from tff_feddst import cohort_work  # pylint: disable=g-import-not-at-top
  from tff_feddst import data  # pylint: disable=g-import-not-at-top
  from tff_feddst import sparse_model  # pylint: disable=g-import-not-at-top

  fed = data.load_federated_data("fashion_mnist", "pathological", total_clients=total_clients, seed=0)
  tf.keras.utils.set_random_seed(0)
  ids = list(fed.nonempty_train_client_ids)[:clients]
  (value,) = cohort_work.pack_cohorts_from_arrays(
      fed, [(c, 100 + i) for i, c in enumerate(ids)], 10, 32, clients
  )
  steps = cohort.steps_dataset(value.get_single_element())
  keras_fn = lambda: keras_models.build_model("mnist_cnn", (28, 28, 1), 10)  # noqa: E731
  layout = sparse_model.build_layout(sparse_model.wrap_prunable(keras_fn()), sparsity)
  weights = sparse_model.initial_model_weights(keras_fn, 0, layout)
  masks = [None] * len(weights.trainable)
  for slot, i in enumerate(layout.kernel_index):
    masks[i] = tf.constant(np.stack([weights.non_trainable[layout.mask_index[slot]]] * clients))
  params = [tf.constant(np.stack([w] * clients)) for w in weights.trainable]
  network = cohort.CohortNetwork(sparse_model.wrap_prunable(keras_fn()))
  hp = cohort.Hyperparameters(0.01, 0.9, 0.001)

  @tf.function
  def call():
    trained, totals = cohort.train(network, hp, params, masks, client_work.without_autotune(steps))
    return trained[0][0, 0, 0, 0, 0], totals[0]

  examples = int(sum(fed.num_train_examples(c) for c in ids)) * 10
  return lambda: [t.numpy() for t in call()], examples


def _timed_calls(call, repeats: int) -> list[float]:
  """Seconds of each of `repeats` calls, after a first (tracing) one."""
  call()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    call()
    times.append(time.perf_counter() - start)
  return times


def run_profile(clients: int, total_clients: int, sparsity: float, repeats: int,
                output_dir: str) -> dict:
  """Times and traces the cohort's training; returns the figures."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  call, examples = _cohort_call(clients, total_clients, sparsity)
  times = _timed_calls(call, repeats)
  trace_dir = os.path.join(output_dir, "trace")
  tf.profiler.experimental.start(trace_dir)
  start = time.perf_counter()
  call()
  traced = time.perf_counter() - start
  tf.profiler.experimental.stop()
  seconds = op_seconds(trace_dir)
  return {
      "median_seconds": statistics.median(times),
      "all_seconds": times,
      "examples": examples,
      "traced_seconds": traced,
      "cores": len(os.sched_getaffinity(0)),
      "op_seconds": seconds,
  }


def report(figures: dict, clients: int, sparsity: float) -> str:
  """The markdown of profile.md."""
  total = sum(figures["op_seconds"].values())
  busy = total / (figures["traced_seconds"] * figures["cores"])
  lines = [
      f"# Cohort training by op kind ({clients} clients, paper setting, S = {sparsity})",
      "",
      f"`cohort.train` outside TFF, {figures['examples']:,} examples: median "
      f"{figures['median_seconds']:.3f} s of {len(figures['all_seconds'])} calls "
      f"({', '.join(f'{t:.3f}' for t in figures['all_seconds'])}).",
      f"Traced call: {figures['traced_seconds']:.3f} s; ops ran {total:.3f} s summed over "
      f"threads, {busy:.0%} of {figures['cores']} cores.",
      "",
      "| op kind | seconds (all threads) | share |",
      "|---|---:|---:|",
  ]
  for kind, value in sorted(figures["op_seconds"].items(), key=lambda kv: -kv[1]):
    if value >= 0.001:
      lines.append(f"| {kind} | {value:.3f} | {value / total:.1%} |")
  return "\n".join(lines) + "\n"


def parse_threads(setting: str) -> tuple[int, int] | None:
  """(inter-op, intra-op) threads of a --threads entry; None for `default`
  (TensorFlow's own choice)."""
  if setting == "default":
    return None
  parts = setting.split(":")
  if len(parts) != 2 or not all(p.isdigit() and int(p) >= 1 for p in parts):
    raise ValueError(
        f"thread setting {setting!r} is not 'default' or INTER:INTRA (two integers >= 1)"
    )
  return int(parts[0]), int(parts[1])


_TIMES_PREFIX = "op_profile times: "
# `python -m benchmarks.op_profile` finds the package from here.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def time_with_threads(setting: str, clients: int, total_clients: int, sparsity: float,
                      repeats: int) -> list[float]:
  """Seconds of `repeats` calls of the cohort's training (after a tracing
  one), in this process, with TensorFlow's thread pools set to `setting`
  (before any op runs)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  threads = parse_threads(setting)
  if threads is not None:
    tf.config.threading.set_inter_op_parallelism_threads(threads[0])
    tf.config.threading.set_intra_op_parallelism_threads(threads[1])
  call, _ = _cohort_call(clients, total_clients, sparsity)
  return _timed_calls(call, repeats)


def sweep_threads(settings, clients: int, total_clients: int, sparsity: float, repeats: int,
                  sweeps: int, log=print) -> dict[str, list[float]]:
  """{setting: every timed call}: each setting in a process of its own,
  `sweeps` times, alternating the order."""
  times = {setting: [] for setting in settings}
  for sweep in range(sweeps):
    for setting in settings if sweep % 2 == 0 else settings[::-1]:
      result = subprocess.run(
          [sys.executable, "-m", "benchmarks.op_profile", f"--time_with_threads={setting}",
           f"--clients={clients}", f"--total_clients={total_clients}",
           f"--sparsity={sparsity}", f"--repeats={repeats}"],
          cwd=_REPO_ROOT, capture_output=True, text=True, check=False,
      )
      lines = [l for l in result.stdout.splitlines() if l.startswith(_TIMES_PREFIX)]
      if result.returncode != 0 or not lines:
        raise RuntimeError(f"threads {setting}: the timing process failed:\n{result.stderr[-2000:]}")
      measured = [float(v) for v in lines[-1][len(_TIMES_PREFIX):].split(",")]
      times[setting] += measured
      log(f"[op_profile] threads {setting}, sweep {sweep + 1}/{sweeps}: "
          + ", ".join(f"{t:.3f}" for t in measured))
  return times


def threads_report(times: dict[str, list[float]], clients: int, cores: int) -> str:
  """The markdown of threads.md: per setting, the median and range of its
  calls, and the median relative to the fastest setting's."""
  medians = {setting: statistics.median(values) for setting, values in times.items()}
  best = min(medians.values())
  lines = [
      f"# Cohort training ({clients} clients, paper setting) by TensorFlow thread pools",
      "",
      f"`cohort.train` outside TFF on {cores} cores; each setting timed in its own process "
      "(inter-op:intra-op threads; `default` is TensorFlow's choice).",
      "",
      "| threads | calls | median s | min-max s | median / fastest |",
      "|---|---:|---:|---:|---:|",
  ]
  for setting, values in sorted(times.items(), key=lambda kv: medians[kv[0]]):
    lines.append(
        f"| {setting} | {len(values)} | {medians[setting]:.3f} | "
        f"{min(values):.3f}-{max(values):.3f} | {medians[setting] / best:.2f} |"
    )
  return "\n".join(lines) + "\n"


def _validate_threads(values) -> bool:
  try:
    for value in values:
      parse_threads(value)
  except ValueError:
    return False
  return True


def define_flags() -> None:
  flags.DEFINE_string("output_dir", "runs/profile", "Where profile.md, profile.csv and trace/ go.")
  flags.DEFINE_integer("clients", 20, "Clients in the cohort (K).")
  flags.DEFINE_integer("total_clients", 400, "Clients in the pool (N).")
  flags.DEFINE_float("sparsity", 0.8, "Sparsity of the ERK random masks.")
  flags.DEFINE_integer("repeats", 5, "Timed calls (after a tracing one).")
  flags.register_validator("clients", lambda v: v >= 1, "--clients must be >= 1")
  flags.register_validator("repeats", lambda v: v >= 1, "--repeats must be >= 1")
  flags.register_validator("sparsity", lambda v: 0 <= v < 1, "--sparsity must be in [0, 1)")
  flags.register_validator(
      "total_clients", lambda v: v >= 1, "--total_clients must be >= 1"
  )
  flags.DEFINE_list(
      "threads", [],
      "Compare TensorFlow thread-pool settings instead of profiling: 'default' or "
      "INTER:INTRA (inter-op and intra-op threads), each timed in its own process.",
  )
  flags.DEFINE_integer("thread_sweeps", 2, "Times each --threads setting is timed, in turn.")
  flags.DEFINE_string(
      "time_with_threads", None,
      "(Used by --threads.) Time the calls with this setting in this process and print them.",
  )
  flags.register_validator(
      "threads", _validate_threads, "--threads entries are 'default' or INTER:INTRA (integers >= 1)"
  )
  flags.register_validator("thread_sweeps", lambda v: v >= 1, "--thread_sweeps must be >= 1")


def main(argv):
  del argv
  if _FLAGS.clients > _FLAGS.total_clients:
    sys.exit(f"error: --clients={_FLAGS.clients} must not exceed --total_clients={_FLAGS.total_clients}")
  importlib.import_module("tff_feddst")  # sets up oneDNN before TensorFlow loads
  from tff_feddst import runtime  # pylint: disable=g-import-not-at-top

  if _FLAGS.time_with_threads is not None:
    if not _validate_threads([_FLAGS.time_with_threads]):
      sys.exit(f"error: --time_with_threads={_FLAGS.time_with_threads} is not 'default' or INTER:INTRA")
    with runtime.managed_runtime():
      times = time_with_threads(
          _FLAGS.time_with_threads, _FLAGS.clients, _FLAGS.total_clients, _FLAGS.sparsity,
          _FLAGS.repeats,
      )
    print(_TIMES_PREFIX + ",".join(f"{t:.6f}" for t in times), flush=True)
    return
  os.makedirs(_FLAGS.output_dir, exist_ok=True)
  if _FLAGS.threads:
    times = sweep_threads(
        _FLAGS.threads, _FLAGS.clients, _FLAGS.total_clients, _FLAGS.sparsity, _FLAGS.repeats,
        _FLAGS.thread_sweeps,
    )
    text = threads_report(times, _FLAGS.clients, len(os.sched_getaffinity(0)))
    with open(os.path.join(_FLAGS.output_dir, "threads.md"), "w") as f:
      f.write(text)
    with open(os.path.join(_FLAGS.output_dir, "threads.csv"), "w") as f:
      f.write("threads,call,seconds\n")
      for setting, values in times.items():
        for i, value in enumerate(values):
          f.write(f"{setting},{i + 1},{value:.6f}\n")
    print(text, end="")
    return
  with runtime.managed_runtime():
    figures = run_profile(
        _FLAGS.clients, _FLAGS.total_clients, _FLAGS.sparsity, _FLAGS.repeats, _FLAGS.output_dir
    )
  text = report(figures, _FLAGS.clients, _FLAGS.sparsity)
  with open(os.path.join(_FLAGS.output_dir, "profile.md"), "w") as f:
    f.write(text)
  with open(os.path.join(_FLAGS.output_dir, "profile.csv"), "w") as f:
    f.write("op_kind,seconds\n")
    for kind, value in sorted(figures["op_seconds"].items(), key=lambda kv: -kv[1]):
      f.write(f"{kind},{value:.6f}\n")
  print(text, end="")


if __name__ == "__main__":
  define_flags()
  app.run(main)
