"""The two-phase structured algorithms through the driver (run_experiment).

A short real run on Fashion-MNIST: the search removes units, phase 2 trains
the physically smaller network with exactly the reported parameters, the
found architecture is written out, and a run resumed inside phase 2 ends
with the same weights.
"""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

import keras_models
from tff_feddst import config as config_lib
from tff_feddst import training
from tff_feddst import unit_graph


@pytest.fixture(scope="module")
def structured_run(tmp_path_factory, small_fashion_mnist):
  out = tmp_path_factory.mktemp("structured") / "run"
  config = config_lib.ExperimentConfig(
      data_dir=small_fashion_mnist,  # the first Fashion-MNIST images (conftest)
      algorithm="structured_feddst",
      total_clients=20,
      clients_per_round=3,
      local_epochs=1,
      rounds=4,
      structured_search_rounds=2,
      structured_boundary=0.9,  # large, so that units go in 2 rounds
      sparsity=0.5,
      eval_every=1,
      checkpoint_every=1,
      seed=1,
      output_dir=str(out),
  )
  lines = []
  summary = training.run_experiment(config, log=lines.append)
  return config, summary, lines


def _rows(out_dir):
  with open(os.path.join(out_dir, "metrics.csv"), newline="") as f:
    return list(csv.DictReader(f))


def test_search_removes_units_and_phase_two_trains_the_smaller_network(structured_run):
  config, summary, lines = structured_run
  info = summary["structured"]
  original, found = info["original_widths"], info["found_widths"]
  assert original == keras_models.default_widths("mnist_cnn")
  assert set(found) == set(original)
  assert all(1 <= found[k] <= original[k] for k in found)
  assert sum(found.values()) < sum(original.values())
  with open(os.path.join(config.output_dir, "found_architecture.json")) as f:
    assert json.load(f)["widths"] == found
  # Phase 2's parameters are exactly those of the network built with the widths.
  params = keras_models.build_model("mnist_cnn", (28, 28, 1), 10, widths=found).count_params()
  assert info["phases"]["retrain"]["params"] == params
  assert info["phases"]["search"]["params"] == params
  final = tf.keras.models.load_model(os.path.join(config.output_dir, "final_model.keras"))
  assert final.count_params() == params
  assert any("phase 2" in line for line in lines)


def test_costs_follow_the_architecture_round_by_round(structured_run):
  config, summary, _ = structured_run
  rows = _rows(config.output_dir)
  assert [int(r["round"]) for r in rows] == [1, 2, 3, 4]
  full = keras_models.build_model("mnist_cnn", (28, 28, 1), 10).count_params()
  # Round 1: every client downloads and uploads the full network.
  assert int(rows[0]["round_upload_bits"]) == 3 * 32 * full
  assert int(rows[0]["round_download_bits"]) == 3 * 32 * full
  # Phase 2 (FedDST at S = 0.5 on the smaller network) sends much less.
  found = summary["structured"]["found_widths"]
  assert int(rows[2]["round_upload_bits"]) < int(rows[0]["round_upload_bits"]) / 1.5
  assert abs(float(rows[3]["sparsity"]) - 0.5) < 1e-3
  cost = unit_graph.architecture_cost("mnist_cnn", (28, 28, 1), 10, found)
  assert float(rows[1]["forward_flops"]) == cost.forward_flops
  assert float(rows[1]["sparsity"]) == pytest.approx(1 - cost.params / full)
  cumulative = 0
  for r in rows:
    cumulative += int(r["round_upload_bits"])
    assert int(r["cumulative_upload_bits"]) == cumulative


def test_a_run_resumed_in_phase_two_ends_with_the_same_weights(structured_run, tmp_path):
  config, _, _ = structured_run
  copy = tmp_path / "resumed"
  shutil.copytree(config.output_dir, copy)
  # As if the run had died after round 3's checkpoint.
  shutil.rmtree(copy / "checkpoints" / "round_4")
  (copy / "summary.json").unlink()
  lines = []
  training.run_experiment(
      config_lib.ExperimentConfig(**{**config.__dict__, "output_dir": str(copy)}),
      log=lines.append,
  )
  assert any("resumed" in line and "round 3" in line for line in lines)
  a = tf.keras.models.load_model(os.path.join(config.output_dir, "final_model.keras"))
  b = tf.keras.models.load_model(copy / "final_model.keras")
  for x, y in zip(a.get_weights(), b.get_weights()):
    np.testing.assert_array_equal(x, y)
  strip = lambda rows: [{k: v for k, v in r.items() if k != "round_seconds"} for r in rows]  # noqa: E731
  assert strip(_rows(copy)) == strip(_rows(config.output_dir))


@pytest.fixture(scope="module")
def std_band_run(tmp_path_factory, small_fashion_mnist):
  """Paper 2's rule on its plain CNN: k = 1 removes units in round 1, and
  the search stops after that one pruning round (cohort execution, so the
  cohort network's global average pooling runs too)."""
  out = tmp_path_factory.mktemp("std_band") / "run"
  config = config_lib.ExperimentConfig(
      data_dir=small_fashion_mnist,  # the first Fashion-MNIST images (conftest)
      algorithm="structured",
      model="paper2_cnn",
      structured_rule="std_band",
      structured_std_k=1.0,
      structured_max_prune_rounds=1,
      total_clients=20,
      clients_per_round=3,
      local_epochs=1,
      rounds=5,
      structured_search_rounds=4,
      eval_every=5,
      checkpoint_every=1,
      seed=2,
      output_dir=str(out),
  )
  summary = training.run_experiment(config, log=lambda line: None)
  return config, summary


def test_std_band_search_prunes_convolutions_only_until_it_stops(std_band_run):
  config, summary = std_band_run
  info = summary["structured"]
  assert (info["rule"], info["std_k"], info["prune_dense"]) == ("std_band", 1.0, False)
  found = info["found_widths"]
  assert set(found) == {"conv1", "conv2"}
  assert found["conv1"] < 32 or found["conv2"] < 64
  rows = _rows(config.output_dir)
  full = unit_graph.architecture_cost("paper2_cnn", (28, 28, 1), 10).forward_flops
  cost = unit_graph.architecture_cost("paper2_cnn", (28, 28, 1), 10, found)
  # Units go in round 1 only: the FLOPs of rounds 1-4 are those found.
  assert [float(r["forward_flops"]) for r in rows[:4]] == [cost.forward_flops] * 4
  assert cost.forward_flops < full


class _Interrupt(Exception):
  pass


def _interrupt_at_round(number):
  """A log function that stops the run when round `number` is reported,
  before its checkpoint is written."""

  def log(line):
    if line.startswith("round") and line.split()[1].startswith(f"{number}/"):
      raise _Interrupt(line)

  return log


def test_a_search_resumed_in_phase_one_keeps_its_stopping_state(std_band_run, tmp_path):
  config, _ = std_band_run
  resumed = config_lib.ExperimentConfig(**{**config.__dict__, "output_dir": str(tmp_path)})
  # The run dies in round 3, inside the search, with round 2's checkpoint on
  # disk: a resumed search that forgot it had stopped would prune again.
  with pytest.raises(_Interrupt):
    training.run_experiment(resumed, log=_interrupt_at_round(3))
  lines = []
  training.run_experiment(resumed, log=lines.append)
  assert any("resumed" in line and "round 2" in line for line in lines)
  strip = lambda rows: [{k: v for k, v in r.items() if k != "round_seconds"} for r in rows]  # noqa: E731
  assert strip(_rows(tmp_path)) == strip(_rows(config.output_dir))
