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

from tff_feddst import training

ALGORITHMS = ("fedavg", "fedavgm", "fedprox", "randommask", "feddst")


@dataclasses.dataclass(frozen=True)
class BenchmarkSettings:
  """What varies between benchmark invocations (the rest is the paper's setting)."""

  rounds: int = 200
  eval_every: int = 5
  seed: int = 0
  data_dir: str | None = None
  total_clients: int = 400
  clients_per_round: int = 20
  local_epochs: int = 10
  sparsity: float = 0.8
  readjustment_ratio: float = 0.05
  rounds_between_readjustments: int = 10
  fedavgm_server_momentum: float = 0.9
  fedprox_mu: float = 0.01


QUICK = dict(rounds=3, eval_every=1, total_clients=40, clients_per_round=5, local_epochs=1)


def experiment_config(algorithm: str, settings: BenchmarkSettings, run_dir: str) -> training.ExperimentConfig:
  """The run.py settings of one algorithm in the benchmark."""
  if algorithm not in ALGORITHMS:
    raise ValueError(f"unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
  sparse = algorithm in ("feddst", "randommask")
  return training.ExperimentConfig(
      algorithm=algorithm,
      dataset="fashion_mnist",
      data_dir=settings.data_dir,
      partition="pathological",
      total_clients=settings.total_clients,
      clients_per_round=settings.clients_per_round,
      rounds=settings.rounds,
      local_epochs=settings.local_epochs,
      server_momentum=settings.fedavgm_server_momentum if algorithm == "fedavgm" else 0.0,
      prox_mu=settings.fedprox_mu if algorithm == "fedprox" else 0.0,
      sparsity=settings.sparsity if sparse else 0.0,
      readjustment_ratio=settings.readjustment_ratio,
      rounds_between_readjustments=settings.rounds_between_readjustments,
      eval_every=settings.eval_every,
      seed=settings.seed,
      output_dir=run_dir,
  )


def _finished_with(config: training.ExperimentConfig) -> bool:
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
  wanted = dataclasses.asdict(config)
  defaults = {f.name: f.default for f in dataclasses.fields(training.ExperimentConfig)}
  for key, value in wanted.items():
    if key == "model":
      continue
    if saved.get(key, defaults.get(key)) != value:
      return False
  return True


def run_all(
    algorithms: list[str],
    settings: BenchmarkSettings,
    output_dir: str,
    log: Callable[[str], None] = print,
) -> dict[str, str]:
  """Trains every algorithm not yet finished; returns {algorithm: run dir}."""
  run_dirs = {}
  for algorithm in algorithms:
    config = experiment_config(algorithm, settings, os.path.join(output_dir, algorithm))
    run_dirs[algorithm] = config.output_dir
    if _finished_with(config):
      log(f"[benchmark] {algorithm}: finished run found in {config.output_dir}, reused")
      continue
    log(f"[benchmark] {algorithm}: training {settings.rounds} rounds into {config.output_dir}")
    training.run_experiment(config, log=lambda line, a=algorithm: log(f"[{a}] {line}"))
  return run_dirs
