"""Compact sparse messages (`tff_feddst/messages.py`): exact round trips.

The TensorFlow encoder is checked against numpy's packbits and boolean
indexing (the numpy reference is checked by hand on small cases), on random
masks and on the edge cases: an empty layer, a full layer, sizes that are
not a multiple of 8, block masks.
"""

import functools

import numpy as np
import pytest
import tensorflow as tf

import keras_models
from tff_feddst import masks as masks_lib
from tff_feddst import messages
from tff_feddst import sparse_model


def test_the_bits_are_packed_first_position_highest():
  mask = np.array([1, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0], np.float32)  # 11: not a multiple of 8
  packed = messages.pack_bits_np(mask)
  assert packed.dtype == np.uint8 and packed.tolist() == [0b10000001, 0b11000000]
  np.testing.assert_array_equal(messages.unpack_bits_np(packed, (11,)), mask)
  np.testing.assert_array_equal(messages.pack_bits(tf.constant(mask), [11]).numpy(), packed)
  np.testing.assert_array_equal(messages.unpack_bits(tf.constant(packed), [11]).numpy(), mask)


@pytest.mark.parametrize("shape", [(5, 5, 1, 2), (13,), (16, 3), (8, 8), (1, 1)])
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_tensorflow_and_numpy_pack_and_encode_alike_and_round_trip(shape, density):
  rng = np.random.default_rng(int(np.prod(shape)) + int(10 * density))
  size = int(np.prod(shape))
  mask = np.zeros(size, np.float32)
  mask[rng.permutation(size)[: int(round(density * size))]] = 1.0
  mask = mask.reshape(shape)
  kernel = (rng.normal(size=shape) * mask).astype(np.float32)
  budget = int(mask.sum())

  packed = messages.pack_bits_np(mask)
  assert packed.shape == (-(-size // 8),)
  np.testing.assert_array_equal(messages.pack_bits(tf.constant(mask), list(shape)).numpy(), packed)
  np.testing.assert_array_equal(messages.unpack_bits(tf.constant(packed), list(shape)).numpy(), mask)

  want = messages.encode_layer_np(kernel, mask, budget)
  got = messages.encode_layer(tf.constant(kernel), tf.constant(mask), budget)
  assert got["values"].shape == (budget,) and got["values"].dtype == tf.float32
  np.testing.assert_array_equal(got["values"].numpy(), want["values"])
  np.testing.assert_array_equal(got["mask_bits"].numpy(), want["mask_bits"])
  # The kept values in row-major order, by hand.
  np.testing.assert_array_equal(want["values"], [v for v, m in zip(kernel.ravel(), mask.ravel()) if m])
  for decode in (messages.decode_layer_np, messages.decode_layer):
    back_kernel, back_mask = decode(got, shape)
    np.testing.assert_array_equal(np.asarray(back_kernel), kernel)
    np.testing.assert_array_equal(np.asarray(back_mask), mask)
  # Without the mask: the receiver decodes against its own.
  bare = messages.encode_layer(tf.constant(kernel), tf.constant(mask), budget, with_mask=False)
  assert list(bare) == ["values"]
  back_kernel, _ = messages.decode_layer(bare, shape, mask=tf.constant(mask))
  np.testing.assert_array_equal(back_kernel.numpy(), kernel)


def test_a_mask_off_budget_is_refused():
  mask = np.array([1, 1, 0], np.float32)
  with pytest.raises(ValueError, match="keeps 2 weights, the budget is 1"):
    messages.encode_layer_np(np.ones(3, np.float32), mask, 1)
  with pytest.raises(tf.errors.InvalidArgumentError, match="not compatible with expected shape"):
    messages.encode_layer(tf.ones([3]), tf.constant(mask), 1)


def test_float16_values_are_the_kernels_rounded_once():
  rng = np.random.default_rng(3)
  kernel = rng.normal(size=(6, 4)).astype(np.float32)
  mask = (rng.random((6, 4)) < 0.5).astype(np.float32)
  kernel *= mask
  got = messages.encode_layer(tf.constant(kernel), tf.constant(mask), int(mask.sum()), tf.float16)
  assert got["values"].dtype == tf.float16
  np.testing.assert_array_equal(got["values"].numpy(), kernel[mask > 0].astype(np.float16))
  back, _ = messages.decode_layer(got, (6, 4))
  np.testing.assert_array_equal(back.numpy(), kernel.astype(np.float16).astype(np.float32))


def test_block_masks_send_one_bit_per_block():
  rng = np.random.default_rng(4)
  blocks = (rng.random((3, 5)) < 0.4).astype(np.float32)  # 12 inputs in blocks of 4, 5 outputs
  mask = np.repeat(blocks, 4, axis=0)  # [12, 5]: block b covers inputs 4b..4b+3
  assert mask.shape == (12, 5)
  kernel = (rng.normal(size=(12, 5)) * mask).astype(np.float32)
  packed = messages.pack_bits_np(mask, rows=4)
  assert packed.shape == (2,)  # 15 blocks
  np.testing.assert_array_equal(np.unpackbits(packed)[:15], blocks.ravel())
  np.testing.assert_array_equal(messages.pack_bits(tf.constant(mask), [12, 5], rows=4).numpy(), packed)
  layer = messages.encode_layer(tf.constant(kernel), tf.constant(mask), int(mask.sum()), rows=4)
  back_kernel, back_mask = messages.decode_layer(layer, (12, 5), rows=4)
  np.testing.assert_array_equal(back_mask.numpy(), mask)
  np.testing.assert_array_equal(back_kernel.numpy(), kernel)
  np.testing.assert_array_equal(messages.unpack_bits_np(packed, (12, 5), rows=4), mask)


def test_kernel_block_masks_send_one_bit_per_filter():
  """A convolution [3, 2, 4, 5] in whole filters: 20 bits, filter (i, o)
  at position i * 5 + o; numpy and TensorFlow agree and round-trip."""
  rng = np.random.default_rng(5)
  filters = rng.random((4, 5)) < 0.4
  mask = np.broadcast_to(filters[None, None], (3, 2, 4, 5)).astype(np.float32)
  kernel = (rng.normal(size=(3, 2, 4, 5)) * mask).astype(np.float32)
  packed = messages.pack_bits_np(mask, rows=6)
  assert messages.mask_units((3, 2, 4, 5), 6) == 20 and packed.shape == (3,)
  np.testing.assert_array_equal(np.unpackbits(packed)[:20], filters.ravel())
  np.testing.assert_array_equal(messages.pack_bits(tf.constant(mask), [3, 2, 4, 5], rows=6).numpy(), packed)
  np.testing.assert_array_equal(messages.unpack_bits_np(packed, (3, 2, 4, 5), rows=6), mask)
  np.testing.assert_array_equal(messages.unpack_bits(tf.constant(packed), [3, 2, 4, 5], rows=6).numpy(), mask)
  layer = messages.encode_layer(tf.constant(kernel), tf.constant(mask), int(mask.sum()), rows=6)
  back_kernel, back_mask = messages.decode_layer(layer, (3, 2, 4, 5), rows=6)
  np.testing.assert_array_equal(back_mask.numpy(), mask)
  np.testing.assert_array_equal(back_kernel.numpy(), kernel)


def _layout(mask_block=1, conv_kernels=False):
  keras_fn = functools.partial(
      keras_models.build_model, "mnist_cnn", (28, 28, 1), 10,
      widths={"conv1": 3, "conv2": 4, "dense1": 8},
  )
  model = keras_fn()
  layout = sparse_model.build_layout(
      sparse_model.wrap_prunable(keras_fn()), 0.8, "erk", mask_block, conv_kernels
  )
  return model, layout


@pytest.mark.parametrize("mask_block, conv_kernels", [(1, False), (4, False), (4, True)])
def test_a_models_message_round_trips_and_counts_its_bits(mask_block, conv_kernels):
  model, layout = _layout(mask_block, conv_kernels)
  if conv_kernels:  # conv2 [5, 5, 3, 4]: a bit per filter, 12 bits
    assert layout.all_rows == (25, 25, 4, 4)
    assert messages.mask_units(layout.kernel_shapes[1], 25) == 12
  rng = np.random.default_rng(5)
  masks = masks_lib.random_masks(layout.kernel_shapes, layout.budgets, 6, layout.all_rows)
  trainable = [rng.normal(size=w.shape).astype(np.float32) for w in model.trainable_weights]
  for slot, i in enumerate(layout.kernel_index):
    trainable[i] *= masks[slot]
  message = messages.encode([tf.constant(w) for w in trainable], masks, layout)
  back, back_masks = messages.decode(message, layout)
  for a, b in zip(back, trainable):
    np.testing.assert_array_equal(np.asarray(a), b)
  for a, b in zip(back_masks, masks):
    np.testing.assert_array_equal(np.asarray(a), b)

  biases = sum(int(np.prod(w.shape)) for i, w in enumerate(trainable) if i not in layout.kernel_index)
  units = [messages.mask_units(s, r) for s, r in zip(layout.kernel_shapes, layout.all_rows)]
  assert messages.message_bits(message) == (
      32 * (layout.num_kept + biases) + 8 * sum(-(-u // 8) for u in units)
  )
  bare = messages.encode([tf.constant(w) for w in trainable], masks, layout, with_mask=False)
  assert messages.message_bits(bare) == 32 * (layout.num_kept + biases)
  half = messages.encode([tf.constant(w) for w in trainable], masks, layout, tf.float16, False)
  assert messages.message_bits(half) == 16 * (layout.num_kept + biases)
  back, _ = messages.decode(bare, layout, masks=masks)
  for a, b in zip(back, trainable):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_a_tff_computation_sends_the_compact_types():
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  model, layout = _layout()
  specs = [tf.TensorSpec(w.shape, tf.float32) for w in model.trainable_weights]
  mask_specs = [tf.TensorSpec(s, tf.float32) for s in layout.kernel_shapes]

  @tff.tensorflow.computation(specs, mask_specs)
  def encode_tf(trainable, masks):
    return messages.encode(list(trainable), list(masks), layout)

  result = encode_tf.type_signature.result
  for slot, (budget, shape) in enumerate(zip(layout.budgets, layout.kernel_shapes)):
    layer = result.layers[slot]
    assert [name for name, _ in tff.structure.iter_elements(layer)] == ["values", "mask_bits"]
    assert (layer.values.dtype, tuple(layer.values.shape)) == (np.float32, (budget,))
    size = int(np.prod(shape))
    assert (layer.mask_bits.dtype, tuple(layer.mask_bits.shape)) == (np.uint8, (-(-size // 8),))
  others = [w for i, w in enumerate(model.trainable_weights) if i not in layout.kernel_index]
  assert [tuple(t.shape) for t in result.other] == [tuple(w.shape) for w in others]
  # No float32 array of a kernel's shape crosses: the mask is bits.
  flat = [tuple(t.shape) for t in tf.nest.flatten(tff.types.type_to_tf_tensor_specs(result))]
  assert not set(flat) & set(map(tuple, layout.kernel_shapes))
  # The bits of the type are the bits of a value of it.
  masks = masks_lib.random_masks(layout.kernel_shapes, layout.budgets, 1, layout.all_rows)
  value = messages.encode([tf.zeros(s.shape) for s in specs], masks, layout)
  assert messages.message_bits(tff.types.type_to_tf_tensor_specs(result)) == (
      messages.message_bits(value)
  )


def _client_masks(layout, seed, keep):
  """One client's masks: random at the budgets, with `keep` of each
  layer's kept positions (fewer than the budget when below 1, the
  padding case; more when above, a mask the server rejects)."""
  rng = np.random.default_rng(seed)
  masks = masks_lib.random_masks(layout.kernel_shapes, layout.budgets, seed, layout.all_rows)
  out = []
  for mask, rows in zip(masks, layout.all_rows):
    flat = mask.reshape(-1, *mask.shape[-1:]) if rows > 1 else mask.ravel()
    grid = flat.reshape(flat.shape[0] // rows, rows, -1) if rows > 1 else flat
    units = grid[:, 0, :] if rows > 1 else grid
    on, off = np.flatnonzero(units.ravel() > 0), np.flatnonzero(units.ravel() == 0)
    target = int(round(keep * len(on)))
    chosen = rng.permutation(on)[:target] if target <= len(on) else np.concatenate(
        [on, rng.permutation(off)[:target - len(on)]])
    new_units = np.zeros(units.size, np.float32)
    new_units[chosen] = 1.0
    if rows > 1:
      new_units = np.repeat(new_units.reshape(units.shape)[:, None, :], rows, axis=1)
    out.append(new_units.reshape(mask.shape).astype(np.float32))
  return out


@pytest.mark.parametrize("mask_block", [1, 4])
@pytest.mark.parametrize("value_dtype", [tf.float32, tf.float16])
def test_a_cohorts_uploads_are_its_clients_messages_batched(mask_block, value_dtype):
  """`encode_cohort_uploads` of G clients holds, row by row, what each
  client's `encode_upload` holds (the mask bits of the clients that send
  them only), counts the sum of their bits, and decodes as each client's
  message decodes: clients at their budgets, below (zero padding), above
  (values cut at the budget), with and without mask bits."""
  model, layout = _layout(mask_block)
  rng = np.random.default_rng(11)
  keeps = (1.0, 1.0, 0.5, 1.0, 1.2)
  send = np.array([True, False, True, False, True])
  masks = [_client_masks(layout, 20 + g, keep) for g, keep in enumerate(keeps)]
  held = [masks_lib.random_masks(layout.kernel_shapes, layout.budgets, 40 + g, layout.all_rows)
          for g in range(len(keeps))]
  for g in np.flatnonzero(~send):  # a client that sends no bits holds the global mask
    held[g] = masks[g]
  trainable = []
  for i, w in enumerate(model.trainable_weights):
    values = rng.normal(size=(len(keeps), *w.shape)).astype(np.float32)
    if i in layout.kernel_index:
      values *= np.stack([m[layout.kernel_index.index(i)] for m in masks])
    trainable.append(values)
  stacked_masks = [np.stack([m[slot] for m in masks]) for slot in range(len(layout.budgets))]
  stacked_held = [np.stack([m[slot] for m in held]) for slot in range(len(layout.budgets))]

  message = messages.encode_cohort_uploads(
      [tf.constant(t) for t in trainable], [tf.constant(m) for m in stacked_masks], layout,
      value_dtype, tf.constant(send),
  )
  back, back_masks = messages.decode_cohort_uploads(
      message, layout, [tf.constant(m) for m in stacked_held], tf.constant(send)
  )
  total_bits = 0
  for g in range(len(keeps)):
    own = messages.encode_upload(
        [tf.constant(t[g]) for t in trainable], [tf.constant(m) for m in masks[g]], layout,
        value_dtype, bool(send[g]),
    )
    total_bits += int(messages.tensor_bits(own))
    sender_row = int(send[:g].sum())
    for slot, layer in enumerate(own["layers"]):
      got = message["layers"][slot]
      np.testing.assert_array_equal(got["values"][g].numpy(), layer["values"].numpy())
      if send[g]:
        np.testing.assert_array_equal(got["mask_bits"][sender_row].numpy(), layer["mask_bits"].numpy())
      mask = masks[g][slot]
      np.testing.assert_array_equal(back_masks[slot][g].numpy(), mask)
      kernel = messages.scatter_kept(layer["values"], tf.constant(mask)).numpy()
      np.testing.assert_array_equal(back[layout.kernel_index[slot]][g].numpy(), kernel)
    for got, want in zip(message["other"], own["other"]):
      np.testing.assert_array_equal(got[g].numpy(), want.numpy())
  assert int(messages.tensor_bits(message)) == total_bits
  assert message["layers"][0]["mask_bits"].shape[0] == send.sum()
  # Nobody sends bits: every mask is the held one.
  bare = messages.encode_cohort_uploads(
      [tf.constant(t) for t in trainable], [tf.constant(m) for m in stacked_masks], layout,
      value_dtype, tf.zeros([len(keeps)], tf.bool),
  )
  _, bare_masks = messages.decode_cohort_uploads(
      bare, layout, [tf.constant(m) for m in stacked_held], tf.zeros([len(keeps)], tf.bool)
  )
  for got, want in zip(bare_masks, stacked_held):
    np.testing.assert_array_equal(got.numpy(), want)


@pytest.mark.parametrize("mask_block", [1, 4])
@pytest.mark.parametrize("value_dtype", [tf.float32, tf.float16])
@pytest.mark.parametrize("case", ["valid", "over_budget", "unpadded", "not_in_blocks"])
def test_a_cohorts_uploads_as_received_equal_the_built_messages_decoded(
    mask_block, value_dtype, case
):
  """`cohort_uploads_as_received` (what cohorts run) gives what the built
  message decodes to, bit for bit, and its bits: valid uploads (the
  direct path), a client over its budget, values as long as the kept
  ones, and a sender whose block mask is not in whole blocks (both
  through the message)."""
  if case == "not_in_blocks" and mask_block == 1:
    pytest.skip("element-wise masks are always whole units")
  model, layout = _layout(mask_block)
  rng = np.random.default_rng(12)
  keeps = (1.0, 1.0, 0.5, 1.0, 1.2 if case == "over_budget" else 1.0)
  send = np.array([True, False, True, False, True])
  masks = [_client_masks(layout, 30 + g, keep) for g, keep in enumerate(keeps)]
  if case == "not_in_blocks":  # one weight of a kept block of a block-masked layer dropped
    slot = next(s for s, rows in enumerate(layout.all_rows) if rows > 1)
    masks[0][slot] = masks[0][slot].copy()
    masks[0][slot].reshape(-1)[np.flatnonzero(masks[0][slot].reshape(-1))[0]] = 0.0
  held = [masks_lib.random_masks(layout.kernel_shapes, layout.budgets, 50 + g, layout.all_rows)
          for g in range(len(keeps))]
  for g in np.flatnonzero(~send):
    held[g] = masks[g]
  # Values outside the masks too: the message leaves them out.
  trainable = [
      tf.constant(rng.normal(size=(len(keeps), *w.shape)).astype(np.float32))
      for w in model.trainable_weights
  ]
  stacked = [tf.constant(np.stack([m[s] for m in masks])) for s in range(len(layout.budgets))]
  stacked_held = [
      tf.constant(np.stack([m[s] for m in held])) for s in range(len(layout.budgets))
  ]
  padded = case != "unpadded"
  message = messages.encode_cohort_uploads(
      trainable, stacked, layout, value_dtype, tf.constant(send), padded
  )
  want, want_masks = messages.decode_cohort_uploads(
      message, layout, stacked_held, tf.constant(send), padded
  )
  got, got_masks, bits = messages.cohort_uploads_as_received(
      trainable, stacked, layout, value_dtype, stacked_held, tf.constant(send), padded
  )
  assert int(bits) == int(messages.tensor_bits(message))
  for a, b in zip(got + got_masks, want + want_masks):
    assert a.dtype == b.dtype == tf.float32
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    # Bit for bit (no -0.0 where the message gives +0.0).
    np.testing.assert_array_equal(
        np.signbit(a.numpy()), np.signbit(b.numpy())
    )
  if case == "valid":
    slot = 0
    kernel = trainable[layout.kernel_index[slot]].numpy()
    expected = np.where(stacked[slot].numpy() > 0, kernel.astype(value_dtype.as_numpy_dtype), 0)
    np.testing.assert_array_equal(got[layout.kernel_index[slot]].numpy(), expected)
