"""LotteryFL's client rule (docs/algorithms.md section 4.3), by hand and
TensorFlow against the numpy reference."""

import numpy as np
import pytest
import tensorflow as tf

from tff_feddst import lotteryfl


def test_each_layer_prunes_its_rate_of_what_it_keeps_down_to_its_budget():
  # round(0.2 * 100) = 20; 10 is at its budget; round(1.4) = 1; round(6.4) = 6.
  assert lotteryfl.pruned_counts([100, 10, 7, 32], [30, 10, 2, 30], 0.2) == [80, 10, 6, 30]
  assert lotteryfl.pruned_counts([5], [0], 0.5) == [3]  # round(2.5) = 2, half to even
  assert lotteryfl.should_prune(0.5, [100, 10], [30, 10], 0.5)
  assert not lotteryfl.should_prune(0.49, [100, 10], [30, 10], 0.5)
  assert not lotteryfl.should_prune(0.9, [30, 10], [30, 10], 0.5)  # at the target


def test_pruning_keeps_the_largest_kept_magnitudes():
  w = np.array([0.5, -3.0, 9.0, 2.0, -2.0, 1.0])
  mask = np.array([1, 1, 0, 1, 1, 1], np.float32)  # 9.0 is not kept: it cannot come back
  np.testing.assert_array_equal(lotteryfl.prune_np(w, mask, 3), [0, 1, 0, 1, 1, 0])
  np.testing.assert_array_equal(lotteryfl.prune_np(w, mask, 2), [0, 1, 0, 1, 0, 0])  # tie: lower
  np.testing.assert_array_equal(lotteryfl.prune_np(w, mask, 9), mask)


def test_a_client_resets_to_the_initial_weights_only_when_it_prunes():
  theta = [np.array([[1.0, -4.0], [0.5, 3.0]]), np.array([0.1, 0.2]), np.array([2.0, -1.0])]
  theta0 = [np.array([[9.0, 8.0], [7.0, 6.0]]), np.array([0.0, 0.0]), np.array([5.0, 4.0])]
  masks = [np.ones((2, 2), np.float32), np.ones(2, np.float32)]
  kernel_index = (0, 2)
  budgets = [2, 1]
  # Accuracy below the threshold: theta under the mask, nothing pruned.
  start, new, pruned = lotteryfl.client_start_np(
      theta, masks, theta0, kernel_index, 0.3, budgets, 0.5, 0.5
  )
  assert not pruned
  np.testing.assert_array_equal(start[0], theta[0])
  np.testing.assert_array_equal(new[0], masks[0])
  # Above it: layer 1 keeps 2 of 4 (|-4| and |3|), layer 2 keeps 1 of 2 (|2|);
  # the kept weights restart from theta0, the biases too.
  start, new, pruned = lotteryfl.client_start_np(
      theta, masks, theta0, kernel_index, 0.6, budgets, 0.5, 0.5
  )
  assert pruned
  np.testing.assert_array_equal(new[0], [[0, 1], [0, 1]])
  np.testing.assert_array_equal(new[1], [1, 0])
  np.testing.assert_array_equal(start[0], [[0, 8.0], [0, 6.0]])
  np.testing.assert_array_equal(start[1], theta0[1])
  np.testing.assert_array_equal(start[2], [5.0, 0.0])


@pytest.mark.parametrize("accuracy", [0.2, 0.8])
@pytest.mark.parametrize("seed", range(3))
def test_tensorflow_follows_the_numpy_rule(seed, accuracy):
  rng = np.random.default_rng(seed)
  shapes = [(3, 4), (4,), (4, 5), (5,)]
  kernel_index = (0, 2)
  theta = [rng.normal(size=s).astype(np.float32) for s in shapes]
  theta0 = [rng.normal(size=s).astype(np.float32) for s in shapes]
  masks = [(rng.random(shapes[i]) < 0.7).astype(np.float32) for i in kernel_index]
  # Layer 2 is at its budget in seed 0; the others are above theirs.
  budgets = [int(m.sum()) - int(rng.integers(1, 4)) for m in masks]
  budgets[1] += 3 if seed == 0 else 0
  budgets = [max(b, 1) for b in budgets]
  want = lotteryfl.client_start_np(theta, masks, theta0, kernel_index, accuracy, budgets, 0.5, 0.3)
  got = lotteryfl.client_start(
      [tf.constant(w) for w in theta], [tf.constant(m) for m in masks],
      [tf.constant(w) for w in theta0], kernel_index, tf.constant(accuracy), budgets, 0.5, 0.3,
  )
  assert bool(got[2]) == want[2] == (accuracy > 0.5)
  for a, b in zip(got[0], want[0]):
    np.testing.assert_array_equal(a.numpy(), b)
  for a, b in zip(got[1], want[1]):
    np.testing.assert_array_equal(a.numpy(), b)
