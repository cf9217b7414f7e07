"""The paper's networks (docs/algorithms.md section 7.1) and their FLOPs (section 6.2).

Parameter counts and FLOPs are worked out by hand in the comments.
"""

import numpy as np
import pytest
import tensorflow as tf

import keras_models
from tff_feddst import costs
from tff_feddst import masks

# name -> (input shape, classes, total parameters, flatten size,
#          prunable layer names, kernel shapes)
#
# mnist_cnn, input 28x28x1:
#   conv1 5x5 1->10 valid: 28 -> 24; pool 3/1: 24 -> 22
#   conv2 5x5 10->20 valid: 22 -> 18; pool 3/1: 18 -> 16 => flatten 16*16*20 = 5120
#   conv1 5*5*1*10 + 10 = 260
#   conv2 5*5*10*20 + 20 = 5020
#   dense1 5120*50 + 50 = 256050
#   logits 50*10 + 10 = 510
#   total 260 + 5020 + 256050 + 510 = 261840
#
# cifar10_cnn, input 32x32x3:
#   conv1 5x5 3->6: 32 -> 28; pool 3/1: 26; conv2 5x5 6->16: 22; pool: 20
#   => flatten 20*20*16 = 6400
#   conv1 5*5*3*6 + 6 = 456
#   conv2 5*5*6*16 + 16 = 2416
#   dense1 6400*120 + 120 = 768120
#   dense2 120*84 + 84 = 10164
#   logits 84*10 + 10 = 850
#   total 456 + 2416 + 768120 + 10164 + 850 = 782006
#
# cifar100_cnn: same convs (456 + 2416), dense1 768120,
#   logits 120*100 + 100 = 12100; total 456 + 2416 + 768120 + 12100 = 783092
#
# leaf_cnn, input 28x28x1:
#   conv1 5x5 same 1->32: 28; pool 2/2: 14; conv2 5x5 same 32->64: 14;
#   pool 2/2: 7 => flatten 7*7*64 = 3136
#   conv1 5*5*1*32 + 32 = 832
#   conv2 5*5*32*64 + 64 = 51264
#   dense1 3136*2048 + 2048 = 6424576
#   logits 2048*62 + 62 = 127038
#   total 832 + 51264 + 6424576 + 127038 = 6603710
#
# paper2_cnn, input 28x28x1:
#   conv1 5x5 1->32 valid: 28 -> 24; pool 2/2: 12; conv2 5x5 32->64: 8;
#   pool 2/2: 4 => global average pooling: 64
#   conv1 5*5*1*32 + 32 = 832
#   conv2 5*5*32*64 + 64 = 51264
#   logits 64*10 + 10 = 650
#   total 832 + 51264 + 650 = 52746
MODELS = {
    "mnist_cnn": (
        (28, 28, 1),
        10,
        261840,
        16 * 16 * 20,
        ["conv1", "conv2", "dense1", "logits"],
        [(5, 5, 1, 10), (5, 5, 10, 20), (5120, 50), (50, 10)],
    ),
    "cifar10_cnn": (
        (32, 32, 3),
        10,
        782006,
        20 * 20 * 16,
        ["conv1", "conv2", "dense1", "dense2", "logits"],
        [(5, 5, 3, 6), (5, 5, 6, 16), (6400, 120), (120, 84), (84, 10)],
    ),
    "cifar100_cnn": (
        (32, 32, 3),
        100,
        783092,
        20 * 20 * 16,
        ["conv1", "conv2", "dense1", "logits"],
        [(5, 5, 3, 6), (5, 5, 6, 16), (6400, 120), (120, 100)],
    ),
    "leaf_cnn": (
        (28, 28, 1),
        62,
        6603710,
        7 * 7 * 64,
        ["conv1", "conv2", "dense1", "logits"],
        [(5, 5, 1, 32), (5, 5, 32, 64), (3136, 2048), (2048, 62)],
    ),
    "paper2_cnn": (
        (28, 28, 1),
        10,
        52746,
        64,
        ["conv1", "conv2", "logits"],
        [(5, 5, 1, 32), (5, 5, 32, 64), (64, 10)],
    ),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def built(request):
  name = request.param
  input_shape, classes, *_ = MODELS[name]
  tf.keras.utils.set_random_seed(0)
  return name, keras_models.build_model(name, input_shape, classes)


def test_model_names_are_the_listed_networks():
  assert set(keras_models.MODEL_NAMES) == set(MODELS)


def test_output_shape(built):
  name, model = built
  input_shape, classes, *_ = MODELS[name]
  x = np.random.default_rng(0).random((3, *input_shape)).astype(np.float32)
  y = model(x, training=False)
  assert tuple(y.shape) == (3, classes)
  assert model.output_shape == (None, classes)
  assert model.input_shape == (None, *input_shape)


def test_parameter_count(built):
  name, model = built
  expected = MODELS[name][2]
  assert model.count_params() == expected
  assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == expected
  # Every parameter is trainable (no normalisation statistics).
  assert not model.non_trainable_weights


def test_flatten_size(built):
  name, model = built
  to_rows = (tf.keras.layers.Flatten, tf.keras.layers.GlobalAveragePooling2D)
  (flatten,) = [layer for layer in model.layers if isinstance(layer, to_rows)]
  assert flatten.output_shape == (None, MODELS[name][3])


def test_prunable_layers_are_the_conv_and_dense_layers_in_order(built):
  name, model = built
  *_, names, kernel_shapes = MODELS[name]
  expected = [
      layer
      for layer in model.layers
      if type(layer) in (tf.keras.layers.Conv2D, tf.keras.layers.Dense)
  ]
  prunable = keras_models.prunable_layers(model)
  assert prunable == expected
  assert [layer.name for layer in prunable] == names
  assert [tuple(layer.kernel.shape) for layer in prunable] == kernel_shapes
  # Pools, ReLUs, flatten are not prunable.
  for layer in model.layers:
    if layer not in expected:
      assert not keras_models.is_prunable(layer)
  # The kernels come in the same order in trainable_weights (kernel, bias
  # per layer).
  kernels = [w for w in model.trainable_weights if len(w.shape) > 1]
  assert [tuple(k.shape) for k in kernels] == kernel_shapes


def test_outputs_are_logits(built):
  name, model = built
  input_shape, classes, *_ = MODELS[name]
  # Large inputs and larger weights: softmax outputs would lie in [0, 1] and
  # sum to 1 per row; logits do not.
  x = np.random.default_rng(1).normal(0.0, 5.0, (8, *input_shape)).astype(np.float32)
  y = model(x, training=False).numpy()
  assert np.all(np.isfinite(y))
  assert (y < 0).any()
  assert not np.allclose(y.sum(axis=1), 1.0, atol=1e-3)
  # The last layer has no activation.
  last = model.layers[-1]
  assert isinstance(last, tf.keras.layers.Dense)
  assert last.activation is tf.keras.activations.linear
  assert not any(isinstance(layer, tf.keras.layers.Softmax) for layer in model.layers)


def test_unknown_model_raises():
  with pytest.raises(ValueError):
    keras_models.build_model("resnet50", (32, 32, 3), 10)


def test_default_model_for_dataset():
  assert keras_models.default_model_for_dataset("mnist") == "mnist_cnn"
  assert keras_models.default_model_for_dataset("fashion_mnist") == "mnist_cnn"
  assert keras_models.default_model_for_dataset("cifar10") == "cifar10_cnn"
  assert keras_models.default_model_for_dataset("cifar100") == "cifar100_cnn"
  assert keras_models.default_model_for_dataset("femnist") == "leaf_cnn"
  with pytest.raises(ValueError):
    keras_models.default_model_for_dataset("imagenet")


# ---------------------------------------------------------------------------
# FLOPs (docs/algorithms.md section 6.2).
# ---------------------------------------------------------------------------

# CIFAR-10 network, FLOPs = 2 x MACs:
#   conv1: output 28x28x6, 5*5*3 MACs each: 28*28*6*75 = 352800 MACs -> 705600
#   conv2: output 22x22x16, 5*5*6 MACs each: 22*22*16*150 = 1161600 -> 2323200
#   dense1: 6400*120 = 768000 -> 1536000
#   dense2: 120*84 = 10080 -> 20160
#   logits: 84*10 = 840 -> 1680
#   total 705600 + 2323200 + 1536000 + 20160 + 1680 = 4586640 (the paper's 4.6 M)
CIFAR10_FLOPS = {
    "conv1": 705600,
    "conv2": 2323200,
    "dense1": 1536000,
    "dense2": 20160,
    "logits": 1680,
}


@pytest.fixture(scope="module")
def cifar10_model():
  return keras_models.build_model("cifar10_cnn", (32, 32, 3), 10)


def test_cifar10_dense_flops(cifar10_model):
  flops = costs.layer_forward_flops(cifar10_model)
  assert flops == CIFAR10_FLOPS
  total = costs.forward_flops(flops)
  assert total == 4586640
  assert round(total / 1e6, 1) == 4.6


def test_mnist_dense_flops():
  # conv1: 24*24*10 outputs x 25 MACs = 144000 -> 288000
  # conv2: 18*18*20 outputs x 250 MACs = 1620000 -> 3240000
  # dense1: 5120*50 = 256000 -> 512000; logits 500 -> 1000
  model = keras_models.build_model("mnist_cnn", (28, 28, 1), 10)
  assert costs.layer_forward_flops(model) == {
      "conv1": 288000,
      "conv2": 3240000,
      "dense1": 512000,
      "logits": 1000,
  }


def test_paper2_cnn_dense_flops():
  # conv1: 24*24*32 outputs x 25 MACs = 460800 -> 921600
  # conv2: 8*8*64 outputs x 800 MACs = 3276800 -> 6553600
  # logits: 64*10 = 640 -> 1280 (pooling is not counted)
  model = keras_models.build_model("paper2_cnn", (28, 28, 1), 10)
  assert costs.layer_forward_flops(model) == {
      "conv1": 921600,
      "conv2": 6553600,
      "logits": 1280,
  }


def test_forward_flops_scales_by_density():
  dense = {"a": 1000, "b": 200}
  assert costs.forward_flops(dense, {"a": 0.25, "b": 0.5}) == 350.0
  # Layers without a density count as dense.
  assert costs.forward_flops(dense, {"a": 0.1}) == 300.0
  m = [np.array([1, 0, 0, 0]), np.array([[1, 1], [0, 1]])]
  assert costs.densities_from_masks(["a", "b"], m) == {"a": 0.25, "b": 0.75}


def test_cifar10_sparse_flops_at_s08_erk(cifar10_model):
  # ERK at S = 0.8 (docs/algorithms.md section 2), by hand:
  #   sizes 450, 2400, 768000, 10080, 840; n = 781770; kept = 156354.
  #   raw x size = (3+6+5+5) 19, (6+16+5+5) 32, 6520, 204, 94; sum 6869.
  #   eps = 156354 / 6869 = 22.76; logits raw 94/840 = 0.1119 -> 2.55 > 1: dense.
  #   eps = (156354 - 840) / (6869 - 94) = 155514 / 6775 = 22.954;
  #   conv1 raw 19/450 -> 0.9692 <= 1: stop.
  #   densities: conv1 19*22.954/450 = 0.96918, conv2 32*22.954/2400 = 0.30605,
  #   dense1 6520*22.954/768000 = 0.19487, dense2 204*22.954/10080 = 0.46454,
  #   logits 1.
  #   FLOPs: 705600*0.96918 = 683853; 2323200*0.30605 = 711016;
  #   1536000*0.19487 = 299322; 20160*0.46454 = 9365; 1680
  #   total 1705241 ~ 1.71 MFLOP.
  # The paper quotes "about 0.8 MFLOP" for this case; that
  # figure cannot come from the rule of section 6.2 (dense FLOPs x layer
  # density) with the ERK densities of section 2: ERK keeps the two convs,
  # which hold 66% of the dense FLOPs, at densities 0.97 and 0.31. Even
  # uniform densities give 0.2 * 4.59 = 0.92 MFLOP. So this test checks the
  # value the stated rule gives.
  flops = costs.layer_forward_flops(cifar10_model)
  names = [layer.name for layer in keras_models.prunable_layers(cifar10_model)]
  shapes = [tuple(layer.kernel.shape) for layer in keras_models.prunable_layers(cifar10_model)]
  eps = 155514 / 6775
  raw = [19 / 450, 32 / 2400, 6520 / 768000, 204 / 10080]
  hand = dict(zip(names, [eps * r for r in raw] + [1.0]))
  expected = sum(CIFAR10_FLOPS[n] * hand[n] for n in names)
  assert expected == pytest.approx(1.7052e6, rel=1e-4)

  densities = dict(zip(names, masks.layer_densities(shapes, 0.8, "erk")))
  got = costs.forward_flops(flops, densities)
  assert got == pytest.approx(expected, rel=1e-9)

  # Densities of actual random masks at the integer budgets give the same
  # figure to within a few FLOPs per layer.
  budgets = masks.layer_budgets(shapes, 0.8, "erk")
  random = masks.random_masks(shapes, budgets, seed=0)
  got_masks = costs.forward_flops(flops, costs.densities_from_masks(names, random))
  assert got_masks == pytest.approx(expected, rel=1e-3)
  # Against the dense figure: about 37% of the dense FLOPs, well above 1 - S.
  assert 0.35 < got / 4586640 < 0.39


# ---------------------------------------------------------------------------
# Widths of the hidden layers (structured pruning, docs/algorithms.md section 5).
# ---------------------------------------------------------------------------


def test_default_widths_are_the_papers_hidden_layers_in_order():
  assert keras_models.default_widths("mnist_cnn") == {
      "conv1": 10, "conv2": 20, "dense1": 50
  }
  assert list(keras_models.default_widths("cifar10_cnn").items()) == [
      ("conv1", 6), ("conv2", 16), ("dense1", 120), ("dense2", 84)
  ]
  assert keras_models.default_widths("cifar100_cnn") == {
      "conv1": 6, "conv2": 16, "dense1": 120
  }
  assert keras_models.default_widths("leaf_cnn") == {
      "conv1": 32, "conv2": 64, "dense1": 2048
  }
  # A fresh dict each call: callers may change it.
  keras_models.default_widths("mnist_cnn")["conv1"] = 1
  assert keras_models.default_widths("mnist_cnn")["conv1"] == 10
  with pytest.raises(ValueError, match="unknown model"):
    keras_models.default_widths("resnet50")


def test_default_widths_match_the_built_layers(built):
  name, model = built
  widths = keras_models.default_widths(name)
  hidden = keras_models.prunable_layers(model)[:-1]
  assert {layer.name: int(layer.kernel.shape[-1]) for layer in hidden} == widths


def test_widths_none_and_default_widths_build_the_same_network(built):
  name, model = built
  input_shape, classes, *_ = MODELS[name]
  same = keras_models.build_model(
      name, input_shape, classes, widths=keras_models.default_widths(name)
  )
  assert [layer.name for layer in same.layers] == [l.name for l in model.layers]
  assert [w.shape for w in same.weights] == [w.shape for w in model.weights]
  assert same.name == model.name


def test_mnist_cnn_with_widths_by_hand():
  # conv1 4, conv2 7, dense1 9 (input 28x28x1, flatten 16*16*7 = 1792):
  #   conv1 5*5*1*4 + 4 = 104; conv2 5*5*4*7 + 7 = 707;
  #   dense1 1792*9 + 9 = 16137; logits 9*10 + 10 = 100; total 17048.
  widths = {"conv1": 4, "conv2": 7, "dense1": 9}
  model = keras_models.build_model("mnist_cnn", (28, 28, 1), 10, widths=widths)
  assert model.count_params() == 17048
  assert [tuple(l.kernel.shape) for l in keras_models.prunable_layers(model)] == [
      (5, 5, 1, 4), (5, 5, 4, 7), (1792, 9), (9, 10)
  ]
  assert [l.name for l in model.layers] == [
      "conv1", "pool1", "relu1", "conv2", "pool2", "relu2", "flatten",
      "dense1", "logits",
  ]
  assert model.name == "mnist_cnn"


def test_missing_widths_keep_the_papers_width():
  model = keras_models.build_model(
      "cifar10_cnn", (32, 32, 3), 10, widths={"dense2": 5}
  )
  kernels = [tuple(l.kernel.shape) for l in keras_models.prunable_layers(model)]
  assert kernels == [(5, 5, 3, 6), (5, 5, 6, 16), (6400, 120), (120, 5), (5, 10)]
  # 456 + 2416 + 768120 + (120*5 + 5) + (5*10 + 10) = 771657
  assert model.count_params() == 771657


def test_leaf_and_cifar100_widths():
  leaf = keras_models.build_model(
      "leaf_cnn", (28, 28, 1), 62, widths={"conv1": 2, "conv2": 3, "dense1": 4}
  )
  # conv1 25*2 + 2 = 52; conv2 25*2*3 + 3 = 153; flatten 7*7*3 = 147;
  # dense1 147*4 + 4 = 592; logits 4*62 + 62 = 310; total 1107.
  assert leaf.count_params() == 1107
  c100 = keras_models.build_model(
      "cifar100_cnn", (32, 32, 3), 100, widths={"dense1": 1}
  )
  # 456 + 2416 + (6400 + 1) + (1*100 + 100) = 9473
  assert c100.count_params() == 9473
  assert [l.name for l in keras_models.prunable_layers(c100)] == [
      "conv1", "conv2", "dense1", "logits"
  ]


@pytest.mark.parametrize(
    "name, widths, message",
    [
        ("mnist_cnn", {"logits": 5}, "no prunable hidden layer 'logits'"),
        ("mnist_cnn", {"dense2": 5}, "no prunable hidden layer 'dense2'"),
        ("cifar100_cnn", {"dense2": 5}, "no prunable hidden layer 'dense2'"),
        ("mnist_cnn", {"conv1": 0}, "width of 'conv1' must be >= 1, got 0"),
        ("leaf_cnn", {"dense1": -3}, "width of 'dense1' must be >= 1, got -3"),
        ("mnist_cnn", {"conv2": 2.5}, "width of 'conv2' must be an integer"),
        ("mnist_cnn", {"conv2": True}, "width of 'conv2' must be an integer"),
        ("mnist_cnn", [("conv1", 3)], "widths must be a dict"),
    ],
)
def test_bad_widths_raise_one_line_errors(name, widths, message):
  with pytest.raises(ValueError, match=message) as info:
    keras_models.build_model(name, (28, 28, 1), 10, widths=widths)
  assert "\n" not in str(info.value)


def test_numpy_integer_widths_are_accepted():
  model = keras_models.build_model(
      "mnist_cnn", (28, 28, 1), 10, widths={"dense1": np.int64(3)}
  )
  assert model.get_layer("dense1").units == 3


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "tf_function"])
def test_a_wrapped_model_decides_training_at_each_call(graph):
  """`sparse_model.wrap_prunable` builds its clone with Keras's learning
  phase held at 0 (the wrappers' no-update branch, traced once). The phase
  must not stay in the model: a training call steps every wrapper's
  `pruning_step` and computes with kernel * mask, an inference call (with
  `training=False` or none) computes the same and steps nothing."""
  from tff_feddst import sparse_model, wrappers  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  wrapped = sparse_model.wrap_prunable(keras_models.build_model("mnist_cnn", (28, 28, 1), 10))
  layers = [layer for layer in wrapped.layers if wrappers.is_wrapper(layer)]
  assert [wrappers.unwrap(layer).name for layer in layers] == ["conv1", "conv2", "dense1", "logits"]
  plain_weights = []
  for layer in layers:
    mask = wrappers.mask_variable(layer)
    mask.assign((rng.random(mask.shape) < 0.3).astype(np.float32))
    wrappers.step_variable(layer).assign(1)
    inner = wrappers.unwrap(layer)
    plain_weights += [inner.kernel.numpy() * mask.numpy(), inner.bias.numpy()]
  plain = keras_models.build_model("mnist_cnn", (28, 28, 1), 10)
  plain.set_weights(plain_weights)
  x = rng.random((3, 28, 28, 1), dtype=np.float32)
  want = plain(x).numpy()

  def call(**kwargs):
    if graph:
      return tf.function(lambda images: wrapped(images, **kwargs))(x).numpy()
    return wrapped(x, **kwargs).numpy()

  def steps():
    return [int(wrappers.step_variable(layer).numpy()) for layer in layers]

  for kwargs in ({"training": False}, {}):
    np.testing.assert_allclose(call(**kwargs), want, rtol=1e-5, atol=1e-6)
    assert steps() == [1, 1, 1, 1], kwargs
  np.testing.assert_allclose(call(training=True), want, rtol=1e-5, atol=1e-6)
  assert steps() == [2, 2, 2, 2]
  for layer, weights in zip(layers, plain_weights[::2]):
    np.testing.assert_array_equal(wrappers.unwrap(layer).kernel.numpy(), weights)


def test_tracing_a_forward_pass_converts_no_graph_safe_library_code(monkeypatch):
  """`sparse_model.GRAPH_SAFE_MODULES`: tracing a wrapped model's TFF
  forward pass converts TFF's `tf.function` entry point and none of the
  tfmot or TFF Keras-adapter functions it calls (each conversion costs
  tens of milliseconds per process), and the training call still steps the
  wrappers (the test above checks its values)."""
  # pylint: disable=g-import-not-at-top
  from tensorflow.python.autograph.pyct import transpiler
  from tff_feddst import sparse_model, wrappers

  converted = []
  transform = transpiler.PyToPy.transform_function

  def recording(self, fn, user_context):
    converted.append(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '')}")
    return transform(self, fn, user_context)

  monkeypatch.setattr(transpiler.PyToPy, "transform_function", recording)
  spec = {"x": tf.TensorSpec([None, 28, 28, 1], tf.float32), "y": tf.TensorSpec([None], tf.int32)}
  keras_fn = lambda: keras_models.build_model("mnist_cnn", (28, 28, 1), 10, widths={"dense1": 4})
  model = sparse_model.make_model_fn(keras_fn, spec, wrapped=True)()
  layers = [layer for layer in model._keras_model.layers if wrappers.is_wrapper(layer)]  # pylint: disable=protected-access
  for layer in layers:
    wrappers.step_variable(layer).assign(1)  # as the client work sets it
  batch = {"x": np.zeros((2, 28, 28, 1), np.float32), "y": np.zeros(2, np.int32)}
  loss = tf.function(lambda b: model.forward_pass(b, training=True).loss)(batch)
  assert np.isfinite(loss.numpy())
  assert [int(wrappers.step_variable(layer).numpy()) for layer in layers] == [2, 2, 2, 2]
  assert any(name.endswith("_KerasModel.forward_pass") for name in converted), converted
  # Converted although graph-safe (their `tf.function` entry points aside).
  converted_safe = [n for n in converted if n.startswith(sparse_model.GRAPH_SAFE_MODULES)
                    and not n.endswith(("_KerasModel.forward_pass",
                                        "_KerasModel.predict_on_batch", "update_state"))]
  assert converted_safe == [], converted_safe
  assert not any(n.endswith("_KerasModel._forward_pass") for n in converted), converted
  assert not any(n.startswith("tensorflow_model_optimization") for n in converted), converted
