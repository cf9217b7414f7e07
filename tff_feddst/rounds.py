"""One communication round as an object: `RoundStep(state, round_num)`.

A step samples K clients without replacement, builds their shuffled local
data sets, draws which of them fail (they download but upload nothing),
runs the learning process's `next` on the survivors, accepts the new state
or skips the round (no survivor, or every update rejected by the server),
charges the ledger and computes the global model's statistics. It returns
the new state and a typed `RoundResult`. `training.run_experiment` and
`benchmarks.speed` drive the same step.
"""

import collections
import concurrent.futures
import copy
import dataclasses
import os
import time

import numpy as np

from tff_feddst import names
from tff_feddst import remote

METRIC_COLUMNS = (
    "round",
    "clients_accuracy",
    "test_accuracy",
    "train_loss",
    "train_accuracy",
    "sparsity",
    "forward_flops",
    "round_upload_bits",
    "round_download_bits",
    "cumulative_upload_bits",
    "cumulative_download_bits",
    "clients_mask_uploaded",
    "readjusted",
    "failed_clients",
    "rejected_clients",
    "round_skipped",
    "round_seconds",
)
# With --workers: bytes of the gRPC messages between the driver and the
# workers in the round (`remote.CountingStub`).
GRPC_COLUMN = "round_grpc_bytes"


def metric_columns(on_workers: bool, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
  """The columns of metrics.csv: with the gRPC bytes when running on
  workers, then the phase's own columns (`extra`)."""
  return METRIC_COLUMNS + ((GRPC_COLUMN,) if on_workers else ()) + tuple(extra)


def seed(*parts: int) -> int:
  """A seed derived from `parts` (independent streams for every purpose)."""
  return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def client_dataset(fed_data, client_id, batch_size, shuffle_seed, epochs):
  """A client's shuffled, batched data; `epochs` repeats with reshuffling."""
  ds = fed_data.train_client_data.create_tf_dataset_for_client(client_id)
  n = fed_data.num_train_examples(client_id)
  ds = ds.shuffle(max(n, 1), seed=shuffle_seed, reshuffle_each_iteration=True)
  ds = ds.batch(batch_size)
  return ds.repeat(epochs) if epochs > 1 else ds


@dataclasses.dataclass(frozen=True)
class RoundResult:
  """What one round did, as `metrics.csv` records it."""

  round_num: int
  client_ids: tuple[str, ...]
  train_loss: float
  train_accuracy: float
  sparsity: float
  forward_flops: float
  upload_bits: int
  download_bits: int
  cumulative_upload_bits: int
  cumulative_download_bits: int
  masks_uploaded: int
  readjusted: int
  failed: int
  rejected: int
  skipped: bool
  seconds: float
  # Bytes exchanged with the --workers in the round (None: run locally).
  grpc_bytes: int | None = None
  # The phase's own per-round figures (`RoundStep.round_extra`).
  extra: dict = dataclasses.field(default_factory=dict)

  def row(self, evaluation: dict, extra: tuple[str, ...] = ()) -> dict:
    """The metrics.csv row (`evaluation` empty in rounds without one;
    `extra`: the phase's own columns, last: a figure of the round, else of
    the evaluation)."""
    values = (
        self.round_num,
        evaluation.get("clients_accuracy", ""),
        evaluation.get("test_accuracy", ""),
        self.train_loss,
        self.train_accuracy,
        self.sparsity,
        self.forward_flops,
        self.upload_bits,
        self.download_bits,
        self.cumulative_upload_bits,
        self.cumulative_download_bits,
        self.masks_uploaded,
        self.readjusted,
        self.failed,
        self.rejected,
        int(self.skipped),
        self.seconds,
    )
    row = collections.OrderedDict(zip(METRIC_COLUMNS, values))
    if self.grpc_bytes is not None:
      row[GRPC_COLUMN] = self.grpc_bytes
    for column in extra:
      row[column] = self.extra.get(column, evaluation.get(column, ""))
    return row


@dataclasses.dataclass(frozen=True)
class _ClientsOutcome:
  """What `process.next` reported of the clients (or a round not run)."""

  train_loss: float = float("nan")
  train_accuracy: float = float("nan")
  uploaded_values: int | None = None
  masks_uploaded: int = 0
  readjusted: int = 0
  rejected: int = 0
  # Clients that also sent dense gradients (PruneFL's re-selection rounds).
  gradients_uploaded: int = 0
  # The bits of the messages the clients sent, measured on the tensors
  # (compact uploads, `messages.tensor_bits`); None: counted by the ledger.
  measured_upload_bits: int | None = None
  # The bits the clients received (compact downloads, `compact_download`).
  measured_download_bits: int | None = None


def _advance_client_round(state):
  """A skipped round still counts in the schedules: every block's round
  counter (the client work's, and with gradual sparsification the
  aggregator's and the finalizer's) moves on."""
  for block in ("client_work", "aggregator", "finalizer"):
    part = getattr(state, block)
    if isinstance(part, dict) and "round_num" in part:
      part = collections.OrderedDict(part)
      current = np.asarray(part["round_num"])
      part["round_num"] = (current + 1).astype(current.dtype)
      state = state._replace(**{block: part})
  return state


_PACKER = None  # (pid, the thread pool of `prefetch`)


def _packer() -> concurrent.futures.ThreadPoolExecutor:
  """One background thread of this process (a forked run makes its own)."""
  global _PACKER
  if _PACKER is None or _PACKER[0] != os.getpid():
    _PACKER = (os.getpid(), concurrent.futures.ThreadPoolExecutor(1, "feddst-pack"))
  return _PACKER[1]


def model_weights(process, state):
  """`process.get_model_weights(state)`, read from the state in Python
  where it holds them, without a call to TFF's worker (a round trip of the
  whole state: 20 to 40 ms a round in the paper setting).

  A composed learning process's state is a `LearningAlgorithmState`, and
  its `get_model_weights` returns the state's `global_model_weights`
  (`tff.learning.templates.compose_learning_process`); the compact-download
  process keeps its inner process's state and `get_model_weights`. Any
  other state goes through the process. `tests/test_feddst_process.py`
  checks both readings equal, bit for bit, in every round of a run.
  """
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  if isinstance(state, tff.learning.templates.LearningAlgorithmState):
    return state.global_model_weights
  return process.get_model_weights(state)


def process_round(state) -> int:
  """The process's own round counter (1 in its first round), or 1 without one."""
  client_work = getattr(state, "client_work", None)
  if isinstance(client_work, dict) and "round_num" in client_work:
    return int(np.asarray(client_work["round_num"]))
  return 1


def _readjusted(plan) -> int:
  """1 if the round changed masks on schedule (FedDST's readjustment,
  PruneFL's re-selection), else 0."""
  if "reselect" in plan:
    return int(plan["reselect"])
  if "num_readjusted" in plan:
    return int(np.sum(plan["num_readjusted"]) > 0)
  return 0  # no schedule (LotteryFL's clients prune when they do well)


def _read_metrics(metrics, sparse: bool) -> _ClientsOutcome:
  train = metrics["client_work"]["train"]
  aggregator = metrics["aggregator"]
  rejected = aggregator["voting"]["rejected"] if "voting" in aggregator else aggregator["rejected"]
  outcome = dict(
      train_loss=float(train["loss"]),
      train_accuracy=float(train["accuracy"]),
      rejected=int(rejected),
  )
  if sparse:
    clients = metrics["client_work"]["clients"]
    outcome.update(
        uploaded_values=int(clients["uploaded_values"]),
        masks_uploaded=int(clients["mask_changed"]),
        readjusted=_readjusted(metrics["client_work"]["readjustment"]),
        gradients_uploaded=int(clients.get("gradients_uploaded", 0)),
    )
    if "upload_bits" in clients:
      outcome["measured_upload_bits"] = int(clients["upload_bits"])
    if "download_bits" in clients:
      outcome["measured_download_bits"] = int(clients["download_bits"])
  return _ClientsOutcome(**outcome)


def default_cohort_size(num_clients: int, workers: int = 0) -> int:
  """Clients per cohort under `--cohort_size=0`.

  On this machine: all of a round's clients, up to names.MAX_DEFAULT_COHORT;
  more are split into the fewest cohorts of at most that many, as even as
  can be (25 clients: 9, 9, 7). TFF's worker trains a round's cohorts
  concurrently, and one cohort's step leaves the 2 cores idle about a
  quarter of the time, so two cohorts of 10 fill them (the paper
  setting's 20 clients: 1.22 s a FedAvg round against 1.36 s in one
  cohort of 20); and a cohort's tensors grow with its clients (100
  clients in cohorts of 10: 6.18 s a FedAvg round, of 20: 6.49 s, in one
  cohort 8.06 s). With `workers` remote workers, one cohort per worker.
  """
  if workers:
    return max(1, -(-num_clients // workers))
  cohorts = max(1, -(-num_clients // names.MAX_DEFAULT_COHORT))
  return max(1, -(-num_clients // cohorts))


class RoundStep:
  """The rounds of one phase: `state, result = step(state, round_num)`.

  Holds the phase, the run's data, the client sampler (a numpy Generator
  whose state is checkpointed), the ledger, and the global mask of the
  last round (a changed mask is sent again to every client).
  """

  def __init__(self, config, phase, fed_data, sampler, ledger, state):
    self.config = config
    self.phase = phase
    self.fed_data = fed_data
    self.population = list(fed_data.nonempty_train_client_ids)
    self.sampler = sampler
    self.ledger = ledger
    # The metrics of the last `process.next`.
    self.last_metrics = None
    # The round's clients that hold no copy of the current global mask.
    self._stale = set()
    # (clients, future) of the next round's cohorts (`prefetch`), and the
    # round being run.
    self._prefetched = None
    self._round_num = 0
    remote.check_splittable(phase.built.process.next)
    weights = model_weights(phase.built.process, state)
    self.sparsity, self.flops, self._masks = phase.stats(weights, ledger)

  def sample_clients(self, sampler=None) -> list[str]:
    chosen = (sampler or self.sampler).choice(
        len(self.population), self.config.clients_per_round, replace=False
    )
    return [self.population[i] for i in sorted(chosen)]

  def client_seeds(self, round_num: int, count: int) -> list[int]:
    """The shuffle seeds of the round's sampled clients' data, in order."""
    return [seed(self.config.seed, 3, round_num, i) for i in range(count)]

  def client_datasets(self, client_ids, round_num: int) -> list:
    epochs = 1 if self.phase.built.epochs_in_process else self.config.local_epochs
    return [
        client_dataset(self.fed_data, cid, self.config.batch_size, shuffle_seed, epochs)
        for cid, shuffle_seed in zip(client_ids, self.client_seeds(round_num, len(client_ids)))
    ]

  def draw_failures(self, round_num: int, num_clients: int) -> np.ndarray:
    """Clients that fail after downloading (stragglers, lost connections)."""
    rate = self.config.client_failure_rate
    if rate <= 0:
      return np.zeros(num_clients, bool)
    rng = np.random.default_rng(seed(self.config.seed, 5, round_num))
    return rng.random(num_clients) < rate

  def client_inputs(self, survivors) -> list:
    """The TFF client values of the round: a data set per client, or
    per cohort of clients when the process trains cohorts.

    `survivors`: (client id, its data set (None for cohorts), its shuffle
    seed) triples. A cohort is packed from the data arrays in the order the
    data set would give (`cohort_work.pack_cohorts_from_arrays`).
    """
    settings = self.phase.built.cohort
    if self.phase.built.compact_download and settings is None:
      return self._compact_download_inputs(survivors)
    if settings is None or not survivors:
      return [dataset for _, dataset, _ in survivors]
    clients = [(cid, shuffle_seed) for cid, _, shuffle_seed in survivors]
    prefetched, self._prefetched = self._prefetched, None
    if prefetched is not None and prefetched[0] == clients:
      cohorts = prefetched[1].result()
    else:
      cohorts = self._pack_cohorts(clients)
    if self.phase.built.compact_download:
      return self._compact_cohort_inputs([cid for cid, _ in clients], cohorts)
    return cohorts

  def _compact_cohort_inputs(self, client_ids, cohorts) -> list:
    """Each cohort's value on compact downloads: its steps, how many of its
    clients need the global mask, the packed mask the others hold
    (`compact_download.cohort_data`). Cohorts hold consecutive clients
    (`_pack_cohorts`)."""
    from tff_feddst import compact_download  # pylint: disable=g-import-not-at-top

    layout = self.phase.built.layout
    held = compact_download.pack_masks_np(self._masks, layout)
    size = self._cohort_size(len(client_ids))
    values = []
    for c, value in enumerate(cohorts):
      members = client_ids[c * size:(c + 1) * size]
      stale = sum(cid in self._stale for cid in members)
      values.append(compact_download.cohort_data(value, len(members), stale, held, layout))
    return values

  def _pack_cohorts(self, clients) -> list:
    from tff_feddst import cohort_work  # pylint: disable=g-import-not-at-top

    return cohort_work.pack_cohorts_from_arrays(
        self.fed_data, clients, self.config.local_epochs, self.config.batch_size,
        self._cohort_size(len(clients)),
    )

  def _cohort_size(self, num_clients: int) -> int:
    return self.config.cohort_size or self._default_cohort_size(num_clients)

  def prefetch(self, round_num: int) -> None:
    """Packs round `round_num`'s cohorts in a background thread while this
    round trains (the driver only waits for TFF's worker then).

    The round's clients are drawn from a copy of the sampler, so the run's
    own draws do not move; `client_inputs` takes the packed cohorts only if
    the round's surviving clients and their shuffle seeds are the ones
    packed, and packs them itself otherwise. Only the plain step with
    cohorts prefetches (steps of other algorithms draw or pack their own
    way).
    """
    built = self.phase.built
    if (
        type(self) is not RoundStep or built.cohort is None
        or round_num > self.phase.last_round
    ):
      return
    ids = self.sample_clients(copy.deepcopy(self.sampler))
    seeds = self.client_seeds(round_num, len(ids))
    failed = self.draw_failures(round_num, len(ids))
    clients = [(c, s) for c, s, f in zip(ids, seeds, failed) if not f]
    if clients:
      self._prefetched = (clients, _packer().submit(self._pack_cohorts, clients))

  def _compact_download_inputs(self, survivors, extra=None) -> list:
    """Each client's data set, the packed global mask it holds, or none
    when it needs the server to send it (`compact_download.client_data`).
    `extra`: per client, its own further data sets (by name)."""
    from tff_feddst import compact_download  # pylint: disable=g-import-not-at-top

    layout = self.phase.built.layout
    held = compact_download.pack_masks_np(self._masks, layout)
    extra = extra or [{}] * len(survivors)
    return [
        compact_download.client_data(
            dataset, None if cid in self._stale else held, layout, **own
        )
        for (cid, dataset, _), own in zip(survivors, extra)
    ]

  def _default_cohort_size(self, num_clients: int) -> int:
    return default_cohort_size(num_clients, len(self.config.worker_addresses))

  def round_extra(self) -> dict:
    """The phase's own figures of the round just run (metrics.csv columns)."""
    return {}

  def charge_download(self, client_ids, state) -> int:
    """Charges the ledger for the round's downloads; returns their bits."""
    built = self.phase.built
    if built.wire_bits is not None:  # the broadcast's TFF type, per client
      return self.ledger.download_measured(client_ids, len(client_ids) * built.wire_bits[0])
    return self.ledger.download(
        client_ids, built.kept_in_round(process_round(state)) if built.sparse else None
    )

  def run_clients(self, state, survivors):
    """(state, outcome, skipped): `process.next` on the surviving
    (client id, data set, shuffle seed) triples, accepted or not."""
    built = self.phase.built
    self.last_metrics = None
    if not survivors:
      return _advance_client_round(state), _ClientsOutcome(), True
    inputs = self.client_inputs(survivors)
    self.prefetch(self._round_num + 1)  # packed while this round trains
    output = built.process.next(state, inputs)
    self.last_metrics = output.metrics
    outcome = _read_metrics(output.metrics, built.sparse)
    # A round in which the server rejected every update keeps the previous
    # state whole (no server momentum step on an empty round).
    if outcome.rejected == len(survivors):
      return _advance_client_round(state), outcome, True
    return output.state, outcome, False

  def __call__(self, state, round_num: int):
    start = time.time()
    wire_start = remote.wire_bytes()
    built, ledger = self.phase.built, self.ledger
    client_ids = self.sample_clients()
    # Cohorts are packed from the data arrays (`client_inputs`), not read
    # from the clients' data sets.
    datasets = (
        self.client_datasets(client_ids, round_num)
        if built.cohort is None else [None] * len(client_ids)
    )
    seeds = self.client_seeds(round_num, len(client_ids))
    failed = self.draw_failures(round_num, len(client_ids))
    survivors = [
        (c, d, s) for c, d, s, f in zip(client_ids, datasets, seeds, failed) if not f
    ]
    measured = built.compact_download
    # Compact downloads: the ledger charges the failed clients by the
    # formula, and the others with what they measured receiving.
    self._stale = {cid for cid in client_ids if ledger.needs_mask(cid)} if measured else set()
    download_bits = self.charge_download(
        [c for c, f in zip(client_ids, failed) if f] if measured else client_ids, state
    )
    self._round_num = round_num
    state, outcome, skipped = self.run_clients(state, survivors)
    if measured and survivors:
      download_bits += ledger.download_measured(
          [c for c, _, _ in survivors], outcome.measured_download_bits
      )
    upload_bits = 0
    if survivors and outcome.measured_upload_bits is not None:
      upload_bits = ledger.upload_measured(outcome.measured_upload_bits)
    elif survivors and built.wire_bits is not None:  # the upload's TFF type
      upload_bits = ledger.upload_measured(len(survivors) * built.wire_bits[1])
    elif survivors:
      upload_bits = ledger.upload(
          len(survivors), outcome.uploaded_values, outcome.masks_uploaded,
          outcome.gradients_uploaded,
      )
    weights = model_weights(built.process, state)
    self.sparsity, self.flops, masks = self.phase.stats(weights, ledger)
    if built.sparse and any(
        not np.array_equal(a, b) for a, b in zip(self._masks, masks)
    ):
      ledger.global_mask_changed()
    self._masks = masks
    return state, RoundResult(
        round_num=round_num,
        client_ids=tuple(client_ids),
        train_loss=outcome.train_loss,
        train_accuracy=outcome.train_accuracy,
        sparsity=self.sparsity,
        forward_flops=self.flops,
        upload_bits=upload_bits,
        download_bits=download_bits,
        cumulative_upload_bits=ledger.cumulative_upload_bits,
        cumulative_download_bits=ledger.cumulative_download_bits,
        masks_uploaded=outcome.masks_uploaded,
        readjusted=outcome.readjusted,
        failed=int(failed.sum()),
        rejected=outcome.rejected,
        skipped=skipped,
        seconds=round(time.time() - start, 4),
        grpc_bytes=None if wire_start is None else remote.wire_bytes() - wire_start,
        extra=self.round_extra(),
    )
