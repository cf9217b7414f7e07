"""Convolutions that are zero on most (input, output) channel pairs, rewritten
so that TFLite computes only the pairs that are kept.

TFLite densifies every sparse CONV_2D weight at load (`convert`'s module
docstring), so a sparse convolution costs what the dense one does. But a
convolution whose kernel w[:, :, i, o] is zero for most pairs (i, o) of
input channel and output filter (`--conv_block=kernel` trains such masks)
is a sum over its P kept pairs p = (i_p, o_p) of one k_h x k_w filter each:

    y[..., o] = b[o] + sum_{p: o_p = o} conv(x[..., i_p], w[:, :, i_p, o_p])

which TFLite runs with three dense builtins:

    select     CONV_2D 1x1, [C_in -> P]: channel p is a copy of x[..., i_p];
    depthwise  DEPTHWISE_CONV_2D k_h x k_w, multiplier 1, the convolution's
               strides and padding: channel p is filtered by w[:, :, i_p, o_p];
    mix        CONV_2D 1x1, [P -> C_out] with the bias: channel o sums the
               channels p with o_p = o (0/1 weights), then the activation.

Multiply-adds per image, for an input of H x W pixels and an output of
H' x W' (dense: H' W' k_h k_w C_in C_out):

    H W C_in P  +  H' W' k_h k_w P  +  H' W' P C_out

`rewrite` replaces a Conv2D (channels last, dilation 1, one group) by this
`PairSparseConv2D` where that count is at most `MAX_COST` of the dense
one's. A FedDST element-wise mask at S = 0.8 leaves conv2 of the MNIST
network with about 174 of its 200 pairs and is never rewritten; a kernel
block mask keeps 15 and is (measured: `python -m benchmarks.sparse_conv`).
The rewritten model computes the same function (`tests/test_pair_sparse.py`
compares logits with atol 1e-5): only the order of the additions changes.
"""

from typing import Optional

import numpy as np
import tensorflow as tf

# A convolution is rewritten when the rewrite's multiply-adds are at most
# this share of the dense convolution's: the three ops cost more per
# multiply-add than one CONV_2D, so a small gain is not worth the ops.
MAX_COST = 0.5


def kept_pairs(kernel: np.ndarray) -> np.ndarray:
  """[C_in, C_out] bool: the pairs (i, o) whose filter w[:, :, i, o] is not all zero."""
  return np.any(np.asarray(kernel) != 0, axis=(0, 1))


def _spatial(shape) -> tuple[int, int]:
  return int(shape[1]), int(shape[2])


def _eligible(layer) -> bool:
  if type(layer) is not tf.keras.layers.Conv2D:  # pylint: disable=unidiomatic-typecheck
    return False
  config = layer.get_config()
  return (
      config.get("data_format", "channels_last") == "channels_last"
      and tuple(config.get("dilation_rate", (1, 1))) == (1, 1)
      and config.get("groups", 1) == 1
      and layer.built
  )


def costs(layer) -> Optional[dict]:
  """{kept_pairs, pairs, dense_macs, rewrite_macs} of a built Conv2D, or None
  where `rewrite` does not apply to it (see `_eligible`)."""
  if not _eligible(layer):
    return None
  # A layer called more than once is costed at its first call.
  height, width = _spatial(layer.input.shape)
  out_h, out_w = _spatial(layer.output.shape)
  kernel = layer.kernel.numpy()
  k_h, k_w, c_in, c_out = kernel.shape
  pairs = int(kept_pairs(kernel).sum())
  dense = out_h * out_w * k_h * k_w * c_in * c_out
  rewritten = height * width * c_in * pairs + out_h * out_w * pairs * (k_h * k_w + c_out)
  return {
      "kept_pairs": pairs,
      "pairs": int(c_in * c_out),
      "dense_macs": int(dense),
      "rewrite_macs": int(rewritten),
  }


def _pays(cost: Optional[dict], max_cost: float) -> bool:
  return cost is not None and cost["rewrite_macs"] <= max_cost * cost["dense_macs"]


def qualifies(layer, max_cost: float = MAX_COST) -> bool:
  return _pays(costs(layer), max_cost)


class PairSparseConv2D(tf.keras.layers.Layer):
  """A Conv2D's function as select, depthwise and mix (module docstring),
  with the kernel, bias, strides, padding and activation of `conv`. Its
  weights are constants: the layer is built for conversion, not training."""

  def __init__(self, conv: tf.keras.layers.Conv2D, **kwargs):
    super().__init__(name=conv.name, **kwargs)
    kernel = conv.kernel.numpy()
    k_h, k_w, c_in, c_out = kernel.shape
    inputs, outputs = np.nonzero(kept_pairs(kernel))  # by input channel, then output
    count = max(len(inputs), 1)  # an all-zero kernel keeps one zero pair
    select = np.zeros((1, 1, c_in, count), np.float32)
    depthwise = np.zeros((k_h, k_w, count, 1), np.float32)
    mix = np.zeros((1, 1, count, c_out), np.float32)
    for p, (i, o) in enumerate(zip(inputs, outputs)):
      select[0, 0, i, p] = 1.0
      depthwise[:, :, p, 0] = kernel[:, :, i, o]
      mix[0, 0, p, o] = 1.0
    self.num_pairs = len(inputs)
    self._select, self._depthwise, self._mix = select, depthwise, mix
    self._bias = (
        conv.bias.numpy() if conv.use_bias else np.zeros(c_out, np.float32)
    )
    self._strides = [1, *conv.strides, 1]
    self._padding = conv.padding.upper()
    self._activation = conv.activation

  def call(self, x):
    y = tf.nn.conv2d(x, tf.constant(self._select), 1, "VALID")
    y = tf.nn.depthwise_conv2d(
        y, tf.constant(self._depthwise), self._strides, self._padding
    )
    y = tf.nn.conv2d(y, tf.constant(self._mix), 1, "VALID")
    return self._activation(tf.nn.bias_add(y, tf.constant(self._bias)))


def rewrite(
    model: tf.keras.Model, max_cost: float = MAX_COST
) -> tuple[tf.keras.Model, list[str]]:
  """(model', names): `model` with every Conv2D that `qualifies` replaced by
  a `PairSparseConv2D` of the same name, and those layers' names. Returns
  `model` itself when no layer qualifies; the caller's model is never
  changed."""
  chosen = [layer.name for layer in model.layers if qualifies(layer, max_cost)]
  if not chosen:
    return model, []

  def clone(layer):
    if layer.name in chosen:
      return PairSparseConv2D(layer)
    return layer.__class__.from_config(layer.get_config())

  rewritten = tf.keras.models.clone_model(model, clone_function=clone)
  for layer in model.layers:
    if layer.name not in chosen and layer.weights:
      rewritten.get_layer(layer.name).set_weights(layer.get_weights())
  return rewritten, chosen


def report(model: tf.keras.Model, max_cost: float = MAX_COST) -> list[dict]:
  """Per eligible Conv2D of `model`: its name, `costs` and whether `rewrite`
  replaces it."""
  rows = []
  for layer in model.layers:
    cost = costs(layer)
    if cost is not None:
      rows.append({"layer": layer.name, **cost, "rewritten": _pays(cost, max_cost)})
  return rows
