"""Every algorithm as a choice of TFF building blocks.

- fedavg / fedavgm: `tff.learning.algorithms.build_weighted_fed_avg` with the
  clients' momentum-SGD-with-weight-decay optimizer (and server momentum).
- fedprox: `tff.learning.algorithms.build_weighted_fed_prox`.
  The dense algorithms aggregate through `aggregation.ValidatingMeanFactory`
  (TFF's weighted mean after the server's check of every update).
- feddst: `feddst.build_feddst` (sparse client work with readjustment, sparse
  voting aggregation, server re-prune).
- randommask: the same process with readjustment ratio 0.
"""

import dataclasses
from typing import Callable

import tensorflow as tf
import tensorflow_federated as tff

from tff_feddst import aggregation
from tff_feddst import costs
from tff_feddst import feddst
from tff_feddst import optimizers
from tff_feddst import sparse_model

ALGORITHMS = (
    "fedavg", "fedavgm", "fedprox", "feddst", "randommask", "structured", "structured_feddst",
)
SPARSE_ALGORITHMS = ("feddst", "randommask")
# Two phases: a structured search (paper 2), then FedAvg or FedDST on the
# smaller network it found (the driver switches phases).
STRUCTURED_ALGORITHMS = {"structured": "fedavg", "structured_feddst": "feddst"}


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
  """Hyperparameters of one algorithm (a subset of the run's flags)."""

  algorithm: str = "feddst"
  local_epochs: int = 10
  client_lr: float = 0.01
  client_momentum: float = 0.9
  weight_decay: float = 0.001
  server_lr: float = 1.0
  server_momentum: float = 0.0
  prox_mu: float = 0.0
  sparsity: float = 0.8
  sparsity_distribution: str = "erk"
  readjustment_ratio: float = 0.05
  rounds_between_readjustments: int = 10
  readjustment_end_round: int = 0
  min_votes: int = 1
  upload_dtype: str = "float32"
  seed: int = 0
  structured_boundary: float = 0.95
  structured_relative_to: str = "original_mean"


@dataclasses.dataclass
class BuiltAlgorithm:
  """A learning process with what the driver needs to run and account it."""

  process: tff.learning.templates.LearningProcess
  initial_weights: tff.learning.models.ModelWeights
  layout: sparse_model.SparseLayout | None
  model_size: costs.ModelSize
  # True when the process iterates E epochs itself (one-epoch datasets).
  epochs_in_process: bool
  # The structured search's layout (phase 1 of `structured*` algorithms).
  structured: object | None = None

  @property
  def sparse(self) -> bool:
    return self.layout is not None


def _server_optimizer(config: AlgorithmConfig):
  return tff.learning.optimizers.build_sgdm(
      learning_rate=config.server_lr, momentum=config.server_momentum or None
  )


def build_client_optimizer(config: AlgorithmConfig):
  """The clients' optimizer, the same for every algorithm."""
  return optimizers.build_sgdw(
      config.client_lr, config.client_momentum, config.weight_decay
  )


def build_algorithm(
    config: AlgorithmConfig,
    keras_fn: Callable[[], tf.keras.Model],
    input_spec,
) -> BuiltAlgorithm:
  """Builds the TFF learning process named by `config.algorithm`."""
  if config.algorithm not in ALGORITHMS:
    raise ValueError(
        f"unknown algorithm {config.algorithm!r}; choose one of {', '.join(ALGORITHMS)}"
    )
  client_optimizer = build_client_optimizer(config)
  if config.algorithm in SPARSE_ALGORITHMS:
    return _build_sparse(config, keras_fn, input_spec, client_optimizer)
  if config.algorithm in STRUCTURED_ALGORITHMS:
    return _build_structured_search(config, keras_fn, input_spec, client_optimizer)

  model_fn = sparse_model.make_model_fn(keras_fn, input_spec, wrapped=False)
  if config.algorithm == "fedprox":
    process = tff.learning.algorithms.build_weighted_fed_prox(
        model_fn,
        proximal_strength=config.prox_mu,
        client_optimizer_fn=client_optimizer,
        server_optimizer_fn=_server_optimizer(config),
        model_aggregator=aggregation.ValidatingMeanFactory(),
    )
  else:
    process = tff.learning.algorithms.build_weighted_fed_avg(
        model_fn,
        client_optimizer_fn=client_optimizer,
        server_optimizer_fn=_server_optimizer(config),
        model_aggregator=aggregation.ValidatingMeanFactory(),
    )
  initial = sparse_model.initial_model_weights(keras_fn, config.seed, None)
  model = keras_fn()
  num_kernel = sum(
      int(layer.kernel.shape.num_elements())
      for layer in model.layers
      if hasattr(layer, "kernel")
  )
  size = costs.ModelSize(num_kernel, model.count_params() - num_kernel)
  return BuiltAlgorithm(process, initial, None, size, epochs_in_process=False)


def _build_sparse(config, keras_fn, input_spec, client_optimizer) -> BuiltAlgorithm:
  model_fn = sparse_model.make_model_fn(keras_fn, input_spec, wrapped=True)
  layout = sparse_model.build_layout(
      sparse_model.wrap_prunable(keras_fn()),
      config.sparsity,
      config.sparsity_distribution,
  )
  initial = sparse_model.initial_model_weights(keras_fn, config.seed, layout)
  alpha = 0.0 if config.algorithm == "randommask" else config.readjustment_ratio
  server_optimizer = None
  if config.server_lr != 1.0 or config.server_momentum:
    server_optimizer = _server_optimizer(config)
  process = feddst.build_feddst(
      model_fn,
      layout,
      initial,
      client_optimizer,
      local_epochs=config.local_epochs,
      readjustment_ratio=alpha,
      rounds_between_readjustments=config.rounds_between_readjustments,
      readjustment_end_round=config.readjustment_end_round,
      min_votes=config.min_votes,
      prox_mu=config.prox_mu,
      server_optimizer=server_optimizer,
      upload_dtype=tf.as_dtype(config.upload_dtype),
  )
  size = costs.ModelSize(layout.num_prunable, layout.num_unmasked)
  return BuiltAlgorithm(process, initial, layout, size, epochs_in_process=True)


def _build_structured_search(config, keras_fn, input_spec, client_optimizer) -> BuiltAlgorithm:
  from tff_feddst import structured  # pylint: disable=g-import-not-at-top

  layout = structured.build_structured_layout(sparse_model.wrap_prunable(keras_fn()))
  initial = structured.initial_search_weights(keras_fn, config.seed, layout)
  process = structured.build_structured_search(
      sparse_model.make_model_fn(keras_fn, input_spec, wrapped=True),
      layout,
      initial,
      client_optimizer,
      local_epochs=config.local_epochs,
      boundary=config.structured_boundary,
      relative_to=config.structured_relative_to,
      prox_mu=config.prox_mu,
  )
  model = keras_fn()
  size = costs.ModelSize(model.count_params(), 0)
  return BuiltAlgorithm(
      process, initial, None, size, epochs_in_process=True, structured=layout
  )
