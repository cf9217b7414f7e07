"""The builders of the registry's learning processes (`algorithms.REGISTRY`).

Each `Algorithm` entry names its builder here: a function of
(`algorithms.AlgorithmConfig`, a Keras model function, the input spec) that
returns a `BuiltAlgorithm`, the TFF `LearningProcess` with what the driver
needs to run and account it. This module imports TensorFlow and TFF; the
registry does not, so that a command line checks its flags first.
"""

import dataclasses
import functools
from typing import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_feddst import aggregation
from tff_feddst import costs
from tff_feddst import feddst
from tff_feddst import masks
from tff_feddst import names
from tff_feddst import optimizers
from tff_feddst import pruning_init
from tff_feddst import sparse_model
from tff_feddst import wire
from tff_feddst.algorithms import AlgorithmConfig


@dataclasses.dataclass
class BuiltAlgorithm:
  """A learning process with what the driver needs to run and account it."""

  process: tff.learning.templates.LearningProcess
  initial_weights: tff.learning.models.ModelWeights
  layout: sparse_model.SparseLayout | None
  model_size: costs.ModelSize
  # True when the process iterates E epochs itself (one-epoch datasets).
  epochs_in_process: bool
  # Bits per uploaded value (16 where the client work uploads float16).
  upload_value_bits: int = 32
  # The structured search's layout (`structured.StructuredLayout`).
  structured: object | None = None
  # Set when the process trains cohorts (`cohort_work.CohortSettings`).
  cohort: object | None = None
  # Gradual sparsification: the layers' budgets of every round
  # (`masks.budget_table`); None: `layout.budgets` throughout.
  budget_table: tuple | None = None
  # Client sparsity tiers: (`tiers.Tiers`, per tier the layers' budgets);
  # None: every client at the layout's budgets.
  tiers: tuple | None = None
  # The server sends compact messages, the mask only to clients that need
  # it (`compact_download`); the clients' values are
  # `compact_download.client_data`, a cohort's `compact_download.cohort_data`.
  compact_download: bool = False
  # (download, upload) bits per client of the model messages, read from the
  # TFF types of `process.next` (`wire.model_message_bits`): set for the
  # dense algorithms' per-client processes, whose round bits are these.
  wire_bits: tuple[int, int] | None = None

  @property
  def sparse(self) -> bool:
    return self.layout is not None

  def kept_in_round(self, round_num: int) -> int:
    """B_kept of the process's round `round_num`: the values of its download."""
    if self.budget_table is None:
      return self.layout.num_kept
    return int(sum(self.budget_table[min(max(round_num, 1), len(self.budget_table)) - 1]))


Builder = Callable[[AlgorithmConfig, Callable[[], tf.keras.Model], object], BuiltAlgorithm]


def _server_optimizer(config: AlgorithmConfig):
  return tff.learning.optimizers.build_sgdm(
      learning_rate=config.server_lr, momentum=config.server_momentum or None
  )


def build_client_optimizer(config: AlgorithmConfig):
  """The clients' optimizer, the same for every algorithm."""
  return optimizers.build_sgdw(
      config.client_lr, config.client_momentum, config.weight_decay
  )


def cohort_settings(config: AlgorithmConfig, keras_fn, input_spec):
  """The cohort engine's settings, or None for per-client execution."""
  if config.client_execution != "cohort":
    return None
  from tff_feddst import cohort_work  # pylint: disable=g-import-not-at-top

  return cohort_work.CohortSettings(
      keras_fn, config.client_lr, config.client_momentum, config.weight_decay,
      tuple(input_spec["x"].shape[1:]),
  )


def dense_model_size(model: tf.keras.Model) -> costs.ModelSize:
  """n = kernel weights, b = the other parameters (biases) of a Keras model."""
  num_kernel = sum(
      int(layer.kernel.shape.num_elements())
      for layer in model.layers
      if hasattr(layer, "kernel")
  )
  return costs.ModelSize(num_kernel, model.count_params() - num_kernel)


def _dense_wire_bits(process, cohorts: bool) -> tuple[int, int]:
  """(download, upload) bits per client of a dense process's model
  messages, read from the TFF types of its round (`wire`). A cohort is one
  TFF client for several: it receives the broadcast model once for all of
  them, and sends their summed model deltas (with their total weight and
  rejected count), each of the type of one client's delta, the model's
  trainable weights; a client's upload is that delta."""
  download, upload = wire.model_message_bits(process.next)
  if cohorts:
    upload = wire.type_bits(process.get_model_weights.type_signature.result.trainable)
  return download, upload


def _build_dense(tff_builder, **extra):
  """A builder over a `tff.learning.algorithms` factory (None with
  `proximal_strength`: FedProx, `feddst.build_fedprox`)."""

  def build(config, keras_fn, input_spec) -> BuiltAlgorithm:
    kwargs = {k: getattr(config, v) for k, v in extra.items()}
    model_fn = sparse_model.make_model_fn(keras_fn, input_spec, wrapped=False)
    initial = sparse_model.initial_model_weights(keras_fn, config.seed, None)
    cohort = cohort_settings(config, keras_fn, input_spec)
    if cohort is not None:
      from tff_feddst import cohort_work  # pylint: disable=g-import-not-at-top

      process = cohort_work.build_dense_cohort_process(
          model_fn, initial, cohort, _server_optimizer(config),
          prox_mu=kwargs.get("proximal_strength", 0.0),
      )
    elif "proximal_strength" in kwargs:
      # Our own client work: TFF 0.87's FedProx term has the wrong sign.
      process = feddst.build_fedprox(
          model_fn, initial, build_client_optimizer(config), _server_optimizer(config),
          kwargs["proximal_strength"],
      )
    else:
      process = tff_builder(
          model_fn,
          client_optimizer_fn=build_client_optimizer(config),
          server_optimizer_fn=_server_optimizer(config),
          model_aggregator=aggregation.ValidatingMeanFactory(),
          **kwargs,
      )
    return BuiltAlgorithm(
        process, initial, None, dense_model_size(keras_fn()),
        epochs_in_process=cohort is not None, cohort=cohort,
        wire_bits=_dense_wire_bits(process, cohort is not None),
    )

  return build


def gradual_budgets(config: AlgorithmConfig, layout) -> tuple | None:
  """The budget table of gradual sparsification, or None without it."""
  final = config.final_sparsity
  if final is None or final == config.sparsity or config.readjustment_end_round <= 0:
    return None
  table = masks.budget_table(
      layout.kernel_shapes, config.sparsity, final, config.readjustment_end_round,
      config.sparsity_distribution, layout.all_rows,
  )
  return tuple(tuple(row) for row in table)


def _build_sparse(readjusts: bool) -> Builder:
  """FedDST (`readjusts`) or RandomMask (readjustment ratio 0)."""

  def build(config, keras_fn, input_spec) -> BuiltAlgorithm:
    layout = sparse_model.build_layout(
        sparse_model.wrap_prunable(keras_fn()),
        config.sparsity,
        config.sparsity_distribution,
        names.MASK_BLOCK_ROWS[config.mask_block],
        conv_kernels=config.conv_block == "kernel",
    )
    initial = sparse_model.initial_model_weights(
        keras_fn, config.seed, layout, rescaled=config.sparse_init == "rescaled"
    )
    server_optimizer = None
    if config.server_lr != 1.0 or config.server_momentum:
      server_optimizer = _server_optimizer(config)
    cohort = cohort_settings(config, keras_fn, input_spec)
    table = gradual_budgets(config, layout)
    # Clients send compact messages (in cohorts, decoded before the
    # cohort's sum) and receive compact downloads; with a budget table,
    # values of each round's length.
    compact = True
    tier_setup = None
    if config.client_sparsity_tiers:
      from tff_feddst import tiers  # pylint: disable=g-import-not-at-top

      parsed = tiers.parse(config.client_sparsity_tiers)
      tier_setup = (parsed, tiers.budgets(
          layout.kernel_shapes, parsed, config.sparsity_distribution, layout.all_rows
      ))
    process = feddst.build_feddst(
        sparse_model.make_model_fn(keras_fn, input_spec, wrapped=True),
        layout,
        initial,
        build_client_optimizer(config),
        local_epochs=config.local_epochs,
        readjustment_ratio=config.readjustment_ratio if readjusts else 0.0,
        rounds_between_readjustments=config.rounds_between_readjustments,
        readjustment_end_round=config.readjustment_end_round,
        min_votes=config.min_votes,
        prox_mu=config.prox_mu,
        server_optimizer=server_optimizer,
        upload_dtype=tf.as_dtype(config.upload_dtype),
        cohort=cohort,
        readjustment_schedule=config.readjustment_schedule,
        budget_table=table,
        remember_old=config.remember_old,
        compact_messages=compact,
        num_tiers=0 if tier_setup is None else len(tier_setup[0].sparsities),
        compact_download=compact,
    )
    size = costs.ModelSize(layout.num_prunable, layout.num_unmasked, layout.num_mask_bits)
    value_bits = 16 if config.upload_dtype == "float16" else 32
    return BuiltAlgorithm(
        process, initial, layout, size, epochs_in_process=True,
        upload_value_bits=value_bits, cohort=cohort, budget_table=table,
        tiers=tier_setup, compact_download=compact,
    )

  return build


build_fedavg = _build_dense(tff.learning.algorithms.build_weighted_fed_avg)
build_fedprox = _build_dense(None, proximal_strength="prox_mu")
build_feddst = _build_sparse(readjusts=True)
build_randommask = _build_sparse(readjusts=False)


def build_prunefl(config, keras_fn, input_spec, per_weight=None) -> BuiltAlgorithm:
  """PruneFL (docs/algorithms.md section 4.2) at the layers' costs per kept
  weight `per_weight` (None: measured now, on a random batch). Its initial
  weights are RandomMask's until the phase puts the initial pruning's."""
  from tff_feddst import prunefl  # pylint: disable=g-import-not-at-top

  layout = sparse_model.build_layout(
      sparse_model.wrap_prunable(keras_fn()), config.sparsity, config.sparsity_distribution
  )
  if per_weight is None:
    shape = tuple(input_spec["x"].shape[1:])
    x = np.random.default_rng(config.seed).random((32, *shape), np.float32)
    per_weight = prunefl.measure_layer_costs(keras_fn, x).per_weight
  initial = sparse_model.initial_model_weights(keras_fn, config.seed, layout)
  process = prunefl.build_process(
      sparse_model.make_model_fn(keras_fn, input_spec, wrapped=True),
      layout, initial, build_client_optimizer(config),
      per_weight=tuple(per_weight),
      local_epochs=config.local_epochs,
      rounds_between=config.rounds_between_readjustments,
      end_round=config.readjustment_end_round,
      min_votes=config.min_votes,
  )
  size = costs.ModelSize(layout.num_prunable, layout.num_unmasked, layout.num_mask_bits)
  return BuiltAlgorithm(process, initial, layout, size, epochs_in_process=True)


def prunefl_phase(*args, **kwargs):
  from tff_feddst import prunefl  # pylint: disable=g-import-not-at-top

  return prunefl.PruneFLPhase(*args, **kwargs)


def build_lotteryfl(config, keras_fn, input_spec, slots: int) -> BuiltAlgorithm:
  """LotteryFL (docs/algorithms.md section 4.3): the dense seeded initial
  weights (the global model has no mask; the clients' own masks start all
  ones), the layers' budgets at the target sparsity, rounds of at most
  `slots` clients."""
  from tff_feddst import lotteryfl  # pylint: disable=g-import-not-at-top

  layout = sparse_model.build_layout(
      sparse_model.wrap_prunable(keras_fn()), config.sparsity, config.sparsity_distribution
  )
  initial = sparse_model.initial_model_weights(
      keras_fn, config.seed, layout,
      masks_fn=lambda _: [np.ones(s, np.float32) for s in layout.kernel_shapes],
  )
  process = lotteryfl.build_process(
      sparse_model.make_model_fn(keras_fn, input_spec, wrapped=True),
      layout, initial, build_client_optimizer(config),
      local_epochs=config.local_epochs,
      threshold=config.lotteryfl_accuracy_threshold,
      prune_rate=config.lotteryfl_prune_rate,
      slots=slots, min_votes=config.min_votes,
  )
  size = costs.ModelSize(layout.num_prunable, layout.num_unmasked, layout.num_mask_bits)
  return BuiltAlgorithm(process, initial, layout, size, epochs_in_process=True)


def lotteryfl_phase(*args, **kwargs):
  from tff_feddst import lotteryfl  # pylint: disable=g-import-not-at-top

  return lotteryfl.LotteryFLPhase(*args, **kwargs)


def build_structured_search(config, keras_fn, input_spec) -> BuiltAlgorithm:
  from tff_feddst import structured  # pylint: disable=g-import-not-at-top

  return structured.build_search_algorithm(config, keras_fn, input_spec)


def search_phase(*args, **kwargs):
  from tff_feddst import structured  # pylint: disable=g-import-not-at-top

  return structured.SearchPhase(*args, **kwargs)


snip_phase = functools.partial(pruning_init.PrunedAtInitPhase, criterion=pruning_init.SNIP)
grasp_phase = functools.partial(pruning_init.PrunedAtInitPhase, criterion=pruning_init.GRASP)
