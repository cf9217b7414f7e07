"""SNIP and GraSP (docs/algorithms.md section 4.1): scores and masks.

On a two-layer network the scores are worked out independently in numpy
(float64): the gradient of the mean cross-entropy by hand, and GraSP's
Hessian-vector product H g as the central difference of that gradient along
g. A short run of each algorithm checks that its fixed mask is the one
chosen from the seeded client's mini-batch, at the layers' budgets.
"""

import csv

import numpy as np
import pytest
import tensorflow as tf

import keras_models
from tff_feddst import pruning_init
from tff_feddst import sparse_model
from tff_feddst import training
from tff_feddst.config import ExperimentConfig

# Compares training results within tolerances: also run under another
# instruction set (`make test`; see the marker in pyproject.toml).
pytestmark = pytest.mark.portability

IN, HIDDEN, CLASSES, BATCH = 6, 5, 3, 8


def _two_layer_net():
  tf.keras.utils.set_random_seed(3)
  inputs = tf.keras.Input((IN,))
  hidden = tf.keras.layers.Dense(HIDDEN, activation="relu", name="dense1")(inputs)
  logits = tf.keras.layers.Dense(CLASSES, name="dense2")(hidden)
  model = tf.keras.Model(inputs, logits)
  rng = np.random.default_rng(4)
  model.set_weights([rng.normal(0, 0.7, w.shape).astype(np.float32) for w in model.get_weights()])
  x = rng.normal(size=(BATCH, IN)).astype(np.float32)
  y = rng.integers(0, CLASSES, BATCH).astype(np.int32)
  return model, x, y


def _numpy_gradient(params, x, y, temperature):
  """d/d(W1, W2) of mean CE(softmax((relu(x W1 + b1) W2 + b2) / T)), float64."""
  w1, b1, w2, b2 = params
  z1 = x @ w1 + b1
  a1 = np.maximum(z1, 0.0)
  logits = (a1 @ w2 + b2) / temperature
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  d_logits = (p - np.eye(CLASSES)[y]) / len(y) / temperature
  g2 = a1.T @ d_logits
  d_z1 = (d_logits @ w2.T) * (z1 > 0)
  g1 = x.T @ d_z1
  return [g1, g2]


def _params(model):
  return [np.asarray(w, np.float64) for w in model.get_weights()]


def test_snip_scores_and_masks_match_numpy():
  model, x, y = _two_layer_net()
  params = _params(model)
  g1, g2 = _numpy_gradient(params, x.astype(np.float64), y, 1.0)
  want = [np.abs(g1 * params[0]), np.abs(g2 * params[2])]
  got = pruning_init.snip_scores(model, x, y)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
  budgets = (9, 4)
  masks = pruning_init.SNIP.masks(model, x, y, budgets)
  for mask, scores, k in zip(masks, want, budgets):
    assert mask.sum() == k
    # Kept: the k largest |g w|.
    threshold = np.sort(scores.ravel())[-k]
    np.testing.assert_array_equal(mask, (scores >= threshold).astype(np.float32))


def test_grasp_scores_and_masks_match_numpy_hessian_vector_product():
  model, x, y = _two_layer_net()
  params = _params(model)
  x64, temperature = x.astype(np.float64), pruning_init.GRASP_TEMPERATURE
  g = _numpy_gradient(params, x64, y, temperature)
  # H g: the change of the kernels' gradient along g (biases held fixed).
  eps = 1e-3 / max(np.abs(v).max() for v in g)
  def shifted(sign):
    moved = [params[0] + sign * eps * g[0], params[1], params[2] + sign * eps * g[1], params[3]]
    return _numpy_gradient(moved, x64, y, temperature)
  plus, minus = shifted(1.0), shifted(-1.0)
  hg = [(p - m) / (2 * eps) for p, m in zip(plus, minus)]
  want = [-params[0] * hg[0], -params[2] * hg[1]]
  got = pruning_init.grasp_scores(model, x, y)
  for a, b in zip(got, want):
    scale = np.abs(b).max()
    np.testing.assert_allclose(a / scale, b / scale, atol=2e-4)
  budgets = (9, 4)
  masks = pruning_init.GRASP.masks(model, x, y, budgets)
  for mask, scores, k in zip(masks, want, budgets):
    assert mask.sum() == k
    # Kept: the k smallest -w (H g), i.e. the largest w (H g).
    threshold = np.sort(scores.ravel())[k - 1]
    np.testing.assert_array_equal(mask, (scores <= threshold).astype(np.float32))


def test_best_mask_breaks_ties_towards_the_lower_index():
  scores = np.array([[1.0, 3.0, 3.0], [0.5, 3.0, -2.0]])
  np.testing.assert_array_equal(
      pruning_init.best_mask(scores, 2, largest=True), [[0, 1, 1], [0, 0, 0]]
  )
  np.testing.assert_array_equal(
      pruning_init.best_mask(scores, 2, largest=False), [[0, 0, 0], [1, 0, 1]]
  )


def _chosen_and_random_masks(config, summary, criterion):
  """(the criterion's masks from the run's seeded scoring batch, the random
  ERK masks a run of the same seed starts from, the layers' budgets) of a
  finished run at S = 0.9."""
  context = training.load_context(config, log=lambda line: None)
  _, x, y = pruning_init.scoring_batch(context.fed_data, config.seed, config.batch_size)
  data = context.fed_data

  def keras_fn():
    return keras_models.build_model(config.model_name, data.input_shape, data.num_classes)

  tf.keras.utils.set_random_seed(config.seed)
  budgets = list(summary["layer_budgets"].values())
  chosen = criterion.masks(keras_fn(), x, y, budgets)
  layout = sparse_model.build_layout(sparse_model.wrap_prunable(keras_fn()), 0.9, "erk")
  assert list(layout.budgets) == budgets
  _, random_masks = sparse_model.kernels_and_masks(
      sparse_model.initial_model_weights(keras_fn, config.seed, layout), layout
  )
  return chosen, random_masks, budgets


@pytest.mark.parametrize(
    "algorithm, criterion, execution",
    [("snip", pruning_init.SNIP, "cohort"), ("grasp", pruning_init.GRASP, "per_client")],
)
def test_run_trains_under_the_mask_chosen_at_initialisation(
    tmp_path, small_fashion_mnist, algorithm, criterion, execution
):
  config = ExperimentConfig(
      data_dir=small_fashion_mnist,  # the first Fashion-MNIST images (conftest)
      algorithm=algorithm, client_execution=execution, total_clients=10, clients_per_round=3,
      local_epochs=1, rounds=2, eval_every=2, sparsity=0.9, output_dir=str(tmp_path / "run"),
  ).resolve()
  summary = training.run_experiment(config, log=lambda line: None)
  # The expected mask, from the same seeded client's first batch.
  want, random_masks, budgets = _chosen_and_random_masks(config, summary, criterion)
  final = tf.keras.models.load_model(tmp_path / "run" / "final_model.keras")
  kernels = [layer.kernel.numpy() for layer in final.layers if hasattr(layer, "kernel")]
  for kernel, mask, k in zip(kernels, want, budgets):
    assert mask.sum() == k
    assert np.all(kernel[mask == 0] == 0)  # trained under the fixed mask
    assert np.count_nonzero(kernel) > 0.9 * k
  assert not any(np.array_equal(m, r) for m, r in zip(want, random_masks) if m.mean() < 1)
  with open(tmp_path / "run" / "metrics.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  assert [int(r["clients_mask_uploaded"]) for r in rows] == [0, 0]
  assert [int(r["rejected_clients"]) for r in rows] == [0, 0]


def test_feddst_snip_starts_from_snips_mask_and_readjusts_it(tmp_path, small_fashion_mnist):
  """FedDST from SNIP's mask: one readjusting round (alpha 0.2) keeps most
  of SNIP's mask (each client swaps a fifth of it, and the server keeps
  the best-voted positions), far more than the random ERK mask a FedDST
  run of the same seed starts from shares with it; its clients send new
  masks, and none is rejected."""
  config = ExperimentConfig(
      data_dir=small_fashion_mnist,  # the first Fashion-MNIST images (conftest)
      algorithm="feddst_snip", total_clients=10, clients_per_round=3, local_epochs=1,
      rounds=1, eval_every=1, sparsity=0.9, readjustment_ratio=0.2,
      rounds_between_readjustments=1, readjustment_end_round=3,
      output_dir=str(tmp_path / "run"),
  ).resolve()
  summary = training.run_experiment(config, log=lambda line: None)
  with open(tmp_path / "run" / "metrics.csv", newline="") as f:
    (row,) = list(csv.DictReader(f))
  assert int(row["clients_mask_uploaded"]) == 3 and int(row["rejected_clients"]) == 0
  # SNIP's mask from the same seeded client's first batch, and the random one.
  snip, random, budgets = _chosen_and_random_masks(config, summary, pruning_init.SNIP)
  final = tf.keras.models.load_model(tmp_path / "run" / "final_model.keras")
  kernels = [layer.kernel.numpy() for layer in final.layers if hasattr(layer, "kernel")]
  shared_final = shared_random = total = 0
  for kernel, want, rand, k in zip(kernels, snip, random, budgets):
    if k == kernel.size:
      continue
    kept = kernel != 0
    assert kept.sum() <= k
    assert (kept & (want > 0)).sum() >= 0.75 * k
    shared_final += (kept & (want > 0)).sum()
    shared_random += (rand * want).sum()
    total += k
  # The random mask shares about the layers' densities with SNIP's.
  assert shared_random < 0.3 * total < 0.75 * total <= shared_final
