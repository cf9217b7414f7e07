"""The public experiment code's schedule options (docs/algorithms.md section 3.6).

- `--readjustment_schedule=constant`: alpha_r = alpha up to R_end;
- `--final_sparsity`: per-round budgets moving linearly from S to S_final,
  followed by the server's re-prune, the validation of updates and the
  ledger's bits (a short real run, resumed from a checkpoint);
- `--remember_old`: the finalizer keeps the previous value of positions no
  client voted for;
- their checks in `ExperimentConfig.resolve()`.
"""

import collections
import csv
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tff_feddst import client_work
from tff_feddst import finalizer as finalizer_lib
from tff_feddst import masks
from tff_feddst import sparse_model
from tff_feddst import training
from tff_feddst.config import ConfigError, ExperimentConfig

# No `portability` marker: budgets and bits are exact, and the resumed run
# is compared with the same process's uninterrupted one (exactly).


def test_constant_schedule_is_alpha_until_r_end():
  for r in range(0, 12):
    want = 0.05 if r < 7 else 0.0
    assert masks.readjustment_ratio(r, 0.05, 7, "constant") == want
    assert float(masks.readjustment_ratio(tf.constant(r), 0.05, 7, "constant")) == pytest.approx(want)
  got = [r for r in range(1, 30) if masks.is_readjustment_round(r, 0.05, 4, 20, "constant")]
  assert got == [1, 5, 9, 13, 17]
  with pytest.raises(ValueError):
    masks.readjustment_ratio(1, 0.05, 7, "linear")


def test_budget_table_moves_linearly_to_the_final_sparsity():
  shapes = [(5, 5, 1, 10), (40, 25)]  # 250 and 1000 weights
  table = masks.budget_table(shapes, 0.5, 0.9, 4, "uniform")
  # Rounds 1..5: S_r = 0.5, 0.6, 0.7, 0.8, 0.9; budget = floor((1 - S_r) size).
  assert table == [[125, 500], [100, 400], [75, 300], [50, 200], [25, 100]]
  assert [masks.round_sparsity(r, 0.5, 0.9, 4) for r in (1, 3, 5, 9)] == pytest.approx([0.5, 0.7, 0.9, 0.9])
  assert masks.budget_table(shapes, 0.5, 0.5, 4, "uniform") == [[125, 500]]
  rows = [client_work.round_budgets(table, r).numpy().tolist() for r in (1, 2, 5, 6, 40)]
  assert rows == [[125, 500], [100, 400], [25, 100], [25, 100], [25, 100]]


# The MNIST network's kernels (250, 5000, 256000, 500 weights) and biases.
SIZES, NUM_BIASES = (250, 5000, 256000, 500), 90
# A mask message: each layer's bits packed into whole bytes (250 -> 256, 500 -> 504).
MASK_BITS = 256 + 5000 + 256000 + 504
# Uniform budgets floor((1 - S_r) size) at S_r = 0.5, 0.6, 0.7 (R_end = 2).
KEPT = {1: 130875, 2: 104700, 3: 78525}


def _rows(path):
  with open(path, newline="") as f:
    return [{k: v for k, v in r.items() if k != "round_seconds"} for r in csv.DictReader(f)]


def test_gradual_sparsification_budgets_bits_and_resume(tmp_path, small_fashion_mnist):
  assert sum(int((1 - 0.6) * s + 1e-9) for s in SIZES) == KEPT[2]
  config = ExperimentConfig(
      data_dir=small_fashion_mnist,  # the first Fashion-MNIST images (conftest)
      algorithm="randommask", client_execution="per_client", sparsity=0.5, final_sparsity=0.7,
      sparsity_distribution="uniform", total_clients=4, clients_per_round=4, local_epochs=1,
      rounds=3, readjustment_end_round=2, eval_every=3, checkpoint_every=2,
      output_dir=str(tmp_path / "run"),
  )
  summary = training.run_experiment(config, log=lambda line: None)
  rows = _rows(tmp_path / "run" / "metrics.csv")
  n = sum(SIZES)
  for row in rows:
    r = int(row["round"])
    # Every client holds the round's budget; none is over it.
    assert int(row["rejected_clients"]) == 0
    assert int(row["round_upload_bits"]) == 4 * 32 * (KEPT[r] + NUM_BIASES)
    # New clients (round 1), then a mask changed by every re-prune: sent each round.
    assert int(row["round_download_bits"]) == 4 * (32 * (KEPT[r] + NUM_BIASES) + MASK_BITS)
    # After round r's re-prune the global mask holds the budget of round r + 1.
    assert float(row["sparsity"]) == pytest.approx(1 - KEPT[min(r + 1, 3)] / n, abs=1e-12)
  assert summary["final_sparsity"] == pytest.approx(1 - KEPT[3] / n)
  # Resume from round 2: the per-round budgets go on from the restored counters.
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "round_3")
  os.remove(tmp_path / "run" / "summary.json")
  training.run_experiment(config, log=lambda line: None)
  assert _rows(tmp_path / "run" / "metrics.csv") == rows


def _tiny_keras():
  inputs = tf.keras.Input((3,))
  hidden = tf.keras.layers.Dense(4, name="d1")(inputs)
  return tf.keras.Model(inputs, tf.keras.layers.Dense(2, name="d2")(hidden))


def _finalize(remember_old):
  """The finalizer on hand-made global weights and voted average (layer d1 below)."""
  spec = collections.OrderedDict(
      x=tf.TensorSpec([None, 3], tf.float32), y=tf.TensorSpec([None], tf.int32)
  )
  layout = sparse_model.build_layout(sparse_model.wrap_prunable(_tiny_keras()), 0.5, "uniform")
  assert layout.budgets == (6, 4)
  _, weights_type, _ = client_work.model_types(
      sparse_model.make_model_fn(_tiny_keras, spec, wrapped=True)
  )
  weights = sparse_model.initial_model_weights(_tiny_keras, 0, layout)
  trainable, non_trainable = list(weights.trainable), list(weights.non_trainable)
  # Global d1: mask on flat positions 0-5 with these values.
  old = np.zeros(12, np.float32)
  old[:6] = [5.0, -4.0, 0.1, 3.0, 0.2, 6.0]
  trainable[layout.kernel_index[0]] = old.reshape(3, 4)
  non_trainable[layout.mask_index[0]] = (old != 0).astype(np.float32).reshape(3, 4)
  # The voted average: votes at 0, 2, 6, 7, 8 only (none at 1, 3, 4, 5).
  values = [np.asarray(t, np.float32) for t in trainable]
  shares = [np.float32(1.0) for _ in trainable]
  value, share = np.zeros(12, np.float32), np.zeros(12, np.float32)
  for position, v, s in [(0, 1.0, 0.5), (2, 0.3, 1.0), (6, 0.05, 0.5), (7, -2.0, 0.5), (8, 0.0, 0.5)]:
    value[position], share[position] = v, s
  values[layout.kernel_index[0]] = value.reshape(3, 4)
  shares[layout.kernel_index[0]] = share.reshape(3, 4)
  # d2: every position voted (nothing to remember); budget 4 of 8.
  d2 = np.array([[0.5, -0.1], [0.9, 0.2], [-0.7, 0.05], [0.3, -0.6]], np.float32)
  values[layout.kernel_index[1]] = d2
  shares[layout.kernel_index[1]] = np.ones_like(d2)
  update = collections.OrderedDict(values=values, masks=shares)
  update_type = tff.types.tensorflow_to_type(collections.OrderedDict(
      values=[tf.TensorSpec(np.shape(v), tf.float32) for v in values],
      masks=[tf.TensorSpec(np.shape(m), tf.float32) for m in shares],
  ))
  process = finalizer_lib.build_sparse_finalizer(
      weights_type, update_type, layout, remember_old=remember_old
  )
  out = process.next(
      process.initialize(), tff.learning.models.ModelWeights(trainable, non_trainable), update
  )
  kernel = np.asarray(out.result.trainable[layout.kernel_index[0]]).ravel()
  mask = np.asarray(out.result.non_trainable[layout.mask_index[0]]).ravel()
  d2_mask = np.asarray(out.result.non_trainable[layout.mask_index[1]])
  np.testing.assert_array_equal(d2_mask, [[1, 0], [1, 0], [1, 0], [0, 1]])
  return kernel, mask


def test_remember_old_keeps_unvoted_positions_of_the_global_mask():
  kernel, mask = _finalize(remember_old=True)
  # Candidates: voted 0:1.0, 2:0.3, 6:0.05, 7:-2, 8:0 and remembered
  # 1:-4, 3:3, 4:0.2, 5:6; the 6 largest |value| are 5, 1, 3, 7, 0, 2.
  want = np.zeros(12, np.float32)
  want[[0, 1, 2, 3, 5, 7]] = [1.0, -4.0, 0.3, 3.0, 6.0, -2.0]
  np.testing.assert_array_equal(kernel, want)
  np.testing.assert_array_equal(mask, want != 0)


def test_without_remember_old_unvoted_positions_are_dropped():
  kernel, mask = _finalize(remember_old=False)
  # Only the 5 voted positions have support (fewer than the budget 6): all kept.
  want_mask = np.zeros(12, np.float32)
  want_mask[[0, 2, 6, 7, 8]] = 1
  np.testing.assert_array_equal(mask, want_mask)
  want = np.zeros(12, np.float32)
  want[[0, 2, 6, 7]] = [1.0, 0.3, 0.05, -2.0]
  np.testing.assert_array_equal(kernel, want)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(final_sparsity=0.7), "--final_sparsity=0.7 must not be below --sparsity=0.8"),
        (dict(final_sparsity=1.0), "--final_sparsity=1.0 must be in [0, 1)"),
        (dict(algorithm="fedavg", final_sparsity=0.9), "--final_sparsity=0.9 needs a sparse algorithm"),
        (dict(rounds=1, final_sparsity=0.9), "needs --readjustment_end_round >= 1"),
        (dict(algorithm="fedprox", remember_old=True), "--remember_old needs a sparse algorithm"),
        (dict(readjustment_schedule="linear"), "--readjustment_schedule=linear is not one of cosine, constant"),
    ],
)
def test_bad_schedule_settings_are_one_line_errors(settings, message):
  with pytest.raises(ConfigError) as error:
    ExperimentConfig(**settings).resolve()
  assert message in str(error.value)
  assert "\n" not in str(error.value)


def test_schedule_settings_resolve():
  config = ExperimentConfig(algorithm="snip", rounds=10).resolve()
  assert (config.final_sparsity, config.readjustment_schedule, config.remember_old) == (0.8, "cosine", False)
  assert ExperimentConfig(algorithm="fedavg").resolve().final_sparsity == 0.0
  # A run saved before these settings existed resumes as the same experiment.
  saved = {k: v for k, v in config.__dict__.items()
           if k not in ("final_sparsity", "readjustment_schedule", "remember_old")}
  assert config.differences_from(saved) == []
  assert config.differences_from({**saved, "final_sparsity": 0.9}) == ["--final_sparsity=0.8 (was 0.9)"]
