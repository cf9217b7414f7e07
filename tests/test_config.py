"""Settings and the algorithm registry: one place resolves and checks them."""

import csv
import dataclasses
import importlib
import json
import pathlib
import re

import pytest

from tff_feddst import algorithms
from tff_feddst import config as config_lib
from tff_feddst import training

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _resolve(**values):
  return config_lib.ExperimentConfig(**values).resolve()


def test_algorithm_defaults_come_from_the_registry():
  assert _resolve(algorithm="fedavgm").server_momentum == 0.9
  assert _resolve(algorithm="fedavg").server_momentum == 0.0
  assert _resolve(algorithm="fedprox").prox_mu == 0.01
  assert _resolve(algorithm="feddst").prox_mu == 0.0
  # An explicit value wins over the algorithm's default.
  assert _resolve(algorithm="fedavgm", server_momentum=0.5).server_momentum == 0.5
  assert _resolve(algorithm="fedprox", prox_mu=0.0).prox_mu == 0.0
  # Dense algorithms train at sparsity 0 whatever --sparsity says.
  assert _resolve(algorithm="fedavg", sparsity=0.9).sparsity == 0.0
  assert _resolve(algorithm="feddst", sparsity=0.9).sparsity == 0.9
  assert _resolve(algorithm="structured_feddst", sparsity=0.9).sparsity == 0.9


def test_client_execution_defaults_to_cohorts_where_the_algorithm_has_them(monkeypatch):
  for name in algorithms.ALGORITHMS:  # all but PruneFL and LotteryFL have a cohort engine
    want = "per_client" if name in ("prunefl", "lotteryfl") else "cohort"
    assert _resolve(algorithm=name).client_execution == want, name
  with pytest.raises(config_lib.ConfigError, match="--client_execution=cohort is implemented for"):
    _resolve(algorithm="prunefl", client_execution="cohort")
  with pytest.raises(config_lib.ConfigError, match="--client_execution=cohort is implemented for"):
    _resolve(algorithm="lotteryfl", client_execution="cohort")
  assert _resolve(algorithm="feddst", client_execution="per_client").client_execution == "per_client"
  structured = _resolve(algorithm="structured")
  assert structured.algorithm_config("structured_search").client_execution == "cohort"
  assert structured.algorithm_config("fedavg").client_execution == "cohort"
  # An algorithm without one runs per client, and refuses cohorts.
  without = dataclasses.replace(algorithms.REGISTRY["fedprox"], cohort=False)
  monkeypatch.setattr(algorithms, "REGISTRY", {**algorithms.REGISTRY, "fedprox": without})
  assert _resolve(algorithm="fedprox").client_execution == "per_client"
  with pytest.raises(config_lib.ConfigError, match="--client_execution=cohort is implemented for"):
    _resolve(algorithm="fedprox", client_execution="cohort")


def test_readjustment_end_round_is_half_the_rounds_of_the_readjusting_process():
  assert _resolve(rounds=50).readjustment_end_round == 25
  assert _resolve(rounds=51).readjustment_end_round == 25
  # Two phases: half of the rounds after the search.
  assert _resolve(
      algorithm="structured_feddst", rounds=50, structured_search_rounds=20
  ).readjustment_end_round == 15
  assert _resolve(rounds=50, readjustment_end_round=7).readjustment_end_round == 7


def test_resolve_is_idempotent_and_fills_the_model():
  once = _resolve(algorithm="fedprox", dataset="cifar10")
  assert once.model == "cifar10_cnn"
  assert once.resolve() == once


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(sparsity=1.0), "--sparsity=1.0 must be in [0, 1)"),
        (dict(rounds=0), "--rounds=0 must be >= 1"),
        (dict(server_momentum=1.5), "--server_momentum=1.5 must be in [0, 1]"),
        (dict(algorithm="nope"), "--algorithm=nope is not one of"),
        (dict(clients_per_round=50, total_clients=40), "--clients_per_round=50 must not exceed --total_clients=40"),
        (dict(partition="natural"), "--partition=natural needs --dataset=emnist or femnist"),
        (
            dict(algorithm="fedavg", upload_dtype="float16"),
            "--upload_dtype=float16 is implemented for feddst, randommask, snip, feddst_snip, grasp, structured_feddst only",
        ),
        (
            dict(algorithm="structured", rounds=10, structured_search_rounds=10),
            "--structured_search_rounds=10 must be below --rounds=10",
        ),
        (dict(output_dir=""), "--output_dir must not be empty"),
        (
            dict(algorithm="snip", sparse_init="rescaled"),
            "--sparse_init=rescaled is implemented for feddst, randommask only",
        ),
        (dict(sparse_init="scaled"), "--sparse_init=scaled is not one of keras, rescaled"),
        (dict(structured_rule="band"), "--structured_rule=band is not one of boundary, std_band, std_band_low"),
        (dict(structured_std_k=-1.0), "--structured_std_k=-1.0 must be >= 0 and finite"),
        (dict(structured_std_k=float("nan")), "--structured_std_k=nan must be >= 0 and finite"),
        (dict(structured_patience=-1), "--structured_patience=-1 must be >= 0"),
        (dict(structured_max_prune_rounds=0), "--structured_max_prune_rounds=0 must be >= 1"),
        (dict(structured_min_width=1.5), "--structured_min_width=1.5 must be in [0, 1]"),
    ],
)
def test_bad_settings_are_one_line(values, message):
  with pytest.raises(config_lib.ConfigError) as raised:
    _resolve(**values)
  assert message in str(raised.value)
  assert "\n" not in str(raised.value)


def test_the_rule_decides_whether_the_search_prunes_dense_layers():
  boundary = _resolve(algorithm="structured")
  band = _resolve(algorithm="structured", structured_rule="std_band")
  low = _resolve(algorithm="structured", structured_rule="std_band_low")
  assert (boundary.structured_prune_dense, band.structured_prune_dense) == (True, False)
  assert low.structured_prune_dense is False
  told = _resolve(algorithm="structured", structured_rule="std_band", structured_prune_dense=True)
  assert told.structured_prune_dense is True
  assert told.algorithm_config("structured_search").structured_prune_dense is True


def test_differences_name_every_setting_that_changes_the_experiment():
  saved = dataclasses.asdict(_resolve(rounds=20, output_dir="a"))
  # Output directory, rounds (with R_end fixed), evaluation period: the same run.
  same = _resolve(rounds=30, readjustment_end_round=10, output_dir="b", eval_every=3)
  assert same.differences_from(saved) == []
  other = _resolve(rounds=20, sparsity=0.5, seed=3)
  assert other.differences_from(saved) == ["--sparsity=0.5 (was 0.8)", "--seed=3 (was 0)"]
  grown = _resolve(rounds=40)
  assert grown.differences_from(saved) == [
      "readjustment end round 20 (was 10; set --readjustment_end_round to keep it)"
  ]


def test_every_flag_of_run_py_is_a_setting():
  import run  # pylint: disable=g-import-not-at-top

  fields = {f.name for f in dataclasses.fields(config_lib.ExperimentConfig)}
  assert set(run.HELP) == fields


def test_no_module_branches_on_an_algorithm_name():
  """Only the registry compares algorithm names (`== "feddst"`, `in (...)`)."""
  names = "|".join(re.escape(n) for n in algorithms.REGISTRY)
  comparison = re.compile(
      rf"""(==|!=)\s*["']({names})["']|["']({names})["']\s*(==|!=)|\bin\s*\([^)]*["']({names})["']"""
  )
  sources = [ROOT / "run.py", *ROOT.glob("tff_feddst/**/*.py"), *ROOT.glob("benchmarks/*.py"),
             *ROOT.glob("tflite_export/*.py")]
  found = []
  for path in sources:
    if path.name == "algorithms.py":
      continue
    for number, line in enumerate(path.read_text().splitlines(), 1):
      if comparison.search(line):
        found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
  assert not found, found


def test_structured_feddst_float16_charges_16_bits_only_in_phase_two(tmp_path, small_fashion_mnist):
  config = config_lib.ExperimentConfig(
      data_dir=small_fashion_mnist,  # the first Fashion-MNIST images (conftest)
      algorithm="structured_feddst", upload_dtype="float16", total_clients=20,
      clients_per_round=3, local_epochs=1, rounds=3, structured_search_rounds=1,
      sparsity=0.5, eval_every=3, output_dir=str(tmp_path / "run"),
  )
  summary = training.run_experiment(config, log=lambda line: None)
  with open(tmp_path / "run" / "metrics.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  search = summary["structured"]["phases"]["search"]
  # Phase 1 clients send the dense float32 weights of the full network.
  full = json.loads((tmp_path / "run" / "config.json").read_text())
  assert full["upload_dtype"] == "float16"
  phase_one_params = 261840  # the MNIST network before any removal
  assert int(rows[0]["round_upload_bits"]) == 3 * 32 * phase_one_params
  assert search["last_round"] == 1
  # Phase 2: 16 bits per kept weight and bias, plus the mask of clients that changed it.
  kept = sum(summary["layer_budgets"].values())
  for row in rows[1:]:
    expected = 3 * 16 * (kept + summary["num_unmasked"])
    expected += int(row["clients_mask_uploaded"]) * summary["num_prunable"]
    assert int(row["round_upload_bits"]) == expected


def test_every_registry_entry_names_a_builder_and_phase_maker_that_exist():
  """The registry names its builders (`builders` imports TensorFlow, it does not)."""
  from tff_feddst import builders  # pylint: disable=g-import-not-at-top

  for entry in (*algorithms.REGISTRY.values(), algorithms.STRUCTURED_SEARCH):
    assert callable(entry.build), entry.name
    assert entry.build is getattr(builders, entry.builder)
    if entry.phase_maker is not None:
      assert callable(entry.make_phase), entry.name
  assert algorithms.get("snip").make_phase.keywords["criterion"] != (
      algorithms.get("grasp").make_phase.keywords["criterion"]
  )


def test_the_tensorflow_free_names_are_those_of_the_modules_that_use_them():
  import keras_models  # pylint: disable=g-import-not-at-top
  from keras_models import networks  # pylint: disable=g-import-not-at-top
  from tff_feddst import data, masks, names, unit_graph  # pylint: disable=g-import-not-at-top
  import tflite_export  # pylint: disable=g-import-not-at-top

  convert_module = importlib.import_module("tflite_export.convert")

  assert tuple(networks._BUILDERS) == keras_models.MODEL_NAMES  # pylint: disable=protected-access
  assert keras_models.build_model is networks.build_model
  assert data.DATASETS == config_lib.CHOICES["dataset"]
  assert masks.DISTRIBUTIONS == config_lib.CHOICES["sparsity_distribution"]
  assert unit_graph.RULES == config_lib.CHOICES["structured_rule"]
  assert names.parse_workers("a:1, b:2") == ("a:1", "b:2")
  # The package's `convert` stays the function after its submodule is imported.
  assert tflite_export.convert is convert_module.convert and callable(tflite_export.convert)
  assert tflite_export.QUANTIZATION_MODES == convert_module.QUANTIZATION_MODES
