"""The speed benchmark's core, in-process, on a tiny configuration."""

import csv
import dataclasses
import math

import pytest

from benchmarks import speed
from tff_feddst import runtime


# The --quick configuration cut to one algorithm, one (N, K) and 2 rounds.
TINY = dataclasses.replace(
    speed.SpeedSettings(**speed.QUICK),
    algorithms=("fedavg",),
    client_execution="per_client",  # the decomposition is per client
    clients_per_round_list=(2,),
    total_clients_list=(40,),
    rounds=2,
    pure_tf_clients=1,
    decomposition_repeats=1,
    evaluation_repeats=1,
)


def test_settings_validation_is_one_line():
  bad = [
      dict(algorithms=("fedprox",)),
      dict(rounds=1),
      dict(clients_per_round_list=(50,), total_clients_list=(40,)),
      dict(clients_per_round_list=()),
  ]
  for change in bad:
    with pytest.raises(ValueError) as e:
      dataclasses.replace(TINY, **change).validate()
    assert "\n" not in str(e.value)


def test_cases_cover_both_sweeps():
  got = speed.cases(speed.SpeedSettings())
  assert [(c.total_clients, c.clients_per_round, c.examples_per_class) for c in got] == [
      (400, 20, 20), (400, 50, 20), (400, 100, 20), (400, 20, 7), (4000, 20, 7)
  ]


def test_feddst_measured_rounds_include_a_readjustment():
  settings = speed.SpeedSettings()
  start = speed.first_process_round("feddst", settings)
  from tff_feddst import masks  # pylint: disable=g-import-not-at-top

  measured = range(start + 1, start + settings.rounds)
  assert any(
      masks.is_readjustment_round(
          r, settings.readjustment_ratio, settings.rounds_between_readjustments,
          settings.readjustment_end_round,
      )
      for r in measured
  )


def test_settings_resolve_through_the_registry():
  settings = speed.SpeedSettings()
  case = speed.cases(settings)[0]
  dense = speed.experiment_config("fedavg", case, settings, "unused")
  sparse = speed.experiment_config("feddst", case, settings, "unused")
  assert dense.sparsity == 0.0 and sparse.sparsity == settings.sparsity
  assert speed.first_process_round("fedavg", settings) == 1


def test_quick_speed_run_writes_positive_finite_figures(tmp_path, fashion_mnist_available):
  lines = []
  rows = speed.run_speed(TINY, str(tmp_path), log=lines.append)
  assert len(rows) == 1
  assert any("decomposition" in line for line in lines)

  with open(tmp_path / "speed.csv", newline="") as f:
    reader = csv.DictReader(f)
    assert tuple(reader.fieldnames) == speed.CSV_COLUMNS
    (row,) = list(reader)
  assert row["algorithm"] == "fedavg"
  assert int(row["total_clients"]) == 40 and int(row["clients_per_round"]) == 2
  positive = (
      "round_seconds_median", "next_seconds_median", "examples_per_second",
      "peak_rss_mib", "peak_worker_rss_mib", "eval_seconds", "decomp_total_seconds",
      "client_training_seconds", "pure_tf_seconds_per_client",
      "empty_data_client_work_seconds", "profiled_round_seconds",
      "prof_next_seconds", "prof_tff_serialize_seconds", "prof_evaluate_seconds",
  )
  for column in positive:
    value = float(row[column])
    assert math.isfinite(value) and value > 0, (column, row[column])
  finite = [c for c in speed.CSV_COLUMNS if c.endswith(("_seconds", "_pct"))]
  for column in finite:
    if row[column] != "":
      assert math.isfinite(float(row[column])), (column, row[column])
  # mnist_cnn's forward pass by hand (2 FLOPs a multiply-add): conv1
  # 5*5*1*10 at 24x24, conv2 5*5*10*20 at 18x18, dense 5120*50 and 50*10;
  # a training example is 3 forward passes.
  forward = 2 * (25 * 10 * 24 * 24 + 25 * 10 * 20 * 18 * 18 + 5120 * 50 + 50 * 10)
  assert forward == 4_041_000
  gflops = float(row["training_gflops_per_second"])
  assert gflops == pytest.approx(3 * forward * float(row["examples_per_second"]) / 1e9, rel=1e-4)
  matmul = float(row["matmul_gflops_per_second"])
  assert matmul > 0 and float(row["matmul_share"]) == pytest.approx(gflops / matmul, abs=1e-6)
  parts = sum(float(row[f"{key}_seconds"]) for key, _ in speed.DECOMPOSITION)
  # The CSV rounds to 6 decimals.
  assert parts == pytest.approx(float(row["decomp_total_seconds"]), abs=1e-5)

  with open(tmp_path / "speed_rounds.csv", newline="") as f:
    rounds = list(csv.DictReader(f))
  assert [int(r["excluded"]) for r in rounds] == [1, 0]
  assert (tmp_path / "speed.md").read_text().startswith("# Simulation speed")
  assert not list(tmp_path.glob("*.tmp"))
  # The worker was stopped after the configuration.
  assert not runtime.tff_worker_processes()


def test_each_configuration_builds_and_captures_its_own_process(tmp_path, fashion_mnist_available):
  """Two K with the same algorithm: the second is not handed the process
  the first built (`phases.build_algorithm` keeps built processes)."""
  from tff_feddst import training  # pylint: disable=g-import-not-at-top

  first, second = (speed.Case("clients_per_round", 40, k, 1) for k in (2, 3))
  context = training.load_context(
      speed.experiment_config("fedavg", first, TINY, str(tmp_path)), lambda line: None
  )
  benches = [speed.build_bench("fedavg", case, context, TINY, lambda line: None)
             for case in (first, second)]
  assert benches[0].blocks is not benches[1].blocks
  assert benches[0].phase.built.process is not benches[1].phase.built.process
  runtime.stop_tff_workers(restartable=True)
