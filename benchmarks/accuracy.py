"""The paper's comparison: every algorithm on the same seed and partition.

Each algorithm trains through `tff_feddst.training.run_experiment` (the code
behind run.py) into its own directory under the benchmark's output directory.
A directory whose run finished with the same settings is reused, so an
interrupted benchmark continues where it stopped.
"""

import dataclasses
import json
import os
from typing import Callable

from tff_feddst.config import ExperimentConfig

ALGORITHMS = (
    "fedavg", "fedavgm", "fedprox", "randommask", "snip", "grasp", "prunefl", "lotteryfl",
    "feddst",
)

# The paper's ablations of FedDST (S = 0.8, alpha 0.05, Delta_R 10, ERK,
# float32 uploads, no server momentum), one setting changed at a time:
# {ablation: {variant: ExperimentConfig settings}} (of FedDST unless they
# name another algorithm). A variant runs like an algorithm
# (`--algorithms=feddst,feddst_alpha0.2`), into its own directory.
ABLATIONS = {
    "alpha": {f"feddst_alpha{a:g}": {"readjustment_ratio": a} for a in (0.0, 0.01, 0.2)},
    "delta_r": {f"feddst_dR{r}": {"rounds_between_readjustments": r} for r in (1, 5, 20)},
    "sparsity": {f"feddst_S{s:g}": {"sparsity": s} for s in (0.5, 0.9, 0.95)},
    "distribution": {"feddst_uniform": {"sparsity_distribution": "uniform"}},
    "float16": {"feddst_float16": {"upload_dtype": "float16"}},
    "momentum": {"feddst_momentum0.9": {"server_momentum": 0.9}},
    # Not the paper's: the initial weights divided by sqrt(layer density).
    "init": {"feddst_rescaled": {"sparse_init": "rescaled"}},
    # Settings that helped on their own, together.
    "combined": {
        "feddst_rescaled_uniform": {"sparse_init": "rescaled", "sparsity_distribution": "uniform"},
    },
    # The clients' learning rate (not the paper's 0.01), FedAvg's too.
    "client_lr": {
        "feddst_rescaled_lr0.02": {"sparse_init": "rescaled", "client_lr": 0.02},
        "fedavg_lr0.02": {"algorithm": "fedavg", "client_lr": 0.02},
    },
    # The recommended configuration with the paper's float16 uploads, which
    # alone left FedDST's accuracy per round where it was at half the upload.
    "recommended": {
        "feddst_rescaled_lr0.02_float16": {
            "sparse_init": "rescaled", "client_lr": 0.02, "upload_dtype": "float16",
        },
    },
    # SNIP (a baseline, not an ablation) with the recommended FedDST's
    # float16 uploads, and its client learning rate, so that the two compare
    # on equal terms (SNIP's mask comes from saliency: it has no rescaled
    # init); and FedDST started from SNIP's mask (not the paper's).
    "snip_options": {
        "snip_float16": {"algorithm": "snip", "upload_dtype": "float16"},
        "snip_lr0.02_float16": {"algorithm": "snip", "client_lr": 0.02, "upload_dtype": "float16"},
        "feddst_snip_float16": {"algorithm": "feddst_snip", "upload_dtype": "float16"},
    },
}
VARIANTS = {
    name: (
        overrides.get("algorithm", "feddst"),
        {k: v for k, v in overrides.items() if k != "algorithm"},
    )
    for variants in ABLATIONS.values()
    for name, overrides in variants.items()
}

# Row labels of the report: algorithms, and variants by what they change.
LABELS_OF_ALGORITHMS = {"feddst": "FedDST", "fedavg": "FedAvg", "snip": "SNIP", "feddst_snip": "FedDST from SNIP's mask"}
LABELS = {
    "fedavg": "FedAvg",
    "fedavgm": "FedAvgM (server momentum 0.9)",
    "fedprox": "FedProx (mu 0.01)",
    "randommask": "RandomMask (S=0.8)",
    "snip": "SNIP (S=0.8)",
    "grasp": "GraSP (S=0.8)",
    "prunefl": "PruneFL (S=0.8)",
    "lotteryfl": "LotteryFL (S=0.8), global model",
    "feddst": "FedDST (S=0.8, a=0.05, dR=10)",
    "feddst_snip": "FedDST from SNIP's mask (S=0.8, a=0.05, dR=10)",
    **{
        name: f"{LABELS_OF_ALGORITHMS[algorithm]}, " + ", ".join(f"{k}={v}" for k, v in overrides.items())
        for name, (algorithm, overrides) in VARIANTS.items()
    },
}

@dataclasses.dataclass(frozen=True)
class BenchmarkSettings:
  """What varies between benchmark invocations (the rest is the paper's setting)."""

  rounds: int = 200
  eval_every: int = 1
  seed: int = 0
  data_dir: str | None = None
  total_clients: int = 400
  clients_per_round: int = 20
  local_epochs: int = 10
  sparsity: float = 0.8
  readjustment_ratio: float = 0.05
  rounds_between_readjustments: int = 10


# A smoke test of every algorithm: FedDST readjusts in it (R_end = 2, every round).
QUICK = dict(
    rounds=4, eval_every=1, total_clients=40, clients_per_round=5, local_epochs=1,
    rounds_between_readjustments=1,
)


def describe(settings: BenchmarkSettings) -> str:
  """The data and client setting of a benchmark, from its own settings."""
  return (
      f"Fashion-MNIST, pathological split ({settings.total_clients} clients x 2 classes), "
      f"{settings.clients_per_round} clients per round, {settings.local_epochs} local "
      f"epoch{'s' if settings.local_epochs != 1 else ''}, batch 32"
  )


def experiment_config(name: str, settings: BenchmarkSettings, run_dir: str) -> ExperimentConfig:
  """The resolved run.py settings of one algorithm (or ablation variant,
  `VARIANTS`) in the benchmark."""
  if name in VARIANTS:
    algorithm, overrides = VARIANTS[name]
  elif name in ALGORITHMS:
    algorithm, overrides = name, {}
  else:
    raise ValueError(
        f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)} or the "
        f"ablation variants {', '.join(VARIANTS)}"
    )
  config = ExperimentConfig(
      algorithm=algorithm,
      dataset="fashion_mnist",
      data_dir=settings.data_dir,
      partition="pathological",
      total_clients=settings.total_clients,
      clients_per_round=settings.clients_per_round,
      rounds=settings.rounds,
      local_epochs=settings.local_epochs,
      sparsity=settings.sparsity,
      readjustment_ratio=settings.readjustment_ratio,
      rounds_between_readjustments=settings.rounds_between_readjustments,
      eval_every=settings.eval_every,
      seed=settings.seed,
      output_dir=run_dir,
  )
  return dataclasses.replace(config, **overrides).resolve()


def finished_with(config: ExperimentConfig) -> bool:
  """True when `config.output_dir` holds a finished run of exactly `config`."""
  summary_path = os.path.join(config.output_dir, "summary.json")
  config_path = os.path.join(config.output_dir, "config.json")
  if not (os.path.exists(summary_path) and os.path.exists(config_path)):
    return False
  try:
    with open(config_path) as f:
      saved = json.load(f)
  except (OSError, ValueError):
    return False
  return not config.differences_from(saved) and saved.get("rounds") == config.rounds


def run_all(
    algorithms: list[str],
    settings: BenchmarkSettings,
    output_dir: str,
    log: Callable[[str], None] = print,
) -> dict[str, str]:
  """Trains every algorithm not yet finished; returns {algorithm: run dir}."""
  from tff_feddst import training  # pylint: disable=g-import-not-at-top  (imports TensorFlow)

  run_dirs = {}
  for algorithm in algorithms:
    config = experiment_config(algorithm, settings, os.path.join(output_dir, algorithm))
    run_dirs[algorithm] = config.output_dir
    if finished_with(config):
      log(f"[benchmark] {algorithm}: finished run found in {config.output_dir}, reused")
      continue
    log(f"[benchmark] {algorithm}: training {settings.rounds} rounds into {config.output_dir}")
    training.run_experiment(config, log=lambda line, a=algorithm: log(f"[{a}] {line}"))
  return run_dirs
