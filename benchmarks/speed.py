"""Simulation speed of the TFF runtime: seconds per round, and where they go.

    python -m benchmarks.speed --output_dir=runs/speed
    python -m benchmarks.speed --quick --output_dir=runs/speed_quick   # smoke

Fashion-MNIST, pathological split, for each algorithm (fedavg, feddst with
S = 0.8, alpha 0.05, Delta_R 10, R_end 100):

- seconds per round (median over --rounds rounds, the first excluded) for
  each K in --clients_per_round_list at N = the first --total_clients_list
  entry (20 examples per class, 40 per client: the paper's setting);
- the same for each N in --total_clients_list at K = the first
  --clients_per_round_list entry, with 7 examples per class (14 per client)
  so that 4000 clients fit in Fashion-MNIST's 6,000 images per class: the
  round cost should depend on K, not N;
- local examples processed per second, the training arithmetic's GFLOP/s
  (3 x the dense network's forward FLOPs per example) and its share of the
  float32 matmul rate measured at the start of the same run, peak RSS
  (Python plus its children, i.e. TFF's worker_binary), the cost of one
  `phases.Evaluator.evaluate`;
- a decomposition of a round (see METHOD below) and a cProfile attribution
  of the driver-side Python time.

FedDST readjusts in rounds r with (r - 1) % Delta_R == 0 and alpha_r > 0
(`masks.is_readjustment_round`). So that the measured rounds contain one,
FedDST's rounds are numbered from Delta_R (its client work's round counter
is set there, as if resuming a longer run): round Delta_R is the excluded
warm-up, round Delta_R + 1 readjusts. Which rounds actually readjusted is
read back from the process's own measurements and written to the outputs.

Outputs in --output_dir, each written atomically:
  speed.csv         one row per (algorithm, N, K, examples per class)
  speed_rounds.csv  one row per round
  speed.md          the tables and the method
  profile.txt       the cProfile listings (with --profile)
"""

import collections
import collections.abc
import contextlib
import cProfile
import csv
import dataclasses
import datetime
import gc
import io
import os
import platform
import pstats
import statistics
import sys
import threading
import time
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from tff_feddst import files  # noqa: E402
from tff_feddst import names  # noqa: E402
from tff_feddst import runtime  # noqa: E402

# The algorithms whose round can be decomposed (their pure-TF client update
# is rebuilt below).
SPEED_ALGORITHMS = ("fedavg", "feddst")

QUICK = dict(
    total_clients_list=(40, 80),
    clients_per_round_list=(2, 4),
    local_epochs=1,
    rounds=3,
)

METHOD = """\
Rounds are run by `rounds.RoundStep`, the step `training.run_experiment`
runs (sampling without replacement, the clients' data sets, `process.next`,
reading the global weights back, the communication ledger and mask
statistics), on a phase built by `phases.build_phase` from the settings
`ExperimentConfig.resolve` fills in. The step's sub-steps are timed by
wrapping them: `sample_clients` (sampling), `client_datasets` (data sets),
`run_clients` (`process.next` and reading its metrics: next_seconds) and
the process's `get_model_weights` (0 where the step reads the weights from
the state itself, `rounds.model_weights`); bookkeeping is the rest of the step
(ledger and mask statistics). A round's seconds are those of the whole
step; evaluation is timed separately. The
first round of every configuration (tracing, worker start-up) is excluded
from the median. Peak memory is the largest sum of the RSS of this Python
process and its child processes (TFF's `worker_binary`), sampled every
0.1 s by a background thread while the configuration ran. The worker is
restarted between configurations, so its peak is the configuration's own;
the Python process is not, so its RSS also holds what earlier
configurations left (start_rss_mib is the RSS when the configuration
began, with its data loaded).

Decomposition of a round. `phases.build_phase` is run with
`compose_learning_process` intercepted, so the blocks it composes (the
distributor, client work, aggregator and finalizer of the real process) are
captured. From them three TFF computations are composed, each taking the
process's (state, client data) and returning the same small value (the
client work's metrics, plus a scalar digest, computed inside TFF, of the
aggregated update / the new weights):
  A = distributor + client work,  B = A + aggregator,  D = B + finalizer.
They run on the current state with K empty client data sets (the clients'
updates still have their real shapes, no training is done), compiled first,
then decomposition_repeats times each; the minimum of each is used. The
measured rounds (the plain ones for FedDST; its readjustment rounds are
reported separately) are split, in seconds, into:
  client training  = the same client update in plain TF outside TFF (dense
                     algorithms: TFF's model-delta update function; sparse
                     ones: `client_work.build_client_update`;
                     same weights, data sets of a measured round's clients,
                     outputs materialised), timed for the first
                     pure_tf_clients of them one after another (at
                     least 5 calls, cycling when K is smaller), median x K;
  aggregation      = min(B) - min(A);
  server update    = min(D) - min(B) (the finalizer);
  TFF overhead     = median process.next - client training - aggregation
                     - server update, plus get_model_weights: broadcasting,
                     serialising weights and data sets into the executor,
                     dispatch to the worker, scheduling of the clients,
                     returning the state, reading the global weights back
                     (the empty-data A is reported too: the part of it that
                     does not depend on the data);
  driver Python    = sampling + data set construction + bookkeeping
                     (median, timed as above);
  evaluation       = one `Evaluator.evaluate` / eval_every (amortised; the
                     driver evaluates every eval_every rounds).
The total is their sum (about the median round plus the amortised
evaluation; medians of parts need not add up exactly). TFF
runs a round's clients concurrently in its worker while the pure-TF clients
run one after another; on several cores the TFF overhead can therefore
come out small or negative. It is reported as measured, not clipped.

cProfile (with --profile): one more round plus one evaluation run under
cProfile in the driver thread and in the thread in which TFF's execution
context runs its event loop (TFF serialises arguments and deserialises
results there). Reported are the cumulative seconds of: sampling
(`RoundStep.sample_clients`), data set construction (`client_datasets`),
ledger and mask statistics (the rest of `RoundStep.__call__`),
`process.next` as seen from the driver (`run_clients`),
`get_model_weights`, TFF's `serialize_value` / `deserialize_value`,
TFF's gRPC calls to its worker (create_value / create_call / compute etc.;
these block until the worker has computed, so they include client
training), and `Evaluator.evaluate`. The profiler slows Python code, so
these are shares of a profiled round, not of the timed ones.
"""

# ----------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class SpeedSettings:
  """What the speed benchmark measures (the paper's setting by default)."""

  algorithms: tuple[str, ...] = SPEED_ALGORITHMS
  rounds: int = 6
  clients_per_round_list: tuple[int, ...] = (20, 50, 100)
  total_clients_list: tuple[int, ...] = (400, 4000)
  local_epochs: int = 10
  batch_size: int = 32
  # Examples per class per client: the K sweep (paper) and the N sweep.
  sweep_examples_per_class: int = 20
  scaling_examples_per_class: int = 7
  sparsity: float = 0.8
  readjustment_ratio: float = 0.05
  rounds_between_readjustments: int = 10
  readjustment_end_round: int = 100
  eval_every: int = 10
  pure_tf_clients: int = 20
  decomposition_repeats: int = 5
  evaluation_repeats: int = 3
  profile: bool = True
  seed: int = 0
  data_dir: str | None = None
  # None: the algorithm's default (cohort where it has a cohort engine).
  client_execution: str | None = None
  # Clients per cohort (0: run.py's default, cohorts of at most
  # names.MAX_DEFAULT_COHORT, `rounds.default_cohort_size`).
  cohort_size: int = 0

  def validate(self) -> None:
    """Raises ValueError (one line) for settings that cannot be measured."""
    for name in self.algorithms:
      if name not in SPEED_ALGORITHMS:
        raise ValueError(
            f"algorithm {name!r} is not measured; choose from {', '.join(SPEED_ALGORITHMS)}"
        )
    if not self.algorithms:
      raise ValueError("no algorithm to measure")
    if self.rounds < 2:
      raise ValueError(f"rounds must be >= 2 (the first is excluded), got {self.rounds}")
    for label, values in (
        ("clients_per_round_list", self.clients_per_round_list),
        ("total_clients_list", self.total_clients_list),
    ):
      if not values or any(v < 1 for v in values):
        raise ValueError(f"{label} must be a non-empty list of positive integers")
    for name in ("pure_tf_clients", "decomposition_repeats", "evaluation_repeats"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
    # The run's settings are checked where every run's are (a ConfigError).
    for algorithm in self.algorithms:
      for case in cases(self):
        experiment_config(algorithm, case, self, "unused")


@dataclasses.dataclass(frozen=True)
class Case:
  """One data configuration (measured for every algorithm)."""

  section: str  # "clients_per_round" or "total_clients": which sweep
  total_clients: int
  clients_per_round: int
  examples_per_class: int


def cases(settings: SpeedSettings) -> list[Case]:
  """The K sweep at the first N, then the N sweep at the first K."""
  base_n = settings.total_clients_list[0]
  found = [
      Case("clients_per_round", base_n, k, settings.sweep_examples_per_class)
      for k in dict.fromkeys(settings.clients_per_round_list)
  ]
  if len(set(settings.total_clients_list)) > 1:
    base_k = settings.clients_per_round_list[0]
    found += [
        Case("total_clients", n, base_k, settings.scaling_examples_per_class)
        for n in dict.fromkeys(settings.total_clients_list)
    ]
  return found


CSV_COLUMNS = (
    "algorithm",
    "section",
    "total_clients",
    "clients_per_round",
    "examples_per_class",
    "examples_per_client",
    "local_epochs",
    "batch_size",
    "measured_rounds",
    "process_rounds",
    "readjusted_rounds",
    "build_seconds",
    "first_round_seconds",
    "round_seconds_median",
    "round_seconds_min",
    "round_seconds_max",
    "next_seconds_median",
    "readjust_round_seconds_median",
    "plain_round_seconds_median",
    "examples_per_second",
    "training_gflops_per_second",
    "matmul_gflops_per_second",
    "matmul_share",
    "start_rss_mib",
    "peak_rss_mib",
    "peak_worker_rss_mib",
    "eval_seconds",
    "eval_to_round_ratio",
    "decomp_rounds",
    "decomp_kind",
    "decomp_total_seconds",
    "client_training_seconds",
    "tff_overhead_seconds",
    "aggregation_seconds",
    "server_update_seconds",
    "driver_python_seconds",
    "evaluation_amortised_seconds",
    "client_training_pct",
    "tff_overhead_pct",
    "aggregation_pct",
    "server_update_pct",
    "driver_python_pct",
    "evaluation_amortised_pct",
    "pure_tf_seconds_per_client",
    "pure_tf_clients_timed",
    "empty_data_client_work_seconds",
    "get_weights_seconds",
    "profiled_round_seconds",
    "prof_sampling_seconds",
    "prof_datasets_seconds",
    "prof_bookkeeping_seconds",
    "prof_next_seconds",
    "prof_get_weights_seconds",
    "prof_tff_serialize_seconds",
    "prof_tff_deserialize_seconds",
    "prof_tff_worker_calls_seconds",
    "prof_evaluate_seconds",
)

ROUND_COLUMNS = (
    "algorithm",
    "total_clients",
    "clients_per_round",
    "examples_per_class",
    "round_index",
    "process_round",
    "excluded",
    "readjusted",
    "round_seconds",
    "next_seconds",
    "sample_seconds",
    "datasets_seconds",
    "get_weights_seconds",
    "bookkeeping_seconds",
    "examples",
)

DECOMPOSITION = (
    ("client_training", "client training"),
    ("tff_overhead", "TFF overhead"),
    ("aggregation", "aggregation"),
    ("server_update", "server update"),
    ("driver_python", "driver Python"),
    ("evaluation_amortised", "evaluation"),
)

# ----------------------------------------------------------------- helpers


def _csv_text(columns, rows) -> str:
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
  writer.writeheader()
  for row in rows:
    writer.writerow({
        k: round(float(v), 6) if isinstance(v, (float, np.floating)) else v
        for k, v in row.items()
    })
  return out.getvalue()


class MemorySampler:
  """Peak RSS of this process plus its children, sampled by a thread."""

  def __init__(self, interval: float = 0.1):
    self._interval = interval
    self._proc = psutil.Process()
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread = None
    self.reset()

  def _sample(self) -> tuple[int, int]:
    total = self._proc.memory_info().rss
    workers = 0
    for child in self._proc.children(recursive=True):
      with contextlib.suppress(psutil.Error):
        rss = child.memory_info().rss
        total += rss
        if child.name() == runtime.WORKER_NAME:
          workers += rss
    return total, workers

  def sample_now(self) -> None:
    with contextlib.suppress(psutil.Error):
      total, workers = self._sample()
      with self._lock:
        self._peak = max(self._peak, total)
        self._peak_workers = max(self._peak_workers, workers)

  def reset(self) -> None:
    with self._lock:
      self._peak = 0
      self._peak_workers = 0

  def current_mib(self) -> float:
    with contextlib.suppress(psutil.Error):
      return self._sample()[0] / 2**20
    return float("nan")

  def peaks_mib(self) -> tuple[float, float]:
    self.sample_now()
    with self._lock:
      return self._peak / 2**20, self._peak_workers / 2**20

  def _run(self) -> None:
    while not self._stop.wait(self._interval):
      self.sample_now()

  def __enter__(self):
    self._stop.clear()
    self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


@contextlib.contextmanager
def capture_composed_blocks():
  """Records the arguments of every `compose_learning_process` call.

  Yields a list to which (initial_weights_fn, distributor, client_work,
  aggregator, finalizer) tuples are appended; TFF's FedAvg builder and
  `feddst.build_feddst` both compose through this function.
  """
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top
  from tensorflow_federated.python.learning.templates import composers  # pylint: disable=g-import-not-at-top

  original = composers.compose_learning_process
  captured = []

  def capturing(*args, **kwargs):
    names = ("initial_model_weights_fn", "model_weights_distributor",
             "client_work", "model_update_aggregator", "model_finalizer")
    values = list(args) + [kwargs[n] for n in names[len(args):]]
    captured.append(tuple(values))
    return original(*args, **kwargs)

  composers.compose_learning_process = capturing
  tff.learning.templates.compose_learning_process = capturing
  try:
    yield captured
  finally:
    composers.compose_learning_process = original
    tff.learning.templates.compose_learning_process = original


def partial_processes(process, blocks):
  """TFF computations running a round's blocks up to each block (A, B, D).

  Each takes the process's (state, client data) and returns the client work's
  measurements (and a scalar digest of the aggregated update / new weights),
  so that what comes back to Python is the same small value for all three.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  _, distributor, client_work, aggregator, finalizer = blocks
  state_type = process.next.type_signature.parameter[0]
  data_type = process.next.type_signature.parameter[1]

  @tff.federated_computation(state_type, data_type)
  def through_client_work(state, data):
    sent = distributor.next(state.distributor, state.global_model_weights)
    work = client_work.next(state.client_work, sent.result, data)
    return work.measurements

  def digest_of(value_type):
    # A scalar that depends on every tensor: makes TFF compute the value
    # without sending it back to Python.
    @tff.tensorflow.computation(value_type)
    def digest(value):
      return tf.add_n(
          [tf.reduce_sum(tf.cast(t, tf.float32)) for t in tf.nest.flatten(value)]
      )

    return digest

  update_type = aggregator.next.type_signature.result.result.member
  weights_type = process.next.type_signature.result.state.member.global_model_weights
  update_digest = digest_of(update_type)
  weights_digest = digest_of(weights_type)

  @tff.federated_computation(state_type, data_type)
  def through_aggregation(state, data):
    sent = distributor.next(state.distributor, state.global_model_weights)
    work = client_work.next(state.client_work, sent.result, data)
    merged = aggregator.next(
        state.aggregator, work.result.update, work.result.update_weight
    )
    return work.measurements, tff.federated_map(update_digest, merged.result)

  @tff.federated_computation(state_type, data_type)
  def through_finalizer(state, data):
    sent = distributor.next(state.distributor, state.global_model_weights)
    work = client_work.next(state.client_work, sent.result, data)
    merged = aggregator.next(
        state.aggregator, work.result.update, work.result.update_weight
    )
    final = finalizer.next(state.finalizer, state.global_model_weights, merged.result)
    return work.measurements, tff.federated_map(weights_digest, final.result)

  return through_client_work, through_aggregation, through_finalizer


def _tff_event_loop():
  """The asyncio loop (in its own thread) of TFF's current execution context."""
  try:
    from tensorflow_federated.python.core.impl.context_stack import context_stack_impl  # pylint: disable=g-import-not-at-top

    context = context_stack_impl.context_stack.current
    return context._async_runner._event_loop  # pylint: disable=protected-access
  except AttributeError:
    return None


@contextlib.contextmanager
def profile_driver_and_tff():
  """cProfile of this thread and of TFF's event-loop thread; yields both."""
  main = cProfile.Profile()
  loop_prof = cProfile.Profile()
  loop = _tff_event_loop()

  def in_loop(fn):
    done = threading.Event()

    def call():
      fn()
      done.set()

    loop.call_soon_threadsafe(call)
    if not done.wait(30):
      raise RuntimeError("TFF's event loop did not answer")

  profiles = {"driver": main, "tff_loop": loop_prof if loop is not None else None}
  if loop is not None:
    in_loop(loop_prof.enable)
  main.enable()
  try:
    yield profiles
  finally:
    main.disable()
    if loop is not None:
      in_loop(loop_prof.disable)


def _cumulative(profile, predicate, combine=max) -> float:
  """Cumulative seconds of the functions matching predicate(file, name):
  the largest (`combine=max`) or their sum (`sum`, for non-nested ones)."""
  if profile is None:
    return float("nan")
  stats = pstats.Stats(profile)
  return float(combine(
      [0.0] + [
          cumtime
          for (filename, _, name), (_, _, _, cumtime, _) in stats.stats.items()  # pytype: disable=attribute-error
          if predicate(filename, name)
      ]
  ))


def _listing(profile, title: str, limit: int = 40) -> str:
  out = io.StringIO()
  out.write(f"== {title} ==\n")
  if profile is None:
    out.write("(not available)\n")
    return out.getvalue()
  pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(limit)
  return out.getvalue()


def _median(values) -> float:
  return float(statistics.median(values)) if values else float("nan")



def _defined_in(path: str) -> str:
  """The last two parts of a source path (how profile entries are matched)."""
  return os.path.join(*os.path.normpath(path).split(os.sep)[-2:])


# ------------------------------------------------------------- the driver

# The RoundStep methods wrapped with stopwatches, and their timing keys.
_TIMED_STEPS = (
    ("sample_clients", "sample_seconds"),
    ("client_datasets", "datasets_seconds"),
    ("run_clients", "next_seconds"),
)


class _ObservedProcess:
  """A phase's process as its RoundStep sees it: `get_model_weights` timed,
  the last metrics of `next` and the last weights read kept; the rest passes
  through to the process."""

  def __init__(self, process, rounds: "TimedRounds"):
    self._process = process
    self._rounds = rounds

  def __getattr__(self, name):
    return getattr(self._process, name)

  def next(self, state, data):
    output = self._process.next(state, data)
    self._rounds.metrics = output.metrics
    # The weights the round step reads next (`rounds.model_weights`: from
    # the state itself where it holds them, without `get_model_weights`).
    from tff_feddst import rounds as rounds_lib  # pylint: disable=g-import-not-at-top  (TFF)

    self._rounds.weights = rounds_lib.model_weights(self._process, output.state)
    return output

  def get_model_weights(self, state):
    start = time.perf_counter()
    self._rounds.weights = self._process.get_model_weights(state)
    self._rounds.seconds["get_weights_seconds"] += time.perf_counter() - start
    return self._rounds.weights


class TimedRounds:
  """A phase's `rounds.RoundStep` with its sub-steps timed (see METHOD).

  The step's own `__call__` runs every round; its `sample_clients`,
  `client_datasets` and `run_clients` are wrapped with stopwatches, and the
  phase's process is replaced by an `_ObservedProcess` (`self.process` is
  the process itself). Bookkeeping is the rest of the step.
  """

  def __init__(self, config, phase, fed_data, state):
    self.phase = phase
    self.process = phase.built.process  # the process itself, unwrapped
    self.seconds = collections.defaultdict(float)
    self.metrics = None
    self.weights = None
    self.state = state
    phase.built.process = _ObservedProcess(self.process, self)
    from tff_feddst import rounds as rounds_lib  # pylint: disable=g-import-not-at-top  (TFF)

    sampler = np.random.default_rng(rounds_lib.seed(config.seed, 2))
    self.step = rounds_lib.RoundStep(
        config, phase, fed_data, sampler, phase.new_ledger(None), state
    )
    for method, key in _TIMED_STEPS:
      setattr(self.step, method, self._stopwatch(key, getattr(self.step, method)))

  def _stopwatch(self, key: str, method):
    def timed(*args, **kwargs):
      start = time.perf_counter()
      try:
        return method(*args, **kwargs)
      finally:
        self.seconds[key] += time.perf_counter() - start

    return timed

  def _num_readjusted(self) -> np.ndarray:
    """The last round's per-layer readjustment counts (dense: [0])."""
    if self.metrics is None or not self.phase.built.sparse:
      return np.zeros([1], np.int32)
    readjustment = self.metrics["client_work"]["readjustment"]
    return np.asarray(readjustment["num_readjusted"], np.int32)

  def round(self, process_round: int) -> dict:
    """Runs round `process_round`; returns its timings (a speed_rounds.csv row)."""
    self.seconds.clear()
    self.metrics = None
    start = time.perf_counter()
    self.state, result = self.step(self.state, process_round)
    timing = {"round_seconds": time.perf_counter() - start}
    for key in ("sample_seconds", "datasets_seconds", "next_seconds", "get_weights_seconds"):
      timing[key] = self.seconds[key]
    timing["bookkeeping_seconds"] = timing["round_seconds"] - sum(self.seconds.values())
    fed_data = self.step.fed_data
    timing.update(
        process_round=process_round,
        readjusted=result.readjusted,
        examples=sum(fed_data.num_train_examples(c) for c in result.client_ids),
        client_ids=list(result.client_ids),  # not written out
        num_readjusted=self._num_readjusted(),  # not written out
    )
    return timing


def first_process_round(algorithm: str, settings: SpeedSettings) -> int:
  """Round number of the warm-up round (sparse algorithms: the one before a
  readjustment)."""
  from tff_feddst import algorithms  # pylint: disable=g-import-not-at-top
  from tff_feddst import masks as masks_lib  # pylint: disable=g-import-not-at-top

  start = settings.rounds_between_readjustments
  if algorithms.get(algorithm).sparse and masks_lib.is_readjustment_round(
      start + 1,
      settings.readjustment_ratio,
      settings.rounds_between_readjustments,
      settings.readjustment_end_round,
  ):
    return start
  return 1  # Dense, or no readjustment scheduled there (alpha 0 or R_end too small).


def _with_round_counter(state, process_round: int):
  """The composed state with the client work's round counter set."""
  work = state.client_work
  if not (isinstance(work, collections.abc.Mapping) and "round_num" in work):
    raise RuntimeError("the client work state has no round_num to set")
  return state._replace(
      client_work=collections.OrderedDict(round_num=np.int32(process_round))
  )


def experiment_config(algorithm: str, case: Case, settings: SpeedSettings, output_dir: str):
  """The resolved settings of one measured configuration (nothing is written
  to `output_dir` through them)."""
  from tff_feddst.config import ExperimentConfig  # pylint: disable=g-import-not-at-top

  return ExperimentConfig(
      algorithm=algorithm,
      dataset="fashion_mnist",
      data_dir=settings.data_dir,
      partition="pathological",
      total_clients=case.total_clients,
      classes_per_client=2,
      examples_per_class=case.examples_per_class,
      clients_per_round=case.clients_per_round,
      # The warm-up, the measured rounds and the profiled one.
      rounds=first_process_round(algorithm, settings) + settings.rounds,
      local_epochs=settings.local_epochs,
      batch_size=settings.batch_size,
      sparsity=settings.sparsity,
      readjustment_ratio=settings.readjustment_ratio,
      rounds_between_readjustments=settings.rounds_between_readjustments,
      readjustment_end_round=settings.readjustment_end_round,
      eval_every=settings.eval_every,
      seed=settings.seed,
      output_dir=output_dir,
      client_execution=settings.client_execution,
      cohort_size=settings.cohort_size,
  ).resolve()


# ------------------------------------------------------------ measurement


@dataclasses.dataclass
class Bench:
  """One (algorithm, data configuration), built and ready to run."""

  tag: str
  config: object  # the resolved `ExperimentConfig`
  context: object  # `training.RunContext`
  phase: object  # `phases.Phase`
  blocks: tuple  # what `compose_learning_process` composed
  rounds: TimedRounds
  first_round: int
  build_seconds: float


def build_bench(algorithm: str, case: Case, context, settings: SpeedSettings, log) -> Bench:
  """Builds the phase (its blocks captured) and its timed round step."""
  from tff_feddst import phases  # pylint: disable=g-import-not-at-top

  config = experiment_config(algorithm, case, settings, context.config.output_dir)
  tag = (
      f"{algorithm} N={case.total_clients} K={case.clients_per_round} "
      f"{2 * case.examples_per_class} ex/client E={settings.local_epochs}"
  )
  start = time.perf_counter()
  # Every configuration builds its own process: the blocks are captured as
  # they are composed, and the build time is part of the figures.
  phases.clear_built_cache()
  with capture_composed_blocks() as captured:
    phase = phases.build_phase(1, config, context, lambda line: log(f"[speed] {line}"))
  if not captured:
    raise RuntimeError(f"{algorithm}: the process was not built by compose_learning_process")
  first_round = first_process_round(algorithm, settings)
  state = phase.initial_state()
  if first_round != 1:
    state = _with_round_counter(state, first_round)
  timed = TimedRounds(config, phase, context.fed_data, state)
  return Bench(tag, config, context, phase, captured[-1], timed, first_round,
               time.perf_counter() - start)


def run_rounds(bench: Bench, settings: SpeedSettings, log) -> list[dict]:
  """The timed rounds (the first one excluded from the figures)."""
  rounds = []
  for i in range(settings.rounds):
    timing = bench.rounds.round(bench.first_round + i)
    timing.update(round_index=i + 1, excluded=int(i == 0))
    rounds.append(timing)
    log(
        f"[speed] {bench.tag}: round {timing['process_round']}"
        f"{' (readjustment)' if timing['readjusted'] else ''}"
        f"{' (warm-up, excluded)' if i == 0 else ''}: "
        f"{timing['round_seconds']:.2f} s (next {timing['next_seconds']:.2f} s)"
    )
  return rounds


def time_evaluation(bench: Bench, settings: SpeedSettings) -> float:
  """Median seconds of one evaluation of the global model (after a tracing one)."""
  trainable = bench.rounds.weights.trainable
  bench.phase.evaluator.evaluate(trainable)  # traces
  times = []
  for _ in range(settings.evaluation_repeats):
    t0 = time.perf_counter()
    bench.phase.evaluator.evaluate(trainable)
    times.append(time.perf_counter() - t0)
  return _median(times)


def _speed_figures(bench: Bench, case: Case, settings: SpeedSettings, rounds) -> dict:
  """The speed.csv columns read off the timed rounds."""
  from tff_feddst import costs  # pylint: disable=g-import-not-at-top

  measured = rounds[1:]
  seconds = [r["round_seconds"] for r in measured]
  round_median = _median(seconds)
  examples_per_round = _median([r["examples"] for r in measured])
  readjust_times = [r["round_seconds"] for r in measured if r["readjusted"]]
  plain_times = [r["round_seconds"] for r in measured if not r["readjusted"]]
  return {
      "algorithm": bench.config.algorithm,
      "section": case.section,
      "total_clients": case.total_clients,
      "clients_per_round": case.clients_per_round,
      "examples_per_class": case.examples_per_class,
      "examples_per_client": examples_per_round / case.clients_per_round,
      "local_epochs": settings.local_epochs,
      "batch_size": settings.batch_size,
      "measured_rounds": len(measured),
      "process_rounds": " ".join(str(r["process_round"]) for r in measured),
      "readjusted_rounds": " ".join(str(r["process_round"]) for r in measured if r["readjusted"]),
      "build_seconds": bench.build_seconds,
      "first_round_seconds": rounds[0]["round_seconds"],
      "round_seconds_median": round_median,
      "round_seconds_min": min(seconds),
      "round_seconds_max": max(seconds),
      "next_seconds_median": _median([r["next_seconds"] for r in measured]),
      "readjust_round_seconds_median": _median(readjust_times) if readjust_times else "",
      "plain_round_seconds_median": _median(plain_times) if plain_times else "",
      "examples_per_second": examples_per_round * settings.local_epochs / round_median,
      "training_gflops_per_second": (
          TRAINING_FLOPS_PER_FORWARD * costs.forward_flops(bench.phase.dense_flops)
          * examples_per_round * settings.local_epochs / round_median / 1e9
      ),
  }


# A training example's arithmetic: the forward pass, the gradient with
# respect to the activations and the gradient with respect to the weights,
# each about the forward pass's FLOPs. Both client engines compute every
# layer dense (a mask multiplies, it does not skip), so the dense network's
# forward FLOPs count at every sparsity.
TRAINING_FLOPS_PER_FORWARD = 3


def matmul_gflops(size: int = 2048, repeats: int = 20, trials: int = 3) -> float:
  """This machine's float32 matmul rate now (GFLOP/s, best of `trials`):
  the yardstick of the achieved rates, measured in the same run because the
  machine's speed varies from day to day."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  a = tf.random.stateless_normal([size, size], seed=[0, 1])
  b = tf.random.stateless_normal([size, size], seed=[0, 2])
  tf.matmul(a, b).numpy()
  best = 0.0
  for _ in range(trials):
    start = time.perf_counter()
    for _ in range(repeats):
      c = tf.matmul(a, b)
    c.numpy()
    best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9)
  return best


def measure_case(algorithm: str, case: Case, context, settings: SpeedSettings,
                 memory: MemorySampler, log: Callable[[str], None]):
  """Measures one (algorithm, data configuration); returns (row, round rows, profile text)."""
  memory.reset()
  start_rss = memory.current_mib()
  bench = build_bench(algorithm, case, context, settings, log)
  rounds = run_rounds(bench, settings, log)
  eval_seconds = time_evaluation(bench, settings)
  log(f"[speed] {bench.tag}: one evaluation {eval_seconds:.3f} s")
  # The decomposition times per-client blocks on per-client data: not for cohorts.
  decomposition = {}
  if bench.phase.built.cohort is None:
    decomposition = decompose(bench, rounds[1:], settings, eval_seconds, log)
  profile, profile_text = {}, ""
  if settings.profile:
    profile, profile_text = profile_round(bench, bench.first_round + settings.rounds)
    log(
        f"[speed] {bench.tag}: profiled round {profile['profiled_round_seconds']:.2f} s "
        f"(serialise {profile['prof_tff_serialize_seconds']:.3f} s, "
        f"datasets {profile['prof_datasets_seconds']:.3f} s)"
    )
  peak, peak_workers = memory.peaks_mib()
  row = _speed_figures(bench, case, settings, rounds)
  row.update(
      start_rss_mib=start_rss,
      peak_rss_mib=peak,
      peak_worker_rss_mib=peak_workers,
      eval_seconds=eval_seconds,
      eval_to_round_ratio=eval_seconds / row["round_seconds_median"],
      **decomposition,
      **profile,
  )
  data_columns = {key: getattr(case, key) for key in
                  ("total_clients", "clients_per_round", "examples_per_class")}
  round_rows = [{"algorithm": algorithm, **data_columns, **r} for r in rounds]
  log(
      f"[speed] {bench.tag}: {row['round_seconds_median']:.2f} s/round (median of "
      f"{row['measured_rounds']}), {row['examples_per_second']:.0f} examples/s "
      f"({row['training_gflops_per_second']:.1f} GFLOP/s), peak RSS "
      f"{peak:.0f} MiB (worker {peak_workers:.0f} MiB)"
      + (f", readjusted in round(s) {row['readjusted_rounds']}" if row["readjusted_rounds"] else "")
  )
  return row, round_rows, f"### {bench.tag}\n\n{profile_text}" if profile_text else ""


# ---------------------------------------------------------- decomposition


def block_seconds(bench: Bench, datasets, repeats: int) -> tuple[float, float, float]:
  """Minimum seconds of A, B and D (see METHOD) on K empty client data sets.

  The aggregator and finalizer see the K clients' real-shaped updates, but
  no training is done.
  """
  partials = partial_processes(bench.rounds.process, bench.blocks)
  state = bench.rounds.state
  empty = [ds.take(0) for ds in datasets]
  for partial in partials:
    partial(state, empty)  # compile, load into the worker
  samples = [[] for _ in partials]
  for _ in range(repeats):
    for times, partial in zip(samples, partials):
      t0 = time.perf_counter()
      partial(state, empty)
      times.append(time.perf_counter() - t0)
  # Minima: the repeats least disturbed by anything else on the machine.
  a0, b0, d0 = (min(times) for times in samples)
  return a0, b0, d0


def _pure_tf_update(bench: Bench):
  """The phase's client update as a plain TF function(weights, dataset, num_to_readjust)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from tff_feddst import builders  # pylint: disable=g-import-not-at-top
  from tff_feddst import client_work as client_work_lib  # pylint: disable=g-import-not-at-top
  from tff_feddst import sparse_model  # pylint: disable=g-import-not-at-top

  config, built, keras_fn = bench.config, bench.phase.built, bench.phase.keras_fn
  input_spec = bench.context.input_spec
  optimizer = builders.build_client_optimizer(config)
  if built.sparse:
    model_fn = sparse_model.make_model_fn(keras_fn, input_spec, wrapped=True)
    update = client_work_lib.build_client_update(
        model_fn, built.layout, optimizer, config.local_epochs,
        prox_mu=config.prox_mu, upload_dtype=tf.as_dtype(config.upload_dtype),
    )
    return lambda weights, dataset, ks: update(weights, dataset, tf.constant(ks, tf.int32))
  from tensorflow_federated.python.learning.templates import model_delta_client_work  # pylint: disable=g-import-not-at-top

  update = model_delta_client_work.build_model_delta_update_with_tff_optimizer(
      sparse_model.make_model_fn(keras_fn, input_spec, wrapped=False),
      weighting=tff.learning.ClientWeighting.NUM_EXAMPLES,
      loop_implementation=tff.learning.LoopImplementation.DATASET_REDUCE,
  )
  return lambda weights, dataset, ks: update(optimizer, weights, dataset)


def pure_tf_seconds(bench: Bench, datasets, num_readjusted, settings: SpeedSettings):
  """(median seconds per client, clients timed) of the client update in plain TF.

  Same weights as the current global model, outputs materialised; at least
  5 timed calls, cycling over the first pure_tf_clients data sets.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  update = _pure_tf_update(bench)
  weights = tf.nest.map_structure(tf.convert_to_tensor, bench.rounds.weights)
  ks = np.asarray(num_readjusted, np.int32)

  def run(dataset):
    result = update(weights, dataset, ks)
    tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, result)

  run(datasets[0])  # traces
  n_pure = min(settings.pure_tf_clients, len(datasets))
  times = []
  for i in range(max(n_pure, 5)):
    t0 = time.perf_counter()
    run(datasets[i % n_pure])
    times.append(time.perf_counter() - t0)
  return _median(times), n_pure


def decompose(bench: Bench, measured: list[dict], settings: SpeedSettings,
              eval_seconds: float, log) -> dict:
  """Splits the measured rounds' time into its parts (see METHOD)."""
  plain = [r for r in measured if not r["readjusted"]]
  anchor = plain or measured
  reference = anchor[-1]
  datasets = bench.rounds.step.client_datasets(
      reference["client_ids"], reference["process_round"]
  )
  a0, b0, d0 = block_seconds(bench, datasets, settings.decomposition_repeats)
  per_client, n_pure = pure_tf_seconds(bench, datasets, reference["num_readjusted"], settings)
  next_seconds = _median([r["next_seconds"] for r in anchor])
  get_weights = _median([r["get_weights_seconds"] for r in anchor])
  k = bench.config.clients_per_round
  client_training, aggregation, server_update = per_client * k, b0 - a0, d0 - b0
  parts = {
      "client_training": client_training,
      "tff_overhead": next_seconds - client_training - aggregation - server_update + get_weights,
      "aggregation": aggregation,
      "server_update": server_update,
      "driver_python": _median([
          r["sample_seconds"] + r["datasets_seconds"] + r["bookkeeping_seconds"]
          for r in anchor
      ]),
      "evaluation_amortised": eval_seconds / settings.eval_every,
  }
  total = sum(parts.values())
  out = {
      "decomp_rounds": " ".join(str(r["process_round"]) for r in anchor),
      "decomp_kind": "plain" if plain else "readjustment",
      "decomp_total_seconds": total,
      "pure_tf_seconds_per_client": per_client,
      "pure_tf_clients_timed": n_pure,
      "empty_data_client_work_seconds": a0,
      "get_weights_seconds": get_weights,
  }
  for key, value in parts.items():
    out[f"{key}_seconds"] = value
    out[f"{key}_pct"] = 100.0 * value / total if total > 0 else float("nan")
  log(
      f"[speed] {bench.tag}: decomposition ({out['decomp_kind']} rounds {out['decomp_rounds']}, "
      f"{total:.2f} s; next {next_seconds:.2f} s, pure TF {per_client:.3f} s/client x {k}, "
      f"empty-data client work {a0:.3f} s): "
      + ", ".join(
          f"{label} {parts[key]:.2f} s ({out[key + '_pct']:.0f}%)"
          for key, label in DECOMPOSITION
      )
  )
  return out


def profile_round(bench: Bench, process_round: int):
  """One round and one evaluation under cProfile; returns (CSV columns, listing)."""
  from tff_feddst import phases  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  with profile_driver_and_tff() as profiles:
    bench.rounds.round(process_round)
    bench.phase.evaluator.evaluate(bench.rounds.weights.trainable)
  wall = time.perf_counter() - start
  main, loop = profiles["driver"], profiles["tff_loop"]

  from tff_feddst import rounds as rounds_lib  # pylint: disable=g-import-not-at-top  (TFF)

  def cumulative(fn_name, path):
    return _cumulative(main, lambda f, n: n == fn_name and f.endswith(_defined_in(path)))

  step = {
      name: cumulative(name, rounds_lib.__file__)
      for name in ("__call__", "sample_clients", "client_datasets", "run_clients")
  }
  get_weights = cumulative("get_model_weights", __file__)
  serialization = lambda name: lambda f, n: n == name and "value_serialization" in f  # noqa: E731
  columns = {
      "profiled_round_seconds": wall,
      "prof_sampling_seconds": step["sample_clients"],
      "prof_datasets_seconds": step["client_datasets"],
      "prof_bookkeeping_seconds": step["__call__"] - get_weights - sum(
          step[name] for name in ("sample_clients", "client_datasets", "run_clients")
      ),
      "prof_next_seconds": step["run_clients"],
      "prof_get_weights_seconds": get_weights,
      "prof_tff_serialize_seconds": _cumulative(loop, serialization("serialize_value")),
      "prof_tff_deserialize_seconds": _cumulative(loop, serialization("deserialize_value")),
      "prof_tff_worker_calls_seconds": _cumulative(
          loop, lambda f, n: "remote_executor_grpc_stub" in f and not n.startswith("_")
          and n != "__init__", combine=sum,
      ),
      "prof_evaluate_seconds": cumulative("evaluate", phases.__file__),
  }
  text = (
      f"profiled round {process_round} + one evaluation: {wall:.2f} s wall\n\n"
      + _listing(main, "driver thread (cumulative)")
      + "\n"
      + _listing(loop, "TFF event-loop thread (cumulative)")
  )
  return columns, text


# ----------------------------------------------------------------- outputs


def _fmt(value, spec=".2f") -> str:
  if value == "" or value is None:
    return "-"
  try:
    if np.isnan(value):
      return "-"
  except TypeError:
    return str(value)
  return format(value, spec)


def _header(settings: SpeedSettings, started: str, wall: float) -> list[str]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  return [
      "# Simulation speed on TFF (Fashion-MNIST, pathological split)",
      "",
      f"Started {started}; {wall:.0f} s in all. Machine: {os.cpu_count()} CPU cores, "
      f"{psutil.virtual_memory().total / 2**30:.1f} GiB RAM, {platform.machine()}, "
      f"Python {platform.python_version()}, TensorFlow {tf.__version__}, "
      f"TFF {tff.__version__}.",
      "",
      f"Settings: {settings.local_epochs} local epochs, batch {settings.batch_size}, "
      f"{settings.rounds} rounds per configuration (the first excluded); FedDST "
      f"S = {settings.sparsity}, alpha = {settings.readjustment_ratio}, "
      f"Delta_R = {settings.rounds_between_readjustments}, "
      f"R_end = {settings.readjustment_end_round}. The K sweep uses "
      f"{settings.sweep_examples_per_class} examples per class (2 classes per "
      f"client), the N sweep {settings.scaling_examples_per_class}.",
  ]


def _speed_table(rows) -> list[str]:
  lines = [
      "",
      "## Seconds per round",
      "",
      "| algorithm | N | K | ex/client | s/round (median) | min-max | rounds (readjusted) "
      "| readjust / plain s | examples/s | GFLOP/s (share of matmul) "
      "| peak RSS MiB (worker; at start) | eval s | eval / round |",
      "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    readj = r["readjusted_rounds"]
    lines.append(
        f"| {r['algorithm']} | {r['total_clients']} | {r['clients_per_round']} "
        f"| {r['examples_per_client']:.0f} | {_fmt(r['round_seconds_median'])} "
        f"| {_fmt(r['round_seconds_min'])}-{_fmt(r['round_seconds_max'])} "
        f"| {r['process_rounds']}{f' ({readj})' if readj else ''} "
        f"| {_fmt(r['readjust_round_seconds_median'])} / {_fmt(r['plain_round_seconds_median'])} "
        f"| {_fmt(r['examples_per_second'], '.0f')} "
        f"| {_fmt(r['training_gflops_per_second'], '.1f')} "
        f"({_fmt(100 * r['matmul_share'], '.0f')}% of {_fmt(r['matmul_gflops_per_second'], '.0f')}) "
        f"| {_fmt(r['peak_rss_mib'], '.0f')} ({_fmt(r['peak_worker_rss_mib'], '.0f')}; "
        f"{_fmt(r['start_rss_mib'], '.0f')}) "
        f"| {_fmt(r['eval_seconds'], '.3f')} | {_fmt(r['eval_to_round_ratio'], '.3f')} |"
    )
  return lines


def _scaling_lines(rows) -> list[str]:
  scaling = [r for r in rows if r["section"] == "total_clients"]
  if not scaling:
    return []
  lines = ["", "Round cost against total clients (same K and per-client data):", ""]
  for algorithm in dict.fromkeys(r["algorithm"] for r in scaling):
    mine = [r for r in scaling if r["algorithm"] == algorithm]
    base = mine[0]["round_seconds_median"]
    lines.append(
        f"- {algorithm}: "
        + ", ".join(
            f"N = {r['total_clients']}: {r['round_seconds_median']:.2f} s "
            f"({r['round_seconds_median'] / base:.2f} x)"
            for r in mine
        )
    )
  return lines


def _decomposition_table(rows, settings: SpeedSettings) -> list[str]:
  lines = [
      "",
      "## Where a round goes",
      "",
      "Seconds (and percent) of a round plus its share of evaluation; see the "
      "method below.",
      "",
      "| algorithm | N | K | rounds | round + eval/"
      f"{settings.eval_every} | "
      + " | ".join(label for _, label in DECOMPOSITION)
      + " | pure-TF s/client | empty-data A s |",
      "|---|---:|---:|---|---:|" + "---:|" * len(DECOMPOSITION) + "---:|---:|",
  ]
  for r in rows:
    if "decomp_kind" not in r:  # cohort execution: not decomposed
      continue
    cells = " | ".join(
        f"{r[key + '_seconds']:.2f} ({r[key + '_pct']:.0f}%)" for key, _ in DECOMPOSITION
    )
    lines.append(
        f"| {r['algorithm']} | {r['total_clients']} | {r['clients_per_round']} "
        f"| {r['decomp_kind']} {r['decomp_rounds']} "
        f"| {r['decomp_total_seconds']:.2f} | {cells} | {r['pure_tf_seconds_per_client']:.3f} "
        f"| {r['empty_data_client_work_seconds']:.3f} |"
    )
  return lines


PROFILE_COLUMNS = (
    ("prof_sampling_seconds", "sampling"),
    ("prof_datasets_seconds", "data sets"),
    ("prof_bookkeeping_seconds", "ledger + masks"),
    ("prof_next_seconds", "process.next"),
    ("prof_get_weights_seconds", "get_model_weights"),
    ("prof_tff_serialize_seconds", "TFF serialise"),
    ("prof_tff_deserialize_seconds", "TFF deserialise"),
    ("prof_tff_worker_calls_seconds", "TFF worker calls"),
    ("prof_evaluate_seconds", "evaluation"),
)


def _profile_table(rows) -> list[str]:
  lines = [
      "",
      "## Driver-side Python (cProfile, one round + one evaluation)",
      "",
      "Cumulative seconds under the profiler (TFF serialise / deserialise are "
      "inside process.next and get_model_weights).",
      "",
      "| algorithm | N | K | profiled s | " + " | ".join(l for _, l in PROFILE_COLUMNS) + " |",
      "|---|---:|---:|---:|" + "---:|" * len(PROFILE_COLUMNS),
  ]
  for r in rows:
    lines.append(
        f"| {r['algorithm']} | {r['total_clients']} | {r['clients_per_round']} "
        f"| {r['profiled_round_seconds']:.2f} | "
        + " | ".join(_fmt(r[c], ".3f") for c, _ in PROFILE_COLUMNS)
        + " |"
    )
  return lines


def markdown(rows, settings: SpeedSettings, started: str, wall: float) -> str:
  """The report: speed table, decomposition, profile and method."""
  lines = (
      _header(settings, started, wall)
      + _speed_table(rows)
      + _scaling_lines(rows)
      + _decomposition_table(rows, settings)
      + (_profile_table(rows) if settings.profile else [])
      + ["", "## Method", "", METHOD]
  )
  return "\n".join(lines) + "\n"


def write_outputs(output_dir: str, rows, round_rows, profiles, settings, started, wall) -> None:
  os.makedirs(output_dir, exist_ok=True)
  outputs = {
      "speed.csv": _csv_text(CSV_COLUMNS, rows),
      "speed_rounds.csv": _csv_text(ROUND_COLUMNS, round_rows),
      "speed.md": markdown(rows, settings, started, wall),
  }
  if profiles:
    outputs["profile.txt"] = "\n\n".join(profiles)
  for name, text in outputs.items():
    files.write_atomic(os.path.join(output_dir, name), text)


# ------------------------------------------------------------- entry points


def check_partitions(settings: SpeedSettings) -> None:
  """Raises DataError before any measurement if a configuration's split is impossible."""
  from tff_feddst import data as data_lib  # pylint: disable=g-import-not-at-top

  arrays = data_lib.load_arrays("fashion_mnist", settings.data_dir)
  for case in cases(settings):
    data_lib.pathological_partition(
        arrays.y_train,
        arrays.y_test,
        num_clients=case.total_clients,
        classes_per_client=2,
        examples_per_class=case.examples_per_class,
        seed=settings.seed,
        num_classes=arrays.num_classes,
    )


def run_speed(settings: SpeedSettings, output_dir: str,
              log: Callable[[str], None] | None = None) -> list[dict]:
  """Measures every configuration, writes the outputs; returns the CSV rows.

  Outputs are rewritten after every configuration, so an interrupted run
  leaves what it measured.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from tff_feddst import training  # pylint: disable=g-import-not-at-top

  log = log or (lambda line: print(line, flush=True))
  settings.validate()
  started = datetime.datetime.now().isoformat(timespec="seconds")
  t_start = time.perf_counter()
  check_partitions(settings)
  rows, round_rows, profiles = [], [], []
  matmul = matmul_gflops()
  log(f"[speed] float32 matmul: {matmul:.0f} GFLOP/s")
  with MemorySampler() as memory:
    for case in cases(settings):
      # The data (one load per configuration, shared by the algorithms).
      context = training.load_context(
          experiment_config(settings.algorithms[0], case, settings, output_dir), log
      )
      for algorithm in settings.algorithms:
        row, rounds, profile_text = measure_case(
            algorithm, case, context, settings, memory, log
        )
        row.update(
            matmul_gflops_per_second=matmul,
            matmul_share=row["training_gflops_per_second"] / matmul,
        )
        rows.append(row)
        round_rows += rounds
        if profile_text:
          profiles.append(profile_text)
        write_outputs(output_dir, rows, round_rows, profiles, settings, started,
                      time.perf_counter() - t_start)
        # A fresh worker for the next configuration (its memory is per
        # configuration), and this configuration's TF objects released.
        runtime.stop_tff_workers(restartable=True)
        tf.keras.backend.clear_session()
        gc.collect()
      del context
      gc.collect()
  log(f"[speed] done in {time.perf_counter() - t_start:.0f} s; outputs in {output_dir}")
  return rows


FLAGS = flags.FLAGS


def _int_list(values) -> bool:
  try:
    return bool(values) and all(int(v) >= 1 for v in values)
  except ValueError:
    return False


def _check_clients(values) -> bool:
  if values["quick"]:
    return True  # checked after the quick defaults are applied
  if not (_int_list(values["clients_per_round_list"]) and _int_list(values["total_clients_list"])):
    return True  # reported by the single-flag validators
  ks = [int(v) for v in values["clients_per_round_list"]]
  ns = [int(v) for v in values["total_clients_list"]]
  return max(ks) <= ns[0] and ks[0] <= min(ns)


def define_flags() -> None:
  """The command line's flags (defined only when run as a program, so that
  importing this module leaves absl's global flags alone)."""
  flags.DEFINE_string("output_dir", "runs/speed", "Where speed.csv and speed.md are written.")
  flags.DEFINE_integer("rounds", 6, "Rounds per configuration; the first is excluded from the median.")
  flags.DEFINE_list("algorithms", list(SPEED_ALGORITHMS), "Algorithms to measure (fedavg, feddst).")
  flags.DEFINE_list(
      "clients_per_round_list", ["20", "50", "100"],
      "K values, at N = the first --total_clients_list value; the first is also the K of the N sweep.")
  flags.DEFINE_list(
      "total_clients_list", ["400", "4000"],
      "N values, at K = the first --clients_per_round_list value and 7 examples per class.")
  flags.DEFINE_integer("local_epochs", 10, "Local epochs (E).")
  flags.DEFINE_bool(
      "quick", False,
      "Smoke configuration: N 40,80; K 2,4; 1 local epoch; 3 rounds (flags given explicitly win).")
  flags.DEFINE_bool("profile", True, "Profile one extra round (and one evaluation) with cProfile.")
  flags.DEFINE_string("data_dir", None, "Directory with Fashion-MNIST's IDX files.")
  flags.DEFINE_integer("pure_tf_clients", 20, "Clients whose update is timed in plain TF for the decomposition.")
  flags.DEFINE_integer(
      "decomposition_repeats", 5,
      "Timings of the aggregator and finalizer (on empty client data) per configuration.")
  flags.DEFINE_integer("seed", 0, "Seed of the partition and the client sampling.")
  flags.DEFINE_enum(
      "client_execution", None, ["cohort", "per_client"],
      "How clients are trained (default: each algorithm's default, run.py's --client_execution).")

  flags.DEFINE_integer(
      "cohort_size", 0,
      "Clients per cohort (run.py's --cohort_size; 0: its default, even cohorts of at most "
      f"{names.MAX_DEFAULT_COHORT}).")

  flags.register_validator("output_dir", bool, "--output_dir must not be empty")
  flags.register_validator("rounds", lambda v: v >= 2, "--rounds must be >= 2 (the first round is excluded)")
  flags.register_validator("local_epochs", lambda v: v >= 1, "--local_epochs must be >= 1")
  flags.register_validator("pure_tf_clients", lambda v: v >= 1, "--pure_tf_clients must be >= 1")
  flags.register_validator("decomposition_repeats", lambda v: v >= 1, "--decomposition_repeats must be >= 1")
  flags.register_validator("seed", lambda v: v >= 0, "--seed must be >= 0")
  flags.register_validator("cohort_size", lambda v: v >= 0, "--cohort_size must be >= 0")
  flags.register_validator(
      "algorithms",
      lambda v: bool(v) and all(a in SPEED_ALGORITHMS for a in v),
      f"--algorithms must be a non-empty list of {', '.join(SPEED_ALGORITHMS)}",
  )
  flags.register_validator(
      "clients_per_round_list", _int_list, "--clients_per_round_list must be a list of positive integers"
  )
  flags.register_validator(
      "total_clients_list", _int_list, "--total_clients_list must be a list of positive integers"
  )
  flags.register_multi_flags_validator(
      ["clients_per_round_list", "total_clients_list", "quick"],
      _check_clients,
      message="every --clients_per_round_list value must be <= the first --total_clients_list "
      "value, and the first must be <= every --total_clients_list value",
  )


def settings_from_flags() -> SpeedSettings:
  values = dict(
      algorithms=tuple(FLAGS.algorithms),
      rounds=FLAGS.rounds,
      clients_per_round_list=tuple(int(v) for v in FLAGS.clients_per_round_list),
      total_clients_list=tuple(int(v) for v in FLAGS.total_clients_list),
      local_epochs=FLAGS.local_epochs,
      profile=FLAGS.profile,
      data_dir=FLAGS.data_dir,
      pure_tf_clients=FLAGS.pure_tf_clients,
      decomposition_repeats=FLAGS.decomposition_repeats,
      seed=FLAGS.seed,
      client_execution=FLAGS.client_execution,
      cohort_size=FLAGS.cohort_size,
  )
  if FLAGS.quick:
    for name, value in QUICK.items():
      if not FLAGS[name].present:
        values[name] = value
  return SpeedSettings(**values)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  settings = settings_from_flags()
  try:
    settings.validate()
  except ValueError as e:
    sys.exit(f"error: {e}")
  from tff_feddst import data as data_lib  # pylint: disable=g-import-not-at-top  (TensorFlow)

  try:
    with runtime.managed_runtime():
      run_speed(settings, FLAGS.output_dir)
  except data_lib.DataError as e:
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:
    sys.exit("interrupted")


if __name__ == "__main__":
  define_flags()
  # Before flags are parsed: even a run that stops at a flag error must
  # release TFF's executor cleanly at exit.
  runtime.install_shutdown_handlers()
  app.run(main)
