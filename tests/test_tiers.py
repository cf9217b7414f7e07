"""Client sparsity tiers (`tff_feddst/tiers.py`): parsing, the seeded
assignment, the tiers' budgets and a client's mask, checked by hand."""

import numpy as np
import pytest

from tff_feddst import masks as masks_lib
from tff_feddst import tiers

MNIST_SHAPES = [(5, 5, 1, 10), (5, 5, 10, 20), (320, 800), (50, 10)]


def test_tiers_parse_and_print_back():
  t = tiers.parse("0.5:0.2, 0.8:0.5,0.95:0.3")
  assert t.sparsities == (0.5, 0.8, 0.95) and t.shares == (0.2, 0.5, 0.3)
  assert t.global_sparsity == 0.5
  assert tiers.parse(str(t)) == t
  assert tiers.parse("0.8:1").sparsities == (0.8,)


@pytest.mark.parametrize("text, message", [
    ("0.5", "'0.5' is not SPARSITY:SHARE"),
    ("a:0.5,0.8:0.5", "'a:0.5' is not SPARSITY:SHARE"),
    ("0.5:0.2:1", "is not SPARSITY:SHARE"),
    ("", "'' is not SPARSITY:SHARE"),
    ("1:1", "sparsity 1 is not in [0, 1)"),
    ("-0.1:1", "sparsity -0.1 is not in [0, 1)"),
    ("0.5:0,0.8:1", "share 0 is not in (0, 1]"),
    ("0.5:0.5,0.5:0.5", "sparsity 0.5 is given twice"),
    ("0.5:0.3,0.8:0.3", "the shares sum to 0.6, not 1"),
    ("0.5:0.6,0.8:0.6", "the shares sum to 1.2, not 1"),
])
def test_bad_tiers_are_refused_in_one_line(text, message):
  with pytest.raises(tiers.TierError) as info:
    tiers.parse(text)
  assert str(info.value).startswith("--client_sparsity_tiers: ")
  assert message in str(info.value) and "\n" not in str(info.value)


def test_tier_counts_are_exact_shares_with_largest_remainders():
  t = tiers.parse("0.5:0.2,0.8:0.5,0.95:0.3")
  assert tiers.tier_counts(400, t) == [80, 200, 120]
  # 7 x (0.2, 0.5, 0.3) = 1.4, 3.5, 2.1: floors 1, 3, 2; the one left goes
  # to the largest remainder (0.5).
  assert tiers.tier_counts(7, t) == [1, 4, 2]
  thirds = tiers.parse("0.5:0.3333334,0.8:0.3333333,0.9:0.3333333")
  assert tiers.tier_counts(7, thirds) == [3, 2, 2]
  assert tiers.tier_counts(0, t) == [0, 0, 0]


def test_the_assignment_is_seeded_exact_and_order_free():
  t = tiers.parse("0.5:0.2,0.8:0.5,0.95:0.3")
  ids = [f"client_{i}" for i in range(40)]
  a = tiers.assign(ids, t, seed=3)
  assert sorted(a) == sorted(ids)
  assert [list(a.values()).count(k) for k in range(3)] == [8, 20, 12]
  assert tiers.assign(list(reversed(ids)), t, seed=3) == a
  assert tiers.assign(ids, t, seed=4) != a
  # By hand: the seeded order of the sorted ids, cut 8 / 20 / 12.
  order = np.random.default_rng(3).permutation(40)
  by_hand = {sorted(ids)[i]: (0 if j < 8 else 1 if j < 28 else 2) for j, i in enumerate(order)}
  assert a == by_hand


def test_each_tier_keeps_its_own_budgets_within_the_global_ones():
  t = tiers.parse("0.5:0.2,0.8:0.5,0.95:0.3")
  per_tier = tiers.budgets(MNIST_SHAPES, t, "erk")
  for s, row in zip(t.sparsities, per_tier):
    assert row == masks_lib.layer_budgets(MNIST_SHAPES, s, "erk")
  for low, high in zip(per_tier, per_tier[1:]):
    assert all(h <= lo for h, lo in zip(high, low))
  # ERK at 0.5 keeps conv1 whole (capped) and at 0.95 about 5% overall.
  assert per_tier[0][0] == 250
  assert abs(sum(per_tier[2]) - 0.05 * 261750) <= 4


def test_a_client_mask_is_the_largest_weights_of_the_global_mask():
  kernel = np.array([[3.0, -1.0, 7.0], [2.0, -5.0, 4.0]], np.float32)
  global_mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)  # 7.0 is outside it
  mask = tiers.client_mask_np(kernel, global_mask, 3)
  np.testing.assert_array_equal(mask, [[1, 0, 0], [0, 1, 1]])  # 5, 4, 3
  # Equal magnitudes: the lower positions win.
  ties = tiers.client_mask_np(np.ones((2, 3)), np.ones((2, 3)), 2)
  np.testing.assert_array_equal(ties, [[1, 1, 0], [0, 0, 0]])
  # Blocks of 2 inputs of one output ([in, out] = [4, 2]), by summed |w|
  # (as masks.keep_top_k): 2 and 9 in rows 0-1, 4 and 1 in rows 2-3.
  blocked = np.array([[1, 9], [1, 0], [4, 0], [0, 1]], np.float32)
  on = np.ones((4, 2), np.float32)
  np.testing.assert_array_equal(
      tiers.client_mask_np(blocked, on, 4, rows=2), [[0, 1], [0, 1], [1, 0], [1, 0]]
  )
  # A budget above the global mask's ones keeps all of them.
  np.testing.assert_array_equal(tiers.client_mask_np(kernel, global_mask, 6), global_mask)


def test_a_random_client_mask_is_a_subset_at_its_budget():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(30, 20)).astype(np.float32)
  (global_mask,) = masks_lib.random_masks([(30, 20)], [240], 1)
  mask = tiers.client_mask_np(kernel, global_mask, 60)
  assert mask.sum() == 60 and np.all(mask <= global_mask)
  kept = np.abs(kernel[mask > 0])
  dropped = np.abs(kernel[(global_mask > 0) & (mask == 0)])
  assert kept.min() >= dropped.max()
