"""The algorithm registry: every algorithm as a choice of TFF building blocks.

One `Algorithm` entry per `--algorithm`: the builder of its TFF
`LearningProcess`, whether it trains a sparse network, its defaults for
server momentum and the FedProx term, its phases and its own setting checks.
Nothing outside this module branches on an algorithm's name.

- fedavg / fedavgm: `tff.learning.algorithms.build_weighted_fed_avg` with the
  clients' momentum-SGD-with-weight-decay optimizer (fedavgm: server
  momentum 0.9 by default).
- fedprox: `feddst.build_fedprox`, TFF's FedAvg blocks around our own
  client work (mu 0.01 by default; TFF 0.87's `build_weighted_fed_prox`
  has the proximal gradient's sign reversed). The dense algorithms
  aggregate through `aggregation.ValidatingMeanFactory` (TFF's weighted
  mean after the server's check of every update).
- with `--client_execution=cohort` (the default) fedavg / fedavgm
  are `cohort_work.build_dense_cohort_process`: the same blocks, a cohort
  of clients trained as one computation per TFF client.
- feddst: `feddst.build_feddst` (sparse client work with readjustment, sparse
  voting aggregation, server re-prune); randommask: the same with
  readjustment ratio 0; snip / grasp: RandomMask whose fixed mask is chosen
  at initialisation from one mini-batch (`pruning_init`).
- structured / structured_feddst: two phases, the structured search
  (`structured.build_structured_search`) and then fedavg / feddst on the
  smaller network it found.
The algorithms are defined in docs/algorithms.md.
"""

import dataclasses
import functools
import types
from typing import Callable, Mapping

import tensorflow as tf
import tensorflow_federated as tff

from tff_feddst import aggregation
from tff_feddst import costs
from tff_feddst import feddst
from tff_feddst import masks
from tff_feddst import optimizers
from tff_feddst import pruning_init
from tff_feddst import sparse_model


@dataclasses.dataclass(frozen=True)
class AlgorithmConfig:
  """Hyperparameters of one algorithm (a subset of the run's settings)."""

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
  # alpha_r: "cosine" decay or "constant" alpha, up to R_end.
  readjustment_schedule: str = "cosine"
  # Gradual sparsification: S moves linearly to this by R_end (None: S).
  final_sparsity: float | None = None
  # A position no client voted for keeps its previous global value.
  remember_old: bool = False
  min_votes: int = 1
  upload_dtype: str = "float32"
  seed: int = 0
  structured_boundary: float = 0.95
  structured_relative_to: str = "original_mean"
  # The search's selection rule ("boundary" or paper 2's "std_band", with
  # its k), whether it removes dense neurons, and when it stops removing.
  structured_rule: str = "boundary"
  structured_std_k: float = 2.2
  structured_prune_dense: bool = True
  structured_patience: int = 3
  structured_max_prune_rounds: int = 50
  # "cohort": each TFF client trains a cohort of clients as one computation.
  client_execution: str = "per_client"


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

  @property
  def sparse(self) -> bool:
    return self.layout is not None

  def kept_in_round(self, round_num: int) -> int:
    """B_kept of the process's round `round_num`: the values of its download."""
    if self.budget_table is None:
      return self.layout.num_kept
    return int(sum(self.budget_table[min(max(round_num, 1), len(self.budget_table)) - 1]))


Builder = Callable[[AlgorithmConfig, Callable[[], tf.keras.Model], object], BuiltAlgorithm]


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """One registry entry.

  `sparse`: trains under masks at `--sparsity` (dense algorithms run at
  sparsity 0). `float16_upload`: accepts `--upload_dtype=float16`.
  `defaults`: its values for settings left unset (`server_momentum`,
  `prox_mu`). `retrain_with`: a two-phase algorithm (structured search,
  then this algorithm on the network found).
  """

  name: str
  summary: str
  build: Builder
  sparse: bool = False
  float16_upload: bool = False
  defaults: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: types.MappingProxyType({})
  )
  retrain_with: str | None = None
  # Has a cohort client work (`--client_execution=cohort`).
  cohort: bool = False
  # Makes the driver's `phases.Phase` for this process (None: the plain one).
  make_phase: Callable | None = None

  @property
  def phases(self) -> tuple["Algorithm", ...]:
    """The processes a run trains one after the other."""
    if self.retrain_with is None:
      return (self,)
    return (STRUCTURED_SEARCH, REGISTRY[self.retrain_with])

  @property
  def two_phase(self) -> bool:
    return self.retrain_with is not None


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
    )

  return build


def gradual_budgets(config: AlgorithmConfig, layout) -> tuple | None:
  """The budget table of gradual sparsification, or None without it."""
  final = config.final_sparsity
  if final is None or final == config.sparsity or config.readjustment_end_round <= 0:
    return None
  table = masks.budget_table(
      layout.kernel_shapes, config.sparsity, final, config.readjustment_end_round,
      config.sparsity_distribution,
  )
  return tuple(tuple(row) for row in table)


def _build_sparse(readjusts: bool) -> Builder:
  """FedDST (`readjusts`) or RandomMask (readjustment ratio 0)."""

  def build(config, keras_fn, input_spec) -> BuiltAlgorithm:
    layout = sparse_model.build_layout(
        sparse_model.wrap_prunable(keras_fn()),
        config.sparsity,
        config.sparsity_distribution,
    )
    initial = sparse_model.initial_model_weights(keras_fn, config.seed, layout)
    server_optimizer = None
    if config.server_lr != 1.0 or config.server_momentum:
      server_optimizer = _server_optimizer(config)
    cohort = cohort_settings(config, keras_fn, input_spec)
    table = gradual_budgets(config, layout)
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
    )
    size = costs.ModelSize(layout.num_prunable, layout.num_unmasked)
    value_bits = 16 if config.upload_dtype == "float16" else 32
    return BuiltAlgorithm(
        process, initial, layout, size, epochs_in_process=True,
        upload_value_bits=value_bits, cohort=cohort, budget_table=table,
    )

  return build


def _build_structured_search(config, keras_fn, input_spec) -> BuiltAlgorithm:
  from tff_feddst import structured  # pylint: disable=g-import-not-at-top

  return structured.build_search_algorithm(config, keras_fn, input_spec)


def _search_phase(*args, **kwargs):
  from tff_feddst import structured  # pylint: disable=g-import-not-at-top

  return structured.SearchPhase(*args, **kwargs)


STRUCTURED_SEARCH = Algorithm(
    "structured_search",
    "phase 1 of structured*: FedAvg with server-side removal of weak units",
    _build_structured_search,
    cohort=True,
    make_phase=_search_phase,
)

_ENTRIES = (
    Algorithm(
        "fedavg", "FedAvg",
        _build_dense(tff.learning.algorithms.build_weighted_fed_avg), cohort=True,
    ),
    Algorithm(
        "fedavgm", "FedAvg with server momentum (0.9 unless --server_momentum)",
        _build_dense(tff.learning.algorithms.build_weighted_fed_avg), cohort=True,
        defaults=types.MappingProxyType({"server_momentum": 0.9}),
    ),
    Algorithm(
        "fedprox", "FedProx (mu 0.01 unless --prox_mu)",
        # No cohort engine yet: its cohort rounds differ from the per-client
        # FedProx by up to 1e-4 in the weights (issue: cohorts for every algorithm).
        _build_dense(None, proximal_strength="prox_mu"),
        defaults=types.MappingProxyType({"prox_mu": 0.01}),
    ),
    Algorithm(
        "feddst", "FedDST: sparse training with mask readjustment",
        _build_sparse(readjusts=True), sparse=True, float16_upload=True, cohort=True,
    ),
    Algorithm(
        "randommask", "FedDST with readjustment ratio 0 (a fixed random mask)",
        _build_sparse(readjusts=False), sparse=True, float16_upload=True, cohort=True,
    ),
    Algorithm(
        "snip", "SNIP: RandomMask with the mask of largest |g * w| on one mini-batch",
        _build_sparse(readjusts=False), sparse=True, float16_upload=True, cohort=True,
        make_phase=functools.partial(pruning_init.PrunedAtInitPhase, criterion=pruning_init.SNIP),
    ),
    Algorithm(
        "grasp", "GraSP: RandomMask with the mask kept by the gradient-flow score -w * (H g)",
        _build_sparse(readjusts=False), sparse=True, float16_upload=True, cohort=True,
        make_phase=functools.partial(pruning_init.PrunedAtInitPhase, criterion=pruning_init.GRASP),
    ),
    Algorithm(
        "structured",
        "structured search, then FedAvg on the smaller network",
        _build_structured_search, retrain_with="fedavg",
    ),
    Algorithm(
        "structured_feddst",
        "structured search, then FedDST on the smaller network",
        _build_structured_search, sparse=True, float16_upload=True,
        retrain_with="feddst",
    ),
)

REGISTRY: Mapping[str, Algorithm] = types.MappingProxyType(
    {entry.name: entry for entry in _ENTRIES}
)
ALGORITHMS = tuple(REGISTRY)


def get(name: str) -> Algorithm:
  """The registry entry `name` (ValueError naming the choices otherwise)."""
  if name not in REGISTRY:
    raise ValueError(
        f"unknown algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}"
    )
  return REGISTRY[name]


def get_phase(name: str) -> Algorithm:
  """A registry entry, or the structured search (a phase of two-phase entries)."""
  return STRUCTURED_SEARCH if name == STRUCTURED_SEARCH.name else get(name)
