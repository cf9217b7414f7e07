"""The simulation driver: rounds, client sampling, costs, evaluation, outputs.

`run_experiment(config)` is what `run.py` (and the benchmarks) call. It writes
into `config.output_dir`:
- config.json   every setting of the run;
- metrics.csv   one row per round (evaluation columns filled every
                `eval_every` rounds and on the last one);
- summary.json  final figures and total wall time (written last, atomically);
- final_model.keras  the final global model (plain Keras, no wrappers).
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
    "rejected_clients",
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

  def resolved_end_round(self) -> int:
    if self.readjustment_end_round is None:
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


def _global_stats(built, weights, dense_flops):
  """Mask sparsity (sparse) or kernel zero fraction (dense), and FLOPs."""
  if built.layout is not None:
    kernels, masks = sparse_model.kernels_and_masks(weights, built.layout)
    names = built.layout.layer_names
    sparsity = masks_lib.sparsity_of(masks)
    flops = costs.forward_flops(dense_flops, costs.densities_from_masks(names, masks))
    return sparsity, flops, masks
  return 0.0, costs.forward_flops(dense_flops), None


def run_experiment(
    config: ExperimentConfig,
    log: Callable[[str], None] | None = None,
) -> dict:
  """Trains `config.rounds` rounds and writes the outputs; returns the summary."""
  log = log or (lambda line: print(line, flush=True))
  started = time.time()
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
  settings = dataclasses.asdict(config) | {"model": model_name}
  _write_atomic(
      os.path.join(config.output_dir, "config.json"),
      json.dumps(settings, indent=2, sort_keys=True) + "\n",
  )

  build_start = time.time()
  built = algorithms.build_algorithm(config.algorithm_config(), keras_fn, input_spec)
  state = built.process.initialize()
  state = built.process.set_model_weights(state, built.initial_weights)
  log(
      f"{config.algorithm} on {config.dataset} ({config.partition}, "
      f"{len(population)} clients, {config.clients_per_round} per round), "
      f"model {model_name}: built in {time.time() - build_start:.1f} s"
  )

  ledger = costs.CommunicationLedger(
      built.model_size,
      sparse=built.sparse,
      upload_value_bits=16 if config.upload_dtype == "float16" else 32,
  )
  dense_flops = costs.layer_forward_flops(keras_fn())
  evaluator = Evaluator(keras_fn, fed_data)
  sampler = np.random.default_rng(_seed(config.seed, 2))
  dataset_epochs = 1 if built.epochs_in_process else config.local_epochs

  weights = built.process.get_model_weights(state)
  _, _, previous_masks = _global_stats(built, weights, dense_flops)
  metrics_path = os.path.join(config.output_dir, "metrics.csv")
  evaluation = {}
  with open(metrics_path, "w", newline="") as metrics_file:
    writer = csv.DictWriter(metrics_file, fieldnames=METRIC_COLUMNS)
    writer.writeheader()
    for round_num in range(1, config.rounds + 1):
      round_start = time.time()
      sampled = sampler.choice(len(population), config.clients_per_round, replace=False)
      client_ids = [population[i] for i in sorted(sampled)]
      datasets = [
          client_dataset(
              fed_data,
              cid,
              config.batch_size,
              _seed(config.seed, 3, round_num, i),
              dataset_epochs,
          )
          for i, cid in enumerate(client_ids)
      ]
      active = built.layout.num_kept if built.sparse else None
      download_bits = ledger.download(client_ids, active)
      output = built.process.next(state, datasets)
      state = output.state
      metrics = output.metrics
      train = metrics["client_work"]["train"]
      if built.sparse:
        stats = metrics["client_work"]["clients"]
        upload_bits = ledger.upload(
            len(client_ids), int(stats["uploaded_values"]), int(stats["mask_changed"])
        )
        masks_uploaded = int(stats["mask_changed"])
        rejected = int(stats["rejected"])
        readjusted = int(np.sum(metrics["client_work"]["readjustment"]["num_readjusted"]) > 0)
      else:
        upload_bits = ledger.upload(len(client_ids))
        masks_uploaded, rejected, readjusted = 0, 0, 0

      weights = built.process.get_model_weights(state)
      sparsity, flops, current_masks = _global_stats(built, weights, dense_flops)
      if built.sparse and any(
          not np.array_equal(a, b) for a, b in zip(previous_masks, current_masks)
      ):
        ledger.global_mask_changed()
      previous_masks = current_masks

      evaluate_now = round_num % config.eval_every == 0 or round_num == config.rounds
      evaluation = evaluator.evaluate(weights.trainable) if evaluate_now else {}
      row = {
          "round": round_num,
          "clients_accuracy": evaluation.get("clients_accuracy", ""),
          "test_accuracy": evaluation.get("test_accuracy", ""),
          "train_loss": float(train["loss"]),
          "train_accuracy": float(train["accuracy"]),
          "sparsity": sparsity,
          "forward_flops": flops,
          "round_upload_bits": upload_bits,
          "round_download_bits": download_bits,
          "cumulative_upload_bits": ledger.cumulative_upload_bits,
          "cumulative_download_bits": ledger.cumulative_download_bits,
          "clients_mask_uploaded": masks_uploaded,
          "readjusted": readjusted,
          "rejected_clients": rejected,
          "round_seconds": round(time.time() - round_start, 4),
      }
      writer.writerow(row)
      metrics_file.flush()
      line = (
          f"round {round_num:>4}/{config.rounds}  loss {row['train_loss']:.4f}  "
          f"sparsity {sparsity:.3f}  up {_format_bits(upload_bits)} "
          f"(total {_format_bits(ledger.cumulative_upload_bits)})  "
          f"{row['round_seconds']:.2f} s"
      )
      if evaluation:
        line += (
            f"  clients_acc {evaluation['clients_accuracy']:.4f}"
            f"  test_acc {evaluation['test_accuracy']:.4f}"
        )
      log(line)

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
  if config.export_tflite:
    summary["tflite"] = _export_tflite(final_model, fed_data, config, log)
  _write_atomic(
      os.path.join(config.output_dir, "summary.json"),
      json.dumps(summary, indent=2) + "\n",
  )
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
