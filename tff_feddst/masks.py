"""Mask arithmetic for FedDST, as pure NumPy / TensorFlow functions.

Nothing here knows about TFF or Keras layers: budgets are computed from
kernel shapes, masks are float tensors of zeros and ones with the kernel's
shape. See docs/algorithms.md sections 2 and 3.

Conventions
- A kernel shape is (k_h, k_w, n_in, n_out) for a convolution and
  (n_in, n_out) for a dense layer (Keras layout).
- The budget of a layer is the integer number of weights it keeps; it is
  fixed for the whole run.
- Ties (equal magnitudes or gradients) are broken towards the lower flat
  index, as `tf.math.top_k` does, so every choice is deterministic.
- Block masks (`--mask_block`, docs/algorithms.md section 3.7): a dense
  kernel whose inputs divide by `rows` is masked in blocks of `rows`
  consecutive inputs of one output, kernel[r * rows:(r + 1) * rows, o]
  (TFLite transposes the kernel to [out, in], where this is a 1 x rows
  block). Every choice is then made on the block grid [n_in / rows, n_out]
  with a block's score the sum of its entries' |score|, and budgets and k
  are multiples of `rows`. `rows` = 1 is the element-wise mask.
- Kernel blocks (`--conv_block=kernel`, section 3.7): a convolution's
  kernel is masked in whole k_h x k_w filters, kernel[:, :, i, o], so
  rows = k_h * k_w. Both kinds are blocks of `rows` consecutive entries of
  one column of a row-major view of the kernel (`block_view`): [n_in /
  rows, rows, n_out] for a dense kernel, [1, k_h * k_w, n_in * n_out] for
  a convolution's; the block grid is that view without its middle axis.
"""

import math
from typing import Sequence

import numpy as np
import tensorflow as tf

from tff_feddst.names import DISTRIBUTIONS, SCHEDULES  # noqa: F401


def _raw_density(shape: Sequence[int], distribution: str) -> float:
  """Unnormalised density of a layer under ER / ERK (RigL, Evci et al.)."""
  if len(shape) == 2:
    n_in, n_out = shape
    return (n_in + n_out) / (n_in * n_out)
  if len(shape) == 4:
    k_h, k_w, n_in, n_out = shape
    if distribution == "erk":
      return (n_in + n_out + k_h + k_w) / (n_in * n_out * k_h * k_w)
    return (n_in + n_out) / (n_in * n_out)
  raise ValueError(f"kernel shape {tuple(shape)} is neither dense nor conv")


def layer_densities(
    shapes: Sequence[Sequence[int]], sparsity: float, distribution: str = "erk"
) -> list[float]:
  """Density per layer so that sum d_l size_l = (1 - S) sum size_l.

  Layers whose ER/ERK density would exceed 1 are kept dense and the scale is
  recomputed over the others, until no layer exceeds 1.
  """
  if not 0.0 <= sparsity < 1.0:
    raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
  if distribution not in DISTRIBUTIONS:
    raise ValueError(
        f"unknown sparsity distribution {distribution!r}; choose one of "
        f"{', '.join(DISTRIBUTIONS)}"
    )
  sizes = [int(np.prod(s)) for s in shapes]
  if distribution == "uniform" or sparsity == 0.0:
    return [1.0 - sparsity] * len(shapes)
  raw = [_raw_density(s, distribution) for s in shapes]
  dense = set()
  while True:
    # Weights the non-dense layers must hold once dense layers are full.
    budget = (1.0 - sparsity) * sum(sizes) - sum(sizes[i] for i in dense)
    divisor = sum(raw[i] * sizes[i] for i in range(len(shapes)) if i not in dense)
    scale = budget / divisor
    free = [i for i in range(len(shapes)) if i not in dense]
    top = max(raw[i] for i in free)
    if scale * top <= 1.0:
      break
    dense.update(i for i in free if raw[i] == top)
  return [1.0 if i in dense else scale * raw[i] for i in range(len(shapes))]


def block_rows(shape: Sequence[int], rows: int, conv_kernels: bool = False) -> int:
  """Rows per mask block of a kernel under `--mask_block` with `rows` inputs
  per block: `rows` for a dense kernel whose inputs divide by it, else 1
  (the other dense kernels stay element-wise); for a convolution k_h * k_w
  with `conv_kernels` (`--conv_block=kernel`), else 1."""
  if len(shape) == 4:
    return int(shape[0] * shape[1]) if conv_kernels else 1
  if rows > 1 and len(shape) == 2 and shape[0] % rows == 0:
    return rows
  return 1


def layer_rows(
    shapes: Sequence[Sequence[int]], rows: int, conv_kernels: bool = False
) -> list[int]:
  """`block_rows` of every layer."""
  return [block_rows(shape, rows, conv_kernels) for shape in shapes]


def block_view(shape: Sequence[int], rows: int) -> list[int]:
  """[A, rows, B]: the row-major view of a kernel of `shape` in which each
  mask block of `rows` entries is [a, :, b]. A dense kernel's: [n_in /
  rows, rows, n_out]; a convolution's in whole filters (rows = k_h * k_w):
  [1, k_h * k_w, n_in * n_out]. The block grid is [A, B]."""
  shape = [int(d) for d in shape]
  if len(shape) == 4:
    if rows != shape[0] * shape[1]:
      raise ValueError(f"a convolution's blocks are whole {shape[0]}x{shape[1]} filters, not {rows} entries")
    return [1, rows, shape[2] * shape[3]]
  return [shape[0] // rows, rows, shape[1]]


def grid_shape(shape: Sequence[int], rows: int) -> list[int]:
  """[A, B]: the block grid of `block_view`."""
  view = block_view(shape, rows)
  return [view[0], view[2]]


def layer_budgets(
    shapes: Sequence[Sequence[int]], sparsity: float, distribution: str = "erk",
    rows: Sequence[int] | None = None,
) -> list[int]:
  """Integer number of kept weights per layer: floor(d_l * size_l), or with
  block masks (`rows`, per layer) rows_l * floor(d_l * size_l / rows_l)."""
  densities = layer_densities(shapes, sparsity, distribution)
  rows = rows or [1] * len(shapes)
  budgets = []
  for shape, density, r in zip(shapes, densities, rows):
    size = int(np.prod(shape))
    # The small epsilon keeps floor(0.2 * 250) from landing on 49.
    budgets.append(r * min(size // r, int(math.floor(density * size / r + 1e-9))))
  return budgets


def random_masks(
    shapes: Sequence[Sequence[int]], budgets: Sequence[int], seed: int,
    rows: Sequence[int] | None = None,
) -> list[np.ndarray]:
  """Seeded random masks (float32) with exactly `budget` ones per layer
  (with `rows`: budget / rows whole blocks, drawn on the block grid)."""
  rng = np.random.default_rng(seed)
  rows = rows or [1] * len(shapes)
  masks = []
  for shape, budget, r in zip(shapes, budgets, rows):
    grid = grid_shape(shape, r) if r > 1 else list(shape)
    size = int(np.prod(grid))
    flat = np.zeros(size, np.float32)
    flat[rng.permutation(size)[:budget // r]] = 1.0
    masks.append(_expand_np(flat.reshape(grid), shape, r) if r > 1 else flat.reshape(shape))
  return masks


def _expand_np(grid: np.ndarray, shape: Sequence[int], rows: int) -> np.ndarray:
  """[A, B] block grid -> the kernel-shaped mask (`block_view`)."""
  return np.repeat(grid[:, None, :], rows, axis=1).reshape(tuple(shape))


def pool_blocks(x: tf.Tensor, rows: int, shape: Sequence[int] | None = None) -> tf.Tensor:
  """[..., *shape] -> [..., A, B] (`grid_shape`): each block's sum of |x|.
  `shape`: the kernel's (x's trailing axes); default x's static shape."""
  if rows == 1:
    return tf.abs(x)
  x = tf.convert_to_tensor(x)
  shape = list(x.shape) if shape is None else list(shape)
  lead = tf.shape(x)[: x.shape.rank - len(shape)]
  view = tf.concat([lead, block_view(shape, rows)], 0)
  return tf.reduce_sum(tf.abs(tf.reshape(x, view)), axis=-2)


def expand_blocks(grid_mask: tf.Tensor, rows: int, shape: Sequence[int] | None = None) -> tf.Tensor:
  """[..., A, B] -> [..., *shape]: each block's value on its entries.
  Without `shape` (a dense kernel's blocks): [..., n_in / rows, n_out] ->
  [..., n_in, n_out]."""
  if rows == 1:
    return grid_mask
  if shape is None:
    return tf.repeat(grid_mask, rows, axis=-2)
  lead = tf.shape(grid_mask)[:-2]
  repeated = tf.repeat(tf.expand_dims(grid_mask, -2), rows, axis=-2)
  return tf.reshape(repeated, tf.concat([lead, [int(d) for d in shape]], 0))


def largest_magnitude_mask(weights: np.ndarray, k: int, rows: int = 1) -> np.ndarray:
  """A float32 mask keeping the k entries of largest |w| (ties: lowest index).

  With `rows` > 1 (a block mask of a [n_in, n_out] kernel, `block_rows`):
  the k / rows blocks of largest sum of |w| (`pool_blocks`; ties: lowest
  index on the block grid [n_in / rows, n_out], row-major).
  """
  weights = np.asarray(weights)
  if rows > 1:
    scores = np.abs(weights).reshape(block_view(weights.shape, rows)).sum(axis=1)
    grid = largest_magnitude_mask(scores, k // rows)
    return _expand_np(grid, weights.shape, rows)
  flat = np.abs(weights).ravel()
  mask = np.zeros(flat.shape, np.float32)
  mask[np.argsort(-flat, kind="stable")[:k]] = 1.0
  return mask.reshape(np.shape(weights))


def sparsity_of(masks: Sequence[np.ndarray]) -> float:
  """Global sparsity: zeros / all over the given masks (or kernels)."""
  total = sum(int(np.size(m)) for m in masks)
  nonzero = sum(int(np.count_nonzero(m)) for m in masks)
  return 1.0 - nonzero / total if total else 0.0


def readjustment_ratio(
    round_num, alpha: float, end_round: int, schedule: str = "cosine"
):
  """alpha_r for r < R_end, 0 from R_end on (docs/algorithms.md section 3.3).

  `schedule` "cosine": alpha/2 (1 + cos(pi r / R_end)); "constant": alpha.
  Works on Python numbers and on TF tensors (float64). The ratio is applied
  once (the public experiment code applied alpha twice).
  """
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown readjustment schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
  if isinstance(round_num, (int, np.integer)):
    if end_round <= 0 or round_num >= end_round:
      return 0.0
    if schedule == "constant":
      return float(alpha)
    return alpha / 2.0 * (1.0 + math.cos(math.pi * round_num / end_round))
  r = tf.cast(round_num, tf.float64)
  if end_round <= 0:
    return tf.constant(0.0, tf.float64)
  if schedule == "constant":
    value = tf.constant(float(alpha), tf.float64)
  else:
    value = alpha / 2.0 * (1.0 + tf.cos(math.pi * r / float(end_round)))
  return tf.where(r < float(end_round), value, tf.constant(0.0, tf.float64))


def is_readjustment_round(
    round_num: int, alpha: float, rounds_between: int, end_round: int,
    schedule: str = "cosine",
) -> bool:
  """Readjust in rounds with (r - 1) mod Delta_R == 0 and alpha_r > 0."""
  return (round_num - 1) % rounds_between == 0 and readjustment_ratio(
      round_num, alpha, end_round, schedule
  ) > 0.0


def round_sparsity(
    round_num: int, sparsity: float, final_sparsity: float, end_round: int
) -> float:
  """S_r, the sparsity of round r under gradual sparsification (section 3.6).

  S_r = S + (S_final - S) * min(r - 1, R_end) / R_end: S in round 1, S_final
  from round R_end + 1 on. With S_final = S (or R_end <= 0) it is S.
  """
  if end_round <= 0 or final_sparsity == sparsity:
    return float(sparsity)
  step = min(max(round_num - 1, 0), end_round)
  return sparsity + (final_sparsity - sparsity) * step / end_round


def budget_table(
    shapes: Sequence[Sequence[int]],
    sparsity: float,
    final_sparsity: float,
    end_round: int,
    distribution: str = "erk",
    rows: Sequence[int] | None = None,
) -> list[list[int]]:
  """Per-layer budgets of every round: row j holds those of round j + 1.

  Row j is `layer_budgets` at S_{j+1} (`round_sparsity`); rounds past the
  last row use the last row (S_final). One row when S_final = S.
  """
  last = end_round if end_round > 0 and final_sparsity != sparsity else 0
  return [
      layer_budgets(
          shapes, round_sparsity(j + 1, sparsity, final_sparsity, end_round), distribution, rows
      )
      for j in range(last + 1)
  ]


def num_to_readjust(ratio, budget, rows=1):
  """k_l = round(alpha_r * budget_l) (tensor in, int32 tensor out); with
  block masks rows_l * round(alpha_r * budget_l / rows_l): whole blocks."""
  rows = tf.cast(rows, tf.float64)
  k = tf.round(tf.cast(ratio, tf.float64) * tf.cast(budget, tf.float64) / rows) * rows
  return tf.cast(k, tf.int32)


def _select(scores: tf.Tensor, k) -> tf.Tensor:
  """0/1 float vector marking the k largest scores (lower index wins ties)."""
  flat = tf.reshape(scores, [-1])
  _, idx = tf.math.top_k(flat, k=k, sorted=False)
  picked = tf.scatter_nd(
      tf.expand_dims(idx, 1), tf.ones_like(idx, tf.float32), tf.shape(flat)
  )
  return tf.reshape(picked, tf.shape(scores))


def prune_smallest(weights: tf.Tensor, mask: tf.Tensor, k) -> tf.Tensor:
  """Deactivates the k active positions of smallest |w|; returns the mask."""
  active = mask > 0
  neg_inf = tf.constant(-np.inf, weights.dtype)
  scores = tf.where(active, -tf.abs(weights), neg_inf)
  return mask * (1.0 - _select(scores, k))


def grow_largest(scores: tf.Tensor, mask: tf.Tensor, k) -> tf.Tensor:
  """Activates the k inactive positions of largest |score|; returns the mask.

  Only inactive positions compete (the public experiment code ranked active
  ones too, so it grew fewer weights than intended).
  """
  neg_inf = tf.constant(-np.inf, scores.dtype)
  candidates = tf.where(mask > 0, neg_inf, tf.abs(scores))
  return tf.minimum(mask + _select(candidates, k), 1.0)


def readjust(
    weights: tf.Tensor, mask: tf.Tensor, gradient: tf.Tensor, k, rows: int = 1
) -> tuple[tf.Tensor, tf.Tensor]:
  """Prune k weights by magnitude, then regrow k by gradient magnitude.

  Returns (new_mask, new_weights). A position that enters the mask starts at
  zero; a position that was dropped and regrown in the same step keeps its
  value (its connection never left the model). The count of ones is unchanged.
  With block masks (`rows` > 1; k a multiple of rows) k / rows blocks go and
  come, chosen by their blocks' sums of |w| and of |gradient|.
  """
  # The choices are made on blocks (single entries when rows = 1).
  k_blocks = tf.cast(k, tf.int32) // rows
  shape = weights.shape
  block_mask = tf.cast(pool_blocks(mask, rows, shape) > 0, mask.dtype)
  pruned = prune_smallest(pool_blocks(weights, rows, shape), block_mask, k_blocks)
  grown = expand_blocks(grow_largest(pool_blocks(gradient, rows, shape), pruned, k_blocks), rows, shape)
  new_positions = grown * (1.0 - mask)
  new_weights = weights * grown * (1.0 - new_positions)
  return grown, new_weights


def _largest_with_count(keys, count):
  """int32: the largest t such that at least `count` of `keys` (int32; the
  entries < 0 never count) are >= t: the count-th largest key; 0 when
  fewer than `count` keys are >= 0, 2**31 - 1 when count <= 0. For
  non-negative floats' bit patterns (`tf.bitcast` to int32, ordered as the
  floats) it is the bits of the count-th largest value. Two histograms:
  of the keys' high 16 bits, then of the low 16 bits of the keys in the
  high bucket where the count-th largest falls."""
  count = tf.cast(count, tf.int32)
  keys = tf.reshape(keys, [-1])
  valid = keys >= 0
  high = tf.where(valid, tf.bitwise.right_shift(keys, 16), 32768)  # 32768: not counted

  def from_top(values, bins):
    """Per bin b, how many values are in bins >= b ([bins + 1], last 0)."""
    hist = tf.math.bincount(values, minlength=bins + 1, maxlength=bins + 1, dtype=tf.int32)
    return tf.concat([tf.cumsum(hist[:bins], reverse=True), [0]], 0)

  at_or_above = from_top(high, 32768)
  # at_or_above does not increase with b: the last bin with enough keys.
  top = tf.reduce_sum(tf.cast(at_or_above[:32768] >= count, tf.int32)) - 1
  need = count - at_or_above[tf.maximum(top, 0) + 1]
  low = tf.where(tf.equal(high, top), tf.bitwise.bitwise_and(keys, 65535), 65536)
  low_at_or_above = from_top(low, 65536)
  bottom = tf.reduce_sum(tf.cast(low_at_or_above[:65536] >= need, tf.int32)) - 1
  found = top * 65536 + bottom
  return tf.where(count <= 0, 2**31 - 1, tf.where(top < 0, 0, found))


def _on_blocks(select, values, support, k, rows: int) -> tf.Tensor:
  """`select` (a re-prune) on blocks of `rows` entries: a block's value is
  its sum of |v|, its support its largest entry's; k / rows blocks."""
  shape = values.shape
  shares = tf.reshape(support, block_view(shape, rows))
  block_support = tf.reduce_max(tf.cast(shares, tf.float32), axis=1)
  block_values = tf.ensure_shape(pool_blocks(values, rows, shape), grid_shape(shape, rows))
  return expand_blocks(
      select(block_values, block_support, tf.cast(k, tf.int32) // rows), rows, shape
  )


def keep_top_k(values: tf.Tensor, support: tf.Tensor, k: int, rows: int = 1) -> tf.Tensor:
  """Server re-prune: the k positions of largest |v| where support > 0.

  `support` is the aggregated mask, 0 where no client voted and otherwise
  the vote share (any positive number). Ties in |v| (typically weights that
  clients regrew at zero) go to the larger support, then the lower index.
  If fewer than k positions have support, all of them are kept. Returns a 0/1
  float mask. With block masks (`rows` > 1; k a multiple of rows): the k /
  rows blocks of largest sum of |v|, a block's support its largest entry's.

  The same choice as `keep_top_k_by_sorting` (tested), without sorting: the
  k-th largest |v| among the supported positions and, among the positions
  tied at it, the largest shares that fit, are read off histograms of
  their float32 bit patterns (non-negative floats order as their bits);
  the positions tied at both go by index. A few passes over the layer
  instead of two sorts of it (the re-prune runs every round; on the
  2-core machine the sorts took about 35 ms of a FedDST round).
  """
  if rows > 1:
    return _on_blocks(keep_top_k, values, support, k, rows)
  size = int(np.prod(values.shape))
  k = tf.minimum(tf.cast(k, tf.int32), size)
  supported = tf.reshape(support > 0, [-1])
  share = tf.reshape(tf.cast(support, tf.float32), [-1])
  magnitude = tf.bitcast(tf.abs(tf.reshape(tf.cast(values, tf.float32), [-1])), tf.int32)
  magnitude = tf.where(supported, magnitude, -1)
  # The k-th largest |v|: all above it are kept, `needed` of those at it.
  at_least = _largest_with_count(magnitude, k)
  above = magnitude > at_least
  tied = tf.equal(magnitude, at_least)
  needed = k - tf.reduce_sum(tf.cast(above, tf.int32))
  # Among those, the larger shares first (shares are positive floats).
  tied_share = tf.where(tied, tf.bitcast(share, tf.int32), -1)
  share_at_least = _largest_with_count(tied_share, needed)
  share_above = tied_share > share_at_least
  share_tied = tf.equal(tied_share, share_at_least)
  still = needed - tf.reduce_sum(tf.cast(share_above, tf.int32))
  # Then the lower index.
  by_index = tf.logical_and(
      share_tied, tf.cumsum(tf.cast(share_tied, tf.int32), exclusive=True) < still
  )
  picked = tf.logical_and(supported, tf.logical_or(above, tf.logical_or(share_above, by_index)))
  return tf.reshape(tf.cast(picked, tf.float32), tf.shape(values))


def keep_top_k_by_sorting(values: tf.Tensor, support: tf.Tensor, k: int, rows: int = 1) -> tf.Tensor:
  """`keep_top_k`'s choice (the same contract) by two stable sorts: by
  |v|, then share, then index. The reference its tests compare against."""
  if rows > 1:
    return _on_blocks(keep_top_k_by_sorting, values, support, k, rows)
  size = int(np.prod(values.shape))
  k = tf.minimum(tf.cast(k, tf.int32), size)  # a Python int or a tensor
  supported = tf.reshape(support > 0, [-1])
  share = tf.reshape(tf.cast(support, tf.float32), [-1])
  magnitude = tf.where(
      supported, tf.reshape(tf.abs(values), [-1]), tf.constant(-1.0, values.dtype)
  )
  by_share = tf.argsort(share, direction="DESCENDING", stable=True)
  by_magnitude = tf.argsort(
      tf.gather(magnitude, by_share), direction="DESCENDING", stable=True
  )
  chosen = tf.gather(by_share, by_magnitude)[:k]
  picked = tf.scatter_nd(
      tf.expand_dims(chosen, 1), tf.ones_like(chosen, tf.float32), [size]
  )
  picked *= tf.cast(supported, tf.float32)
  return tf.reshape(picked, tf.shape(values))
