"""Compact sparse messages: what a sparse model's message holds, as tensors
of a fixed type (docs/algorithms.md section 6.1).

Every layer keeps exactly its budget of kernel weights, so a message has a
static type. Per prunable layer (kernel of `size` weights, budget k):

    values     float32[k] (float16[k] for half-precision uploads): the kept
               weights in increasing flat (row-major) order of the kernel
    mask_bits  uint8[ceil(units / 8)]: the mask packed 8 to a byte, the
               first position in the byte's highest bit (numpy's packbits
               order), the last byte padded with zeros; `units` is the
               kernel's size, or with block masks (rows r > 1, blocks of r
               consecutive inputs of one output, or a convolution's whole
               filters) its number of blocks, one bit per block, in the
               row-major order of the block grid (`masks.block_view`)

plus the other trainable values (biases) whole, in the values' dtype. The mask part is left out
of messages that do not carry it (`encode(..., with_mask=False)`); the
receiver then decodes against the mask it already holds.

`encode` / `decode` are TensorFlow functions (they run inside TFF
computations); `encode_np` / `decode_np` are their numpy references, and
`message_bits` counts a message's bits from its tensors' shapes and dtypes.
"""

import collections
from typing import Sequence

import numpy as np
import tensorflow as tf

from tff_feddst import masks as masks_lib

# Bits of one element of each dtype a message may hold.
DTYPE_BITS = {
    np.dtype(np.float32): 32,
    np.dtype(np.float16): 16,
    np.dtype(np.uint8): 8,
    np.dtype(np.int32): 32,
    np.dtype(np.int64): 64,  # counters in the metrics' sums (`wire.py`)
}


def mask_units(shape: Sequence[int], rows: int = 1) -> int:
  """The mask's bits before packing: one per weight, or one per block of
  `rows` consecutive inputs of one output (a [in, out] kernel)."""
  size = int(np.prod(shape))
  return size // rows


def packed_size(units: int) -> int:
  return -(-units // 8)


# ------------------------------------------------------------------- numpy


def _block_grid_np(mask: np.ndarray, rows: int) -> np.ndarray:
  """The block mask of an [in, out] mask in blocks of `rows` inputs (flat)."""
  if rows == 1:
    return np.asarray(mask).ravel()
  grid = np.asarray(mask).reshape(masks_lib.block_view(np.shape(mask), rows))
  return grid[:, 0, :].ravel()


def _expand_np(units: np.ndarray, shape, rows: int) -> np.ndarray:
  if rows == 1:
    return units.reshape(shape)
  view = masks_lib.block_view(shape, rows)
  grid = units.reshape(view[0], 1, view[2])
  return np.broadcast_to(grid, view).reshape(shape)


def pack_bits_np(mask: np.ndarray, rows: int = 1) -> np.ndarray:
  """uint8[ceil(units / 8)]: the mask (or its block mask) packed."""
  return np.packbits(_block_grid_np(mask, rows) > 0, bitorder="big")


def unpack_bits_np(packed: np.ndarray, shape, rows: int = 1) -> np.ndarray:
  units = mask_units(shape, rows)
  bits = np.unpackbits(np.asarray(packed, np.uint8), count=units, bitorder="big")
  return _expand_np(bits.astype(np.float32), tuple(shape), rows)


def encode_layer_np(kernel, mask, budget: int, value_dtype=np.float32, rows: int = 1,
                    with_mask: bool = True):
  kept = np.asarray(mask).ravel() > 0
  if int(kept.sum()) != budget:
    raise ValueError(f"the mask keeps {int(kept.sum())} weights, the budget is {budget}")
  layer = collections.OrderedDict(values=np.asarray(kernel).ravel()[kept].astype(value_dtype))
  if with_mask:
    layer["mask_bits"] = pack_bits_np(mask, rows)
  return layer


def decode_layer_np(layer, shape, rows: int = 1, mask=None):
  """(kernel float32, mask float32) of an encoded layer; `mask` is the
  receiver's own when the message carries none."""
  if "mask_bits" in layer:
    mask = unpack_bits_np(layer["mask_bits"], shape, rows)
  mask = np.asarray(mask, np.float32)
  kernel = np.zeros(int(np.prod(shape)), np.float32)
  kernel[mask.ravel() > 0] = np.asarray(layer["values"], np.float32)
  return kernel.reshape(shape), mask


# -------------------------------------------------------------- TensorFlow


def _block_grid(mask, shape, rows: int):
  flat = tf.reshape(mask, [-1])
  if rows == 1:
    return flat
  grid = tf.reshape(mask, masks_lib.block_view(shape, rows))
  return tf.reshape(grid[:, 0, :], [-1])


def _expand(units, shape, rows: int):
  if rows == 1:
    return tf.reshape(units, shape)
  view = masks_lib.block_view(shape, rows)
  grid = tf.reshape(units, [view[0], 1, view[2]])
  return tf.reshape(tf.tile(grid, [1, rows, 1]), shape)


# The value of each bit of a byte, the first position highest.
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def pack_bits(mask, shape, rows: int = 1):
  """`pack_bits_np` in TensorFlow: uint8[ceil(units / 8)]."""
  units = mask_units(shape, rows)
  bits = tf.cast(_block_grid(mask, shape, rows) > 0, tf.int32)
  bits = tf.pad(bits, [[0, packed_size(units) * 8 - units]])
  weights = tf.constant(_BIT_WEIGHTS, tf.int32)
  packed = tf.reduce_sum(tf.reshape(bits, [-1, 8]) * weights, axis=1)
  return tf.cast(packed, tf.uint8)


def unpack_bits(packed, shape, rows: int = 1):
  """float32 mask of `shape` from `pack_bits`' bytes."""
  units = mask_units(shape, rows)
  bytes_ = tf.cast(tf.reshape(packed, [-1, 1]), tf.int32)
  bits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bytes_, tf.range(7, -1, -1)), 1)
  bits = tf.reshape(bits, [-1])[:units]
  return _expand(tf.cast(bits, tf.float32), list(shape), rows)


def encode_layer(kernel, mask, budget: int, value_dtype=tf.float32, rows: int = 1,
                 with_mask: bool = True):
  """One layer's part of a message (static shapes: values [budget])."""
  shape = kernel.shape.as_list()
  kept = tf.reshape(mask, [-1]) > 0
  values = tf.boolean_mask(tf.reshape(kernel, [-1]), kept)
  values = tf.ensure_shape(tf.cast(values, value_dtype), [budget])
  layer = collections.OrderedDict(values=values)
  if with_mask:
    layer["mask_bits"] = pack_bits(mask, shape, rows)
  return layer


def decode_layer(layer, shape, rows: int = 1, mask=None):
  """(kernel float32, mask float32) of an encoded layer (`decode_layer_np`)."""
  if "mask_bits" in layer:
    mask = unpack_bits(layer["mask_bits"], shape, rows)
  mask = tf.cast(mask, tf.float32)
  flat_mask = tf.reshape(mask, [-1])
  positions = tf.where(flat_mask > 0)
  values = tf.cast(layer["values"], tf.float32)
  kernel = tf.scatter_nd(positions, values, tf.shape(flat_mask, out_type=tf.int64))
  return tf.reshape(kernel, shape), mask


# ---------------------------------------------------------- whole messages


def encode(trainable, masks, layout, value_dtype=tf.float32, with_mask: bool = True,
           budgets=None):
  """A model's message: OrderedDict(layers=[per prunable layer, in layout
  order], other=[the other trainable values, in order]). `budgets`: the
  layers' budgets (default `layout.budgets`)."""
  budgets = layout.budgets if budgets is None else budgets
  layers = [
      encode_layer(
          trainable[i], masks[slot], budgets[slot], value_dtype, layout.rows(slot), with_mask
      )
      for slot, i in enumerate(layout.kernel_index)
  ]
  kernels = set(layout.kernel_index)
  other = [tf.cast(v, value_dtype) for i, v in enumerate(trainable) if i not in kernels]
  return collections.OrderedDict(layers=layers, other=other)


def decode(message, layout, masks=None):
  """(trainable list, masks list) of `encode`'s message; `masks`: the
  receiver's own, for a message without them."""
  trainable = [None] * (len(layout.kernel_index) + len(message["other"]))
  decoded_masks = []
  for slot, i in enumerate(layout.kernel_index):
    kernel, mask = decode_layer(
        message["layers"][slot], layout.kernel_shapes[slot], layout.rows(slot),
        None if masks is None else masks[slot],
    )
    trainable[i] = kernel
    decoded_masks.append(mask)
  return _fill_others(trainable, message["other"]), decoded_masks


def _fill_others(trainable, other):
  """`trainable` with its unset (non-kernel) entries taken in order from
  `other`, as float32."""
  others = (tf.cast(v, tf.float32) for v in other)
  return [next(others) if t is None else t for t in trainable]


def message_bits(message) -> int:
  """The bits of a message (tensors, arrays or TFF/TF specs with shapes
  and dtypes): the sum over its leaves of elements times bits per element."""
  total = 0
  for leaf in tf.nest.flatten(message):
    dtype = np.dtype(getattr(getattr(leaf, "dtype", None), "as_numpy_dtype", None) or leaf.dtype)
    total += int(np.prod(leaf.shape)) * DTYPE_BITS[dtype]
  return total


# ------------------------------------------------------------------ uploads


def padded_values(kernel, mask, budget: int, value_dtype):
  """The kept values in increasing position, cut or padded with zeros to
  `budget` (a mask keeps fewer than its budget only when the global mask
  it came from did; one keeping more is rejected by the server, which sees
  its bits)."""
  values = tf.boolean_mask(tf.reshape(kernel, [-1]), tf.reshape(mask, [-1]) > 0)
  values = values[:budget]
  values = tf.pad(values, [[0, budget - tf.shape(values)[0]]])
  return tf.ensure_shape(tf.cast(values, value_dtype), [budget])


def kept_values(kernel, mask, value_dtype):
  """value_dtype[?]: the kept values in increasing position."""
  kept = tf.reshape(mask, [-1]) > 0
  return tf.cast(tf.boolean_mask(tf.reshape(kernel, [-1]), kept), value_dtype)


def encode_upload(trainable, masks, layout, value_dtype=tf.float32, with_mask=True,
                  padded=True):
  """A client's upload: `encode`'s message with a fixed type for every
  round. `values` is value_dtype[budget_l] (zero-padded, see
  `padded_values`), or with `padded=False` value_dtype[?], exactly the
  kept values (clients of different budgets, `tier_work`); `mask_bits`
  is uint8[?]: the packed mask when `with_mask` (a boolean tensor: the
  client's mask is not the global one it received), else empty, and the
  server decodes against the global mask."""
  layers = []
  for slot, i in enumerate(layout.kernel_index):
    shape, rows = list(layout.kernel_shapes[slot]), layout.rows(slot)
    mask = masks[slot]
    bits = tf.cond(
        tf.convert_to_tensor(with_mask),
        lambda mask=mask, shape=shape, rows=rows: pack_bits(mask, shape, rows),
        lambda: tf.zeros([0], tf.uint8),
    )
    if padded:
      values = padded_values(trainable[i], mask, layout.budgets[slot], value_dtype)
    else:
      values = kept_values(trainable[i], mask, value_dtype)
    layers.append(collections.OrderedDict(values=values, mask_bits=bits))
  kernels = set(layout.kernel_index)
  other = [tf.cast(v, value_dtype) for i, v in enumerate(trainable) if i not in kernels]
  return collections.OrderedDict(layers=layers, other=other)


def scatter_kept(values, mask):
  """float32 tensor of `mask`'s shape: `values` (in increasing position) at
  the mask's ones, zeros elsewhere; values past the mask's count are
  ignored, and so are ones past the values' count (a mask over its budget,
  which the server rejects)."""
  flat_mask = tf.reshape(tf.cast(mask, tf.float32), [-1])
  positions = tf.where(flat_mask > 0)
  count = tf.minimum(tf.shape(positions)[0], tf.shape(values)[0])
  kept = tf.cast(values, tf.float32)[:count]
  flat = tf.scatter_nd(positions[:count], kept, tf.shape(flat_mask, out_type=tf.int64))
  return tf.reshape(flat, tf.shape(mask))


def tensor_bits(message):
  """int64 tensor: the bits of `message`'s tensors as they are (their
  sizes at run time, so an empty `mask_bits` counts 0)."""
  total = tf.constant(0, tf.int64)
  for leaf in tf.nest.flatten(message):
    bits = DTYPE_BITS[np.dtype(leaf.dtype.as_numpy_dtype)]
    total += tf.size(leaf, out_type=tf.int64) * bits
  return total


# ------------------------------------------------------ a cohort's uploads
#
# A cohort (`cohort_work`) trains G clients as one computation, every tensor
# with a leading client axis. Each client's upload is built as
# `encode_upload` builds it, G at once, and decoded as the server decodes
# it, before the cohort sums the clients' voting contributions.


def _block_grids(mask, shape, rows: int):
  """[G, units]: each client's mask, or block mask (`_block_grid`)."""
  g, units = tf.shape(mask)[0], mask_units(shape, rows)
  if rows == 1:
    return tf.reshape(mask, [g, units])
  grid = tf.reshape(mask, [g, *masks_lib.block_view(shape, rows)])
  return tf.reshape(grid[:, :, 0, :], [g, units])


def _pack_rows(mask, shape, rows: int):
  """uint8 [G, ceil(units / 8)]: `pack_bits` of each client's mask."""
  units = mask_units(shape, rows)
  bits = tf.cast(_block_grids(mask, shape, rows) > 0, tf.int32)
  bits = tf.pad(bits, [[0, 0], [0, packed_size(units) * 8 - units]])
  bits = tf.reshape(bits, [tf.shape(bits)[0], packed_size(units), 8])
  return tf.cast(tf.reduce_sum(bits * tf.constant(_BIT_WEIGHTS, tf.int32), axis=2), tf.uint8)


def _unpack_rows(packed, shape, rows: int):
  """float32 [S, *shape]: `unpack_bits` of each row of `packed`."""
  units = mask_units(shape, rows)
  s = tf.shape(packed)[0]
  bytes_ = tf.cast(packed, tf.int32)[:, :, tf.newaxis]
  bits = tf.bitwise.bitwise_and(tf.bitwise.right_shift(bytes_, tf.range(7, -1, -1)), 1)
  bits = tf.cast(tf.reshape(bits, [s, packed_size(units) * 8])[:, :units], tf.float32)
  if rows == 1:
    return tf.reshape(bits, [s, *shape])
  view = masks_lib.block_view(shape, rows)
  grid = tf.reshape(bits, [s, view[0], 1, view[2]])
  return tf.reshape(tf.tile(grid, [1, 1, rows, 1]), [s, *shape])


def _row_counts(keep, g, size: int):
  """int32 [G]: each row's kept positions, and [G] the exclusive prefix sums
  (where each row's run starts among all rows' kept positions)."""
  counts = tf.reduce_sum(tf.cast(tf.reshape(keep, [g, size]), tf.int32), axis=1)
  return counts, tf.cumsum(counts, exclusive=True)


def _padded_rows(kernel, mask, shape, budget: int | None, value_dtype):
  """value_dtype [G, budget]: `padded_values` of each client (its kept
  values in increasing position, cut or zero-padded to `budget`). `budget`
  None: as long as the longest row (budgets that change by round; every
  client keeps as many as the global mask it received, since readjustment
  moves positions without changing their number)."""
  g, size = tf.shape(kernel)[0], int(np.prod(shape))
  keep = tf.reshape(mask, [-1]) > 0
  kept = tf.boolean_mask(tf.reshape(kernel, [-1]), keep)  # row after row
  counts, starts = _row_counts(keep, g, size)
  if budget is None:
    budget = tf.reduce_max(tf.concat([counts, [0]], 0))
  elif budget == 0:
    return tf.zeros([g, 0], value_dtype)
  rank = tf.range(budget)[tf.newaxis]
  present = rank < counts[:, tf.newaxis]
  values = tf.gather(kept, tf.where(present, starts[:, tf.newaxis] + rank, 0))
  return tf.cast(tf.where(present, values, 0.0), value_dtype)


def encode_cohort_uploads(trainable, masks, layout, value_dtype, send_mask, padded=True):
  """The uploads of a cohort's G clients (`trainable`, `masks`: each tensor
  with a leading client axis) as one message of batched tensors: per layer
  `values` value_dtype[G, budget_l] (row g: client g's `encode_upload`
  values) and `mask_bits` uint8[S, ceil(units_l / 8)], the packed masks of
  the S clients whose `send_mask` (bool [G]) is true, in client order;
  `other` [G, ...]. Its `tensor_bits` are the sum of the G clients'
  `encode_upload` messages' bits. `padded=False` (budgets that change by
  round): `values` value_dtype[G, ?], as long as the clients' kept values
  (`encode_upload(padded=False)`; see `_padded_rows`)."""
  layers = []
  for slot, i in enumerate(layout.kernel_index):
    shape, rows = list(layout.kernel_shapes[slot]), layout.rows(slot)
    layers.append(collections.OrderedDict(
        values=_padded_rows(
            trainable[i], masks[slot], shape, layout.budgets[slot] if padded else None,
            value_dtype,
        ),
        mask_bits=_pack_rows(tf.boolean_mask(masks[slot], send_mask), shape, rows),
    ))
  kernels = set(layout.kernel_index)
  other = [tf.cast(v, value_dtype) for i, v in enumerate(trainable) if i not in kernels]
  return collections.OrderedDict(layers=layers, other=other)


def _decode_rows(values, mask, shape, budget: int | None):
  """float32 [G, *shape]: each client's kept values at its mask's ones in
  increasing position (`scatter_kept`: ones past the budget get 0).
  `budget` None: the values' width (`encode_cohort_uploads(padded=False)`)."""
  g, size = tf.shape(mask)[0], int(np.prod(shape))
  if budget is None:
    # A spare zero column keeps the gather below in range when the width is 0.
    budget = tf.shape(values)[1]
    values = tf.pad(values, [[0, 0], [0, 1]])
    width = budget + 1
  elif budget == 0:
    return tf.zeros_like(tf.reshape(mask, [g, *shape]))
  else:
    width = budget
  keep = tf.reshape(mask, [-1]) > 0
  positions = tf.where(keep)  # [K, 1], row after row
  _, starts = _row_counts(keep, g, size)
  row = tf.cast(positions[:, 0] // size, tf.int32)
  rank = tf.range(tf.shape(positions)[0]) - tf.gather(starts, row)
  taken = rank < budget
  flat_values = tf.reshape(tf.cast(values, tf.float32), [-1])
  picked = tf.where(
      taken, tf.gather(flat_values, row * width + tf.minimum(rank, width - 1)), 0.0
  )
  # SparseToDense: a plain scatter of sorted positions (4x scatter_nd's speed here).
  flat = tf.raw_ops.SparseToDense(
      sparse_indices=positions, output_shape=tf.cast(tf.stack([g * size]), tf.int64),
      sparse_values=picked, default_value=0.0, validate_indices=False,
  )
  return tf.reshape(flat, [g, *shape])


def cohort_uploads_as_received(trainable, masks, layout, value_dtype, held_masks, send_mask,
                               padded=True):
  """(trainable, masks, bits): what `decode_cohort_uploads` gives for
  `encode_cohort_uploads`' message of the same arguments, and that
  message's `tensor_bits`, without gathering the kept values into the
  message and scattering them back.

  The masks are 0/1, and a client that sends no mask bits (`send_mask`
  false) holds its own mask (`held_masks` row equal to its `masks` row):
  a cohort's clients send their bits exactly when their mask changed.
  The decoded masks are built as the server builds them (the senders'
  packed bits unpacked over the held masks). Where the senders' decoded
  masks equal their masks and no client keeps more than its layer's
  budget (every valid upload), the decoded kernels are the trained values
  at the mask's ones, through `value_dtype`, and zeros elsewhere: that is
  what the message's values, placed back at the mask's ones in
  increasing position, hold. Otherwise (a malformed mask) the message is
  built and decoded (the reference; `tests/test_messages.py` checks the
  two equal). The bits follow from the message's shapes: per layer G
  times the values' width (its budget, or with `padded=False` the most
  values a client keeps) at `value_dtype`'s bits, plus the senders' mask
  bytes, plus the other values.
  """
  g = tf.shape(send_mask)[0]
  senders = tf.where(send_mask)
  any_sender = tf.reduce_any(send_mask)
  value_bits = DTYPE_BITS[np.dtype(tf.as_dtype(value_dtype).as_numpy_dtype)]
  decoded_masks, matches, bits = [], [], tf.constant(0, tf.int64)
  for slot in range(len(layout.kernel_index)):
    shape, rows = list(layout.kernel_shapes[slot]), layout.rows(slot)
    sent = tf.boolean_mask(masks[slot], send_mask)
    packed = _pack_rows(sent, shape, rows)
    unpacked = _unpack_rows(packed, shape, rows)
    held = tf.cast(held_masks[slot], tf.float32)
    mask = tf.cond(
        any_sender,
        lambda held=held, unpacked=unpacked: tf.tensor_scatter_nd_update(held, senders, unpacked),
        lambda held=held: held,
    )
    decoded_masks.append(mask)
    # 0/1 masks: a row's sum is its number of ones.
    counts = tf.reduce_sum(tf.reshape(mask, [g, int(np.prod(shape))]), axis=1)
    if padded:
      width = layout.budgets[slot]
      matches.append(tf.reduce_all(counts <= width))
    else:
      width = tf.cast(tf.reduce_max(tf.concat([counts, [0.0]], 0)), tf.int32)
    matches.append(tf.reduce_all(tf.equal(unpacked, tf.cast(sent, tf.float32))))
    bits += (tf.cast(g, tf.int64) * tf.cast(width, tf.int64) * value_bits
             + tf.size(packed, out_type=tf.int64) * 8)
  slot_of = layout.mask_slot()
  for i, v in enumerate(trainable):
    if i not in slot_of:
      bits += tf.size(v, out_type=tf.int64) * value_bits

  def through_dtype(v):
    return tf.cast(tf.cast(v, value_dtype), tf.float32) if value_dtype != tf.float32 else v

  def direct():
    return tuple(
        tf.where(decoded_masks[slot_of[i]] > 0, through_dtype(v), 0.0) if i in slot_of
        else through_dtype(v)
        for i, v in enumerate(trainable)
    )

  def built():
    message = encode_cohort_uploads(trainable, masks, layout, value_dtype, send_mask, padded)
    values, _ = decode_cohort_uploads(message, layout, held_masks, send_mask, padded)
    return tuple(values)

  values = tf.cond(tf.reduce_all(tf.stack(matches)), direct, built)
  return list(values), decoded_masks, bits


def decode_cohort_uploads(message, layout, held_masks, send_mask, padded=True):
  """(trainable, masks), each tensor [G, ...] float32, of
  `encode_cohort_uploads`' message (of the same `padded`): a client's mask
  from its bits if it sent them, else the mask the receiver holds for it
  (`held_masks`, the global mask it was sent)."""
  senders = tf.where(send_mask)
  trainable = [None] * (len(layout.kernel_index) + len(message["other"]))
  decoded_masks = []
  for slot, i in enumerate(layout.kernel_index):
    shape, rows = list(layout.kernel_shapes[slot]), layout.rows(slot)
    layer = message["layers"][slot]
    mask = tf.tensor_scatter_nd_update(
        tf.cast(held_masks[slot], tf.float32), senders,
        _unpack_rows(layer["mask_bits"], shape, rows),
    )
    trainable[i] = _decode_rows(
        layer["values"], mask, shape, layout.budgets[slot] if padded else None
    )
    decoded_masks.append(mask)
  return _fill_others(trainable, message["other"]), decoded_masks
