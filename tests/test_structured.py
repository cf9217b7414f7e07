"""Automatic structured pruning (FEDDST_SPEC.md section 9, paper 2).

- L1 importance and the unit selection rule on hand-made numbers;
- the unit graph of the paper's networks, the element masks and the
  shrinking of a tiny conv -> conv -> flatten -> dense -> dense -> logits
  network (exact channels / rows; the shrunk model computes the same logits;
  parameter counts by hand);
- the structured finalizer on a hand-made aggregate through TFF;
- a short real run of the search process on tiny random data.
"""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import keras_models
from tff_feddst import optimizers
from tff_feddst import sparse_model
from tff_feddst import structured

# The tiny network: cifar10_cnn on 14x14x1 images, 3 classes.
#   conv1 5x5 1->3 valid: 14 -> 10; pool 3/1: 8
#   conv2 5x5 3->4 valid: 8 -> 4;   pool 3/1: 2  => flatten 2*2*4 = 16
#   dense1 16 -> 5; dense2 5 -> 4; logits 4 -> 3
TINY = "cifar10_cnn"
TINY_SHAPE = (14, 14, 1)
TINY_CLASSES = 3
TINY_WIDTHS = {"conv1": 3, "conv2": 4, "dense1": 5, "dense2": 4}


def _tiny_keras(widths=None):
  return keras_models.build_model(
      TINY, TINY_SHAPE, TINY_CLASSES, widths=widths or TINY_WIDTHS
  )


def _images(n, shape=TINY_SHAPE, seed=0):
  return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


# ------------------------------------------------------------- importance


def test_importance_of_a_conv_kernel_by_hand():
  # (k_h, k_w, c_in, c_out) = (1, 2, 2, 3)
  kernel = np.zeros((1, 2, 2, 3), np.float32)
  kernel[0, 0, 0] = [1.0, -2.0, 0.5]
  kernel[0, 0, 1] = [-1.0, 0.0, 0.5]
  kernel[0, 1, 0] = [3.0, 2.0, -0.5]
  kernel[0, 1, 1] = [0.0, -4.0, 0.5]
  # filter 0: 1 + 1 + 3 + 0 = 5; filter 1: 2 + 0 + 2 + 4 = 8; filter 2: 2.
  np.testing.assert_array_equal(structured.unit_importance(kernel), [5.0, 8.0, 2.0])


def test_importance_of_a_dense_kernel_by_hand():
  kernel = np.array([[1.0, -1.0], [-2.0, 0.25], [0.5, 0.0]], np.float32)
  # neuron 0: 1 + 2 + 0.5 = 3.5; neuron 1: 1 + 0.25 = 1.25
  np.testing.assert_array_equal(structured.unit_importance(kernel), [3.5, 1.25])
  with pytest.raises(ValueError, match="at least 2 axes"):
    structured.unit_importance(np.ones(3))


# ------------------------------------------------------------- selection

ALL = [True, True, True, True]


def test_select_relative_to_mean():
  importance = [1.0, 2.0, 3.0, 6.0]  # mean 3
  # boundary 0.5: remove < 1.5
  np.testing.assert_array_equal(
      structured.select_units(importance, ALL, 0.5), [False, True, True, True]
  )
  # boundary 1: remove < 3; a unit exactly at the boundary stays.
  np.testing.assert_array_equal(
      structured.select_units(importance, ALL, 1.0, "mean"),
      [False, False, True, True],
  )
  # boundary 0 removes nothing.
  np.testing.assert_array_equal(
      structured.select_units(importance, ALL, 0.0), ALL
  )


def test_select_relative_to_original_mean_settles():
  importance = np.array([1.0, 2.0, 3.0, 6.0])  # mean 3
  first = structured.select_units(importance, ALL, 1.0, "original_mean")
  np.testing.assert_array_equal(first, [False, False, True, True])
  # Removed units count 0: R = (3 + 6) / 4 = 2.25, so 3 stays.
  np.testing.assert_array_equal(
      structured.select_units(importance, first, 1.0, "original_mean"), first
  )
  # "mean" over the alive units keeps going: R = 4.5 removes 3 as well.
  np.testing.assert_array_equal(
      structured.select_units(importance, first, 1.0, "mean"),
      [False, False, False, True],
  )


def test_select_relative_to_max():
  importance = [1.0, 2.0, 3.0, 6.0]  # max 6
  # boundary 0.25: remove < 1.5
  np.testing.assert_array_equal(
      structured.select_units(importance, ALL, 0.25, "max"),
      [False, True, True, True],
  )
  # boundary 0.5: remove < 3 (3 stays)
  np.testing.assert_array_equal(
      structured.select_units(importance, ALL, 0.5, "max"),
      [False, False, True, True],
  )
  # boundary 1: only the maximum stays
  np.testing.assert_array_equal(
      structured.select_units(importance, ALL, 1.0, "max"),
      [False, False, False, True],
  )


def test_the_reference_counts_alive_units_only():
  # Unit 0 is dead; its (large) importance neither counts in the mean
  # (alive mean = (1 + 2 + 3) / 3 = 2, not 4) nor brings it back.
  importance = [10.0, 1.0, 2.0, 3.0]
  alive = [False, True, True, True]
  np.testing.assert_array_equal(
      structured.select_units(importance, alive, 1.0), [False, False, True, True]
  )
  # Alive max = 3 (not 10): boundary 0.5 removes < 1.5 only.
  np.testing.assert_array_equal(
      structured.select_units(importance, alive, 0.5, "max"),
      [False, False, True, True],
  )
  np.testing.assert_array_equal(
      structured.select_units(importance, alive, 0.3, "max"),
      [False, True, True, True],
  )


def test_a_layer_is_never_emptied_and_ties_go_to_the_lowest_index():
  importance = [1.0, 3.0, 3.0, 2.0]
  # boundary 2 x max: every unit is under it; keep the single best, the
  # lower index of the two 3s.
  np.testing.assert_array_equal(
      structured.select_units(importance, ALL, 2.0, "max"),
      [False, True, False, False],
  )
  np.testing.assert_array_equal(
      structured.select_units(importance, ALL, 5.0, "mean"),
      [False, True, False, False],
  )
  # With unit 1 dead the best alive unit is unit 2.
  np.testing.assert_array_equal(
      structured.select_units(importance, [True, False, True, True], 2.0, "max"),
      [False, False, True, False],
  )
  # All equal: the mean rule keeps everything (none is under the mean) and
  # an impossible boundary keeps unit 0.
  np.testing.assert_array_equal(
      structured.select_units([2.0, 2.0, 2.0], [True] * 3, 1.0), [True] * 3
  )
  np.testing.assert_array_equal(
      structured.select_units([2.0, 2.0, 2.0], [True] * 3, 1.5),
      [True, False, False],
  )
  # A single alive unit always stays, even with zero importance.
  np.testing.assert_array_equal(
      structured.select_units([0.0, 5.0], [True, False], 1.0, "max"),
      [True, False],
  )


def test_removed_units_stay_removed_over_steps():
  alive = np.array([True] * 6)
  rng = np.random.default_rng(0)
  history = [alive]
  for _ in range(8):
    # Dead units get the largest importance on purpose.
    importance = rng.random(6)
    importance[~alive] = 100.0
    new = structured.select_units(importance, alive, 0.9)
    assert not np.any(new & ~alive)
    assert new.sum() >= 1
    alive = new
    history.append(alive)
  assert history[-1].sum() < 6


def test_selection_argument_errors():
  with pytest.raises(ValueError, match="relative_to must be one of original_mean, mean, max"):
    structured.select_units([1.0], [True], 0.5, "median")
  with pytest.raises(ValueError, match="boundary must be a finite number >= 0"):
    structured.select_units([1.0], [True], -0.1)
  with pytest.raises(ValueError, match="boundary must be a finite number >= 0"):
    structured.select_units([1.0], [True], float("nan"))
  with pytest.raises(ValueError, match="same length"):
    structured.select_units([1.0, 2.0], [True], 0.5)
  with pytest.raises(ValueError, match="no alive unit"):
    structured.select_units([1.0, 2.0], [False, False], 0.5)


# ------------------------------------------------------------- unit graph

PAPER_NETWORKS = {
    # name: (input shape, classes, [(producer, consumer, mode, channels)])
    "mnist_cnn": ((28, 28, 1), 10, [
        ("conv1", "conv2", "conv", 10),
        ("conv2", "dense1", "flatten", 20),
        ("dense1", "logits", "dense", 50),
    ]),
    "cifar10_cnn": ((32, 32, 3), 10, [
        ("conv1", "conv2", "conv", 6),
        ("conv2", "dense1", "flatten", 16),
        ("dense1", "dense2", "dense", 120),
        ("dense2", "logits", "dense", 84),
    ]),
    "cifar100_cnn": ((32, 32, 3), 100, [
        ("conv1", "conv2", "conv", 6),
        ("conv2", "dense1", "flatten", 16),
        ("dense1", "logits", "dense", 120),
    ]),
    "leaf_cnn": ((28, 28, 1), 62, [
        ("conv1", "conv2", "conv", 32),
        ("conv2", "dense1", "flatten", 64),
        ("dense1", "logits", "dense", 2048),
    ]),
}


@pytest.mark.parametrize("name", sorted(PAPER_NETWORKS))
def test_unit_graph_of_the_papers_networks(name):
  shape, classes, links = PAPER_NETWORKS[name]
  model = keras_models.build_model(name, shape, classes)
  graph = structured.unit_graph(model)
  assert [
      (l.producer, l.consumer, l.mode, l.channels) for l in graph.links
  ] == links
  assert graph.hidden_names == tuple(keras_models.default_widths(name))
  assert graph.names == tuple(l.name for l in keras_models.prunable_layers(model))
  # The same graph from the tfmot-wrapped model.
  assert structured.unit_graph(sparse_model.wrap_prunable(model)) == graph


def test_unit_graph_rejects_layers_it_cannot_slice_through():
  layers = tf.keras.layers
  model = tf.keras.Sequential([
      layers.InputLayer(input_shape=(6, 6, 1)),
      layers.Conv2D(2, 3, name="c1"),
      layers.BatchNormalization(name="bn"),
      layers.Conv2D(2, 3, name="c2"),
      layers.Flatten(),
      layers.Dense(2, name="out"),
  ])
  with pytest.raises(ValueError, match="'bn' .* between 'c1' and 'c2'"):
    structured.unit_graph(model)
  no_flatten = tf.keras.Sequential([
      layers.InputLayer(input_shape=(6, 6, 1)),
      layers.Conv2D(2, 3, name="c1"),
      layers.GlobalAveragePooling2D(name="gap"),
      layers.Dense(2, name="out"),
  ])
  with pytest.raises(ValueError, match="'gap'"):
    structured.unit_graph(no_flatten)


# ------------------------------------------------ masks on the tiny network

# conv1 loses filter 1; conv2 loses filters 0 and 3; dense1 loses neurons 2
# and 3; dense2 keeps only neuron 3.
ALIVE = {
    "conv1": np.array([True, False, True]),
    "conv2": np.array([False, True, True, False]),
    "dense1": np.array([True, True, False, False, True]),
    "dense2": np.array([False, False, False, True]),
}
# dense1 reads the NHWC flatten of conv2's 2x2x4 output: row f is channel
# f % 4, so the rows of the dead channels 0 and 3 are these.
DENSE1_DEAD_ROWS = [0, 3, 4, 7, 8, 11, 12, 15]


@pytest.fixture(scope="module")
def tiny_graph():
  return structured.unit_graph(_tiny_keras())


def test_kernel_masks_zero_exactly_the_removed_units_and_their_inputs(tiny_graph):
  masks = structured.kernel_masks(tiny_graph, ALIVE)
  assert list(masks) == ["conv1", "conv2", "dense1", "dense2", "logits"]
  for name, mask in masks.items():
    assert mask.dtype == np.float32
    assert mask.shape == tiny_graph.layer(name).kernel_shape
    assert set(np.unique(mask)) <= {0.0, 1.0}

  expected = {n: np.ones(tiny_graph.layer(n).kernel_shape, np.float32) for n in masks}
  expected["conv1"][:, :, :, 1] = 0  # removed filter
  expected["conv2"][:, :, 1, :] = 0  # input channel of conv1's filter 1
  expected["conv2"][:, :, :, [0, 3]] = 0  # removed filters
  expected["dense1"][DENSE1_DEAD_ROWS, :] = 0  # flattened rows of dead channels
  expected["dense1"][:, [2, 3]] = 0
  expected["dense2"][[2, 3], :] = 0  # rows of dense1's dead neurons
  expected["dense2"][:, [0, 1, 2]] = 0
  expected["logits"][[0, 1, 2], :] = 0  # rows of dense2's dead neurons
  for name in masks:
    np.testing.assert_array_equal(masks[name], expected[name], err_msg=name)
  # The flatten rows by formula: row f is dead iff channel f % 4 is dead.
  dead_rows = [f for f in range(16) if not ALIVE["conv2"][f % 4]]
  assert dead_rows == DENSE1_DEAD_ROWS


def test_alive_from_masks_round_trip(tiny_graph):
  masks = structured.kernel_masks(tiny_graph, ALIVE)
  for given in (masks, list(masks.values())):
    alive = structured.alive_from_masks(tiny_graph, given)
    assert list(alive) == list(ALIVE)
    for name in ALIVE:
      np.testing.assert_array_equal(alive[name], ALIVE[name])


def test_missing_layers_are_all_alive_and_bad_alive_vectors_raise(tiny_graph):
  masks = structured.kernel_masks(tiny_graph, {"dense1": ALIVE["dense1"]})
  assert masks["conv1"].min() == 1.0 and masks["conv2"].min() == 1.0
  np.testing.assert_array_equal(masks["dense2"][[2, 3], :], 0.0)
  assert masks["dense2"][[0, 1, 4], :].min() == 1.0
  with pytest.raises(ValueError, match="no hidden prunable layer 'logits'"):
    structured.kernel_masks(tiny_graph, {"logits": np.ones(3, bool)})
  with pytest.raises(ValueError, match="layer 'conv2' has no alive unit"):
    structured.kernel_masks(tiny_graph, {"conv2": np.zeros(4, bool)})
  with pytest.raises(ValueError, match=r"expected \(5,\)"):
    structured.kernel_masks(tiny_graph, {"dense1": np.ones(4, bool)})


# ------------------------------------------------------------- shrinking


def _zeroed_copy(model, alive):
  """`model` with removed units (kernels, biases) and consumer inputs zeroed."""
  graph = structured.unit_graph(model)
  masks = structured.kernel_masks(graph, alive)
  copy = tf.keras.models.clone_model(model)
  copy.set_weights(model.get_weights())
  for name, mask in masks.items():
    kernel, bias = copy.get_layer(name).get_weights()
    if name in alive:
      bias = bias * alive[name]
    copy.get_layer(name).set_weights([kernel * mask, bias])
  return copy


@pytest.fixture(scope="module")
def tiny_model():
  tf.keras.utils.set_random_seed(1)
  model = _tiny_keras()
  # Non-zero biases everywhere, so a wrongly kept or dropped bias shows.
  for layer in keras_models.prunable_layers(model):
    kernel, bias = layer.get_weights()
    layer.set_weights([kernel, np.linspace(-0.5, 0.5, bias.size).astype(np.float32)])
  return model


def test_shrink_slices_the_right_channels_and_rows(tiny_model):
  widths, weights = structured.shrink(tiny_model, ALIVE)
  assert widths == {"conv1": 2, "conv2": 2, "dense1": 3, "dense2": 1}
  original = {l.name: l.get_weights() for l in keras_models.prunable_layers(tiny_model)}
  conv1, conv2, dense1, dense2, logits = (original[n] for n in
                                          ["conv1", "conv2", "dense1", "dense2", "logits"])
  kept_rows = [1, 2, 5, 6, 9, 10, 13, 14]  # flatten rows of channels 1, 2
  expected = [
      conv1[0][:, :, :, [0, 2]], conv1[1][[0, 2]],
      conv2[0][:, :, [0, 2], :][:, :, :, [1, 2]], conv2[1][[1, 2]],
      dense1[0][kept_rows][:, [0, 1, 4]], dense1[1][[0, 1, 4]],
      dense2[0][[0, 1, 4]][:, [3]], dense2[1][[3]],
      logits[0][[3]], logits[1],
  ]
  assert len(weights) == len(expected)
  for got, want in zip(weights, expected):
    np.testing.assert_array_equal(got, want)


def test_shrunk_model_computes_the_same_logits(tiny_model):
  small = structured.build_shrunk_model(
      TINY, TINY_SHAPE, TINY_CLASSES, tiny_model, ALIVE
  )
  x = _images(16)
  reference = _zeroed_copy(tiny_model, ALIVE)(x).numpy()
  np.testing.assert_allclose(small(x).numpy(), reference, rtol=1e-5, atol=1e-5)
  # Pruning changed the function (the check is not vacuous).
  assert not np.allclose(tiny_model(x).numpy(), reference, atol=1e-3)
  # By hand: conv1 5*5*1*2 + 2 = 52; conv2 5*5*2*2 + 2 = 102;
  # dense1 (2*2*2)*3 + 3 = 27; dense2 3*1 + 1 = 4; logits 1*3 + 3 = 6.
  assert small.count_params() == 52 + 102 + 27 + 4 + 6 == 191
  widths = {"conv1": 2, "conv2": 2, "dense1": 3, "dense2": 1}
  assert structured.count_params(TINY, TINY_SHAPE, TINY_CLASSES, widths) == 191
  assert [l.name for l in small.layers] == [l.name for l in tiny_model.layers]


def test_shrinking_to_one_unit_per_layer(tiny_model):
  one = {n: np.eye(w, dtype=bool)[w - 1] for n, w in TINY_WIDTHS.items()}
  small = structured.build_shrunk_model(TINY, TINY_SHAPE, TINY_CLASSES, tiny_model, one)
  # conv1 25 + 1; conv2 25 + 1; dense1 (2*2*1) + 1; dense2 1 + 1; logits 3 + 3.
  assert small.count_params() == 26 + 26 + 5 + 2 + 6 == 65
  x = _images(8, seed=2)
  np.testing.assert_allclose(
      small(x).numpy(), _zeroed_copy(tiny_model, one)(x).numpy(), rtol=1e-5, atol=1e-5
  )


def test_shrinking_a_wrapped_model_uses_its_masks(tiny_model):
  wrapped = sparse_model.wrap_prunable(tiny_model)
  masks = structured.kernel_masks(structured.unit_graph(wrapped), ALIVE)
  for layer in wrapped.layers:
    if hasattr(layer, "pruning_vars"):
      (_, mask_var, _), = layer.pruning_vars
      mask_var.assign(masks[layer.layer.name])
  x = _images(8, seed=3)
  small = structured.build_shrunk_model(TINY, TINY_SHAPE, TINY_CLASSES, wrapped, ALIVE)
  # The wrapped model computes with kernel * mask; only the removed biases
  # differ, and those units feed nothing (their consumer rows are masked).
  np.testing.assert_allclose(
      small(x).numpy(), wrapped(x, training=False).numpy(), rtol=1e-5, atol=1e-5
  )


def test_mnist_cnn_shrinks_with_parameters_by_hand():
  tf.keras.utils.set_random_seed(4)
  model = keras_models.build_model("mnist_cnn", (28, 28, 1), 10)
  rng = np.random.default_rng(4)
  alive = {n: rng.random(w) < 0.5 for n, w in keras_models.default_widths("mnist_cnn").items()}
  for a in alive.values():
    a[0] = True
  a, b, c = (int(alive[n].sum()) for n in ("conv1", "conv2", "dense1"))
  small = structured.build_shrunk_model("mnist_cnn", (28, 28, 1), 10, model, alive)
  # conv1 25a + a; conv2 25ab + b; dense1 (16*16*b) c + c; logits 10c + 10.
  assert small.count_params() == 26 * a + 25 * a * b + b + 256 * b * c + c + 10 * c + 10
  x = _images(4, (28, 28, 1), seed=5)
  np.testing.assert_allclose(
      small(x).numpy(), _zeroed_copy(model, alive)(x).numpy(), rtol=1e-4, atol=1e-4
  )


def test_architecture_cost_by_hand():
  widths = {"conv1": 5, "conv2": 8, "dense1": 20}
  cost = structured.architecture_cost("mnist_cnn", (28, 28, 1), 10, widths)
  # params: conv1 25*5 + 5 = 130; conv2 25*5*8 + 8 = 1008;
  # dense1 (16*16*8)*20 + 20 = 40980; logits 20*10 + 10 = 210.
  assert cost.params == 130 + 1008 + 40980 + 210 == 42328
  # FLOPs (2 x MACs): conv1 24*24*5*25 -> 144000; conv2 18*18*8*125 -> 648000;
  # dense1 2048*20 -> 81920; logits 200 -> 400.
  assert cost.layer_flops == {
      "conv1": 144000, "conv2": 648000, "dense1": 81920, "logits": 400
  }
  assert cost.forward_flops == 874320
  assert cost.upload_bits_per_client() == 32 * 42328
  assert cost.widths == widths
  full = structured.architecture_cost("mnist_cnn", (28, 28, 1), 10)
  assert full.params == 261840 and full.forward_flops == 288000 + 3240000 + 512000 + 1000


# ------------------------------------------------------ TFF: the finalizer

SPEC = collections.OrderedDict(
    x=tf.TensorSpec([None, *TINY_SHAPE], tf.float32),
    y=tf.TensorSpec([None], tf.int32),
)


@pytest.fixture(scope="module")
def tiny_layout():
  return structured.build_structured_layout(sparse_model.wrap_prunable(_tiny_keras()))


def test_structured_layout_positions(tiny_layout):
  # Trainable: kernel, bias per layer; non-trainable: mask, threshold, step.
  assert tiny_layout.sparse.kernel_index == (0, 2, 4, 6, 8)
  assert tiny_layout.bias_index == (1, 3, 5, 7, 9)
  assert tiny_layout.sparse.mask_index == (0, 3, 6, 9, 12)
  assert tiny_layout.sparse.budgets == tuple(
      int(np.prod(s)) for s in tiny_layout.sparse.kernel_shapes
  )
  assert tiny_layout.hidden_names == ("conv1", "conv2", "dense1", "dense2")
  with pytest.raises(ValueError, match="wrap_prunable"):
    structured.build_structured_layout(_tiny_keras())


def _finalizer_inputs(layout, scales, contributed=True):
  """Initial weights and a hand-made aggregate: unit j of a hidden layer has
  every kernel entry equal to scales[layer][j] (importance = fan-in x it)."""
  weights = structured.initial_search_weights(_tiny_keras, 0, layout)
  values = [np.array(v) for v in weights.trainable]
  for s, name in enumerate(layout.graph.names):
    k = layout.sparse.kernel_index[s]
    if name in scales:
      values[k] = np.broadcast_to(
          np.asarray(scales[name], np.float32), values[k].shape
      ).copy()
    else:
      values[k] = np.full(values[k].shape, 0.5, np.float32)
    values[layout.bias_index[s]] = np.arange(
        1, values[k].shape[-1] + 1, dtype=np.float32
    )
  flag = 1.0 if contributed else 0.0
  masks = []
  for i, v in enumerate(values):
    if i in layout.sparse.kernel_index:
      masks.append(np.full(v.shape, flag, np.float32))
    else:
      masks.append(np.float32(flag))
  update = collections.OrderedDict(values=values, masks=masks)
  return weights, update


def _build_finalizer(layout, boundary, relative_to):
  with tf.Graph().as_default():
    model = sparse_model.make_model_fn(_tiny_keras, SPEC, True)()
    weights_type = tff.learning.models.weights_type_from_model(model)
  update_type = tff.types.tensorflow_to_type(
      collections.OrderedDict(
          values=[tf.TensorSpec(s, tf.float32) for s in _trainable_shapes(layout)],
          masks=[
              tf.TensorSpec(s if i in layout.sparse.kernel_index else [], tf.float32)
              for i, s in enumerate(_trainable_shapes(layout))
          ],
      )
  )
  return structured.build_structured_finalizer(
      weights_type, update_type, layout, boundary=boundary, relative_to=relative_to
  )


def _trainable_shapes(layout):
  shapes = []
  for s, shape in enumerate(layout.sparse.kernel_shapes):
    shapes.append(tuple(shape))
    shapes.append((shape[-1],))
  return shapes


# Layers are visited in order, and a layer's importance is taken after the
# inputs of the producer's units removed in the same step are zeroed. With
# boundary 0.9 x mean:
# conv1, fan-in 25: [25, 75, 50], mean 50, < 45 -> filter 0 goes;
# conv2, fan-in 2 live channels x 25 = 50: [200, 50, 200, 200], mean 162.5,
#   < 146.25 -> filter 1 goes;
# dense1, fan-in 12 live rows (channel 1's rows 1, 5, 9, 13 are gone):
#   [12, 12, 12, 12, 60], mean 21.6, < 19.44 -> neurons 0-3 go;
# dense2, fan-in 1 live row: [1, 1, 1, 1], all equal -> none goes.
SCALES = {
    "conv1": [1.0, 3.0, 2.0],
    "conv2": [4.0, 1.0, 4.0, 4.0],
    "dense1": [1.0, 1.0, 1.0, 1.0, 5.0],
    "dense2": [1.0, 1.0, 1.0, 1.0],
}


@pytest.fixture(scope="module")
def mean_finalizer(tiny_layout):
  return _build_finalizer(tiny_layout, 0.9, "mean")


def test_finalizer_removes_units_under_the_boundary(tiny_layout, mean_finalizer):
  finalizer = mean_finalizer
  weights, update = _finalizer_inputs(tiny_layout, SCALES)
  out = finalizer.next(finalizer.initialize(), weights, update)
  expected_alive = {
      "conv1": [False, True, True],
      "conv2": [True, False, True, True],
      "dense1": [False, False, False, False, True],
      "dense2": [True, True, True, True],
  }
  assert dict(out.measurements["alive"]) == {"conv1": 2, "conv2": 3, "dense1": 1, "dense2": 4}
  assert dict(out.measurements["removed"]) == {"conv1": 1, "conv2": 1, "dense1": 4, "dense2": 0}
  assert out.measurements["removed_total"] == 6
  assert out.measurements["skipped"] == 0
  new = out.result
  kernels, masks = sparse_model.kernels_and_masks(new, tiny_layout.sparse)
  alive = structured.alive_from_masks(tiny_layout.graph, masks)
  for name, want in expected_alive.items():
    np.testing.assert_array_equal(alive[name], want, err_msg=name)
  expected_masks = structured.kernel_masks(tiny_layout.graph, expected_alive)
  # Explicit rows / channels, independent of kernel_masks:
  np.testing.assert_array_equal(masks[1][:, :, 0, :], 0.0)  # conv2 <- conv1 f0
  np.testing.assert_array_equal(masks[2][[1, 5, 9, 13], :], 0.0)  # dense1 <- conv2 f1
  np.testing.assert_array_equal(masks[3][[0, 1, 2, 3], :], 0.0)  # dense2 <- dense1
  assert masks[4].min() == 1.0  # dense2 lost nothing
  for s, name in enumerate(tiny_layout.graph.names):
    np.testing.assert_array_equal(masks[s], expected_masks[name], err_msg=name)
    k = tiny_layout.sparse.kernel_index[s]
    np.testing.assert_array_equal(
        kernels[s], update["values"][k] * expected_masks[name], err_msg=name
    )
    # Biases of removed units are zero, the others unchanged.
    b = tiny_layout.bias_index[s]
    keep = np.asarray(expected_alive.get(name, [True] * 3), np.float32)
    np.testing.assert_array_equal(new.trainable[b], update["values"][b] * keep)
  # Thresholds and pruning steps are untouched.
  for i, v in enumerate(weights.non_trainable):
    if i not in tiny_layout.sparse.mask_index:
      np.testing.assert_array_equal(new.non_trainable[i], v)

  # A second round on the pruned weights: removed units stay removed even
  # when the aggregate gives them large values.
  _, update2 = _finalizer_inputs(tiny_layout, {n: [9.0] * len(v) for n, v in SCALES.items()})
  out2 = finalizer.next(out.state, new, update2)
  assert out2.measurements["removed_total"] == 0
  _, masks2 = sparse_model.kernels_and_masks(out2.result, tiny_layout.sparse)
  for m1, m2 in zip(masks, masks2):
    np.testing.assert_array_equal(m1, m2)


def test_importance_is_taken_on_the_weights_that_remain(tiny_layout, mean_finalizer):
  weights, update = _finalizer_inputs(tiny_layout, SCALES)
  # dense2: unit 0 is big only on the rows of dense1's neurons 0-3, which
  # this same step removes (see SCALES); units 1-3 read neuron 4.
  dense2 = np.zeros((5, 4), np.float32)
  dense2[:4, 0] = 10.0
  dense2[4, 0] = 0.1
  dense2[4, 1:] = 1.0
  update["values"][tiny_layout.sparse.kernel_index[3]] = dense2
  out = mean_finalizer.next(mean_finalizer.initialize(), weights, update)
  # On the remaining row: [0.1, 1, 1, 1], mean 0.775, < 0.6975 -> unit 0
  # goes. (Measured before dense1's removals, unit 0 would have 40.1 and
  # units 1-3 would go instead.)
  _, masks = sparse_model.kernels_and_masks(out.result, tiny_layout.sparse)
  alive = structured.alive_from_masks(tiny_layout.graph, masks)
  np.testing.assert_array_equal(alive["dense2"], [False, True, True, True])
  assert out.measurements["removed"]["dense2"] == 1
  # The numpy `prune_step` makes the same decision for every layer.
  kernels = [update["values"][i] for i in tiny_layout.sparse.kernel_index]
  decided = structured.prune_step(tiny_layout.graph, kernels, None, 0.9)
  assert list(decided) == list(alive)
  for name in alive:
    np.testing.assert_array_equal(decided[name], alive[name], err_msg=name)


def test_prune_step_by_hand(tiny_graph):
  kernels = {n: np.ones(tiny_graph.layer(n).kernel_shape, np.float32) for n in tiny_graph.names}
  kernels["conv1"][..., 2] = 0.1  # importance [25, 25, 2.5], mean 17.5
  # Already dead units stay dead and do not count.
  alive = {"dense1": np.array([True, True, True, False, True])}
  new = structured.prune_step(tiny_graph, kernels, alive, 0.5)
  # conv1: < 8.75 -> filter 2 goes. conv2 reads 2 live channels: all 50,
  # none goes. dense1: all 16, none goes (3 stays dead). dense2 reads 4 live
  # rows: all 4, none goes.
  np.testing.assert_array_equal(new["conv1"], [True, True, False])
  np.testing.assert_array_equal(new["conv2"], [True] * 4)
  np.testing.assert_array_equal(new["dense1"], [True, True, True, False, True])
  np.testing.assert_array_equal(new["dense2"], [True] * 4)


def test_finalizer_never_empties_a_layer_and_breaks_ties_low(tiny_layout):
  finalizer = _build_finalizer(tiny_layout, 1.5, "max")
  weights, update = _finalizer_inputs(tiny_layout, SCALES)
  out = finalizer.next(finalizer.initialize(), weights, update)
  # Every unit is under 1.5 x max: the best one stays (ties: lowest index).
  assert dict(out.measurements["alive"]) == {"conv1": 1, "conv2": 1, "dense1": 1, "dense2": 1}
  _, masks = sparse_model.kernels_and_masks(out.result, tiny_layout.sparse)
  alive = structured.alive_from_masks(tiny_layout.graph, masks)
  assert {n: int(np.flatnonzero(a)[0]) for n, a in alive.items()} == {
      "conv1": 1, "conv2": 0, "dense1": 4, "dense2": 0
  }


def test_finalizer_keeps_the_weights_when_no_client_contributed(
    tiny_layout, mean_finalizer
):
  finalizer = mean_finalizer
  weights, update = _finalizer_inputs(tiny_layout, SCALES, contributed=False)
  out = finalizer.next(finalizer.initialize(), weights, update)
  assert out.measurements["skipped"] == 1
  assert out.measurements["removed_total"] == 0
  for got, want in zip(out.result.trainable, weights.trainable):
    np.testing.assert_array_equal(got, want)
  for got, want in zip(out.result.non_trainable, weights.non_trainable):
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------ TFF: a short real search

SEARCH_WIDTHS = {"conv1": 4, "conv2": 6, "dense1": 8, "dense2": 6}
SEARCH_ROUNDS = 3


def _search_keras():
  return keras_models.build_model(TINY, TINY_SHAPE, TINY_CLASSES, widths=SEARCH_WIDTHS)


def _client_data(round_num, sizes=(6, 8, 10)):
  rng = np.random.default_rng(round_num)
  out = []
  for n in sizes:
    x = rng.normal(size=(n, *TINY_SHAPE)).astype(np.float32)
    y = rng.integers(0, TINY_CLASSES, n).astype(np.int32)
    out.append(
        tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(4)
    )
  return out


def _empty_client():
  x = np.zeros((0, *TINY_SHAPE), np.float32)
  y = np.zeros((0,), np.int32)
  return tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(4)


@pytest.fixture(scope="module")
def search_run():
  """Builds the search once; runs SEARCH_ROUNDS rounds and an empty round."""
  layout = structured.build_structured_layout(
      sparse_model.wrap_prunable(_search_keras())
  )
  initial = structured.initial_search_weights(_search_keras, 0, layout)
  process = structured.build_structured_search(
      sparse_model.make_model_fn(_search_keras, SPEC, True),
      layout,
      initial,
      optimizers.build_sgdw(0.05, 0.9, 0.001),
      local_epochs=1,
      boundary=0.9,
  )
  state = process.initialize()
  previous = process.get_model_weights(state)
  rounds = []
  for r in range(1, SEARCH_ROUNDS + 1):
    output = process.next(state, _client_data(r))
    state = output.state
    weights = process.get_model_weights(state)
    rounds.append((previous, weights, output.metrics))
    previous = weights
  empty = process.next(state, [_empty_client()])
  return layout, initial, rounds, (previous, process.get_model_weights(empty.state), empty.metrics)


def _check_removed_units_are_zero(layout, weights):
  """Removed unit => its kernel slice, bias and consumer inputs are 0."""
  graph = layout.graph
  kernels, masks = sparse_model.kernels_and_masks(weights, layout.sparse)
  alive = structured.alive_from_masks(graph, masks)
  slot = {n: i for i, n in enumerate(graph.names)}
  for link in graph.links:
    dead = np.flatnonzero(~alive[link.producer])
    producer = kernels[slot[link.producer]]
    consumer = kernels[slot[link.consumer]]
    bias = np.asarray(weights.trainable[layout.bias_index[slot[link.producer]]])
    for j in dead:
      assert not producer[..., j].any()
      assert bias[j] == 0.0
      if link.mode == "conv":
        assert not consumer[:, :, j, :].any()
      elif link.mode == "flatten":
        rows = np.arange(j, consumer.shape[0], link.channels)
        assert len(rows) == consumer.shape[0] // link.channels
        assert not consumer[rows].any()
      else:
        assert not consumer[j].any()
  return alive


def test_initial_search_masks_are_all_ones(search_run):
  layout, initial, _, _ = search_run
  _, masks = sparse_model.kernels_and_masks(initial, layout.sparse)
  assert all(m.min() == 1.0 for m in masks)


def test_every_round_keeps_masks_structured_and_consistent(search_run):
  layout, _, rounds, _ = search_run
  for previous, weights, metrics in rounds:
    _, masks = sparse_model.kernels_and_masks(weights, layout.sparse)
    assert all(set(np.unique(m)) <= {0.0, 1.0} for m in masks)
    alive = _check_removed_units_are_zero(layout, weights)
    # The masks are exactly the element masks of the alive vectors.
    expected = structured.kernel_masks(layout.graph, alive)
    for mask, want in zip(masks, expected.values()):
      np.testing.assert_array_equal(mask, want)
    # Kernels are zero outside the mask.
    kernels, _ = sparse_model.kernels_and_masks(weights, layout.sparse)
    for kernel, mask in zip(kernels, masks):
      assert not (kernel * (1 - mask)).any()
    # Measurements match the masks; no layer is ever empty.
    _, old_masks = sparse_model.kernels_and_masks(previous, layout.sparse)
    old_alive = structured.alive_from_masks(layout.graph, old_masks)
    fin = metrics["finalizer"]
    assert fin["skipped"] == 0
    for name in layout.hidden_names:
      assert fin["alive"][name] == int(alive[name].sum()) >= 1
      assert fin["removed"][name] == int(old_alive[name].sum() - alive[name].sum())
      # Removed units stay removed.
      assert not np.any(alive[name] & ~old_alive[name])
    assert fin["removed_total"] == sum(fin["removed"].values())


def test_the_search_removes_units(search_run):
  layout, _, rounds, _ = search_run
  first = rounds[0][2]["finalizer"]
  assert first["removed_total"] > 0
  total = sum(m["finalizer"]["removed_total"] for _, _, m in rounds)
  start = sum(SEARCH_WIDTHS.values())
  final_alive = rounds[-1][2]["finalizer"]["alive"]
  assert sum(final_alive.values()) == start - total
  # Every client trained: FedAvg over 3 clients and 24 examples.
  assert rounds[0][2]["client_work"]["clients"]["examples"] == 24


def test_a_round_without_contributions_changes_nothing(search_run):
  _, _, _, (before, after, metrics) = search_run
  assert metrics["finalizer"]["skipped"] == 1
  assert metrics["finalizer"]["removed_total"] == 0
  for got, want in zip(after.trainable, before.trainable):
    np.testing.assert_array_equal(got, want)
  for got, want in zip(after.non_trainable, before.non_trainable):
    np.testing.assert_array_equal(got, want)


def test_the_found_architecture_shrinks_to_an_equivalent_model(search_run):
  layout, _, rounds, _ = search_run
  weights = rounds[-1][1]
  alive = structured.alive_from_model_weights(layout, weights)
  wrapped = sparse_model.wrap_prunable(_search_keras())
  weights.assign_weights_to(wrapped)
  small = structured.build_shrunk_model(TINY, TINY_SHAPE, TINY_CLASSES, wrapped, alive)
  widths = structured.widths_from_alive(alive)
  assert widths == dict(rounds[-1][2]["finalizer"]["alive"])
  assert small.count_params() == structured.count_params(
      TINY, TINY_SHAPE, TINY_CLASSES, widths
  )
  assert small.count_params() < _search_keras().count_params()
  x = _images(8, seed=7)
  np.testing.assert_allclose(
      small(x).numpy(), wrapped(x, training=False).numpy(), rtol=1e-5, atol=1e-5
  )


def test_search_rejects_bad_arguments(tiny_layout):
  model_fn = sparse_model.make_model_fn(_tiny_keras, SPEC, True)
  initial = structured.initial_search_weights(_tiny_keras, 0, tiny_layout)
  optimizer = optimizers.build_sgdw()
  with pytest.raises(ValueError, match="relative_to"):
    structured.build_structured_search(
        model_fn, tiny_layout, initial, optimizer, local_epochs=1, boundary=0.5,
        relative_to="median",
    )
  with pytest.raises(ValueError, match="local_epochs"):
    structured.build_structured_search(
        model_fn, tiny_layout, initial, optimizer, local_epochs=0, boundary=0.5
    )
  with pytest.raises(TypeError, match="StructuredLayout"):
    structured.build_structured_search(
        model_fn, tiny_layout.sparse, initial, optimizer, local_epochs=1, boundary=0.5
    )
  # An unstructured (random sparse) mask is refused.
  sparse_layout = sparse_model.build_layout(
      sparse_model.wrap_prunable(_tiny_keras()), 0.5, "uniform"
  )
  sparse_initial = sparse_model.initial_model_weights(_tiny_keras, 0, sparse_layout)
  with pytest.raises(ValueError, match="not a structured"):
    structured.build_structured_search(
        model_fn, tiny_layout, sparse_initial, optimizer, local_epochs=1, boundary=0.5
    )
