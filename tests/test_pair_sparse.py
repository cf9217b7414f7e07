"""tflite_export.pair_sparse: convolutions that keep few (input, output)
channel pairs, exported as select, depthwise and mix."""

import numpy as np
import pytest
import tensorflow as tf

from keras_models import networks
import tflite_export
from tflite_export import evaluate as tfl_eval
from tflite_export import inspect_model
from tflite_export import pair_sparse
from tff_feddst import masks


def _pair_masked(kernel: np.ndarray, pairs: int, seed: int) -> np.ndarray:
  """`kernel` with all but `pairs` random (input, output) filters zeroed."""
  c_in, c_out = kernel.shape[2:]
  keep = np.zeros(c_in * c_out, bool)
  keep[np.random.default_rng(seed).permutation(keep.size)[:pairs]] = True
  return kernel * keep.reshape(1, 1, c_in, c_out)


def _conv_model(strides, padding, activation):
  """input 9x8x3 -> Conv2D(5, 3x2) -> Dense: a small functional model."""
  inputs = tf.keras.Input((9, 8, 3))
  conv = tf.keras.layers.Conv2D(
      5, (3, 2), strides=strides, padding=padding, activation=activation, name="conv"
  )
  outputs = tf.keras.layers.Dense(4, name="head")(tf.keras.layers.Flatten()(conv(inputs)))
  model = tf.keras.Model(inputs, outputs)
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((3, 2, 3, 5)).astype(np.float32)
  conv.set_weights([_pair_masked(kernel, 2, seed=1), rng.standard_normal(5).astype(np.float32)])
  return model


def test_costs_by_hand():
  model = _conv_model(1, "valid", None)
  cost = pair_sparse.costs(model.get_layer("conv"))
  # Output 7 x 7; dense: 49 * 3*2 * 3 * 5; select 9*8*3*P, depthwise 49*6*P, mix 49*P*5.
  assert cost == {
      "kept_pairs": 2,
      "pairs": 15,
      "dense_macs": 49 * 6 * 15,
      "rewrite_macs": 72 * 3 * 2 + 49 * 6 * 2 + 49 * 2 * 5,
  }
  assert pair_sparse.qualifies(model.get_layer("conv"))  # 1,118 <= 0.5 * 4,410
  assert pair_sparse.costs(model.get_layer("head")) is None


@pytest.mark.parametrize(
    "strides, padding, activation", [(1, "valid", None), (2, "same", "relu"), ((1, 2), "same", "tanh")]
)
def test_rewrite_computes_the_same_function(strides, padding, activation):
  model = _conv_model(strides, padding, activation)
  before = [w.copy() for w in model.get_weights()]
  rewritten, names = pair_sparse.rewrite(model)
  assert names == ["conv"]
  layer = rewritten.get_layer("conv")
  assert isinstance(layer, pair_sparse.PairSparseConv2D) and layer.num_pairs == 2
  x = np.random.default_rng(2).standard_normal((6, 9, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(rewritten(x).numpy(), model(x).numpy(), atol=1e-5)
  # The caller's model is left as it was.
  assert type(model.get_layer("conv")) is tf.keras.layers.Conv2D  # pylint: disable=unidiomatic-typecheck
  for old, now in zip(before, model.get_weights()):
    np.testing.assert_array_equal(old, now)


def test_rewrite_of_the_select_depthwise_mix_weights():
  """Pair p = (i_p, o_p), in order of input channel then output: select
  copies channel i_p, depthwise holds w[:, :, i_p, o_p], mix adds it to o_p."""
  kernel = np.zeros((2, 2, 3, 4), np.float32)
  kernel[:, :, 2, 1] = [[1, 2], [3, 4]]
  kernel[0, 1, 0, 3] = 5.0  # one non-zero entry keeps the pair
  layer = tf.keras.layers.Conv2D(4, 2, use_bias=False)
  layer.build((None, 5, 5, 3))
  layer.set_weights([kernel])
  rewritten = pair_sparse.PairSparseConv2D(layer)
  assert rewritten.num_pairs == 2
  np.testing.assert_array_equal(np.nonzero(rewritten._select[0, 0]), [[0, 2], [0, 1]])
  np.testing.assert_array_equal(rewritten._depthwise[:, :, 0, 0], kernel[:, :, 0, 3])
  np.testing.assert_array_equal(rewritten._depthwise[:, :, 1, 0], kernel[:, :, 2, 1])
  np.testing.assert_array_equal(np.nonzero(rewritten._mix[0, 0]), [[0, 1], [3, 1]])
  np.testing.assert_array_equal(rewritten._bias, np.zeros(4))


def test_dense_convolutions_and_element_wise_masks_are_not_rewritten():
  """FedDST's element-wise ERK mask at S = 0.8 leaves the MNIST network's
  conv2 most of its pairs: no layer qualifies, the model comes back as it is."""
  tf.keras.utils.set_random_seed(0)
  model = networks.build_model("mnist_cnn", (28, 28, 1), 10)
  layers = networks.prunable_layers(model)
  shapes = [tuple(layer.kernel.shape) for layer in layers]
  budgets = masks.layer_budgets(shapes, 0.8, "erk")
  for layer, mask in zip(layers, masks.random_masks(shapes, budgets, seed=0)):
    layer.kernel.assign(layer.kernel * mask)
  rows = {row["layer"]: row for row in pair_sparse.report(model)}
  assert set(rows) == {"conv1", "conv2"}
  assert rows["conv2"]["kept_pairs"] > 150 and not rows["conv2"]["rewritten"]
  assert pair_sparse.rewrite(model) == (model, [])


def test_sparse_export_runs_only_the_kept_pairs_and_equals_keras():
  """The MNIST network with conv2 keeping 15 of its 200 pairs: the sparse
  export runs conv2 as CONV_2D 1x1, DEPTHWISE_CONV_2D, CONV_2D 1x1 and its
  logits equal Keras' (atol 1e-5); the dense export keeps one CONV_2D."""
  tf.keras.utils.set_random_seed(0)
  model = networks.build_model("mnist_cnn", (28, 28, 1), 10)
  conv2 = model.get_layer("conv2")
  conv2.kernel.assign(_pair_masked(conv2.kernel.numpy(), 15, seed=0))
  assert [r["rewritten"] for r in pair_sparse.report(model)] == [False, True]
  x = np.random.default_rng(1).random((32, 28, 28, 1)).astype(np.float32)
  keras_logits = model(x).numpy()
  sparse = tflite_export.convert(model, sparse=True)
  dense = tflite_export.convert(model, sparse=False)
  assert [op for op in inspect_model.operators(sparse) if op != "DENSIFY"] == [
      "CONV_2D", "MAX_POOL_2D", "CONV_2D", "DEPTHWISE_CONV_2D", "CONV_2D",
      "MAX_POOL_2D", "RESHAPE", "FULLY_CONNECTED", "FULLY_CONNECTED",
  ]
  assert "DEPTHWISE_CONV_2D" not in inspect_model.operators(dense)
  for content in (sparse, dense):
    np.testing.assert_allclose(tfl_eval.predict_logits(content, x), keras_logits, atol=1e-5)


def test_a_convolution_used_twice_is_rewritten_once_and_computes_the_same():
  """A Conv2D called on two tensors (of one shape, or of two) becomes one
  PairSparseConv2D called twice, costed at its first call."""
  x = np.random.default_rng(3).standard_normal((2, 8, 8, 4)).astype(np.float32)
  for padding in ("same", "valid"):
    conv = tf.keras.layers.Conv2D(4, 3, padding=padding, name="shared")
    inputs = tf.keras.Input((8, 8, 4))
    model = tf.keras.Model(inputs, conv(conv(inputs)))
    conv.kernel.assign(_pair_masked(conv.kernel.numpy(), 1, seed=0))
    out = 8 if padding == "same" else 6
    assert pair_sparse.costs(conv)["dense_macs"] == out * out * 9 * 16
    new, names = pair_sparse.rewrite(model)
    assert names == ["shared"]
    np.testing.assert_allclose(new(x).numpy(), model(x).numpy(), atol=1e-5)
