"""The settings of a run: one dataclass that validates and resolves itself.

`ExperimentConfig` holds every flag of `run.py`; `resolve()` is the one
place where settings are checked and where defaults that depend on the
algorithm (server momentum, FedProx mu, sparsity of dense algorithms, the
readjustment end round) are filled in from the registry
(`algorithms.REGISTRY`). `run.py`, the benchmarks and the resume check all
go through it, and `config.json` stores the resolved settings.
"""

import dataclasses
import typing

from keras_models import names as model_names
from tff_feddst import algorithms
from tff_feddst import names
import tflite_export


class ConfigError(ValueError):
  """A setting that is out of range or does not fit the data (one line)."""


CLIENT_EXECUTION = ("cohort", "per_client")

# The algorithms whose clients may train at different sparsity tiers.
TIER_ALGORITHMS = ("feddst", "randommask")

# The values a string setting may take.
CHOICES = {
    "algorithm": algorithms.ALGORITHMS,
    "dataset": names.DATASETS,
    "model": model_names.MODEL_NAMES,
    "partition": names.PARTITIONS,
    "sparsity_distribution": names.DISTRIBUTIONS,
    "sparse_init": names.SPARSE_INITS,
    "mask_block": names.MASK_BLOCKS,
    "conv_block": names.CONV_BLOCKS,
    "upload_dtype": ("float32", "float16"),
    "tflite_quantization": tflite_export.QUANTIZATION_MODES,
    "structured_relative_to": names.RELATIVE_TO,
    "structured_rule": names.RULES,
    "client_execution": CLIENT_EXECUTION,
    "readjustment_schedule": names.SCHEDULES,
}

# (setting, test, what it must be) for every numeric setting.
_RANGES = (
    ("classes_per_client", lambda v: v >= 1, ">= 1"),
    ("examples_per_class", lambda v: v >= 1, ">= 1"),
    ("dirichlet_beta", lambda v: v > 0, "> 0"),
    ("total_clients", lambda v: v >= 1, ">= 1"),
    ("clients_per_round", lambda v: v >= 1, ">= 1"),
    ("rounds", lambda v: v >= 1, ">= 1"),
    ("local_epochs", lambda v: v >= 1, ">= 1"),
    ("batch_size", lambda v: v >= 1, ">= 1"),
    ("client_lr", lambda v: v > 0, "> 0"),
    ("client_momentum", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("server_lr", lambda v: v > 0, "> 0"),
    ("server_momentum", lambda v: v is None or 0 <= v <= 1, "in [0, 1]"),
    ("prox_mu", lambda v: v is None or v >= 0, ">= 0"),
    ("sparsity", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("readjustment_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("rounds_between_readjustments", lambda v: v >= 1, ">= 1"),
    ("readjustment_end_round", lambda v: v is None or v >= 0, ">= 0"),
    ("final_sparsity", lambda v: v is None or 0 <= v < 1, "in [0, 1)"),
    ("min_votes", lambda v: v >= 1, ">= 1"),
    ("eval_every", lambda v: v >= 1, ">= 1"),
    ("seed", lambda v: v >= 0, ">= 0"),
    ("checkpoint_every", lambda v: v >= 1, ">= 1"),
    ("client_failure_rate", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("structured_search_rounds", lambda v: v >= 1, ">= 1"),
    ("structured_boundary", lambda v: v >= 0, ">= 0"),
    ("structured_std_k", lambda v: 0 <= v < float("inf"), ">= 0 and finite"),
    ("structured_patience", lambda v: v >= 0, ">= 0 (0: no patience stop)"),
    ("structured_max_prune_rounds", lambda v: v >= 1, ">= 1"),
    ("structured_min_width", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("cohort_size", lambda v: v >= 0, f">= 0 (0: the default, cohorts of at most {names.MAX_DEFAULT_COHORT})"),
    ("prunefl_initial_rounds", lambda v: v >= 1, ">= 1"),
    ("lotteryfl_accuracy_threshold", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("lotteryfl_prune_rate", lambda v: 0 < v < 1, "in (0, 1)"),
)

# Settings that some algorithm owns (`algorithms.Algorithm.own_settings`).
OWNED_SETTINGS = frozenset(k for a in algorithms.REGISTRY.values() for k in a.own_settings)

# Settings that may differ when a run is resumed: they do not change what
# is trained (`rounds` may grow as long as R_end stays the same).
RESUMABLE_CHANGES = frozenset({
    "output_dir", "data_dir", "rounds", "eval_every", "checkpoint_every",
    "export_tflite", "tflite_quantization", "client_execution", "cohort_size",
    "workers", "prunefl_costs",
})


@dataclasses.dataclass(frozen=True)
class ExperimentConfig(algorithms.AlgorithmConfig):
  """Every setting of a run (the flags of run.py).

  `server_momentum`, `prox_mu`, `readjustment_end_round` and
  `client_execution` left at None take the algorithm's default in
  `resolve()` (cohort execution where the algorithm has it).
  """

  client_execution: str | None = None
  server_momentum: float | None = None
  prox_mu: float | None = None
  readjustment_end_round: int | None = None
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
  eval_every: int = 10
  output_dir: str = "runs/default"
  export_tflite: bool = False
  tflite_quantization: str = "float32"
  checkpoint_every: int = 10
  client_failure_rate: float = 0.0
  # structured*: rounds of the search (phase 1); the rest retrain.
  structured_search_rounds: int = 20
  # structured*: phase 2 starts from fresh seeded weights.
  structured_reinit: bool = False
  # structured*: the search also removes dense neurons (None: the rule's
  # default, `names.PRUNES_DENSE`).
  structured_prune_dense: bool | None = None
  # Clients per cohort with --client_execution=cohort (0: one cohort a round,
  # one per worker with --workers).
  cohort_size: int = 0
  # host:port,... of TFF workers that run the clients (empty: this machine).
  workers: str = ""
  # PruneFL: a costs file of an earlier run to use (empty: measure them).
  prunefl_costs: str = ""

  @property
  def spec(self) -> algorithms.Algorithm:
    return algorithms.get(self.algorithm)

  @property
  def model_name(self) -> str:
    return self.model or model_names.default_model_for_dataset(self.dataset)

  def phase_rounds(self) -> tuple[int, ...]:
    """The last round of each phase."""
    if self.spec.two_phase:
      return (self.structured_search_rounds, self.rounds)
    return (self.rounds,)

  def resolve(self) -> "ExperimentConfig":
    """These settings checked, with the algorithm's defaults filled in.

    Needs no TensorFlow (a flag error answers at once). Raises ConfigError
    naming the first setting that is out of range.
    """
    self._check()
    spec = self.spec
    values = {"model": self.model_name}
    for key in ("server_momentum", "prox_mu"):
      if getattr(self, key) is None:
        values[key] = spec.defaults.get(key, 0.0)
    if not spec.sparse:
      values["sparsity"] = 0.0
    if self.client_execution is None:
      has_cohorts = any(phase.cohort for phase in spec.phases)
      values["client_execution"] = "cohort" if has_cohorts else "per_client"
    if self.structured_prune_dense is None:
      values["structured_prune_dense"] = names.PRUNES_DENSE[self.structured_rule]
    if self.readjustment_end_round is None:
      retrain_rounds = self.rounds - (self.phase_rounds()[0] if spec.two_phase else 0)
      values["readjustment_end_round"] = retrain_rounds // 2
    if self.client_sparsity_tiers:
      values.update(self._resolve_tiers())
    if self.final_sparsity is None:
      values["final_sparsity"] = values.get("sparsity", self.sparsity)
    resolved = dataclasses.replace(self, **values)
    resolved._check_gradual()
    return resolved

  def _resolve_tiers(self) -> dict:
    """--client_sparsity_tiers: checked; the global model's sparsity (the
    lowest tier's, in place of --sparsity), the tiers written canonically
    and per-client execution."""
    from tff_feddst import tiers  # pylint: disable=g-import-not-at-top

    if self.algorithm not in TIER_ALGORITHMS:
      raise ConfigError(
          f"--client_sparsity_tiers is implemented for {', '.join(TIER_ALGORITHMS)} only"
      )
    try:
      parsed = tiers.parse(self.client_sparsity_tiers)
    except tiers.TierError as e:
      raise ConfigError(str(e)) from None
    if self.client_execution == "cohort":
      raise ConfigError("--client_sparsity_tiers needs --client_execution=per_client")
    if self.final_sparsity is not None and self.final_sparsity != parsed.global_sparsity:
      raise ConfigError("--client_sparsity_tiers does not combine with --final_sparsity")
    return {
        "sparsity": parsed.global_sparsity,
        "client_sparsity_tiers": str(parsed),
        "client_execution": "per_client",
    }

  def _check_gradual(self) -> None:
    """--final_sparsity (resolved): not below S, and R_end rounds to get there."""
    if self.final_sparsity == self.sparsity:
      return
    if not self.spec.sparse:
      raise ConfigError(
          f"--final_sparsity={self.final_sparsity} needs a sparse algorithm "
          f"({', '.join(a.name for a in algorithms.REGISTRY.values() if a.sparse)})"
      )
    if self.final_sparsity < self.sparsity:
      raise ConfigError(
          f"--final_sparsity={self.final_sparsity} must not be below --sparsity={self.sparsity}"
      )
    if self.readjustment_end_round < 1:
      raise ConfigError(
          f"--final_sparsity={self.final_sparsity} needs --readjustment_end_round >= 1 "
          f"(the round by which it is reached), got {self.readjustment_end_round}"
      )

  def _check(self) -> None:
    for key, choices in CHOICES.items():
      value = getattr(self, key)
      if value is not None and value not in choices:
        raise ConfigError(f"--{key}={value} is not one of {', '.join(choices)}")
    for key, test, requirement in _RANGES:
      value = getattr(self, key)
      if not test(value):
        raise ConfigError(f"--{key}={value} must be {requirement}")
    if not self.output_dir:
      raise ConfigError("--output_dir must not be empty")
    if self.clients_per_round > self.total_clients:
      raise ConfigError(
          f"--clients_per_round={self.clients_per_round} must not exceed "
          f"--total_clients={self.total_clients}"
      )
    if self.partition == "natural" and self.dataset not in names.NATURAL_DATASETS:
      raise ConfigError(
          f"--partition=natural needs --dataset={' or '.join(names.NATURAL_DATASETS)}"
      )
    if self.upload_dtype != "float32" and not self.spec.float16_upload:
      allowed = [a.name for a in algorithms.REGISTRY.values() if a.float16_upload]
      raise ConfigError(
          f"--upload_dtype={self.upload_dtype} is implemented for {', '.join(allowed)} only"
      )
    if self.remember_old and not self.spec.sparse:
      raise ConfigError(
          f"--remember_old needs a sparse algorithm "
          f"({', '.join(a.name for a in algorithms.REGISTRY.values() if a.sparse)})"
      )
    if self.sparse_init != "keras" and not self.spec.rescaled_init:
      allowed = [a.name for a in algorithms.REGISTRY.values() if a.rescaled_init]
      raise ConfigError(
          f"--sparse_init={self.sparse_init} is implemented for {', '.join(allowed)} only"
      )
    if self.mask_block != "none" and not self.spec.block_masks:
      allowed = [a.name for a in algorithms.REGISTRY.values() if a.block_masks]
      raise ConfigError(
          f"--mask_block={self.mask_block} is implemented for {', '.join(allowed)} only"
      )
    if self.conv_block != "none" and not self.spec.block_masks:
      allowed = [a.name for a in algorithms.REGISTRY.values() if a.block_masks]
      raise ConfigError(
          f"--conv_block={self.conv_block} is implemented for {', '.join(allowed)} only"
      )
    if self.client_execution == "cohort" and not any(p.cohort for p in self.spec.phases):
      allowed = [a.name for a in algorithms.REGISTRY.values() if any(p.cohort for p in a.phases)]
      raise ConfigError(
          f"--client_execution=cohort is implemented for {', '.join(allowed)} only"
      )
    self._check_workers()
    if self.spec.two_phase and self.structured_search_rounds >= self.rounds:
      raise ConfigError(
          f"--structured_search_rounds={self.structured_search_rounds} must be "
          f"below --rounds={self.rounds} (phase 2 needs at least one round)"
      )

  @property
  def worker_addresses(self) -> tuple[str, ...]:
    """The addresses of --workers (empty: the clients run on this machine)."""
    return names.parse_workers(self.workers or "")

  def _check_workers(self) -> None:
    try:
      self.worker_addresses  # pylint: disable=pointless-statement
    except ValueError as e:
      raise ConfigError(f"--workers={self.workers}: {e}") from None

  def algorithm_config(self, algorithm: str | None = None) -> algorithms.AlgorithmConfig:
    """The resolved hyperparameters of (a phase's) algorithm."""
    values = {
        f.name: getattr(self, f.name)
        for f in dataclasses.fields(algorithms.AlgorithmConfig)
    }
    if algorithm is not None:
      values["algorithm"] = algorithm
    if not algorithms.get_phase(values["algorithm"]).cohort:
      values["client_execution"] = "per_client"
    return algorithms.AlgorithmConfig(**values)

  def differences_from(self, saved: dict) -> list[str]:
    """The settings (resolved) in which this run is another experiment than `saved`."""
    differing = []
    for key, value in dataclasses.asdict(self).items():
      if key in RESUMABLE_CHANGES:
        continue
      if key.startswith("structured_") and not self.spec.two_phase:
        continue
      if key in OWNED_SETTINGS and key not in self.spec.own_settings:
        continue
      was = saved.get(key, _saved_before_setting_existed(key, saved))
      if was == value:
        continue
      if key == "final_sparsity" and value == self.sparsity and was == saved.get("sparsity"):
        continue  # no gradual sparsification in either run: --sparsity names the change
      if key == "readjustment_end_round":
        differing.append(
            f"readjustment end round {value} (was {was}; set "
            "--readjustment_end_round to keep it)"
        )
      else:
        differing.append(f"--{key}={value} (was {was})")
    return differing


def _saved_before_setting_existed(key: str, saved: dict):
  """The value a run saved before setting `key` existed ran with."""
  if key == "final_sparsity":
    return saved.get("sparsity")
  return {
      "readjustment_schedule": "cosine", "remember_old": False, "mask_block": "none",
      "conv_block": "none",
      "prunefl_initial_rounds": 5, "prunefl_costs": "",
      "lotteryfl_accuracy_threshold": 0.5, "lotteryfl_prune_rate": 0.2,
      "client_sparsity_tiers": "", "sparse_init": "keras", "structured_min_width": 0.0,
      "structured_remove_dead": False,
  }.get(key)


def field_type(name: str) -> type:
  """The Python type of setting `name` (Optional unwrapped)."""
  hint = typing.get_type_hints(ExperimentConfig)[name]
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  return args[0] if args else hint
