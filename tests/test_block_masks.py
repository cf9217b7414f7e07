"""Block-sparse FedDST (`--mask_block`): settings, a run, and its TFLite export.

The mask arithmetic in blocks is tested in test_masks.py (against numpy) and
the two client engines in test_cohort.py; here a whole run keeps whole
blocks at the layout's budgets and its export runs dense1 sparse.
"""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tff_feddst.config import ConfigError
from tff_feddst.config import ExperimentConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(algorithm="fedavg", mask_block="1x4"), "--mask_block=1x4 is implemented for feddst, randommask, structured_feddst only"),
        (dict(algorithm="snip", mask_block="1x16"), "--mask_block=1x16 is implemented for feddst, randommask, structured_feddst only"),
        (dict(algorithm="structured", mask_block="1x4"), "is implemented for feddst, randommask, structured_feddst only"),
        (dict(mask_block="2x2"), "--mask_block=2x2 is not one of none, 1x4, 1x16"),
        (dict(algorithm="fedavg", conv_block="kernel"), "--conv_block=kernel is implemented for feddst, randommask, structured_feddst only"),
        (dict(conv_block="3x3"), "--conv_block=3x3 is not one of none, kernel"),
    ],
)
def test_bad_mask_block_settings_are_one_line_errors(settings, message):
  with pytest.raises(ConfigError) as error:
    ExperimentConfig(**settings).resolve()
  assert message in str(error.value)
  assert "\n" not in str(error.value)


def test_a_run_saved_before_mask_block_existed_resumes_as_element_wise():
  config = ExperimentConfig(rounds=10).resolve()
  saved = {k: v for k, v in config.__dict__.items() if k != "mask_block"}
  assert config.differences_from(saved) == []
  blocked = ExperimentConfig(rounds=10, mask_block="1x4").resolve()
  assert blocked.differences_from(saved) == ["--mask_block=1x4 (was none)"]
  saved = {k: v for k, v in config.__dict__.items() if k != "conv_block"}
  assert config.differences_from(saved) == []
  blocked = ExperimentConfig(rounds=10, conv_block="kernel").resolve()
  assert blocked.differences_from(saved) == ["--conv_block=kernel (was none)"]


def test_block_feddst_run_keeps_whole_blocks_and_exports_dense1_sparse(
    tmp_path, small_fashion_mnist
):
  """Two readjusting rounds at S = 0.8 with 1x4 blocks: dense1's non-zero
  weights lie in at most its budget of blocks; a mask upload costs a bit per
  block; its TFLite tensor is
  block-encoded and read by FULLY_CONNECTED without DENSIFY, and the export
  computes the Keras model's logits."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from tflite_export import evaluate as tfl_eval  # pylint: disable=g-import-not-at-top
  from tff_feddst import training  # pylint: disable=g-import-not-at-top

  config = ExperimentConfig(
      data_dir=small_fashion_mnist,  # the first Fashion-MNIST images (conftest)
      algorithm="feddst", mask_block="1x4", total_clients=20, clients_per_round=3,
      local_epochs=1, rounds=2, eval_every=2, rounds_between_readjustments=1,
      readjustment_end_round=3, seed=4, export_tflite=True, output_dir=str(tmp_path),
  )
  training.run_experiment(config, log=lambda line: None)
  with open(tmp_path / "summary.json") as f:
    summary = json.load(f)
  budget = summary["layer_budgets"]["dense1"]
  assert budget == 4 * 12811  # ERK at 0.8: 51,245.2 weights, 12,811 whole blocks (test_masks)
  model = tf.keras.models.load_model(tmp_path / "final_model.keras")
  kernel = model.get_layer("dense1").kernel.numpy()
  blocks = np.abs(kernel).reshape(5120 // 4, 4, 50).sum(axis=1) > 0
  # Non-zero values lie in at most the budget's 12,811 blocks (element-wise
  # masks at 20% density would touch 1 - 0.8^4 = 59% of the 64,000 blocks);
  # a kept block may hold zeros (a regrown block whose inputs never fired).
  assert 0.95 * budget <= 4 * blocks.sum() <= budget

  # The ledger charges a mask one bit per weight of conv1, conv2 and logits
  # and one per 1x4 block of dense1, each layer's packed into whole bytes:
  # 256 + 5,000 + 64,000 + 504 bits (250 and 500 padded).
  with open(tmp_path / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  values = 32 * (sum(summary["layer_budgets"].values()) + summary["num_unmasked"])
  assert [int(r["round_upload_bits"]) for r in rows] == [
      3 * values + int(r["clients_mask_uploaded"]) * 69_760 for r in rows
  ]
  assert int(rows[0]["clients_mask_uploaded"]) == 3

  report = summary["tflite"]
  (dense1,) = [t for t in report["exports"]["sparse"]["sparse_tensors"] if "dense1" in t["name"]]
  assert dense1["kept_sparse"] and dense1["block_map"] == [1] and dense1["shape"] == [50, 5120]
  x = np.random.default_rng(0).random((64, 28, 28, 1), np.float32)
  with open(tmp_path / "model.tflite", "rb") as f:
    logits = tfl_eval.predict_logits(f.read(), x)
  np.testing.assert_allclose(logits, model(x).numpy(), atol=1e-5, rtol=1e-5)


def test_kernel_block_feddst_run_keeps_whole_filters_and_exports_conv2_as_pairs(
    tmp_path, small_fashion_mnist
):
  """Two readjusting rounds at S = 0.8 with --conv_block=kernel and 1x4
  blocks: conv1 keeps 8 whole 5x5 filters, conv2 15 (ERK, test_masks); a
  mask upload costs a bit per filter; the sparse export runs conv2 over
  its kept pairs only (DEPTHWISE_CONV_2D) and computes the Keras model's
  logits. `benchmarks.retime_runs` times the run's exports again and
  tabulates it."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from tflite_export import evaluate as tfl_eval  # pylint: disable=g-import-not-at-top
  from tflite_export import inspect_model  # pylint: disable=g-import-not-at-top
  from tff_feddst import training  # pylint: disable=g-import-not-at-top

  config = ExperimentConfig(
      data_dir=small_fashion_mnist,
      algorithm="feddst", mask_block="1x4", conv_block="kernel", total_clients=20,
      clients_per_round=3, local_epochs=1, rounds=2, eval_every=2,
      rounds_between_readjustments=1, readjustment_end_round=3, seed=4,
      export_tflite=True, output_dir=str(tmp_path / "run"),
  )
  training.run_experiment(config, log=lambda line: None)
  with open(tmp_path / "run" / "summary.json") as f:
    summary = json.load(f)
  assert summary["layer_budgets"]["conv1"] == 25 * 8
  assert summary["layer_budgets"]["conv2"] == 25 * 15
  model = tf.keras.models.load_model(tmp_path / "run" / "final_model.keras")
  for name, budget in (("conv1", 8), ("conv2", 15)):
    kept = np.abs(model.get_layer(name).kernel.numpy()).sum(axis=(0, 1)) > 0
    assert kept.sum() <= budget
    assert kept.sum() >= budget - 1  # a regrown filter may still be all zero

  # A mask: a bit per filter of conv1 and conv2, per 1x4 block of dense1,
  # per weight of logits, each layer's in whole bytes: 16 + 200 + 64,000 + 504.
  with open(tmp_path / "run" / "metrics.csv") as f:
    rows = list(csv.DictReader(f))
  values = 32 * (sum(summary["layer_budgets"].values()) + summary["num_unmasked"])
  assert [int(r["round_upload_bits"]) for r in rows] == [
      3 * values + int(r["clients_mask_uploaded"]) * 64_720 for r in rows
  ]

  report = summary["tflite"]
  convs = {row["layer"]: row for row in report["pair_sparse_convs"]}
  assert convs["conv2"]["rewritten"] and convs["conv2"]["kept_pairs"] <= 15
  with open(tmp_path / "run" / "model.tflite", "rb") as f:
    content = f.read()
  assert "DEPTHWISE_CONV_2D" in inspect_model.operators(content)
  x = np.random.default_rng(0).random((64, 28, 28, 1), np.float32)
  np.testing.assert_allclose(
      tfl_eval.predict_logits(content, x), model(x).numpy(), atol=1e-5, rtol=1e-5
  )

  retimed = subprocess.run(
      [sys.executable, "-m", "benchmarks.retime_runs", f"--runs_dir={tmp_path}", "--latency_examples=5"],
      cwd=REPO, capture_output=True, text=True, timeout=300,
  )
  assert retimed.returncode == 0, retimed.stderr[-3000:]
  with open(tmp_path / "latency_quiet" / "run.json") as f:
    again = json.load(f)
  assert again["pair_sparse_convs"] == report["pair_sparse_convs"]
  assert again["exports"]["sparse"]["batch1_latency_num_examples"] == 5
  evaluated = [float(r["clients_accuracy"]) for r in rows if r["clients_accuracy"]]
  mean = sum(evaluated[-4:]) / len(evaluated[-4:])
  lines = (tmp_path / "latency_quiet" / "retimed.md").read_text().splitlines()
  assert lines[2].startswith(
      f"| run | {evaluated[-1]:.4f} ({mean:.4f}) | {again['exports']['sparse']['size_bytes']:,} |"
  )
  assert lines[2].endswith("| conv2 |") and "run:" in retimed.stdout


RESULTS = os.path.join(REPO, "docs", "benchmarks", "kernel_blocks")


def test_committed_kernel_block_runs_and_their_quiet_timings():
  """docs/benchmarks/kernel_blocks: the README's runs. Kernel-block runs
  keep conv1 and conv2 in 8 and 15 whole filters and their sparse exports
  run conv2 over its kept pairs; the others never; retimed.md is the
  table `benchmarks.retime_runs` makes of the committed files."""
  from benchmarks import retime_runs  # pylint: disable=g-import-not-at-top

  names = sorted(n for n in os.listdir(RESULTS) if n != "latency_quiet")
  assert len(names) == 20
  rows = []
  for name in names:
    with open(os.path.join(RESULTS, name, "config.json")) as f:
      config = json.load(f)
    with open(os.path.join(RESULTS, name, "summary.json")) as f:
      summary = json.load(f)
    with open(os.path.join(RESULTS, "latency_quiet", f"{name}.json")) as f:
      quiet = json.load(f)
    kernel = name.startswith("kernel_")
    assert config["conv_block"] == ("kernel" if kernel else "none")
    assert (config["rounds"], config["sparsity"], config["algorithm"]) == (100, 0.8, "feddst")
    budgets = summary["layer_budgets"]
    assert (budgets["conv1"], budgets["conv2"]) == ((200, 375) if kernel else (208, 396))
    rewritten = [c["layer"] for c in quiet["pair_sparse_convs"] if c["rewritten"]]
    assert rewritten == (["conv2"] if kernel else [])
    # The quiet export is the run's own model: the same accuracy.
    assert quiet["keras"]["accuracy"] == summary["tflite"]["keras"]["accuracy"]
    rows.append(retime_runs.row(name, os.path.join(RESULTS, name), quiet, 4))
  with open(os.path.join(RESULTS, "latency_quiet", "retimed.md")) as f:
    assert f.read() == retime_runs.table(rows, 4) + "\n"
