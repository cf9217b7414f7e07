"""The simulation driver: rounds, client sampling, costs, evaluation, outputs.

`run_experiment(config)` is what `run.py` (and the benchmarks) call. It writes
into `config.output_dir`:
- config.json   every setting of the run;
- metrics.csv   one row per round (evaluation columns filled every
                `eval_every` rounds and on the last one);
- summary.json  final figures and total wall time (written last, atomically);
- final_model.keras  the final global model (plain Keras, no wrappers);
- checkpoints/  the run's state every `checkpoint_every` rounds and at the
                end (`checkpoint.RunCheckpoints`); rerunning the same settings
                with the same output directory resumes from the latest.
"""

import collections
import csv
import dataclasses
import json
import os
import sys
import time
from typing import Callable

import numpy as np
import tensorflow as tf

import keras_models
from tff_feddst import algorithms
from tff_feddst import checkpoint as checkpoint_lib
from tff_feddst import costs
from tff_feddst import data as data_lib
from tff_feddst import masks as masks_lib
from tff_feddst import sparse_model

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


class ConfigError(ValueError):
  """A setting that does not fit the data (reported as one line)."""


@dataclasses.dataclass(frozen=True)
class ExperimentConfig(algorithms.AlgorithmConfig):
  """Every setting of a run (the flags of run.py): the algorithm's, and these."""

  dataset: str = "fashion_mnist"
  data_dir: str | None = None
  model: str | None = None
  partition: str = "pathological"
  classes_per_client: int = 2
  examples_per_class: int = 20
  dirichlet_beta: float = 0.1
  total_clients: int = 400
  clients_per_round: int = 20
  rounds: int = 200
  batch_size: int = 32
  # None: R_end = rounds // 2.
  readjustment_end_round: int | None = None
  eval_every: int = 10
  output_dir: str = "runs/default"
  export_tflite: bool = False
  tflite_quantization: str = "float32"
  checkpoint_every: int = 10
  client_failure_rate: float = 0.0
  # structured / structured_feddst: search rounds (phase 1), then retraining.
  structured_search_rounds: int = 20
  # Phase 2 starts from fresh seeded weights instead of the surviving ones.
  structured_reinit: bool = False

  def resolved_end_round(self) -> int:
    """R_end, counted in the rounds of the (FedDST) process that readjusts."""
    if self.readjustment_end_round is None:
      if self.algorithm in algorithms.STRUCTURED_ALGORITHMS:
        return (self.rounds - self.structured_search_rounds) // 2
      return self.rounds // 2
    return self.readjustment_end_round

  def algorithm_config(self) -> algorithms.AlgorithmConfig:
    values = {
        f.name: getattr(self, f.name)
        for f in dataclasses.fields(algorithms.AlgorithmConfig)
    }
    values["readjustment_end_round"] = self.resolved_end_round()
    return algorithms.AlgorithmConfig(**values)


def _seed(*parts: int) -> int:
  return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class Evaluator:
  """Evaluates global weights outside TFF, on the whole test split once.

  Every client's local test set is a subset of the test split, so one pass
  gives both the test accuracy and each client's accuracy (the paper's
  measure: the mean over clients of the accuracy on their local test sets).
  """

  def __init__(self, keras_fn, fed_data, batch_size: int = 1000):
    self.model = keras_fn()
    self.x = fed_data.arrays.x_test
    self.y = fed_data.arrays.y_test
    self.client_indices = [
        fed_data.test_indices(cid)
        for cid in fed_data.client_ids
        if fed_data.num_test_examples(cid) > 0
    ]
    self.batch_size = batch_size
    self._logits = tf.function(lambda x: self.model(x, training=False))

  def correct(self, trainable_weights) -> np.ndarray:
    self.model.set_weights([np.asarray(w) for w in trainable_weights])
    hits = []
    for start in range(0, len(self.x), self.batch_size):
      logits = self._logits(self.x[start : start + self.batch_size])
      hits.append(np.argmax(logits.numpy(), axis=1) == self.y[start : start + self.batch_size])
    return np.concatenate(hits)

  def evaluate(self, trainable_weights) -> dict[str, float]:
    hits = self.correct(trainable_weights)
    per_client = [float(hits[idx].mean()) for idx in self.client_indices]
    return {
        "test_accuracy": float(hits.mean()),
        "clients_accuracy": float(np.mean(per_client)) if per_client else float("nan"),
    }


def client_dataset(fed_data, client_id, batch_size, shuffle_seed, epochs):
  """A client's shuffled, batched data; `epochs` repeats with reshuffling."""
  ds = fed_data.train_client_data.create_tf_dataset_for_client(client_id)
  n = fed_data.num_train_examples(client_id)
  ds = ds.shuffle(max(n, 1), seed=shuffle_seed, reshuffle_each_iteration=True)
  ds = ds.batch(batch_size)
  return ds.repeat(epochs) if epochs > 1 else ds


def _format_bits(bits: float) -> str:
  value = bits / 8
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if value < 1000 or unit == "TB":
      return f"{value:.1f} {unit}"
    value /= 1000
  raise AssertionError


RESUMABLE_CHANGES = frozenset({
    # Settings that may differ when a run is resumed: they do not change
    # what is trained (`rounds` may grow as long as R_end stays the same).
    "output_dir",
    "data_dir",
    "rounds",
    "eval_every",
    "checkpoint_every",
    "export_tflite",
    "tflite_quantization",
})


def _check_resumable(saved: dict, config: ExperimentConfig, model_name: str) -> None:
  """Raises ConfigError when `config` is another experiment than `saved`."""
  defaults = {f.name: f.default for f in dataclasses.fields(ExperimentConfig)}
  current = dataclasses.asdict(config) | {"model": model_name}
  differing = []
  structured_run = config.algorithm in algorithms.STRUCTURED_ALGORITHMS
  for key, value in current.items():
    if key in RESUMABLE_CHANGES or key == "readjustment_end_round":
      continue
    if key.startswith("structured_") and not structured_run:
      continue
    if saved.get(key, defaults.get(key)) != value:
      differing.append(f"--{key}={value} (was {saved.get(key, defaults.get(key))})")
  saved_end = saved.get("readjustment_end_round")
  if saved_end is None:
    saved_rounds = int(saved.get("rounds", 0))
    if saved.get("algorithm") in algorithms.STRUCTURED_ALGORITHMS:
      saved_rounds -= int(saved.get("structured_search_rounds", 0))
    saved_end = saved_rounds // 2
  if saved_end != config.resolved_end_round():
    differing.append(
        f"readjustment end round {config.resolved_end_round()} (was {saved_end}; "
        "set --readjustment_end_round to keep it)"
    )
  if differing:
    raise ConfigError(
        f"{config.output_dir} holds a checkpoint of a different experiment: "
        + ", ".join(differing)
        + "; use another --output_dir, or delete this one to start over"
    )


def _read_saved_config(path: str) -> dict:
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError("not a JSON object")
    return saved
  except (OSError, ValueError) as e:
    raise ConfigError(
        f"cannot resume: {path} is missing or corrupt ({e}); delete the output "
        "directory to start over"
    ) from None


def _truncate_metrics(path: str, last_round: int) -> None:
  """Keeps the rows of rounds 1..last_round (rewritten atomically)."""
  try:
    with open(path, newline="") as f:
      rows = [r for r in csv.DictReader(f)]
    kept = [r for r in rows if int(r["round"]) <= last_round]
  except (OSError, ValueError, KeyError, TypeError, csv.Error) as e:
    raise ConfigError(
        f"cannot resume: {path} is missing or corrupt ({e}); delete the output "
        "directory to start over"
    ) from None
  if [int(r["round"]) for r in kept] != list(range(1, last_round + 1)):
    raise ConfigError(
        f"cannot resume: {path} does not hold one row for each of rounds "
        f"1-{last_round}; delete the output directory to start over"
    )
  tmp = f"{path}.tmp"
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in kept:
      writer.writerow({k: row.get(k, "") for k in METRIC_COLUMNS})
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _advance_client_round(state):
  """A skipped round still counts in the readjustment schedule."""
  client_work = state.client_work
  if isinstance(client_work, dict) and "round_num" in client_work:
    client_work = collections.OrderedDict(client_work)
    current = np.asarray(client_work["round_num"])
    client_work["round_num"] = (current + 1).astype(current.dtype)
    return state._replace(client_work=client_work)
  return state


def mask_stats(built, weights, dense_flops):
  """(sparsity, forward FLOPs, masks) of a global model, as metrics.csv has them.

  Sparse algorithms: the global mask's sparsity and FLOPs at the layers'
  densities; dense ones: 0, the dense FLOPs and no masks.
  """
  if built.layout is None:
    return 0.0, costs.forward_flops(dense_flops), None
  _, masks = sparse_model.kernels_and_masks(weights, built.layout)
  densities = costs.densities_from_masks(built.layout.layer_names, masks)
  return masks_lib.sparsity_of(masks), costs.forward_flops(dense_flops, densities), masks


FOUND_ARCHITECTURE = "found_architecture.json"


def _read_found_widths(output_dir: str) -> dict:
  path = os.path.join(output_dir, FOUND_ARCHITECTURE)
  try:
    with open(path) as f:
      widths = json.load(f)["widths"]
    return {str(k): int(v) for k, v in widths.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ConfigError(
        f"cannot resume the second phase: {path} is missing or corrupt ({e}); "
        "delete the output directory to start over"
    ) from None


class _Phase:
  """One learning process of a run and what the driver needs around it.

  Single-phase algorithms have one phase. `structured*` algorithms have the
  search (phase 1, on the full network with whole-unit masks) and the
  retraining (phase 2, FedAvg or FedDST on the smaller network found).
  """

  def __init__(self, number, built, keras_fn, fed_data, model_name, widths):
    self.number = number
    self.built = built
    self.keras_fn = keras_fn
    self.fed_data = fed_data
    self.model_name = model_name
    self.widths = widths  # phase 2: the found widths; else None
    self.evaluator = Evaluator(keras_fn, fed_data)
    self.dense_flops = costs.layer_forward_flops(keras_fn())
    self.current_widths = dict(keras_models.resolve_widths(model_name, widths))
    self._costs = {}
    self._full_params = keras_models.build_model(
        model_name, fed_data.input_shape, fed_data.num_classes
    ).count_params()

  def initial_state(self):
    state = self.built.process.initialize()
    return self.built.process.set_model_weights(state, self.built.initial_weights)

  def new_ledger(self, config, previous):
    ledger = costs.CommunicationLedger(
        self.built.model_size,
        sparse=self.built.sparse,
        upload_value_bits=16 if config.upload_dtype == "float16" else 32,
    )
    if previous is not None:  # totals run on across phases
      ledger.cumulative_upload_bits = previous.cumulative_upload_bits
      ledger.cumulative_download_bits = previous.cumulative_download_bits
    return ledger

  def architecture(self, widths):
    from tff_feddst import structured  # pylint: disable=g-import-not-at-top

    key = tuple(sorted(widths.items()))
    if key not in self._costs:
      self._costs[key] = structured.architecture_cost(
          self.model_name, self.fed_data.input_shape, self.fed_data.num_classes, widths
      )
    return self._costs[key]

  def stats(self, weights, ledger):
    """(sparsity, forward FLOPs, masks) of the global model.

    Sparse phases: the global mask's sparsity. The structured search: the
    fraction of the full network's parameters removed so far, and the
    ledger is set to the current (smaller) network's size, which is what
    the next round's clients download and upload.
    """
    built = self.built
    if built.structured is not None:
      from tff_feddst import structured  # pylint: disable=g-import-not-at-top

      alive = structured.alive_from_model_weights(built.structured, weights)
      self.current_widths = structured.widths_from_alive(alive)
      cost = self.architecture(self.current_widths)
      ledger.size = costs.ModelSize(cost.params, 0)
      return 1.0 - cost.params / self._full_params, cost.forward_flops, None
    return mask_stats(built, weights, self.dense_flops)

  def found(self, weights):
    """(widths, weights of the smaller network) found by the search."""
    from tff_feddst import structured  # pylint: disable=g-import-not-at-top

    wrapped = sparse_model.wrap_prunable(self.keras_fn())
    weights.assign_weights_to(wrapped)
    alive = structured.alive_from_model_weights(self.built.structured, weights)
    return structured.shrink(wrapped, alive)

  def report(self, weights, evaluation, ledger, last_round):
    """Per-phase figures for summary.json."""
    widths = dict(self.current_widths)
    cost = self.architecture(widths)
    if self.built.structured is None:
      _, flops, _ = self.stats(weights, ledger)
    else:
      flops = cost.forward_flops
    per_client = costs.dense_message_bits(costs.ModelSize(cost.params, 0))
    if self.built.sparse:
      per_client = costs.sparse_message_bits(
          self.built.model_size, self.built.layout.num_kept, False
      )
    return {
        "last_round": last_round,
        "widths": widths,
        "params": cost.params,
        "forward_flops": flops,
        "upload_bits_per_client_round": per_client,
        "clients_accuracy": evaluation.get("clients_accuracy"),
        "test_accuracy": evaluation.get("test_accuracy"),
        "cumulative_upload_bits": ledger.cumulative_upload_bits,
    }


def _build_phase(config, number, model_name, fed_data, input_spec, found, log) -> _Phase:
  """Builds phase `number`; `found` = (widths, weights or None) for phase 2."""
  build_start = time.time()
  widths, small_weights = found if found is not None else (None, None)
  keras_fn = lambda: keras_models.build_model(  # noqa: E731
      model_name, fed_data.input_shape, fed_data.num_classes, widths=widths
  )
  algorithm_config = config.algorithm_config()
  description = config.algorithm
  if number == 2:
    second = algorithms.STRUCTURED_ALGORITHMS[config.algorithm]
    algorithm_config = dataclasses.replace(algorithm_config, algorithm=second)
    description = f"{config.algorithm} phase 2 ({second} on widths {widths})"
  elif config.algorithm in algorithms.STRUCTURED_ALGORITHMS:
    description = f"{config.algorithm} phase 1 (search, boundary {config.structured_boundary} x {config.structured_relative_to})"
  built = algorithms.build_algorithm(algorithm_config, keras_fn, input_spec)
  if small_weights is not None and not config.structured_reinit:
    built.initial_weights = _start_from(built, small_weights)
  log(
      f"{description} on {config.dataset} ({config.partition}, "
      f"{config.clients_per_round} clients per round), model {model_name}: "
      f"built in {time.time() - build_start:.1f} s"
  )
  return _Phase(number, built, keras_fn, fed_data, model_name, widths)


def _start_from(built, small_weights):
  """Initial weights of phase 2 from the search's surviving weights.

  Dense: the weights as they are. Sparse (FedDST): each layer keeps its
  budget of largest-magnitude weights (ties: lowest index).
  """
  trainable = [np.asarray(w, np.float32) for w in small_weights]
  non_trainable = [np.asarray(w) for w in built.initial_weights.non_trainable]
  if built.sparse:
    layout = built.layout
    for slot, i in enumerate(layout.kernel_index):
      flat = np.abs(trainable[i]).ravel()
      order = np.argsort(-flat, kind="stable")
      mask = np.zeros_like(flat)
      mask[order[: layout.budgets[slot]]] = 1.0
      mask = mask.reshape(trainable[i].shape)
      trainable[i] = trainable[i] * mask
      non_trainable[layout.mask_index[slot]] = mask.astype(non_trainable[layout.mask_index[slot]].dtype)
  return type(built.initial_weights)(trainable=trainable, non_trainable=non_trainable)


def run_experiment(
    config: ExperimentConfig,
    log: Callable[[str], None] | None = None,
) -> dict:
  """Trains `config.rounds` rounds and writes the outputs; returns the summary.

  If `config.output_dir` holds a checkpoint of the same experiment, the run
  resumes from it (and ends at once if it is complete).
  """
  log = log or (lambda line: print(line, flush=True))
  started = time.time()
  if not 0.0 <= config.client_failure_rate < 1.0:
    raise ConfigError(
        f"--client_failure_rate={config.client_failure_rate} must be in [0, 1)"
    )
  if config.checkpoint_every < 1:
    raise ConfigError(f"--checkpoint_every={config.checkpoint_every} must be >= 1")
  if config.algorithm in algorithms.STRUCTURED_ALGORITHMS and not (
      1 <= config.structured_search_rounds < config.rounds
  ):
    raise ConfigError(
        f"--structured_search_rounds={config.structured_search_rounds} must be "
        f"at least 1 and below --rounds={config.rounds}"
    )
  fed_data = data_lib.load_federated_data(
      config.dataset,
      config.partition,
      data_dir=config.data_dir,
      total_clients=config.total_clients,
      classes_per_client=config.classes_per_client,
      examples_per_class=config.examples_per_class,
      dirichlet_beta=config.dirichlet_beta,
      seed=config.seed,
  )
  population = list(fed_data.nonempty_train_client_ids)
  if config.clients_per_round > len(population):
    raise ConfigError(
        f"--clients_per_round={config.clients_per_round} exceeds the "
        f"{len(population)} clients that have training data"
    )
  model_name = config.model or keras_models.default_model_for_dataset(config.dataset)
  keras_fn = lambda: keras_models.build_model(  # noqa: E731
      model_name, fed_data.input_shape, fed_data.num_classes
  )
  input_spec = collections.OrderedDict(
      x=tf.TensorSpec([None, *fed_data.input_shape], tf.float32),
      y=tf.TensorSpec([None], tf.int32),
  )
  os.makedirs(config.output_dir, exist_ok=True)
  config_path = os.path.join(config.output_dir, "config.json")
  metrics_path = os.path.join(config.output_dir, "metrics.csv")
  summary_path = os.path.join(config.output_dir, "summary.json")
  checkpoints = checkpoint_lib.RunCheckpoints(
      os.path.join(config.output_dir, "checkpoints")
  )
  resume_round = checkpoints.latest_round()
  if resume_round is not None:
    _check_resumable(_read_saved_config(config_path), config, model_name)
    if resume_round > config.rounds:
      raise ConfigError(
          f"{config.output_dir} holds a checkpoint at round {resume_round}, "
          f"past --rounds={config.rounds}"
      )
    if resume_round == config.rounds and os.path.exists(summary_path):
      log(f"{config.output_dir}: the run is complete ({resume_round} rounds); nothing to do")
      with open(summary_path) as f:
        return json.load(f)
  dense_flops = costs.layer_forward_flops(keras_fn())
  sampler = np.random.default_rng(_seed(config.seed, 2))
  structured_run = config.algorithm in algorithms.STRUCTURED_ALGORITHMS
  search_rounds = config.structured_search_rounds if structured_run else config.rounds
  restored = None
  if resume_round is not None and resume_round > search_rounds:
    found = (_read_found_widths(config.output_dir), None)
    phase = _build_phase(config, 2, model_name, fed_data, input_spec, found, log)
  else:
    phase = _build_phase(config, 1, model_name, fed_data, input_spec, None, log)
  state = phase.initial_state()
  if resume_round is not None:
    # Nothing in the output directory changes before the checkpoint and the
    # metrics proved readable.
    restored = checkpoints.restore(resume_round, state)
    state = restored.state
    _truncate_metrics(metrics_path, resume_round)
  if os.path.exists(summary_path):
    os.remove(summary_path)
  settings = dataclasses.asdict(config) | {"model": model_name}
  _write_atomic(config_path, json.dumps(settings, indent=2, sort_keys=True) + "\n")

  ledger = phase.new_ledger(config, None)
  evaluation = {}
  first_round = 1
  phase_results = restored.extras.get("phases", {}) if restored else {}
  if restored is not None:
    ledger.load_state(restored.extras["ledger"])
    sampler.bit_generator.state = restored.extras["sampler"]
    evaluation = restored.extras.get("evaluation", {})
    first_round = resume_round + 1
    log(f"resumed from {checkpoints.root_dir} at round {resume_round}")

  weights = phase.built.process.get_model_weights(state)
  sparsity, flops, previous_masks = phase.stats(weights, ledger)
  with open(metrics_path, "a" if resume_round is not None else "w", newline="") as metrics_file:
    writer = csv.DictWriter(metrics_file, fieldnames=METRIC_COLUMNS)
    if resume_round is None:
      writer.writeheader()
    for round_num in range(first_round, config.rounds + 1):
      if structured_run and phase.number == 1 and round_num > search_rounds:
        phase_results["search"] = phase.report(weights, evaluation, ledger, search_rounds)
        found = phase.found(weights)
        _write_atomic(
            os.path.join(config.output_dir, FOUND_ARCHITECTURE),
            json.dumps({"model": model_name, "widths": found[0]}, indent=2) + "\n",
        )
        phase = _build_phase(config, 2, model_name, fed_data, input_spec, found, log)
        state = phase.initial_state()
        ledger = phase.new_ledger(config, ledger)
        weights = phase.built.process.get_model_weights(state)
        sparsity, flops, previous_masks = phase.stats(weights, ledger)
      built = phase.built
      round_start = time.time()
      sampled = sampler.choice(len(population), config.clients_per_round, replace=False)
      client_ids = [population[i] for i in sorted(sampled)]
      datasets = [
          client_dataset(
              fed_data,
              cid,
              config.batch_size,
              _seed(config.seed, 3, round_num, i),
              1 if built.epochs_in_process else config.local_epochs,
          )
          for i, cid in enumerate(client_ids)
      ]
      # Clients that fail after being sampled (stragglers, lost connections)
      # have downloaded the model but upload nothing.
      failed = np.zeros(len(client_ids), bool)
      if config.client_failure_rate > 0:
        failure_rng = np.random.default_rng(_seed(config.seed, 5, round_num))
        failed = failure_rng.random(len(client_ids)) < config.client_failure_rate
      active = built.layout.num_kept if built.sparse else None
      download_bits = ledger.download(client_ids, active)
      survivors = [d for d, f in zip(datasets, failed) if not f]
      upload_bits, masks_uploaded, rejected, readjusted = 0, 0, 0, 0
      train_loss, train_accuracy = float("nan"), float("nan")
      skipped = True
      if survivors:
        output = built.process.next(state, survivors)
        metrics = output.metrics
        train = metrics["client_work"]["train"]
        train_loss, train_accuracy = float(train["loss"]), float(train["accuracy"])
        if built.sparse:
          stats = metrics["client_work"]["clients"]
          upload_bits = ledger.upload(
              len(survivors), int(stats["uploaded_values"]), int(stats["mask_changed"])
          )
          masks_uploaded = int(stats["mask_changed"])
          readjusted = int(
              np.sum(metrics["client_work"]["readjustment"]["num_readjusted"]) > 0
          )
        else:
          upload_bits = ledger.upload(len(survivors))
        aggregator = metrics["aggregator"]
        rejected = int(aggregator["voting"]["rejected"] if "voting" in aggregator else aggregator["rejected"])
        # A round in which the server rejected every update keeps the
        # previous state whole (no server momentum step on an empty round).
        skipped = rejected == len(survivors)
        state = output.state if not skipped else _advance_client_round(state)
      else:
        state = _advance_client_round(state)

      weights = built.process.get_model_weights(state)
      sparsity, flops, current_masks = phase.stats(weights, ledger)
      if built.sparse and any(
          not np.array_equal(a, b) for a, b in zip(previous_masks, current_masks)
      ):
        ledger.global_mask_changed()
      previous_masks = current_masks

      evaluate_now = (
          round_num % config.eval_every == 0
          or round_num == config.rounds
          or (structured_run and round_num == search_rounds)
      )
      evaluation = phase.evaluator.evaluate(weights.trainable) if evaluate_now else {}
      row = {
          "round": round_num,
          "clients_accuracy": evaluation.get("clients_accuracy", ""),
          "test_accuracy": evaluation.get("test_accuracy", ""),
          "train_loss": train_loss,
          "train_accuracy": train_accuracy,
          "sparsity": sparsity,
          "forward_flops": flops,
          "round_upload_bits": upload_bits,
          "round_download_bits": download_bits,
          "cumulative_upload_bits": ledger.cumulative_upload_bits,
          "cumulative_download_bits": ledger.cumulative_download_bits,
          "clients_mask_uploaded": masks_uploaded,
          "readjusted": readjusted,
          "failed_clients": int(failed.sum()),
          "rejected_clients": rejected,
          "round_skipped": int(skipped),
          "round_seconds": round(time.time() - round_start, 4),
      }
      writer.writerow(row)
      metrics_file.flush()
      os.fsync(metrics_file.fileno())
      line = (
          f"round {round_num:>4}/{config.rounds}  loss {train_loss:.4f}  "
          f"sparsity {sparsity:.3f}  up {_format_bits(upload_bits)} "
          f"(total {_format_bits(ledger.cumulative_upload_bits)})  "
          f"{row['round_seconds']:.2f} s"
      )
      if failed.any() or rejected:
        line += f"  failed {int(failed.sum())} rejected {rejected}"
      if skipped:
        line += "  (skipped: no update accepted)"
      if built.structured is not None:
        line += "  widths " + ",".join(str(w) for w in phase.current_widths.values())
      if evaluation:
        line += (
            f"  clients_acc {evaluation['clients_accuracy']:.4f}"
            f"  test_acc {evaluation['test_accuracy']:.4f}"
        )
      log(line)
      if round_num % config.checkpoint_every == 0 or round_num == config.rounds:
        checkpoints.save(
            round_num,
            state,
            {
                "ledger": ledger.state(),
                "sampler": sampler.bit_generator.state,
                "evaluation": evaluation,
                "widths": phase.widths,
                "phases": phase_results,
            },
        )

  built = phase.built
  keras_fn = phase.keras_fn
  final_model = keras_fn()
  final_model.set_weights([np.asarray(w) for w in weights.trainable])
  model_path = os.path.join(config.output_dir, "final_model.keras")
  tmp_model_path = os.path.join(config.output_dir, "final_model.tmp.keras")
  final_model.save(tmp_model_path)
  os.replace(tmp_model_path, model_path)

  summary = {
      "algorithm": config.algorithm,
      "dataset": config.dataset,
      "model": model_name,
      "rounds": config.rounds,
      "resumed_from_round": resume_round,
      "final_clients_accuracy": evaluation.get("clients_accuracy"),
      "final_test_accuracy": evaluation.get("test_accuracy"),
      "final_sparsity": sparsity,
      "forward_flops": flops,
      "dense_forward_flops": costs.forward_flops(dense_flops),
      "num_prunable": built.model_size.num_prunable,
      "num_unmasked": built.model_size.num_unmasked,
      "layer_budgets": (
          dict(zip(built.layout.layer_names, built.layout.budgets))
          if built.sparse
          else None
      ),
      "cumulative_upload_bits": ledger.cumulative_upload_bits,
      "cumulative_download_bits": ledger.cumulative_download_bits,
      "wall_seconds": round(time.time() - started, 2),
  }
  if structured_run:
    phase_results["retrain"] = phase.report(weights, evaluation, ledger, config.rounds)
    summary["structured"] = {
        "boundary": config.structured_boundary,
        "relative_to": config.structured_relative_to,
        "search_rounds": search_rounds,
        "reinit": config.structured_reinit,
        "original_widths": keras_models.default_widths(model_name),
        "found_widths": phase.widths,
        "phases": phase_results,
    }
  if config.export_tflite:
    summary["tflite"] = _export_tflite(final_model, fed_data, config, log)
  _write_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
  log(
      f"done in {summary['wall_seconds']:.1f} s: clients_accuracy "
      f"{summary['final_clients_accuracy']:.4f}, test_accuracy "
      f"{summary['final_test_accuracy']:.4f}, uploaded "
      f"{_format_bits(ledger.cumulative_upload_bits)}; outputs in {config.output_dir}"
  )
  sys.stdout.flush()
  return summary


def _export_tflite(model, fed_data, config, log) -> dict:
  """Sparse TFLite export of the final model, evaluated with the TFLite runtime."""
  import tflite_export  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(_seed(config.seed, 4))
  x_train = fed_data.arrays.x_train
  representative = x_train[rng.choice(len(x_train), min(256, len(x_train)), replace=False)]
  client_indices = [
      fed_data.test_indices(cid)
      for cid in fed_data.client_ids
      if fed_data.num_test_examples(cid) > 0
  ]
  report = tflite_export.export_and_report(
      model,
      output_dir=config.output_dir,
      x_test=fed_data.arrays.x_test,
      y_test=fed_data.arrays.y_test,
      client_test_indices=client_indices,
      representative_data=representative,
      quantization=config.tflite_quantization,
  )
  log(f"TFLite export written to {os.path.join(config.output_dir, 'model.tflite')}")
  return report
