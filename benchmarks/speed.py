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
- local examples processed per second, peak RSS (Python plus its children,
  i.e. TFF's worker_binary), the cost of one `training.Evaluator.evaluate`;
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
  profile_*.txt     the cProfile listings (with --profile)
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
Rounds are driven as `training.run_experiment` drives them (sampling without
replacement, `training.client_dataset`, `process.next`, reading the global
weights back, the communication ledger and mask statistics), with the
process built by `algorithms.build_algorithm`. A round's seconds run from
sampling to the end of the bookkeeping; evaluation is timed separately. The
first round of every configuration (tracing, worker start-up) is excluded
from the median. Peak memory is the largest sum of the RSS of this Python
process and its child processes (TFF's `worker_binary`), sampled every
0.1 s by a background thread while the configuration ran. The worker is
restarted between configurations, so its peak is the configuration's own;
the Python process is not, so its RSS also holds what earlier
configurations left (start_rss_mib is the RSS when the configuration
began, with its data loaded).

Decomposition of a round. `algorithms.build_algorithm` is run with
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
  client training  = the same client update in plain TF outside TFF (TFF's
                     FedAvg update function / `client_work.build_client_update`,
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
  driver Python    = sampling + data set construction + ledger and mask
                     statistics (median, timed directly);
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
results there). Reported are the cumulative seconds of: sampling, data set
construction, ledger and mask statistics, `process.next` as seen from the
driver, `get_model_weights`, TFF's `serialize_value` / `deserialize_value`,
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
    for case in cases(self):
      if case.clients_per_round > case.total_clients:
        raise ValueError(
            f"{case.clients_per_round} clients per round exceed {case.total_clients} total clients"
        )
    for name in ("local_epochs", "batch_size", "sweep_examples_per_class",
                 "scaling_examples_per_class", "rounds_between_readjustments",
                 "eval_every", "pure_tf_clients", "decomposition_repeats",
                 "evaluation_repeats"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


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


def _seed(*parts: int) -> int:
  return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w", newline="") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


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


def _cumulative(profile, predicate) -> float:
  """Largest cumulative time of the functions matching predicate(file, name)."""
  if profile is None:
    return float("nan")
  stats = pstats.Stats(profile)
  best = 0.0
  for (filename, _, name), (_, _, _, cumtime, _) in stats.stats.items():  # pytype: disable=attribute-error
    if predicate(filename, name):
      best = max(best, cumtime)
  return best


def _total_cumulative(profile, predicate) -> float:
  """Sum of cumulative times of the matching (non-nested) functions."""
  if profile is None:
    return float("nan")
  stats = pstats.Stats(profile)
  return float(sum(
      cumtime
      for (filename, _, name), (_, _, _, cumtime, _) in stats.stats.items()  # pytype: disable=attribute-error
      if predicate(filename, name)
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


# ------------------------------------------------------------- the driver


class RoundDriver:
  """One configuration's rounds, timed piece by piece (run_experiment's loop)."""

  def __init__(self, built, fed_data, keras_fn, settings: SpeedSettings, clients_per_round: int):
    from tff_feddst import costs  # pylint: disable=g-import-not-at-top
    from tff_feddst import training  # pylint: disable=g-import-not-at-top

    self.built = built
    self.fed_data = fed_data
    self.settings = settings
    self.clients_per_round = clients_per_round
    self.population = list(fed_data.nonempty_train_client_ids)
    self.sampler = np.random.default_rng(_seed(settings.seed, 2))
    self.ledger = costs.CommunicationLedger(built.model_size, sparse=built.sparse)
    self.dense_flops = costs.layer_forward_flops(keras_fn())
    self.dataset_epochs = 1 if built.epochs_in_process else settings.local_epochs
    self._training = training
    self.state = None
    self.weights = None
    self.masks = None

  def start(self, state) -> None:
    self.state = state
    self.weights = self.built.process.get_model_weights(state)
    _, _, self.masks = self._mask_stats(self.weights)

  def _mask_stats(self, weights):
    """(sparsity, forward FLOPs, masks) of the global model, as the driver logs them."""
    return self._training.mask_stats(self.built, weights, self.dense_flops)

  # Named steps, so that cProfile can attribute them.
  def _sample_clients(self) -> list[str]:
    chosen = self.sampler.choice(len(self.population), self.clients_per_round, replace=False)
    return [self.population[i] for i in sorted(chosen)]

  def _build_datasets(self, client_ids, process_round: int) -> list:
    return [
        self._training.client_dataset(
            self.fed_data,
            cid,
            self.settings.batch_size,
            _seed(self.settings.seed, 3, process_round, i),
            self.dataset_epochs,
        )
        for i, cid in enumerate(client_ids)
    ]

  def _run_next(self, datasets):
    return self.built.process.next(self.state, datasets)

  def _read_weights(self, state):
    return self.built.process.get_model_weights(state)

  def _bookkeeping_before(self, client_ids) -> None:
    active = self.built.layout.num_kept if self.built.sparse else None
    self.ledger.download(client_ids, active)

  def _bookkeeping_after(self, client_ids, metrics, weights) -> np.ndarray:
    """Ledger upload and mask statistics; returns the per-layer readjustment counts."""
    num_readjusted = np.zeros([1], np.int32)
    if self.built.sparse:
      stats = metrics["client_work"]["clients"]
      self.ledger.upload(
          len(client_ids), int(stats["uploaded_values"]), int(stats["mask_changed"])
      )
      num_readjusted = np.asarray(
          metrics["client_work"]["readjustment"]["num_readjusted"], np.int32
      )
    else:
      self.ledger.upload(len(client_ids))
    _, _, masks = self._mask_stats(weights)
    if self.built.sparse and any(
        not np.array_equal(a, b) for a, b in zip(self.masks, masks)
    ):
      self.ledger.global_mask_changed()
    self.masks = masks
    return num_readjusted

  def prepare(self, process_round: int):
    """Samples and builds the data sets; returns (client_ids, datasets, timings)."""
    t0 = time.perf_counter()
    client_ids = self._sample_clients()
    t1 = time.perf_counter()
    datasets = self._build_datasets(client_ids, process_round)
    t2 = time.perf_counter()
    return client_ids, datasets, {"sample_seconds": t1 - t0, "datasets_seconds": t2 - t1}

  def finish(self, client_ids, output) -> dict:
    """Reads weights back and does the bookkeeping; returns timings."""
    t0 = time.perf_counter()
    self.state = output.state
    self.weights = self._read_weights(self.state)
    t1 = time.perf_counter()
    num_readjusted = self._bookkeeping_after(client_ids, output.metrics, self.weights)
    t2 = time.perf_counter()
    return {
        "get_weights_seconds": t1 - t0,
        "bookkeeping_seconds": t2 - t1,
        "readjusted": int(num_readjusted.sum() > 0),
        "num_readjusted": num_readjusted,
    }

  def round(self, process_round: int) -> dict:
    start = time.perf_counter()
    client_ids, datasets, timing = self.prepare(process_round)
    t0 = time.perf_counter()
    self._bookkeeping_before(client_ids)
    book = time.perf_counter() - t0
    t0 = time.perf_counter()
    output = self._run_next(datasets)
    timing["next_seconds"] = time.perf_counter() - t0
    timing.update(self.finish(client_ids, output))
    timing["bookkeeping_seconds"] += book
    timing["round_seconds"] = time.perf_counter() - start
    timing["examples"] = sum(self.fed_data.num_train_examples(c) for c in client_ids)
    timing["process_round"] = process_round
    timing["client_ids"] = client_ids  # not written out
    return timing


def _pure_tf_update(algorithm: str, built, keras_fn, settings: SpeedSettings, input_spec):
  """The algorithm's client update as a plain TF function(weights, dataset, num_to_readjust)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from tff_feddst import algorithms  # pylint: disable=g-import-not-at-top
  from tff_feddst import client_work as client_work_lib  # pylint: disable=g-import-not-at-top
  from tff_feddst import sparse_model  # pylint: disable=g-import-not-at-top

  config = _algorithm_config(algorithm, settings)
  optimizer = algorithms.build_client_optimizer(config)
  if algorithm == "feddst":
    model_fn = sparse_model.make_model_fn(keras_fn, input_spec, wrapped=True)
    update, _ = client_work_lib.build_client_update(
        model_fn,
        built.layout,
        optimizer,
        config.local_epochs,
        prox_mu=config.prox_mu,
        upload_dtype=tf.as_dtype(config.upload_dtype),
    )

    def run(weights, dataset, num_to_readjust):
      return update(weights, dataset, tf.constant(num_to_readjust, tf.int32))

    return run
  from tensorflow_federated.python.learning.templates import model_delta_client_work  # pylint: disable=g-import-not-at-top

  model_fn = sparse_model.make_model_fn(keras_fn, input_spec, wrapped=False)
  update = model_delta_client_work.build_model_delta_update_with_tff_optimizer(
      model_fn,
      weighting=tff.learning.ClientWeighting.NUM_EXAMPLES,
      loop_implementation=tff.learning.LoopImplementation.DATASET_REDUCE,
  )

  def run(weights, dataset, num_to_readjust):
    del num_to_readjust
    return update(optimizer, weights, dataset)

  return run


def _algorithm_config(algorithm: str, settings: SpeedSettings):
  from tff_feddst import algorithms  # pylint: disable=g-import-not-at-top

  return algorithms.AlgorithmConfig(
      algorithm=algorithm,
      local_epochs=settings.local_epochs,
      sparsity=settings.sparsity if algorithm in algorithms.SPARSE_ALGORITHMS else 0.0,
      readjustment_ratio=settings.readjustment_ratio,
      rounds_between_readjustments=settings.rounds_between_readjustments,
      readjustment_end_round=settings.readjustment_end_round,
      seed=settings.seed,
  )


def first_process_round(algorithm: str, settings: SpeedSettings) -> int:
  """Round number of the warm-up round (FedDST: the one before a readjustment)."""
  from tff_feddst import masks as masks_lib  # pylint: disable=g-import-not-at-top

  if algorithm != "feddst":
    return 1
  start = settings.rounds_between_readjustments
  if not masks_lib.is_readjustment_round(
      start + 1,
      settings.readjustment_ratio,
      settings.rounds_between_readjustments,
      settings.readjustment_end_round,
  ):
    return 1  # No readjustment scheduled there (alpha 0 or R_end too small).
  return start


def _with_round_counter(state, process_round: int):
  """The composed state with FedDST's client-work round counter set."""
  work = state.client_work
  if not (isinstance(work, collections.abc.Mapping) and "round_num" in work):
    raise RuntimeError("the client work state has no round_num to set")
  return state._replace(
      client_work=collections.OrderedDict(round_num=np.int32(process_round))
  )


def measure_case(algorithm: str, case: Case, fed_data, settings: SpeedSettings,
                 memory: MemorySampler, log: Callable[[str], None]):
  """Measures one (algorithm, data configuration); returns (row, round rows, profile text)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  import keras_models  # pylint: disable=g-import-not-at-top
  from tff_feddst import algorithms  # pylint: disable=g-import-not-at-top
  from tff_feddst import training  # pylint: disable=g-import-not-at-top

  tag = (
      f"{algorithm} N={case.total_clients} K={case.clients_per_round} "
      f"{2 * case.examples_per_class} ex/client E={settings.local_epochs}"
  )
  memory.reset()
  start_rss = memory.current_mib()
  model_name = keras_models.default_model_for_dataset("fashion_mnist")
  keras_fn = lambda: keras_models.build_model(  # noqa: E731
      model_name, fed_data.input_shape, fed_data.num_classes
  )
  input_spec = collections.OrderedDict(
      x=tf.TensorSpec([None, *fed_data.input_shape], tf.float32),
      y=tf.TensorSpec([None], tf.int32),
  )
  build_start = time.perf_counter()
  with capture_composed_blocks() as captured:
    built = algorithms.build_algorithm(_algorithm_config(algorithm, settings), keras_fn, input_spec)
  if not captured:
    raise RuntimeError(f"{algorithm}: the process was not built by compose_learning_process")
  blocks = captured[-1]
  state = built.process.initialize()
  state = built.process.set_model_weights(state, built.initial_weights)
  start_round = first_process_round(algorithm, settings)
  if start_round != 1:
    state = _with_round_counter(state, start_round)
  build_seconds = time.perf_counter() - build_start
  log(f"[speed] {tag}: built in {build_seconds:.1f} s")

  driver = RoundDriver(built, fed_data, keras_fn, settings, case.clients_per_round)
  driver.start(state)
  rounds = []
  for i in range(settings.rounds):
    timing = driver.round(start_round + i)
    timing["round_index"] = i + 1
    timing["excluded"] = int(i == 0)
    rounds.append(timing)
    log(
        f"[speed] {tag}: round {timing['process_round']}"
        f"{' (readjustment)' if timing['readjusted'] else ''}"
        f"{' (warm-up, excluded)' if i == 0 else ''}: "
        f"{timing['round_seconds']:.2f} s (next {timing['next_seconds']:.2f} s)"
    )
  measured = rounds[1:]
  seconds = [r["round_seconds"] for r in measured]
  round_median = _median(seconds)
  readjusted_rounds = [r["process_round"] for r in measured if r["readjusted"]]
  examples_per_round = _median([r["examples"] for r in measured])

  # Evaluation: the global model on every client's local test set.
  evaluator = training.Evaluator(keras_fn, fed_data)
  evaluator.evaluate(driver.weights.trainable)  # traces
  eval_times = []
  for _ in range(settings.evaluation_repeats):
    t0 = time.perf_counter()
    evaluator.evaluate(driver.weights.trainable)
    eval_times.append(time.perf_counter() - t0)
  eval_seconds = _median(eval_times)
  log(f"[speed] {tag}: one evaluation {eval_seconds:.3f} s")

  decomposition = decompose(algorithm, built, blocks, driver, measured, keras_fn,
                            input_spec, settings, eval_seconds, log, tag)
  next_round = start_round + settings.rounds

  profile = {}
  profile_text = ""
  if settings.profile:
    profile, profile_text = profile_round(driver, evaluator, next_round, tag)
    log(
        f"[speed] {tag}: profiled round {profile['profiled_round_seconds']:.2f} s "
        f"(serialise {profile['prof_tff_serialize_seconds']:.3f} s, "
        f"datasets {profile['prof_datasets_seconds']:.3f} s)"
    )

  peak, peak_workers = memory.peaks_mib()
  readjust_times = [r["round_seconds"] for r in measured if r["readjusted"]]
  plain_times = [r["round_seconds"] for r in measured if not r["readjusted"]]
  row = {
      "algorithm": algorithm,
      "section": case.section,
      "total_clients": case.total_clients,
      "clients_per_round": case.clients_per_round,
      "examples_per_class": case.examples_per_class,
      "examples_per_client": examples_per_round / case.clients_per_round,
      "local_epochs": settings.local_epochs,
      "batch_size": settings.batch_size,
      "measured_rounds": len(measured),
      "process_rounds": " ".join(str(r["process_round"]) for r in measured),
      "readjusted_rounds": " ".join(str(r) for r in readjusted_rounds),
      "build_seconds": build_seconds,
      "first_round_seconds": rounds[0]["round_seconds"],
      "round_seconds_median": round_median,
      "round_seconds_min": min(seconds),
      "round_seconds_max": max(seconds),
      "next_seconds_median": _median([r["next_seconds"] for r in measured]),
      "readjust_round_seconds_median": _median(readjust_times) if readjust_times else "",
      "plain_round_seconds_median": _median(plain_times) if plain_times else "",
      "examples_per_second": examples_per_round * settings.local_epochs / round_median,
      "start_rss_mib": start_rss,
      "peak_rss_mib": peak,
      "peak_worker_rss_mib": peak_workers,
      "eval_seconds": eval_seconds,
      "eval_to_round_ratio": eval_seconds / round_median,
      **decomposition,
      **profile,
  }
  round_rows = [
      {
          "algorithm": algorithm,
          "total_clients": case.total_clients,
          "clients_per_round": case.clients_per_round,
          "examples_per_class": case.examples_per_class,
          **r,
      }
      for r in rounds
  ]
  log(
      f"[speed] {tag}: {round_median:.2f} s/round (median of {len(measured)}), "
      f"{row['examples_per_second']:.0f} examples/s, peak RSS {peak:.0f} MiB "
      f"(worker {peak_workers:.0f} MiB)"
      + (f", readjusted in round(s) {row['readjusted_rounds']}" if readjusted_rounds else "")
  )
  return row, round_rows, f"### {tag}\n\n{profile_text}" if profile_text else ""


def decompose(algorithm, built, blocks, driver: RoundDriver, measured: list[dict],
              keras_fn, input_spec, settings: SpeedSettings, eval_seconds: float,
              log, tag) -> dict:
  """Splits the measured rounds' time into its parts (see METHOD)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  plain = [r for r in measured if not r["readjusted"]]
  anchor = plain or measured
  k = driver.clients_per_round
  n_pure = min(settings.pure_tf_clients, k)
  next_seconds = _median([r["next_seconds"] for r in anchor])
  get_weights = _median([r["get_weights_seconds"] for r in anchor])
  driver_python = _median([
      r["sample_seconds"] + r["datasets_seconds"] + r["bookkeeping_seconds"]
      for r in anchor
  ])
  reference = anchor[-1]
  datasets = driver._build_datasets(  # pylint: disable=protected-access
      reference["client_ids"], reference["process_round"]
  )

  # Aggregator and finalizer on the K clients' real-shaped updates, with
  # empty client data sets so that no training is done.
  to_client_work, to_aggregator, to_finalizer = partial_processes(built.process, blocks)
  empty = [ds.take(0) for ds in datasets]
  partials = (to_client_work, to_aggregator, to_finalizer)
  for partial in partials:
    partial(driver.state, empty)  # compile, load into the worker
  samples = collections.defaultdict(list)
  for _ in range(settings.decomposition_repeats):
    for key, partial in zip("ABD", partials):
      t0 = time.perf_counter()
      partial(driver.state, empty)
      samples[key].append(time.perf_counter() - t0)
  # Minima: the repeats least disturbed by anything else on the machine.
  a0, b0, d0 = (min(samples[key]) for key in "ABD")
  aggregation = b0 - a0
  server_update = d0 - b0

  # The same client update in plain TF, same weights and data, outside TFF.
  pure_update = _pure_tf_update(algorithm, built, keras_fn, settings, input_spec)
  weights = tf.nest.map_structure(tf.convert_to_tensor, driver.weights)
  ks = np.asarray(reference["num_readjusted"], np.int32)

  def materialise(result):
    return tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, result)

  materialise(pure_update(weights, datasets[0], ks))  # traces
  pure_times = []
  # At least 5 timed calls (cycling over the clients when K is small).
  for i in range(max(n_pure, 5)):
    ds = datasets[i % n_pure]
    t0 = time.perf_counter()
    materialise(pure_update(weights, ds, ks))
    pure_times.append(time.perf_counter() - t0)
  per_client = _median(pure_times)

  client_training = per_client * k
  parts = {
      "client_training": client_training,
      "tff_overhead": next_seconds - client_training - aggregation - server_update + get_weights,
      "aggregation": aggregation,
      "server_update": server_update,
      "driver_python": driver_python,
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
      f"[speed] {tag}: decomposition ({out['decomp_kind']} rounds {out['decomp_rounds']}, "
      f"{total:.2f} s; next {next_seconds:.2f} s, pure TF {per_client:.3f} s/client x {k}, "
      f"empty-data client work {a0:.3f} s): "
      + ", ".join(
          f"{label} {parts[key]:.2f} s ({out[key + '_pct']:.0f}%)"
          for key, label in DECOMPOSITION
      )
  )
  return out


def profile_round(driver: RoundDriver, evaluator, process_round: int, tag: str):
  """One round and one evaluation under cProfile; returns (CSV columns, listing)."""
  start = time.perf_counter()
  with profile_driver_and_tff() as profiles:
    driver.round(process_round)
    evaluator.evaluate(driver.weights.trainable)
  wall = time.perf_counter() - start
  main, loop = profiles["driver"], profiles["tff_loop"]

  def named(fn_name, file_part=None):
    return lambda f, n: n == fn_name and (file_part is None or file_part in f)

  speed_file = os.path.basename(__file__)
  columns = {
      "profiled_round_seconds": wall,
      "prof_sampling_seconds": _cumulative(main, named("_sample_clients", speed_file)),
      "prof_datasets_seconds": _cumulative(main, named("_build_datasets", speed_file)),
      "prof_bookkeeping_seconds": (
          _cumulative(main, named("_bookkeeping_before", speed_file))
          + _cumulative(main, named("_bookkeeping_after", speed_file))
      ),
      "prof_next_seconds": _cumulative(main, named("_run_next", speed_file)),
      "prof_get_weights_seconds": _cumulative(main, named("_read_weights", speed_file)),
      "prof_tff_serialize_seconds": _cumulative(loop, named("serialize_value", "value_serialization")),
      "prof_tff_deserialize_seconds": _cumulative(loop, named("deserialize_value", "value_serialization")),
      "prof_tff_worker_calls_seconds": _total_cumulative(
          loop, lambda f, n: "remote_executor_grpc_stub" in f and not n.startswith("_")
          and n != "__init__"
      ),
      "prof_evaluate_seconds": _cumulative(main, named("evaluate", "training.py")),
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


def markdown(rows, settings: SpeedSettings, started: str, wall: float) -> str:
  """The report: speed table, decomposition, profile and method."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  lines = [
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
      "",
      "## Seconds per round",
      "",
      "| algorithm | N | K | ex/client | s/round (median) | min-max | rounds (readjusted) "
      "| readjust / plain s | examples/s | peak RSS MiB (worker; at start) | eval s | eval / round |",
      "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
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
        f"| {_fmt(r['peak_rss_mib'], '.0f')} ({_fmt(r['peak_worker_rss_mib'], '.0f')}; "
        f"{_fmt(r['start_rss_mib'], '.0f')}) "
        f"| {_fmt(r['eval_seconds'], '.3f')} | {_fmt(r['eval_to_round_ratio'], '.3f')} |"
    )
  scaling = [r for r in rows if r["section"] == "total_clients"]
  if scaling:
    lines += ["", "Round cost against total clients (same K and per-client data):", ""]
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
  lines += [
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
    cells = " | ".join(
        f"{r[key + '_seconds']:.2f} ({r[key + '_pct']:.0f}%)" for key, _ in DECOMPOSITION
    )
    lines.append(
        f"| {r['algorithm']} | {r['total_clients']} | {r['clients_per_round']} "
        f"| {r['decomp_kind']} {r['decomp_rounds']} "
        f"| {r['decomp_total_seconds']:.2f} | {cells} | {r['pure_tf_seconds_per_client']:.3f} "
        f"| {r['empty_data_client_work_seconds']:.3f} |"
    )
  if settings.profile:
    prof_cols = (
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
    lines += [
        "",
        "## Driver-side Python (cProfile, one round + one evaluation)",
        "",
        "Cumulative seconds under the profiler (TFF serialise / deserialise are "
        "inside process.next and get_model_weights).",
        "",
        "| algorithm | N | K | profiled s | " + " | ".join(l for _, l in prof_cols) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(prof_cols),
    ]
    for r in rows:
      lines.append(
          f"| {r['algorithm']} | {r['total_clients']} | {r['clients_per_round']} "
          f"| {r['profiled_round_seconds']:.2f} | "
          + " | ".join(_fmt(r[c], ".3f") for c, _ in prof_cols)
          + " |"
      )
  lines += ["", "## Method", "", METHOD]
  return "\n".join(lines) + "\n"


def write_outputs(output_dir: str, rows, round_rows, profiles, settings, started, wall) -> None:
  os.makedirs(output_dir, exist_ok=True)
  _write_atomic(os.path.join(output_dir, "speed.csv"), _csv_text(CSV_COLUMNS, rows))
  _write_atomic(os.path.join(output_dir, "speed_rounds.csv"), _csv_text(ROUND_COLUMNS, round_rows))
  _write_atomic(os.path.join(output_dir, "speed.md"), markdown(rows, settings, started, wall))
  if profiles:
    _write_atomic(os.path.join(output_dir, "profile.txt"), "\n\n".join(profiles))


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

  from tff_feddst import data as data_lib  # pylint: disable=g-import-not-at-top

  log = log or (lambda line: print(line, flush=True))
  settings.validate()
  started = datetime.datetime.now().isoformat(timespec="seconds")
  t_start = time.perf_counter()
  check_partitions(settings)
  rows, round_rows, profiles = [], [], []
  with MemorySampler() as memory:
    for case in cases(settings):
      fed_data = data_lib.load_federated_data(
          "fashion_mnist",
          "pathological",
          data_dir=settings.data_dir,
          total_clients=case.total_clients,
          classes_per_client=2,
          examples_per_class=case.examples_per_class,
          seed=settings.seed,
      )
      for algorithm in settings.algorithms:
        row, rounds, profile_text = measure_case(
            algorithm, case, fed_data, settings, memory, log
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
      del fed_data
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

  flags.register_validator("output_dir", bool, "--output_dir must not be empty")
  flags.register_validator("rounds", lambda v: v >= 2, "--rounds must be >= 2 (the first round is excluded)")
  flags.register_validator("local_epochs", lambda v: v >= 1, "--local_epochs must be >= 1")
  flags.register_validator("pure_tf_clients", lambda v: v >= 1, "--pure_tf_clients must be >= 1")
  flags.register_validator("decomposition_repeats", lambda v: v >= 1, "--decomposition_repeats must be >= 1")
  flags.register_validator("seed", lambda v: v >= 0, "--seed must be >= 0")
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
  from tff_feddst import data as data_lib  # pylint: disable=g-import-not-at-top

  settings = settings_from_flags()
  try:
    settings.validate()
  except ValueError as e:
    sys.exit(f"error: {e}")
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
