"""Mask arithmetic of FedDST (docs/algorithms.md sections 2 and 3).

Expected values are derived independently of `tff_feddst.masks`: budgets
from an exact rational re-implementation of RigL's ERK-with-capping rule
(and one case by hand), masks from hand-written examples.
"""

import math
from fractions import Fraction

import numpy as np
import pytest
import tensorflow as tf

from tff_feddst import masks

MNIST_SHAPES = [(5, 5, 1, 10), (5, 5, 10, 20), (5120, 50), (50, 10)]
CIFAR10_SHAPES = [(5, 5, 3, 6), (5, 5, 6, 16), (6400, 120), (120, 84), (84, 10)]
NETWORKS = {"mnist": MNIST_SHAPES, "cifar10": CIFAR10_SHAPES}
SPARSITIES = [0.5, 0.8, 0.9, 0.98]


# ---------------------------------------------------------------------------
# Independent reference: RigL's ERK / ER with capping, in exact arithmetic.
# ---------------------------------------------------------------------------


def _size(shape):
  return math.prod(shape)


def _reference_raw(shape, distribution):
  """Unnormalised RigL density: sum of dims / product of dims (ERK).

  ER uses only (n_in, n_out) of a conv kernel; for a dense kernel ER and
  ERK coincide.
  """
  if distribution == "er" and len(shape) == 4:
    shape = shape[2:]
  return Fraction(sum(shape), _size(shape))


def reference_budgets(shapes, sparsity, distribution="erk"):
  """RigL's loop (Evci et al. 2020, sparse_utils.get_sparsities), exactly.

  In RigL's form: rhs = sum over free layers of their ones minus, over dense
  layers, their zeros; eps = rhs / sum(raw_l * size_l) over free layers; a
  layer with eps * raw_l > 1 (the largest raw) becomes dense; repeat.
  Budgets are floor(density * size), computed with Fractions so no floating
  point rounding can move a floor.
  """
  s = Fraction(str(sparsity))
  sizes = [_size(sh) for sh in shapes]
  if distribution == "uniform":
    return [math.floor((1 - s) * n) for n in sizes]
  raw = [_reference_raw(sh, distribution) for sh in shapes]
  dense = set()
  while True:
    rhs = Fraction(0)
    divisor = Fraction(0)
    for i, n in enumerate(sizes):
      if i in dense:
        rhs -= s * n  # its zeros must be found elsewhere
      else:
        rhs += (1 - s) * n
        divisor += raw[i] * n
    eps = rhs / divisor
    free_raw = [raw[i] for i in range(len(sizes)) if i not in dense]
    top = max(free_raw)
    if eps * top > 1:
      dense.update(i for i in range(len(sizes)) if i not in dense and raw[i] == top)
    else:
      break
  return [n if i in dense else math.floor(eps * raw[i] * n) for i, n in enumerate(sizes)]


def reference_capped(shapes, sparsity, distribution="erk"):
  """Indices of the layers RigL keeps dense."""
  return [
      i
      for i, (b, sh) in enumerate(zip(reference_budgets(shapes, sparsity, distribution), shapes))
      if b == _size(sh)
  ]


# ---------------------------------------------------------------------------
# Budgets.
# ---------------------------------------------------------------------------


def test_mnist_erk_budgets_at_0_8_by_hand():
  # Sizes: 250, 5000, 256000, 500 -> n = 261750; (1 - 0.8) n = 52350.
  # Raw ERK densities x size: conv1 (1+10+5+5) = 21, conv2 (10+20+5+5) = 40,
  # dense1 (5120+50) = 5170, dense2 (50+10) = 60; sum 5291.
  # eps = 52350 / 5291 = 9.894; dense2 raw 60/500 = 0.12 -> 1.187 > 1: cap.
  # Then eps = (52350 - 500) / (5291 - 60) = 51850 / 5231 = 9.912;
  # conv1 raw 21/250 = 0.084 -> 0.833 <= 1: stop.
  # conv1: floor(21 * 51850 / 5231) = floor(208.15) = 208
  # conv2: floor(40 * 51850 / 5231) = floor(396.48) = 396
  # dense1: floor(5170 * 51850 / 5231) = floor(268064500 / 5231) = 51245
  # dense2: 500 (capped, full)
  assert masks.layer_budgets(MNIST_SHAPES, 0.8, "erk") == [208, 396, 51245, 500]


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_erk_budgets_match_reference(network, sparsity):
  shapes = NETWORKS[network]
  expected = reference_budgets(shapes, sparsity, "erk")
  got = masks.layer_budgets(shapes, sparsity, "erk")
  assert got == expected
  assert all(isinstance(b, int) for b in got)


@pytest.mark.parametrize("distribution", ["erk", "er", "uniform"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_budget_invariants(network, sparsity, distribution):
  shapes = NETWORKS[network]
  sizes = [_size(s) for s in shapes]
  budgets = masks.layer_budgets(shapes, sparsity, distribution)
  target = (1 - Fraction(str(sparsity))) * sum(sizes)
  # Each layer floors once, so the total is short of the target by less than
  # one weight per layer, and never above it.
  assert target - len(shapes) < sum(budgets) <= target
  # No layer above density 1, none negative.
  for b, n in zip(budgets, sizes):
    assert 0 <= b <= n
  densities = masks.layer_densities(shapes, sparsity, distribution)
  assert all(0.0 < d <= 1.0 for d in densities)
  if distribution != "uniform":
    # Capped layers (as RigL picks them) hold exactly their size.
    for i in reference_capped(shapes, sparsity, distribution):
      assert densities[i] == 1.0
      assert budgets[i] == sizes[i]


def test_capping_happens_in_the_paper_networks():
  # CIFAR-10 at S = 0.5: raw x size = 19, 32, 6520, 204, 94 (sum 6869);
  # eps = 390885 / 6869 = 56.9 makes the last layer (raw 94/840 = 0.112)
  # 6.4 > 1, so at least that layer is capped; the loop must go on.
  budgets = masks.layer_budgets(CIFAR10_SHAPES, 0.5, "erk")
  assert budgets[4] == 84 * 10
  assert masks.layer_densities(CIFAR10_SHAPES, 0.5, "erk")[4] == 1.0
  # MNIST at S = 0.98 needs no capping: eps = 5235 / 5291 < 1 and the largest
  # raw density is 0.12, so every layer stays below 1.
  assert all(
      b < _size(s) for b, s in zip(masks.layer_budgets(MNIST_SHAPES, 0.98, "erk"), MNIST_SHAPES)
  )


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_uniform_is_floor_of_density_times_size(sparsity):
  for shapes in NETWORKS.values():
    expected = [math.floor((1 - Fraction(str(sparsity))) * _size(s)) for s in shapes]
    assert masks.layer_budgets(shapes, sparsity, "uniform") == expected
  # Hand check: 0.2 * 250 = 50 exactly (not 49 from 0.19999... * 250).
  assert masks.layer_budgets([(5, 5, 1, 10)], 0.8, "uniform") == [50]


@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_er_matches_reference_and_differs_from_erk_only_through_convs(sparsity):
  for shapes in NETWORKS.values():
    assert masks.layer_budgets(shapes, sparsity, "er") == reference_budgets(shapes, sparsity, "er")
  # A dense-only network: ER and ERK are the same rule.
  dense_only = [(784, 300), (300, 100), (100, 10)]
  assert masks.layer_budgets(dense_only, sparsity, "er") == masks.layer_budgets(
      dense_only, sparsity, "erk"
  )
  assert masks.layer_densities(dense_only, sparsity, "er") == pytest.approx(
      masks.layer_densities(dense_only, sparsity, "erk"), rel=1e-12
  )
  # With convolutions they differ, and the conv layers differ.
  er = masks.layer_budgets(MNIST_SHAPES, sparsity, "er")
  erk = masks.layer_budgets(MNIST_SHAPES, sparsity, "erk")
  assert er[:2] != erk[:2]


def test_er_and_erk_raw_density_of_a_conv_by_hand():
  # Two convs with different kernel sizes (a single layer would get 1 - S
  # under any rule). Layers A (3,3,4,4) size 144 and B (1,1,4,4) size 16. S = 0.5 -> 80 kept.
  # ER: raw A = 8/16 = B, so both get density 80/160 = 0.5 -> 72, 8.
  # ERK: raw A = (4+4+3+3)/144 = 14/144, raw B = (4+4+1+1)/16 = 10/16;
  #   raw x size: 14, 10 -> eps = 80/24 = 3.33; B -> 10/16 * 3.33 = 2.08 > 1,
  #   capped: B = 16; A = 80 - 16 = 64.
  shapes = [(3, 3, 4, 4), (1, 1, 4, 4)]
  assert masks.layer_budgets(shapes, 0.5, "er") == [72, 8]
  assert masks.layer_budgets(shapes, 0.5, "erk") == [64, 16]


@pytest.mark.parametrize("distribution", ["erk", "er", "uniform"])
def test_zero_sparsity_gives_full_budgets(distribution):
  for shapes in NETWORKS.values():
    assert masks.layer_budgets(shapes, 0.0, distribution) == [_size(s) for s in shapes]
    assert masks.layer_densities(shapes, 0.0, distribution) == [1.0] * len(shapes)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan")])
def test_bad_sparsity_raises(sparsity):
  with pytest.raises(ValueError):
    masks.layer_budgets(MNIST_SHAPES, sparsity, "erk")


def test_unknown_distribution_raises():
  with pytest.raises(ValueError):
    masks.layer_budgets(MNIST_SHAPES, 0.8, "gaussian")


def test_kernel_of_wrong_rank_raises():
  with pytest.raises(ValueError):
    masks.layer_budgets([(3, 4, 5)], 0.5, "erk")


# ---------------------------------------------------------------------------
# Random masks.
# ---------------------------------------------------------------------------


def test_random_masks_have_exactly_the_budget():
  budgets = reference_budgets(MNIST_SHAPES, 0.8, "erk")
  result = masks.random_masks(MNIST_SHAPES, budgets, seed=3)
  assert len(result) == len(MNIST_SHAPES)
  for m, shape, b in zip(result, MNIST_SHAPES, budgets):
    assert m.shape == shape
    assert m.dtype == np.float32
    assert set(np.unique(m)) <= {0.0, 1.0}
    assert int(m.sum()) == b


def test_random_masks_are_deterministic_per_seed_and_differ_across_seeds():
  budgets = [50, 100, 25000, 100]
  a = masks.random_masks(MNIST_SHAPES, budgets, seed=7)
  b = masks.random_masks(MNIST_SHAPES, budgets, seed=7)
  c = masks.random_masks(MNIST_SHAPES, budgets, seed=8)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  # Each partial layer differs (C(250, 50) choices: equal by chance is
  # essentially impossible).
  for x, z, bud, sh in zip(a, c, budgets, MNIST_SHAPES):
    assert bud < _size(sh)
    assert not np.array_equal(x, z)


def test_random_masks_full_and_empty_layers():
  result = masks.random_masks([(2, 3), (4, 5)], [6, 0], seed=0)
  np.testing.assert_array_equal(result[0], np.ones((2, 3)))
  np.testing.assert_array_equal(result[1], np.zeros((4, 5)))


# ---------------------------------------------------------------------------
# Prune / grow / readjust on hand-made tensors.
# ---------------------------------------------------------------------------

# A 3x4 kernel. Position (2, 0) is inactive but holds a stale non-zero value,
# so "a newly activated weight starts at 0" is not trivially true.
W = np.array(
    [
        [0.5, -0.1, 0.0, 0.9],
        [0.2, 0.0, -0.7, 0.05],
        [0.8, 0.3, 0.0, -0.4],
    ],
    np.float32,
)
M = np.array(
    [
        [1, 1, 0, 1],
        [1, 0, 1, 1],
        [0, 1, 0, 1],
    ],
    np.float32,
)  # 8 ones
G = np.array(
    [
        [9.0, 8.0, 0.1, 9.0],
        [9.0, 0.3, 9.0, 0.25],
        [-0.6, 9.0, 0.2, 9.0],
    ],
    np.float32,
)


def _np(t):
  return np.asarray(t.numpy() if hasattr(t, "numpy") else t)


def test_prune_smallest_by_hand():
  # Active |w|: 0.5, 0.1, 0.9, 0.2, 0.7, 0.05, 0.3, 0.4. The 2 smallest are
  # 0.05 at (1, 3) and 0.1 at (0, 1). The inactive (2, 0) (|w| = 0.8) and the
  # inactive zeros are never candidates.
  expected = M.copy()
  expected[1, 3] = 0
  expected[0, 1] = 0
  got = _np(masks.prune_smallest(tf.constant(W), tf.constant(M), 2))
  np.testing.assert_array_equal(got, expected)
  # k = 3 also drops 0.2 at (1, 0).
  expected[1, 0] = 0
  got = _np(masks.prune_smallest(tf.constant(W), tf.constant(M), 3))
  np.testing.assert_array_equal(got, expected)


def test_prune_never_touches_inactive_zero_weights():
  # Inactive positions hold |w| = 0 < every active |w|; they must not be
  # "pruned" instead of the active ones.
  w = np.array([[0.0, 0.3, 0.0, 0.2]], np.float32)
  m = np.array([[0, 1, 0, 1]], np.float32)
  got = _np(masks.prune_smallest(tf.constant(w), tf.constant(m), 1))
  np.testing.assert_array_equal(got, [[0, 1, 0, 0]])


def test_grow_largest_by_hand():
  pruned = M.copy()
  pruned[1, 3] = 0
  pruned[0, 1] = 0
  # Inactive after pruning: (0,1) |g|=8, (0,2) 0.1, (1,1) 0.3, (1,3) 0.25,
  # (2,0) 0.6, (2,2) 0.2. The two largest: (0,1) and (2,0). Every active
  # position has |g| = 9 and must not be picked.
  expected = pruned.copy()
  expected[0, 1] = 1
  expected[2, 0] = 1
  got = _np(masks.grow_largest(tf.constant(G), tf.constant(pruned), 2))
  np.testing.assert_array_equal(got, expected)
  assert got.sum() == pruned.sum() + 2


def test_grow_uses_absolute_gradient():
  m = np.array([1, 0, 0, 0], np.float32)
  g = np.array([5.0, 0.5, -3.0, 1.0], np.float32)
  got = _np(masks.grow_largest(tf.constant(g), tf.constant(m), 1))
  np.testing.assert_array_equal(got, [1, 0, 1, 0])


def test_readjust_by_hand():
  new_mask, new_w = masks.readjust(tf.constant(W), tf.constant(M), tf.constant(G), 2)
  new_mask, new_w = _np(new_mask), _np(new_w)
  # Pruned (1,3) and (0,1); grown (0,1) (dropped and regrown) and (2,0) (new).
  expected_mask = np.array(
      [
          [1, 1, 0, 1],
          [1, 0, 1, 0],
          [1, 1, 0, 1],
      ],
      np.float32,
  )
  np.testing.assert_array_equal(new_mask, expected_mask)
  assert new_mask.sum() == M.sum()
  expected_w = np.array(
      [
          [0.5, -0.1, 0.0, 0.9],  # (0,1) dropped and regrown: keeps -0.1
          [0.2, 0.0, -0.7, 0.0],  # (1,3) pruned for good: 0
          [0.0, 0.3, 0.0, -0.4],  # (2,0) newly active: starts at 0, not 0.8
      ],
      np.float32,
  )
  np.testing.assert_array_equal(new_w, expected_w)
  # Weights outside the new mask are zero.
  assert np.all(new_w[new_mask == 0] == 0)


def test_readjust_regrows_only_positions_inactive_after_pruning():
  rng = np.random.default_rng(0)
  for trial in range(20):
    w = rng.normal(size=(6, 7)).astype(np.float32)
    m = (rng.random((6, 7)) < 0.4).astype(np.float32)
    w *= m
    g = rng.normal(size=(6, 7)).astype(np.float32)
    n_active = int(m.sum())
    k = int(rng.integers(0, min(n_active, 42 - n_active) + 1))
    pruned = _np(masks.prune_smallest(tf.constant(w), tf.constant(m), k))
    new_mask, new_w = masks.readjust(tf.constant(w), tf.constant(m), tf.constant(g), k)
    new_mask, new_w = _np(new_mask), _np(new_w)
    # Independent expectation with NumPy (stable sorts: lower index wins).
    flat_w, flat_m, flat_g = w.ravel(), m.ravel(), g.ravel()
    active_idx = np.flatnonzero(flat_m)
    order = active_idx[np.argsort(np.abs(flat_w[active_idx]), kind="stable")]
    exp_pruned = flat_m.copy()
    exp_pruned[order[:k]] = 0
    np.testing.assert_array_equal(pruned.ravel(), exp_pruned, err_msg=f"trial {trial}")
    inactive_idx = np.flatnonzero(exp_pruned == 0)
    order_g = inactive_idx[np.argsort(-np.abs(flat_g[inactive_idx]), kind="stable")]
    exp_mask = exp_pruned.copy()
    exp_mask[order_g[:k]] = 1
    np.testing.assert_array_equal(new_mask.ravel(), exp_mask, err_msg=f"trial {trial}")
    # Count unchanged; nothing regrown where the pruned mask was already 1.
    assert new_mask.sum() == n_active
    grown = (new_mask.ravel() == 1) & (exp_pruned == 0)
    assert grown.sum() == k
    # Weights: kept where the position was active before and after; 0 where
    # it newly entered or left.
    exp_w = np.where((exp_mask == 1) & (flat_m == 1), flat_w, 0.0)
    np.testing.assert_array_equal(new_w.ravel(), exp_w, err_msg=f"trial {trial}")


def test_readjust_with_k_zero_changes_nothing():
  new_mask, new_w = masks.readjust(tf.constant(W), tf.constant(M), tf.constant(G), 0)
  np.testing.assert_array_equal(_np(new_mask), M)
  np.testing.assert_array_equal(_np(new_w), W * M)
  np.testing.assert_array_equal(_np(masks.prune_smallest(tf.constant(W), tf.constant(M), 0)), M)
  np.testing.assert_array_equal(_np(masks.grow_largest(tf.constant(G), tf.constant(M), 0)), M)


def test_readjust_accepts_a_tensor_k():
  k = masks.num_to_readjust(tf.constant(0.25, tf.float64), 8)  # round(2.0) = 2
  new_mask, _ = masks.readjust(tf.constant(W), tf.constant(M), tf.constant(G), k)
  assert _np(new_mask)[2, 0] == 1 and _np(new_mask)[1, 3] == 0


def test_prune_ties_go_to_the_lower_flat_index():
  w = np.array([[0.3, 0.1, -0.1], [0.1, 0.5, 0.2]], np.float32)
  m = np.ones_like(w)
  # |w| = 0.1 at flat 1, 2, 3: k = 2 prunes flat 1 and 2.
  got = _np(masks.prune_smallest(tf.constant(w), tf.constant(m), 2))
  np.testing.assert_array_equal(got, [[1, 0, 0], [1, 1, 1]])


def test_grow_ties_go_to_the_lower_flat_index():
  g = np.array([[0.0, 2.0, -2.0], [2.0, 0.0, 1.0]], np.float32)
  m = np.array([[1, 0, 0], [0, 0, 0]], np.float32)
  # |g| = 2 at flat 1, 2, 3 (all inactive): k = 2 grows flat 1 and 2.
  got = _np(masks.grow_largest(tf.constant(g), tf.constant(m), 2))
  np.testing.assert_array_equal(got, [[1, 1, 1], [0, 0, 0]])


def test_grow_prefers_an_inactive_zero_gradient_over_active_positions():
  g = np.array([5.0, 0.0, 7.0], np.float32)
  m = np.array([1, 0, 1], np.float32)
  got = _np(masks.grow_largest(tf.constant(g), tf.constant(m), 1))
  np.testing.assert_array_equal(got, [1, 1, 1])


# ---------------------------------------------------------------------------
# Server re-prune.
# ---------------------------------------------------------------------------


def test_keep_top_k_by_hand():
  v = np.array([0.5, 0.0, 0.0, -0.5, 0.9, 0.2], np.float32)
  support = np.array([1.0, 0.3, 0.6, 1.0, 0.0, 0.5], np.float32)
  # Supported: 0 (0.5), 1 (0), 2 (0), 3 (0.5), 5 (0.2). Index 4 has the
  # largest |v| but no support: never chosen.
  got = _np(masks.keep_top_k(tf.constant(v), tf.constant(support), 3))
  np.testing.assert_array_equal(got, [1, 0, 0, 1, 0, 1])
  # k = 4: the tie at |v| = 0 between 1 (share 0.3) and 2 (0.6) goes to 2.
  got = _np(masks.keep_top_k(tf.constant(v), tf.constant(support), 4))
  np.testing.assert_array_equal(got, [1, 0, 1, 1, 0, 1])


def test_keep_top_k_ties_by_support_then_index():
  v = np.array([0.5, -0.5, 0.5, 0.5], np.float32)
  support = np.array([1.0, 1.0, 2.0, 1.0], np.float32)
  # All |v| equal: index 2 (largest support), then 0 (lowest index).
  got = _np(masks.keep_top_k(tf.constant(v), tf.constant(support), 2))
  np.testing.assert_array_equal(got, [1, 0, 1, 0])
  got = _np(masks.keep_top_k(tf.constant(v), tf.constant(support), 3))
  np.testing.assert_array_equal(got, [1, 1, 1, 0])


def test_keep_top_k_keeps_all_supported_when_fewer_than_k():
  v = np.array([[0.1, 0.9], [0.8, 0.0]], np.float32)
  support = np.array([[1, 0], [0, 1]], np.float32)
  got = _np(masks.keep_top_k(tf.constant(v), tf.constant(support), 3))
  assert got.shape == (2, 2)
  np.testing.assert_array_equal(got, [[1, 0], [0, 1]])
  # k larger than the tensor.
  got = _np(masks.keep_top_k(tf.constant(v), tf.constant(support), 10))
  np.testing.assert_array_equal(got, [[1, 0], [0, 1]])


def test_keep_top_k_random_against_numpy():
  rng = np.random.default_rng(1)
  for trial in range(20):
    v = rng.normal(size=(5, 6)).astype(np.float32)
    v[rng.random((5, 6)) < 0.3] = 0.0  # ties at zero (regrown weights)
    support = (rng.integers(0, 4, size=(5, 6)) / 3.0).astype(np.float32)
    k = int(rng.integers(0, 31))
    got = _np(masks.keep_top_k(tf.constant(v), tf.constant(support), k)).ravel()
    fv, fs = np.abs(v.ravel()), support.ravel()
    candidates = [i for i in range(30) if fs[i] > 0]
    candidates.sort(key=lambda i: (-fv[i], -fs[i], i))
    expected = np.zeros(30, np.float32)
    expected[candidates[:k]] = 1
    np.testing.assert_array_equal(got, expected, err_msg=f"trial {trial}")
    assert np.all(got[fs == 0] == 0)


# ---------------------------------------------------------------------------
# Schedule.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.01, 0.05, 0.3])
@pytest.mark.parametrize("end_round", [1, 7, 20, 100])
def test_readjustment_ratio_cosine(alpha, end_round):
  for r in range(0, end_round + 5):
    expected = alpha / 2 * (1 + math.cos(math.pi * r / end_round)) if r < end_round else 0.0
    got_int = masks.readjustment_ratio(r, alpha, end_round)
    got_tensor = masks.readjustment_ratio(tf.constant(r, tf.int64), alpha, end_round)
    assert float(got_int) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert float(got_tensor) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert float(got_tensor) == pytest.approx(float(got_int), rel=1e-12, abs=1e-15)


def test_readjustment_ratio_applies_alpha_once():
  # r = 0: alpha/2 * (1 + cos 0) = alpha (the public code gave alpha^2).
  assert masks.readjustment_ratio(0, 0.05, 20) == pytest.approx(0.05)
  assert float(masks.readjustment_ratio(tf.constant(0), 0.05, 20)) == pytest.approx(0.05)
  # r = R_end / 2: alpha/2 * (1 + 0) = alpha/2.
  assert masks.readjustment_ratio(10, 0.05, 20) == pytest.approx(0.025)
  # From R_end on: 0.
  assert masks.readjustment_ratio(20, 0.05, 20) == 0.0
  assert masks.readjustment_ratio(21, 0.05, 20) == 0.0
  assert float(masks.readjustment_ratio(tf.constant(20), 0.05, 20)) == 0.0
  # R_end = 0: never readjust.
  assert masks.readjustment_ratio(0, 0.05, 0) == 0.0
  assert float(masks.readjustment_ratio(tf.constant(0), 0.05, 0)) == 0.0


def test_is_readjustment_round_enumeration():
  got = [r for r in range(1, 41) if masks.is_readjustment_round(r, 0.05, 10, 20)]
  # (r - 1) % 10 == 0: 1, 11, 21, 31; alpha_r > 0 needs r < 20: 1, 11.
  assert got == [1, 11]
  # Delta_R = 3, R_end = 10: 1, 4, 7, (10 is at R_end -> 0).
  got = [r for r in range(1, 41) if masks.is_readjustment_round(r, 0.05, 3, 10)]
  assert got == [1, 4, 7]
  # alpha = 0 (RandomMask): never.
  assert not any(masks.is_readjustment_round(r, 0.0, 10, 20) for r in range(1, 41))


def test_num_to_readjust_rounds_alpha_times_budget():
  cases = [
      (0.05, 208, 10),  # 10.4 -> 10
      (0.05, 396, 20),  # 19.8 -> 20
      (0.01, 51245, 512),  # 512.45 -> 512
      (0.01, 500, 5),  # 5.0
      (0.0, 1000, 0),
      (0.3, 7, 2),  # 2.1 -> 2
      (0.4, 7, 3),  # 2.8 -> 3
  ]
  for ratio, budget, expected in cases:
    got = masks.num_to_readjust(tf.constant(ratio, tf.float64), budget)
    assert got.dtype == tf.int32
    assert int(got) == expected, (ratio, budget)
    assert int(masks.num_to_readjust(ratio, budget)) == expected


def test_num_to_readjust_from_the_schedule():
  # Round 11 of Delta_R = 10, R_end = 20, alpha = 0.05:
  # alpha_11 = 0.025 * (1 + cos(0.55 pi)) = 0.025 * (1 - 0.156434) = 0.0210891
  # budget 396 -> 8.351 -> 8.
  ratio = masks.readjustment_ratio(tf.constant(11), 0.05, 20)
  assert int(masks.num_to_readjust(ratio, 396)) == 8


# ---------------------------------------------------------------------------
# Sparsity.
# ---------------------------------------------------------------------------


def test_sparsity_of():
  a = np.zeros((2, 5), np.float32)
  a[0, :3] = 1  # 3 of 10
  b = np.ones((3,), np.float32)
  b[1] = 0  # 2 of 3
  # 5 non-zero of 13 -> 8/13 zeros.
  assert masks.sparsity_of([a, b]) == pytest.approx(8 / 13)
  # Works on kernels (any non-zero counts as kept).
  k = np.array([[0.0, -0.3], [1e-8, 0.0]])
  assert masks.sparsity_of([k]) == pytest.approx(0.5)
  assert masks.sparsity_of([np.ones((4, 4))]) == 0.0
  assert masks.sparsity_of([np.zeros((4, 4))]) == 1.0
  assert masks.sparsity_of([]) == 0.0


def test_sparsity_of_random_erk_masks_is_close_to_target():
  for shapes in NETWORKS.values():
    for s in SPARSITIES:
      budgets = reference_budgets(shapes, s, "erk")
      m = masks.random_masks(shapes, budgets, seed=0)
      total = sum(_size(sh) for sh in shapes)
      assert masks.sparsity_of(m) == pytest.approx(1 - sum(budgets) / total, abs=1e-12)
      assert s <= masks.sparsity_of(m) <= s + len(shapes) / total


# ---------------------------------------------------------------------------
# Block masks (--mask_block): a block is `rows` consecutive inputs of one
# output of a dense kernel [n_in, n_out]. References below work on numpy
# block sums written out here.
# ---------------------------------------------------------------------------


def _block_sums(x, rows):
  n_in, n_out = x.shape
  return np.abs(x).reshape(n_in // rows, rows, n_out).sum(axis=1)


def _is_blockwise(mask, rows):
  grid = mask.reshape(mask.shape[0] // rows, rows, mask.shape[1])
  return bool((grid.min(axis=1) == grid.max(axis=1)).all())


def test_block_rows_only_for_dense_kernels_whose_inputs_divide():
  assert masks.layer_rows(MNIST_SHAPES, 4) == [1, 1, 4, 1]  # 50 inputs: element-wise
  assert masks.layer_rows(MNIST_SHAPES, 16) == [1, 1, 16, 1]
  assert masks.layer_rows(CIFAR10_SHAPES, 4) == [1, 1, 4, 4, 4]
  assert masks.layer_rows(CIFAR10_SHAPES, 16) == [1, 1, 16, 1, 1]
  assert masks.layer_rows(MNIST_SHAPES, 1) == [1, 1, 1, 1]


@pytest.mark.parametrize("rows", [4, 16])
def test_block_budgets_are_whole_blocks_of_the_element_budgets(rows):
  per_layer = masks.layer_rows(CIFAR10_SHAPES, rows)
  plain = masks.layer_budgets(CIFAR10_SHAPES, 0.8, "erk")
  blocked = masks.layer_budgets(CIFAR10_SHAPES, 0.8, "erk", per_layer)
  for b, p, r in zip(blocked, plain, per_layer):
    assert b % r == 0
    assert b == r * (p // r)  # floor(d * size / r) blocks (d * size is not an integer here)
  # The mnist network at 1x4 by hand: dense1 keeps floor(51245.2 / 4) = 12811 blocks.
  assert masks.layer_budgets(MNIST_SHAPES, 0.8, "erk", [1, 1, 4, 1]) == [208, 396, 4 * 12811, 500]


def test_block_random_masks_draw_whole_blocks_with_exact_budgets():
  rows = masks.layer_rows(MNIST_SHAPES, 4)
  budgets = masks.layer_budgets(MNIST_SHAPES, 0.8, "erk", rows)
  drawn = masks.random_masks(MNIST_SHAPES, budgets, 3, rows)
  for mask, budget, r in zip(drawn, budgets, rows):
    assert int(mask.sum()) == budget
    if r > 1:
      assert _is_blockwise(mask, r)
  # Element-wise masks of the same seed are not block-structured.
  plain = masks.random_masks(MNIST_SHAPES, budgets, 3)
  assert not _is_blockwise(plain[2], 4)


def test_largest_magnitude_mask_in_blocks_by_hand():
  # Kernel [4, 2] in blocks of 2 rows: block sums of |w| on the 2 x 2 grid
  # are (0, 0) 3, (0, 1) 5, (1, 0) 1, (1, 1) 6; an element-wise choice of 4
  # would keep -5, 2, 3 and -3 (not whole blocks).
  w = np.array([[1.0, -5.0], [2.0, 0.0], [0.5, 3.0], [0.5, -3.0]], np.float32)
  np.testing.assert_array_equal(
      masks.largest_magnitude_mask(w, 4, rows=2), [[0, 1], [0, 1], [0, 1], [0, 1]]
  )
  np.testing.assert_array_equal(
      masks.largest_magnitude_mask(w, 4), [[0, 1], [1, 0], [0, 1], [0, 1]]
  )
  np.testing.assert_array_equal(
      masks.largest_magnitude_mask(w, 6, rows=2), [[1, 1], [1, 1], [0, 1], [0, 1]]
  )
  # Ties between blocks go to the lowest index on the grid, row-major.
  tied = np.ones((4, 2), np.float32)
  np.testing.assert_array_equal(
      masks.largest_magnitude_mask(tied, 2, rows=2), [[1, 0], [1, 0], [0, 0], [0, 0]]
  )
  np.testing.assert_array_equal(
      masks.largest_magnitude_mask(tied, 6, rows=2), [[1, 1], [1, 1], [1, 0], [1, 0]]
  )


def test_block_readjust_by_hand():
  # Kernel [8, 2] in blocks of 4 rows: a 2 x 2 block grid.
  w = np.zeros((8, 2), np.float32)
  w[0:4, 0] = [0.5, -0.5, 0.5, 0.5]  # block (0, 0): sum |w| 2.0
  w[0:4, 1] = [0.1, 0.1, -0.1, 0.1]  # block (0, 1): 0.4, the smallest
  w[4:8, 0] = [1.0, 0.0, 0.0, 0.0]  # block (1, 0): 1.0 (one large entry)
  mask = np.zeros((8, 2), np.float32)
  mask[0:4, :] = 1.0
  mask[4:8, 0] = 1.0  # block (1, 1) is inactive
  g = np.zeros((8, 2), np.float32)
  g[4:8, 1] = 0.3  # block (1, 1): sum |g| 1.2
  g[0:4, 1] = [0.2, 0.2, 0.2, -0.2]  # block (0, 1): 0.8
  g[0:4, 0] = 9.0  # active: never a regrowth candidate
  new_mask, new_w = (_np(t) for t in masks.readjust(tf.constant(w), tf.constant(mask), tf.constant(g), 4, rows=4))
  want_mask = np.zeros((8, 2), np.float32)
  want_mask[0:4, 0] = 1.0
  want_mask[4:8, :] = 1.0
  np.testing.assert_array_equal(new_mask, want_mask)
  want_w = w.copy()
  want_w[0:4, 1] = 0.0  # pruned
  np.testing.assert_array_equal(new_w, want_w)  # block (1, 1) enters at zero
  # The pruned block regrows when its gradient is the largest: it keeps its values.
  g[0:4, 1] = 0.5
  new_mask, new_w = (_np(t) for t in masks.readjust(tf.constant(w), tf.constant(mask), tf.constant(g), 4, rows=4))
  np.testing.assert_array_equal(new_mask, mask)
  np.testing.assert_array_equal(new_w, w)


def _numpy_block_readjust(w, mask, g, k_blocks, rows):
  """Prune the k active blocks of least sum |w|, then grow the k inactive
  blocks of largest sum |g| (ties: lower flat block index)."""
  grid_mask = _block_sums(mask, rows) > 0
  w_sums = _block_sums(w, rows).ravel()
  active = np.flatnonzero(grid_mask.ravel())
  pruned = grid_mask.ravel().copy()
  pruned[active[np.argsort(w_sums[active], kind="stable")[:k_blocks]]] = False
  inactive = np.flatnonzero(~pruned)
  g_sums = _block_sums(g, rows).ravel()
  grown = pruned.copy()
  grown[inactive[np.argsort(-g_sums[inactive], kind="stable")[:k_blocks]]] = True
  new_mask = np.repeat(grown.reshape(grid_mask.shape), rows, axis=0).astype(np.float32)
  return new_mask, w * new_mask * (1 - new_mask * (1 - mask))


@pytest.mark.parametrize("rows", [4, 16])
def test_block_readjust_random_against_numpy(rows):
  rng = np.random.default_rng(rows)
  for _ in range(10):
    n_in, n_out = rows * 6, 5
    grid = rng.random((6, n_out)) < 0.4
    mask = np.repeat(grid, rows, axis=0).astype(np.float32)
    w = rng.normal(size=(n_in, n_out)).astype(np.float32) * mask
    g = rng.normal(size=(n_in, n_out)).astype(np.float32)
    k_blocks = int(rng.integers(0, grid.sum() + 1))
    got_mask, got_w = masks.readjust(tf.constant(w), tf.constant(mask), tf.constant(g), k_blocks * rows, rows=rows)
    want_mask, want_w = _numpy_block_readjust(w, mask, g, k_blocks, rows)
    np.testing.assert_array_equal(_np(got_mask), want_mask)
    np.testing.assert_array_equal(_np(got_w), want_w)
    assert _np(got_mask).sum() == mask.sum()  # the budget is kept exactly


def _voted(client_masks, client_values, weights):
  """(values, support) of the server's voting average, by hand: each
  position's weighted mean over the clients that kept it, and its vote share."""
  votes = sum(n * m for n, m in zip(weights, client_masks))
  values = np.divide(
      sum(n * v for n, v in zip(weights, client_values)), votes,
      out=np.zeros_like(votes), where=votes > 0,
  )
  return values, votes / sum(weights)


def test_block_vote_and_reprune_keep_whole_blocks_and_the_budget():
  """Three clients' block masks voted (support = vote share) and re-pruned
  to 5 blocks: the supported blocks of largest sum |v|, against numpy."""
  rng = np.random.default_rng(7)
  rows, n_in, n_out = 4, 24, 3
  client_masks = [np.repeat(rng.random((6, n_out)) < 0.35, rows, axis=0).astype(np.float32) for _ in range(3)]
  client_values = [rng.normal(size=(n_in, n_out)).astype(np.float32) * m for m in client_masks]
  values, support = _voted(client_masks, client_values, [3.0, 1.0, 2.0])
  got = _np(masks.keep_top_k(tf.constant(values), tf.constant(support), 5 * rows, rows=rows))
  assert _is_blockwise(got, rows) and got.sum() == 5 * rows
  supported = (_block_sums(support, rows) > 0).ravel()
  sums = np.where(supported, _block_sums(values, rows).ravel(), -1.0)
  want = np.zeros(sums.shape, np.float32)
  want[np.argsort(-sums, kind="stable")[:5]] = 1.0
  np.testing.assert_array_equal(got, np.repeat(want.reshape(6, n_out), rows, axis=0))


def test_num_to_readjust_in_whole_blocks():
  # alpha 0.05 of 12,811 blocks: round(640.55) = 641 blocks of 4.
  assert int(masks.num_to_readjust(0.05, 4 * 12811, 4)) == 4 * 641
  got = masks.num_to_readjust(0.05, tf.constant([208, 51244]), tf.constant([1, 4]))
  np.testing.assert_array_equal(got, [10, 2564])


@pytest.mark.parametrize("rows", [1, 4])
def test_keep_top_k_equals_the_sorting_reference(rows):
  """The histogram re-prune picks what two stable sorts pick: many ties
  in |v| (zeros, repeated values) and in support, negative values, k from
  0 to past the supported count, a Python int and a tensor k."""
  rng = np.random.default_rng(7)
  for trial in range(30):
    shape = (8 * rows, 12)
    v = rng.choice([-0.5, -0.25, 0.0, 0.25, 0.5, 1e-30], size=shape).astype(np.float32)
    if trial % 2:  # distinct values among the ties
      v += (rng.normal(size=shape) * (rng.random(shape) < 0.5)).astype(np.float32)
    support = (rng.integers(0, 3, size=shape) / 2.0).astype(np.float32)
    units = v.size // rows
    k = rows * int(rng.integers(0, units + 3))
    for kk in (k, tf.constant(k)):
      got = _np(masks.keep_top_k(tf.constant(v), tf.constant(support), kk, rows=rows))
      want = _np(masks.keep_top_k_by_sorting(tf.constant(v), tf.constant(support), kk, rows=rows))
      np.testing.assert_array_equal(got, want, err_msg=f"trial {trial} k {k}")


# ---------------------------------------------------------------------------
# Kernel blocks (--conv_block=kernel): a convolution [k_h, k_w, n_in, n_out]
# masked in whole filters kernel[:, :, i, o]. References below work on
# numpy filter sums |w|.sum(axis=(0, 1)), an [n_in, n_out] grid, row-major.
# ---------------------------------------------------------------------------


def _filter_sums(x):
  return np.abs(x).sum(axis=(0, 1))


def _whole_filters(mask):
  return bool((mask.min(axis=(0, 1)) == mask.max(axis=(0, 1))).all())


def _filters_to_mask(grid, shape):
  return np.broadcast_to(grid[None, None].astype(np.float32), shape).copy()


def test_kernel_blocks_are_whole_filters_of_convolutions_only():
  assert masks.layer_rows(MNIST_SHAPES, 4, conv_kernels=True) == [25, 25, 4, 1]
  assert masks.layer_rows(MNIST_SHAPES, 1, conv_kernels=True) == [25, 25, 1, 1]
  assert masks.layer_rows([(3, 2, 4, 5), (1, 1, 4, 5)], 1, conv_kernels=True) == [6, 1]
  assert masks.block_view((5, 5, 10, 20), 25) == [1, 25, 200]
  assert masks.grid_shape((5, 5, 10, 20), 25) == [1, 200]
  assert masks.block_view((5120, 50), 4) == [1280, 4, 50]
  with pytest.raises(ValueError, match="whole 5x5 filters"):
    masks.block_view((5, 5, 10, 20), 4)
  # A block is one filter: the row-major view's column i * n_out + o.
  kernel = np.arange(3 * 2 * 4 * 5, dtype=np.float32).reshape(3, 2, 4, 5)
  view = kernel.reshape(masks.block_view(kernel.shape, 6))
  np.testing.assert_array_equal(view[0, :, 2 * 5 + 3], kernel[:, :, 2, 3].ravel())


def test_kernel_block_budgets_and_random_masks_by_hand():
  rows = masks.layer_rows(MNIST_SHAPES, 4, conv_kernels=True)
  budgets = masks.layer_budgets(MNIST_SHAPES, 0.8, "erk", rows)
  # ERK at 0.8 (test above: 208 and 396 element-wise): 8 of conv1's 10
  # filters, 15 of conv2's 200.
  assert budgets == [25 * 8, 25 * 15, 4 * 12811, 500]
  drawn = masks.random_masks(MNIST_SHAPES, budgets, 3, rows)
  for mask, budget in zip(drawn[:2], budgets[:2]):
    assert int(mask.sum()) == budget and _whole_filters(mask)
  # Dense layers draw as they did without kernel blocks (the same stream).
  plain = masks.random_masks(MNIST_SHAPES, budgets, 3, [1, 1, 4, 1])
  assert not _whole_filters(plain[1])


def test_largest_magnitude_mask_in_whole_filters_by_hand():
  w = np.zeros((2, 2, 2, 2), np.float32)
  w[:, :, 0, 0] = [[1.0, 0.0], [0.0, 0.0]]  # filter sum 1
  w[:, :, 0, 1] = [[0.5, 0.5], [0.5, 0.5]]  # 2
  w[:, :, 1, 0] = [[-3.0, 0.0], [0.0, 0.0]]  # 3, one large entry
  w[:, :, 1, 1] = [[0.1, 0.1], [0.1, -0.1]]  # 0.4
  got = masks.largest_magnitude_mask(w, 8, rows=4)
  np.testing.assert_array_equal(got[0, 0], [[0, 1], [1, 0]])
  assert _whole_filters(got)
  # Ties go to the lower grid index (i * n_out + o).
  got = masks.largest_magnitude_mask(np.ones((2, 2, 2, 2), np.float32), 4, rows=4)
  np.testing.assert_array_equal(got[1, 1], [[1, 0], [0, 0]])


def _numpy_filter_readjust(w, mask, g, k):
  """Prune the k kept filters of least sum |w|, grow the k dropped filters
  of largest sum |g| (ties: lower grid index)."""
  grid = (_filter_sums(mask) > 0).ravel()
  sums = _filter_sums(w).ravel()
  active = np.flatnonzero(grid)
  pruned = grid.copy()
  pruned[active[np.argsort(sums[active], kind="stable")[:k]]] = False
  inactive = np.flatnonzero(~pruned)
  grown = pruned.copy()
  grown[inactive[np.argsort(-_filter_sums(g).ravel()[inactive], kind="stable")[:k]]] = True
  new_mask = _filters_to_mask(grown.reshape(mask.shape[2:]), mask.shape)
  return new_mask, w * new_mask * (1 - new_mask * (1 - mask))


def test_kernel_block_readjust_random_against_numpy():
  rng = np.random.default_rng(11)
  shape = (3, 3, 4, 6)
  for _ in range(10):
    mask = _filters_to_mask(rng.random(shape[2:]) < 0.4, shape)
    w = rng.normal(size=shape).astype(np.float32) * mask
    g = rng.normal(size=shape).astype(np.float32)
    k = int(rng.integers(0, _filter_sums(mask).astype(bool).sum() + 1))
    got_mask, got_w = masks.readjust(tf.constant(w), tf.constant(mask), tf.constant(g), 9 * k, rows=9)
    want_mask, want_w = _numpy_filter_readjust(w, mask, g, k)
    np.testing.assert_array_equal(_np(got_mask), want_mask)
    np.testing.assert_array_equal(_np(got_w), want_w)
    assert _np(got_mask).sum() == mask.sum()


def test_kernel_block_vote_and_reprune_keep_whole_filters_and_the_budget():
  rng = np.random.default_rng(8)
  shape = (3, 3, 4, 6)
  client_masks = [_filters_to_mask(rng.random(shape[2:]) < 0.35, shape) for _ in range(3)]
  client_values = [rng.normal(size=shape).astype(np.float32) * m for m in client_masks]
  values, support = _voted(client_masks, client_values, [3.0, 1.0, 2.0])
  for reprune in (masks.keep_top_k, masks.keep_top_k_by_sorting):
    got = _np(reprune(tf.constant(values), tf.constant(support), 5 * 9, rows=9))
    assert _whole_filters(got) and got.sum() == 5 * 9
    sums = np.where(_filter_sums(support).ravel() > 0, _filter_sums(values).ravel(), -1.0)
    want = np.zeros(sums.shape, bool)
    want[np.argsort(-sums, kind="stable")[:5]] = True
    np.testing.assert_array_equal(got, _filters_to_mask(want.reshape(shape[2:]), shape))
