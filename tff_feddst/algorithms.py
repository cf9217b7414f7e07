"""The algorithm registry: every algorithm as a choice of TFF building blocks.

One `Algorithm` entry per `--algorithm`: the builder of its TFF
`LearningProcess` (a function of `builders`, named here and imported when
first used, so the registry and the settings' checks need no TensorFlow),
whether it trains a sparse network, its defaults for server momentum and the
FedProx term, its phases and its own setting checks. Nothing outside this
module branches on an algorithm's name.

- fedavg / fedavgm: `tff.learning.algorithms.build_weighted_fed_avg` with the
  clients' momentum-SGD-with-weight-decay optimizer (fedavgm: server
  momentum 0.9 by default).
- fedprox: `feddst.build_fedprox`, TFF's FedAvg blocks around our own
  client work (mu 0.01 by default; TFF 0.87's `build_weighted_fed_prox`
  has the proximal gradient's sign reversed). The dense algorithms
  aggregate through `aggregation.ValidatingMeanFactory` (TFF's weighted
  mean after the server's check of every update).
- with `--client_execution=cohort` (the default) fedavg / fedavgm /
  fedprox are `cohort_work.build_dense_cohort_process`: the same blocks, a
  cohort of clients trained as one computation per TFF client.
- feddst: `feddst.build_feddst` (sparse client work with readjustment, sparse
  voting aggregation, server re-prune); randommask: the same with
  readjustment ratio 0; snip / grasp: RandomMask whose fixed mask is chosen
  at initialisation from one mini-batch (`pruning_init`); prunefl:
  `prunefl.build_process` (masked training, dense gradients uploaded every
  Delta_R rounds, the server re-selecting the mask by g^2 / t), starting
  from one client's initial pruning (`prunefl.PruneFLPhase`); lotteryfl:
  `lotteryfl.build_process` (every client trains under a mask of its own,
  which the driver stores by client id, `lotteryfl.LotteryFLPhase`).
- structured / structured_feddst: two phases, the structured search
  (`structured.build_structured_search`) and then fedavg / feddst on the
  smaller network it found.
The algorithms are defined in docs/algorithms.md.
"""

import dataclasses
import importlib
import types
from typing import Callable, Mapping


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
  # names.SPARSE_INITS: "rescaled" divides each masked kernel's initial
  # weights by sqrt(its density).
  sparse_init: str = "keras"
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
  # Masks of dense kernels in blocks (names.MASK_BLOCKS; "none": element-wise).
  mask_block: str = "none"
  # Masks of convolution kernels in whole filters (names.CONV_BLOCKS).
  conv_block: str = "none"
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
  # The search leaves every layer at least this share of its units (0: off).
  structured_min_width: float = 0.0
  # The search first removes units that can never fire (off: paper 2).
  structured_remove_dead: bool = False
  # "cohort": each TFF client trains a cohort of clients as one computation.
  client_execution: str = "per_client"
  # PruneFL: local rounds of the initial pruning on one client.
  prunefl_initial_rounds: int = 5
  # LotteryFL: a client prunes when the global model under its mask reaches
  # this accuracy on its validation data, by this share of its kept weights.
  lotteryfl_accuracy_threshold: float = 0.5
  lotteryfl_prune_rate: float = 0.2
  # Client sparsity tiers "S1:p1,S2:p2,..." (`tiers.py`; empty: none).
  client_sparsity_tiers: str = ""


def _from_builders(name: str) -> Callable:
  """Function `name` of `builders` (imported on first use: it imports TensorFlow)."""
  return getattr(importlib.import_module("tff_feddst.builders"), name)


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
  # The name of its builder in `builders`.
  builder: str
  sparse: bool = False
  float16_upload: bool = False
  defaults: Mapping[str, float] = dataclasses.field(
      default_factory=lambda: types.MappingProxyType({})
  )
  retrain_with: str | None = None
  # Has a cohort client work (`--client_execution=cohort`).
  cohort: bool = False
  # Accepts `--mask_block` and `--conv_block` (its masks are drawn and
  # readjusted in blocks).
  block_masks: bool = False
  # Accepts `--sparse_init=rescaled` (its initial mask is the random one).
  rescaled_init: bool = False
  # The name of the function in `builders` that makes the driver's
  # `phases.Phase` for this process (None: the plain `phases.Phase`).
  phase_maker: str | None = None
  # Settings only this algorithm reads (other algorithms ignore them, also
  # when a run resumes).
  own_settings: tuple[str, ...] = ()

  @property
  def build(self) -> Callable:
    """Its builder: (AlgorithmConfig, Keras model function, input spec) -> BuiltAlgorithm."""
    return _from_builders(self.builder)

  @property
  def make_phase(self) -> Callable | None:
    return None if self.phase_maker is None else _from_builders(self.phase_maker)

  @property
  def phases(self) -> tuple["Algorithm", ...]:
    """The processes a run trains one after the other."""
    if self.retrain_with is None:
      return (self,)
    return (STRUCTURED_SEARCH, REGISTRY[self.retrain_with])

  @property
  def two_phase(self) -> bool:
    return self.retrain_with is not None


STRUCTURED_SEARCH = Algorithm(
    "structured_search",
    "phase 1 of structured*: FedAvg with server-side removal of weak units",
    "build_structured_search",
    cohort=True,
    phase_maker="search_phase",
)

_ENTRIES = (
    Algorithm("fedavg", "FedAvg", "build_fedavg", cohort=True),
    Algorithm(
        "fedavgm", "FedAvg with server momentum (0.9 unless --server_momentum)",
        "build_fedavg", cohort=True,
        defaults=types.MappingProxyType({"server_momentum": 0.9}),
    ),
    Algorithm(
        "fedprox", "FedProx (mu 0.01 unless --prox_mu)",
        "build_fedprox", cohort=True,
        defaults=types.MappingProxyType({"prox_mu": 0.01}),
    ),
    Algorithm(
        "feddst", "FedDST: sparse training with mask readjustment",
        "build_feddst", sparse=True, float16_upload=True, cohort=True,
        block_masks=True, rescaled_init=True,
    ),
    Algorithm(
        "randommask", "FedDST with readjustment ratio 0 (a fixed random mask)",
        "build_randommask", sparse=True, float16_upload=True, cohort=True,
        block_masks=True, rescaled_init=True,
    ),
    Algorithm(
        "snip", "SNIP: RandomMask with the mask of largest |g * w| on one mini-batch",
        "build_randommask", sparse=True, float16_upload=True, cohort=True,
        phase_maker="snip_phase",
    ),
    Algorithm(
        "feddst_snip",
        "FedDST started from SNIP's mask (not the paper's: its FedDST starts from a random one)",
        "build_feddst", sparse=True, float16_upload=True, cohort=True,
        phase_maker="snip_phase",
    ),
    Algorithm(
        "grasp", "GraSP: RandomMask with the mask kept by the gradient-flow score -w * (H g)",
        "build_randommask", sparse=True, float16_upload=True, cohort=True,
        phase_maker="grasp_phase",
    ),
    Algorithm(
        "prunefl",
        "PruneFL: one client prunes first; the server re-selects the mask by g^2/t every Delta_R rounds",
        "build_prunefl", sparse=True, phase_maker="prunefl_phase",
        own_settings=("prunefl_initial_rounds", "prunefl_costs"),
    ),
    Algorithm(
        "lotteryfl",
        "LotteryFL: every client keeps its own mask and prunes it when the global model "
        "does well on its data",
        "build_lotteryfl", sparse=True, phase_maker="lotteryfl_phase",
        own_settings=("lotteryfl_accuracy_threshold", "lotteryfl_prune_rate"),
    ),
    Algorithm(
        "structured",
        "structured search, then FedAvg on the smaller network",
        "build_structured_search", retrain_with="fedavg",
    ),
    Algorithm(
        "structured_feddst",
        "structured search, then FedDST on the smaller network",
        "build_structured_search", sparse=True, float16_upload=True,
        block_masks=True, retrain_with="feddst",
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
