"""PruneFL's parts (docs/algorithms.md section 4.2): the mask by g^2 / t, the
measured cost per kept weight, a client's local round, the initial pruning.

The masks are worked out by hand on small arrays; the local round's
gradients and weights in numpy (float64) from the softmax cross-entropy's
gradient and the client optimizer's rule written out.
"""

import collections
import functools
import json

import numpy as np
import pytest
import tensorflow as tf

import keras_models
from tff_feddst import optimizers
from tff_feddst import prunefl
from tff_feddst import sparse_model

# Compares training results within tolerances: also run under another
# instruction set (`make test`; see the marker in pyproject.toml).
pytestmark = pytest.mark.portability


def test_masks_keep_the_largest_g2_over_t_of_the_whole_network():
  g1 = np.array([[1.0, -2.0], [0.5, 3.0]])  # t = 4: scores 0.25, 1, 0.0625, 2.25
  g2 = np.array([0.3, -1.0, 2.0])  # t = 1: scores 0.09, 1, 4
  got = prunefl.select_masks([g1, g2], [4.0, 1.0], 3)
  # 4 and 2.25, then the tie at 1 goes to the lower position (layer 1).
  np.testing.assert_array_equal(got[0], [[0, 1], [0, 1]])
  np.testing.assert_array_equal(got[1], [0, 0, 1])
  got = prunefl.select_masks([g1, g2], [4.0, 1.0], 4)
  np.testing.assert_array_equal(got[0], [[0, 1], [0, 1]])
  np.testing.assert_array_equal(got[1], [0, 1, 1])
  # The cost moves weights between layers: at t = 1 for both, layer 1's 2
  # and 3 outrank layer 2's 1.
  got = prunefl.select_masks([g1, g2], [1.0, 1.0], 3)
  np.testing.assert_array_equal(got[0], [[0, 1], [0, 1]])
  np.testing.assert_array_equal(got[1], [0, 0, 1])
  got = prunefl.select_masks([g1, g2], [1.0, 1.0], 4)
  np.testing.assert_array_equal(got[0], [[1, 1], [0, 1]])
  np.testing.assert_array_equal(got[1], [0, 0, 1])
  assert [m.sum() for m in prunefl.select_masks([g1, g2], [4.0, 1.0], 0)] == [0, 0]
  assert [m.sum() for m in prunefl.select_masks([g1, g2], [4.0, 1.0], 7)] == [4, 3]
  with pytest.raises(ValueError, match="cannot keep 8 of 7"):
    prunefl.select_masks([g1, g2], [4.0, 1.0], 8)


def test_the_cost_per_weight_is_the_fitted_slope():
  kept = ((100, 75, 50, 25), (400, 300, 200, 100), (10, 8, 5, 2))
  seconds = (
      tuple(1e-3 + 2e-6 * k for k in kept[0]),
      tuple(5e-4 + 3e-7 * k for k in kept[1]),
      (2e-4, 2.1e-4, 2.2e-4, 2.3e-4),  # the fixed cost hides the size
  )
  costs = prunefl.LayerCosts(
      ("a", "b", "c"), (100, 400, 10), 32, (1.0, 0.75, 0.5, 0.25), kept, seconds
  )
  (fixed_a, slope_a), (fixed_b, slope_b), (_, slope_c) = costs.fits
  assert fixed_a == pytest.approx(1e-3) and slope_a == pytest.approx(2e-6)
  assert fixed_b == pytest.approx(5e-4) and slope_b == pytest.approx(3e-7)
  assert slope_c < 0
  assert costs.per_weight == pytest.approx((2e-6, 3e-7, 3e-7))
  again = prunefl.LayerCosts.from_json(json.loads(json.dumps(costs.to_json())))
  assert again == costs
  assert costs.to_json()["per_weight_seconds"] == pytest.approx([2e-6, 3e-7, 3e-7])


def test_measured_costs_cover_every_layer_and_density():
  keras_fn = functools.partial(
      keras_models.build_model, "mnist_cnn", (28, 28, 1), 10,
      widths={"conv1": 4, "conv2": 8, "dense1": 16},
  )
  x = np.random.default_rng(0).random((8, 28, 28, 1), np.float32)
  costs = prunefl.measure_layer_costs(keras_fn, x, repeats=3)
  assert costs.layer_names == ("conv1", "conv2", "dense1", "logits")
  assert costs.num_weights == (5 * 5 * 1 * 4, 5 * 5 * 4 * 8, 16 * 16 * 8 * 16, 16 * 10)
  assert costs.batch_size == 8
  # Density d keeps round(d * units) output units of the layer.
  assert costs.kept[0] == (100, 75, 50, 25)
  assert costs.kept[3] == (160, 128, 80, 32)  # 8 and 2 of 10 (half to even)
  for kept, num in zip(costs.kept, costs.num_weights):
    assert kept[0] == num and list(kept) == sorted(kept, reverse=True)
  assert all(s > 0 for row in costs.seconds for s in row)
  assert all(0 < t < 1 and np.isfinite(t) for t in costs.per_weight)


def _softmax_regression():
  tf.keras.utils.set_random_seed(1)
  inputs = tf.keras.Input((4,))
  model = tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="dense")(inputs))
  rng = np.random.default_rng(2)
  model.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
  return model


def test_a_local_round_is_the_clients_sgd_and_averages_its_gradients():
  lr, momentum, wd = 0.1, 0.9, 0.01
  rng = np.random.default_rng(3)
  x = rng.normal(size=(5, 4)).astype(np.float32)
  y = rng.integers(0, 3, 5).astype(np.int32)
  batches = [(x[:3], y[:3]), (x[3:], y[3:]), (x[:2], y[:2])]
  dataset = [collections.OrderedDict(x=tf.constant(bx), y=tf.constant(by)) for bx, by in batches]
  model = _softmax_regression()
  w, b = (np.asarray(v, np.float64) for v in model.get_weights())
  velocity = [np.zeros_like(w), np.zeros_like(b)]
  kernel_grads = []
  for bx, by in batches:
    logits = bx @ w + b
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    d = (p - np.eye(3)[by]) / len(by)
    gw, gb = bx.T @ d, d.sum(axis=0)
    kernel_grads.append(gw)
    for i, (param, grad) in enumerate(((w, gw), (b, gb))):
      velocity[i] = momentum * velocity[i] + grad + wd * param
    w, b = w - lr * velocity[0], b - lr * velocity[1]

  mean, steps = prunefl.local_round(model, optimizers.build_sgdw(lr, momentum, wd), dataset, [0])
  assert steps == 3
  np.testing.assert_allclose(mean[0], np.mean(kernel_grads, axis=0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(model.get_weights()[0], w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.get_weights()[1], b, rtol=1e-5, atol=1e-6)


def test_the_initial_pruning_keeps_the_budget_of_one_clients_trained_model(
    fashion_mnist_available,
):
  from tff_feddst import data as data_lib  # pylint: disable=g-import-not-at-top

  fed = data_lib.load_federated_data("fashion_mnist", "pathological", total_clients=40, seed=3)
  keras_fn = functools.partial(
      keras_models.build_model, "mnist_cnn", (28, 28, 1), 10,
      widths={"conv1": 4, "conv2": 8, "dense1": 16},
  )
  layout = sparse_model.build_layout(sparse_model.wrap_prunable(keras_fn()), 0.8, "erk")
  per_weight = (1e-6, 1e-7, 1e-9, 1e-9)
  optimizer = optimizers.build_sgdw(0.01, 0.9, 0.001)
  pruning = prunefl.prune_on_one_client(
      keras_fn, 5, fed, layout, optimizer, local_rounds=2, batch_size=32,
      local_epochs=1, per_weight=per_weight,
  )
  assert pruning.client_id == prunefl.initial_client(fed, 5)
  assert pruning.client_id in fed.nonempty_train_client_ids
  assert pruning.steps == -(-fed.num_train_examples(pruning.client_id) // 32)
  assert sum(int(m.sum()) for m in pruning.masks) == layout.num_kept
  want = prunefl.select_masks(pruning.gradients, per_weight, layout.num_kept)
  for got, expected in zip(pruning.masks, want):
    np.testing.assert_array_equal(got, expected)
  # The client trained: its weights moved from the seeded initial ones.
  start = sparse_model.initial_model_weights(keras_fn, 5, None).trainable
  assert not np.allclose(pruning.trained[0], start[0])

  weights = prunefl.initial_weights(keras_fn, 5, layout, pruning)
  for slot, mask in enumerate(pruning.masks):
    kernel = weights.trainable[layout.kernel_index[slot]]
    np.testing.assert_array_equal(weights.non_trainable[layout.mask_index[slot]], mask)
    np.testing.assert_array_equal(kernel, pruning.trained[layout.kernel_index[slot]] * mask)
  # Biases are the client's, unmasked.
  np.testing.assert_array_equal(weights.trainable[1], pruning.trained[1])
