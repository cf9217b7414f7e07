"""Automatic structured pruning (paper 2; docs/algorithms.md).

- L1 importance and the unit selection rule on hand-made numbers, and
  against a plain NumPy reference written in this file;
- the unit graph of the paper's networks, the element masks and the
  shrinking of a tiny conv -> conv -> flatten -> dense -> dense -> logits
  network (exact channels / rows; the shrunk model computes the same logits;
  parameter counts by hand);
- the structured finalizer through TFF on hand-made aggregates (expected
  units stated by hand) and on random ones (against the NumPy reference);
- a short real run of the search process on tiny random data.
"""

import collections
import inspect

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import keras_models
from tff_feddst import algorithms
from tff_feddst import optimizers
from tff_feddst import sparse_model
from tff_feddst import structured
from tff_feddst import unit_graph
from tff_feddst import wrappers

# `portability` (pyproject.toml) marks the tests that run the networks
# (convolutions and matrix products, whose oneDNN kernels change with the
# instruction set): `make test` runs them under another one too. The
# selection rules and the finalizer add and compare importances without
# oneDNN, the same on every processor.

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
  np.testing.assert_array_equal(unit_graph.unit_importance(kernel), [5.0, 8.0, 2.0])


def test_importance_of_a_dense_kernel_by_hand():
  kernel = np.array([[1.0, -1.0], [-2.0, 0.25], [0.5, 0.0]], np.float32)
  # neuron 0: 1 + 2 + 0.5 = 3.5; neuron 1: 1 + 0.25 = 1.25
  np.testing.assert_array_equal(unit_graph.unit_importance(kernel), [3.5, 1.25])
  with pytest.raises(ValueError, match="at least 2 axes"):
    unit_graph.unit_importance(np.ones(3))


# ------------------------------------------------------------- selection

ALL = [True, True, True, True]


def test_select_relative_to_mean():
  importance = [1.0, 2.0, 3.0, 6.0]  # mean 3
  # boundary 0.5: remove < 1.5
  np.testing.assert_array_equal(
      unit_graph.select_units(importance, ALL, 0.5, "mean"),
      [False, True, True, True],
  )
  # boundary 1: remove < 3; a unit exactly at the boundary stays.
  np.testing.assert_array_equal(
      unit_graph.select_units(importance, ALL, 1.0, "mean"),
      [False, False, True, True],
  )
  # boundary 0 removes nothing.
  np.testing.assert_array_equal(
      unit_graph.select_units(importance, ALL, 0.0, "mean"), ALL
  )


def test_select_relative_to_original_mean_settles():
  importance = np.array([1.0, 2.0, 3.0, 6.0])  # mean 3
  first = unit_graph.select_units(importance, ALL, 1.0, "original_mean")
  np.testing.assert_array_equal(first, [False, False, True, True])
  # Removed units count 0: R = (3 + 6) / 4 = 2.25, so 3 stays.
  np.testing.assert_array_equal(
      unit_graph.select_units(importance, first, 1.0, "original_mean"), first
  )
  # "mean" over the alive units keeps going: R = 4.5 removes 3 as well.
  np.testing.assert_array_equal(
      unit_graph.select_units(importance, first, 1.0, "mean"),
      [False, False, False, True],
  )


def test_select_relative_to_max():
  importance = [1.0, 2.0, 3.0, 6.0]  # max 6
  # boundary 0.25: remove < 1.5
  np.testing.assert_array_equal(
      unit_graph.select_units(importance, ALL, 0.25, "max"),
      [False, True, True, True],
  )
  # boundary 0.5: remove < 3 (3 stays)
  np.testing.assert_array_equal(
      unit_graph.select_units(importance, ALL, 0.5, "max"),
      [False, False, True, True],
  )
  # boundary 1: only the maximum stays
  np.testing.assert_array_equal(
      unit_graph.select_units(importance, ALL, 1.0, "max"),
      [False, False, False, True],
  )


def test_the_reference_counts_alive_units_only():
  # Unit 0 is dead; its (large) importance neither counts in the mean
  # (alive mean = (1 + 2 + 3) / 3 = 2, not 4) nor brings it back.
  importance = [10.0, 1.0, 2.0, 3.0]
  alive = [False, True, True, True]
  np.testing.assert_array_equal(
      unit_graph.select_units(importance, alive, 1.0, "mean"),
      [False, False, True, True],
  )
  # "original_mean" counts it as 0: R = (0 + 1 + 2 + 3) / 4 = 1.5, so
  # boundary 0.6 removes < 0.9 (nothing), where "mean" removes < 1.2.
  np.testing.assert_array_equal(
      unit_graph.select_units(importance, alive, 0.6, "original_mean"),
      [False, True, True, True],
  )
  np.testing.assert_array_equal(
      unit_graph.select_units(importance, alive, 0.6, "mean"),
      [False, False, True, True],
  )
  # Alive max = 3 (not 10): boundary 0.5 removes < 1.5 only.
  np.testing.assert_array_equal(
      unit_graph.select_units(importance, alive, 0.5, "max"),
      [False, False, True, True],
  )
  np.testing.assert_array_equal(
      unit_graph.select_units(importance, alive, 0.3, "max"),
      [False, True, True, True],
  )


def test_a_layer_is_never_emptied_and_ties_go_to_the_lowest_index():
  importance = [1.0, 3.0, 3.0, 2.0]
  # boundary 2 x max: every unit is under it; keep the single best, the
  # lower index of the two 3s.
  np.testing.assert_array_equal(
      unit_graph.select_units(importance, ALL, 2.0, "max"),
      [False, True, False, False],
  )
  np.testing.assert_array_equal(
      unit_graph.select_units(importance, ALL, 5.0, "mean"),
      [False, True, False, False],
  )
  # With unit 1 dead the best alive unit is unit 2.
  np.testing.assert_array_equal(
      unit_graph.select_units(importance, [True, False, True, True], 2.0, "max"),
      [False, False, True, False],
  )
  # All equal: the mean rule keeps everything (none is under the mean) and
  # an impossible boundary keeps unit 0.
  np.testing.assert_array_equal(
      unit_graph.select_units([2.0, 2.0, 2.0], [True] * 3, 1.0, "mean"), [True] * 3
  )
  np.testing.assert_array_equal(
      unit_graph.select_units([2.0, 2.0, 2.0], [True] * 3, 1.5, "mean"),
      [True, False, False],
  )
  # A single alive unit always stays, even with zero importance.
  np.testing.assert_array_equal(
      unit_graph.select_units([0.0, 5.0], [True, False], 1.0, "max"),
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
    new = unit_graph.select_units(importance, alive, 0.9)
    assert not np.any(new & ~alive)
    assert new.sum() >= 1
    alive = new
    history.append(alive)
  assert history[-1].sum() < 6


def test_selection_argument_errors():
  with pytest.raises(ValueError, match="relative_to must be one of original_mean, mean, max"):
    unit_graph.select_units([1.0], [True], 0.5, "median")
  with pytest.raises(ValueError, match="boundary must be a finite number >= 0"):
    unit_graph.select_units([1.0], [True], -0.1)
  with pytest.raises(ValueError, match="boundary must be a finite number >= 0"):
    unit_graph.select_units([1.0], [True], float("nan"))
  with pytest.raises(ValueError, match="same length"):
    unit_graph.select_units([1.0, 2.0], [True], 0.5)
  with pytest.raises(ValueError, match="no alive unit"):
    unit_graph.select_units([1.0, 2.0], [False, False], 0.5)


# --------------------------------------------- a NumPy reference of the rule
#
# Written from the rule, not from unit_graph's code: the L1 importance of a
# unit is the sum of |w| over its kernel slice; among a layer's alive units
# those with importance < boundary x R go (a unit exactly at boundary x R
# stays), R being "original_mean": the sum of the alive units' importances
# over the layer's original unit count (removed units count 0), "mean": the
# same sum over the alive count, "max": the largest alive importance; when
# every alive unit would go, the most important one stays (lowest index
# among equals). Hidden layers are decided in model order, each on its
# kernel with the inputs of its producer's dead or just removed units zeroed.
# R and the threshold are computed in the importances' dtype, as the server
# does (float32 kernels), so exact ties are compared exactly.

# The tiny network's layers and links (cifar10_cnn): (producer, consumer, mode).
TINY_LAYERS = ("conv1", "conv2", "dense1", "dense2", "logits")
TINY_LINKS = (
    ("conv1", "conv2", "conv"),
    ("conv2", "dense1", "flatten"),
    ("dense1", "dense2", "dense"),
    ("dense2", "logits", "dense"),
)
_PRODUCER = {consumer: (producer, mode) for producer, consumer, mode in TINY_LINKS}


def _np_importance(kernel):
  kernel = np.asarray(kernel)
  return np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)


def _np_select(importance, alive, boundary, relative_to):
  importance = np.asarray(importance)
  if not np.issubdtype(importance.dtype, np.floating):
    importance = importance.astype(np.float64)
  alive = np.asarray(alive, bool)
  real = importance.dtype.type
  total = real(importance[alive].sum())
  if relative_to == "original_mean":
    reference = total / real(len(importance))
  elif relative_to == "mean":
    reference = total / real(alive.sum())
  else:
    assert relative_to == "max"
    reference = importance[alive].max()
  keep = alive & (importance >= real(boundary) * reference)
  if not keep.any():
    best = max(np.flatnonzero(alive), key=lambda j: (importance[j], -j))
    keep = np.zeros(len(alive), bool)
    keep[best] = True
  return keep


def _np_inputs_alive(mode, producer_alive, consumer_shape):
  """Bool over the consumer kernel's input axis (the one before the last)."""
  producer_alive = np.asarray(producer_alive, bool)
  if mode == "flatten":  # NHWC flatten: input row f is channel f % C
    channels = len(producer_alive)
    return np.array([producer_alive[f % channels] for f in range(consumer_shape[-2])])
  assert consumer_shape[-2] == len(producer_alive)
  return producer_alive


def _np_prune_step(kernels, alive, boundary, relative_to):
  """New alive vectors of the tiny network's hidden layers."""
  new = {}
  for name in TINY_LAYERS[:-1]:
    kernel = np.array(kernels[name])
    if name in _PRODUCER:
      producer, mode = _PRODUCER[name]
      inputs = _np_inputs_alive(mode, new[producer], kernel.shape)
      kernel[..., ~inputs, :] = 0
    units = kernel.shape[-1]
    old = np.asarray(alive.get(name, np.ones(units, bool)), bool)
    new[name] = _np_select(_np_importance(kernel), old, boundary, relative_to)
  return new


def _np_masks(shapes, alive):
  """Element masks of the tiny network's kernels: a dead unit's output slice
  and its consumer's matching inputs are 0."""
  masks = {}
  for name in TINY_LAYERS:
    mask = np.ones(shapes[name], np.float32)
    if name in alive:
      mask[..., ~np.asarray(alive[name], bool)] = 0
    if name in _PRODUCER:
      producer, mode = _PRODUCER[name]
      mask[..., ~_np_inputs_alive(mode, alive[producer], mask.shape), :] = 0
    masks[name] = mask
  return masks


def _np_alive(mask):
  mask = np.asarray(mask)
  return (mask != 0).reshape(-1, mask.shape[-1]).any(axis=0)


# Hand-checked cases, for the reference itself:
# (importance, alive, boundary, relative_to, expected alive).
HAND_SELECTIONS = [
    # mean 3: < 1.5 goes; at boundary 1, 3 (exactly at it) stays.
    ([1.0, 2.0, 3.0, 6.0], ALL, 0.5, "mean", [False, True, True, True]),
    ([1.0, 2.0, 3.0, 6.0], ALL, 1.0, "mean", [False, False, True, True]),
    # max 6: < 3 goes, 3 stays.
    ([1.0, 2.0, 3.0, 6.0], ALL, 0.5, "max", [False, False, True, True]),
    # original mean (0 + 0 + 3 + 6) / 4 = 2.25: nothing more goes.
    ([1.0, 2.0, 3.0, 6.0], [False, False, True, True], 1.0, "original_mean",
     [False, False, True, True]),
    # alive mean 4.5: 3 goes too.
    ([1.0, 2.0, 3.0, 6.0], [False, False, True, True], 1.0, "mean",
     [False, False, False, True]),
    # every alive unit under the boundary: the lower index of the two 3s.
    ([1.0, 3.0, 3.0, 2.0], ALL, 2.0, "max", [False, True, False, False]),
    ([1.0, 3.0, 3.0, 2.0], [True, False, True, True], 5.0, "original_mean",
     [False, False, True, False]),
    # all importances 0: R = 0, nothing is under it.
    ([0.0, 0.0, 0.0], [True] * 3, 1.0, "original_mean", [True] * 3),
]


@pytest.mark.parametrize("case", HAND_SELECTIONS)
def test_the_reference_and_select_units_on_hand_made_cases(case):
  importance, alive, boundary, relative_to, expected = case
  np.testing.assert_array_equal(
      _np_select(importance, alive, boundary, relative_to), expected
  )
  np.testing.assert_array_equal(
      unit_graph.select_units(importance, alive, boundary, relative_to), expected
  )


@pytest.mark.parametrize("relative_to", unit_graph.RELATIVE_TO)
def test_select_units_matches_the_numpy_reference(relative_to):
  rng = np.random.default_rng(11)
  removed = kept = 0
  for _ in range(300):
    n = int(rng.integers(1, 9))
    # Small integers: many ties, and boundaries hitting values exactly.
    importance = rng.integers(0, 6, n).astype(np.float64)
    alive = rng.random(n) < 0.7
    alive[rng.integers(n)] = True
    boundary = float(rng.choice([0.0, 0.5, 0.75, 0.9, 1.0, 1.5, 3.0]))
    want = _np_select(importance, alive, boundary, relative_to)
    got = unit_graph.select_units(importance, alive, boundary, relative_to)
    assert got.dtype == bool
    np.testing.assert_array_equal(
        got, want, err_msg=f"{importance} {alive} {boundary} {relative_to}"
    )
    removed += int(np.sum(alive & ~want))
    kept += int(np.sum(want))
  assert removed > 100 and kept > 100  # the comparison is not vacuous


def test_the_defaults_are_the_configured_relative_to():
  configured = algorithms.AlgorithmConfig().structured_relative_to
  assert configured == unit_graph.RELATIVE_TO[0] == "original_mean"
  for function in (
      unit_graph.select_units,
      unit_graph.prune_step,
      structured.build_structured_finalizer,
      structured.build_structured_search,
  ):
    default = inspect.signature(function).parameters["relative_to"].default
    assert default == configured, function.__name__


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
    # Global average pooling: logits row j reads channel j (a "flatten"
    # link with one position).
    "paper2_cnn": ((28, 28, 1), 10, [
        ("conv1", "conv2", "conv", 32),
        ("conv2", "logits", "flatten", 64),
    ]),
}


@pytest.mark.parametrize("name", sorted(PAPER_NETWORKS))
def test_unit_graph_of_the_papers_networks(name):
  shape, classes, links = PAPER_NETWORKS[name]
  model = keras_models.build_model(name, shape, classes)
  graph = unit_graph.unit_graph(model)
  assert [
      (l.producer, l.consumer, l.mode, l.channels) for l in graph.links
  ] == links
  assert graph.hidden_names == tuple(keras_models.default_widths(name))
  assert graph.names == tuple(l.name for l in keras_models.prunable_layers(model))
  # The same graph from the tfmot-wrapped model.
  assert unit_graph.unit_graph(sparse_model.wrap_prunable(model)) == graph


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
    unit_graph.unit_graph(model)
  no_flatten = tf.keras.Sequential([
      layers.InputLayer(input_shape=(6, 6, 1)),
      layers.Conv2D(2, 3, name="c1"),
      layers.Reshape((-1,), name="reshape"),
      layers.Dense(2, name="out"),
  ])
  with pytest.raises(ValueError, match="'reshape'"):
    unit_graph.unit_graph(no_flatten)


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
  return unit_graph.unit_graph(_tiny_keras())


def _shapes(graph):
  return {layer.name: layer.kernel_shape for layer in graph.layers}


def test_the_reference_reads_the_tiny_network_as_the_unit_graph_does(tiny_graph):
  assert tiny_graph.names == TINY_LAYERS
  assert tuple((l.producer, l.consumer, l.mode) for l in tiny_graph.links) == TINY_LINKS


def test_kernel_masks_zero_exactly_the_removed_units_and_their_inputs(tiny_graph):
  masks = unit_graph.kernel_masks(tiny_graph, ALIVE)
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
  reference = _np_masks(_shapes(tiny_graph), ALIVE)
  for name in masks:
    np.testing.assert_array_equal(masks[name], expected[name], err_msg=name)
    np.testing.assert_array_equal(reference[name], expected[name], err_msg=name)
  # The flatten rows by formula: row f is dead iff channel f % 4 is dead.
  dead_rows = [f for f in range(16) if not ALIVE["conv2"][f % 4]]
  assert dead_rows == DENSE1_DEAD_ROWS


def test_alive_from_masks_round_trip(tiny_graph):
  masks = unit_graph.kernel_masks(tiny_graph, ALIVE)
  for given in (masks, list(masks.values())):
    alive = unit_graph.alive_from_masks(tiny_graph, given)
    assert list(alive) == list(ALIVE)
    for name in ALIVE:
      np.testing.assert_array_equal(alive[name], ALIVE[name])


def test_missing_layers_are_all_alive_and_bad_alive_vectors_raise(tiny_graph):
  masks = unit_graph.kernel_masks(tiny_graph, {"dense1": ALIVE["dense1"]})
  assert masks["conv1"].min() == 1.0 and masks["conv2"].min() == 1.0
  np.testing.assert_array_equal(masks["dense2"][[2, 3], :], 0.0)
  assert masks["dense2"][[0, 1, 4], :].min() == 1.0
  with pytest.raises(ValueError, match="no hidden prunable layer 'logits'"):
    unit_graph.kernel_masks(tiny_graph, {"logits": np.ones(3, bool)})
  with pytest.raises(ValueError, match="layer 'conv2' has no alive unit"):
    unit_graph.kernel_masks(tiny_graph, {"conv2": np.zeros(4, bool)})
  with pytest.raises(ValueError, match=r"expected \(5,\)"):
    unit_graph.kernel_masks(tiny_graph, {"dense1": np.ones(4, bool)})


# ------------------------------------------------------------- shrinking


def _zeroed_copy(model, alive):
  """`model` with removed units (kernels, biases) and consumer inputs zeroed."""
  graph = unit_graph.unit_graph(model)
  masks = unit_graph.kernel_masks(graph, alive)
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
  widths, weights = unit_graph.shrink(tiny_model, ALIVE)
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


@pytest.mark.portability
def test_shrunk_model_computes_the_same_logits(tiny_model):
  small = unit_graph.build_shrunk_model(
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
  assert unit_graph.count_params(TINY, TINY_SHAPE, TINY_CLASSES, widths) == 191
  assert [l.name for l in small.layers] == [l.name for l in tiny_model.layers]


@pytest.mark.portability
def test_shrinking_to_one_unit_per_layer(tiny_model):
  one = {n: np.eye(w, dtype=bool)[w - 1] for n, w in TINY_WIDTHS.items()}
  small = unit_graph.build_shrunk_model(TINY, TINY_SHAPE, TINY_CLASSES, tiny_model, one)
  # conv1 25 + 1; conv2 25 + 1; dense1 (2*2*1) + 1; dense2 1 + 1; logits 3 + 3.
  assert small.count_params() == 26 + 26 + 5 + 2 + 6 == 65
  x = _images(8, seed=2)
  np.testing.assert_allclose(
      small(x).numpy(), _zeroed_copy(tiny_model, one)(x).numpy(), rtol=1e-5, atol=1e-5
  )


@pytest.mark.portability
def test_shrinking_a_wrapped_model_uses_its_masks(tiny_model):
  wrapped = sparse_model.wrap_prunable(tiny_model)
  masks = unit_graph.kernel_masks(unit_graph.unit_graph(wrapped), ALIVE)
  for layer in wrapped.layers:
    if wrappers.is_wrapper(layer):
      wrappers.mask_variable(layer).assign(masks[wrappers.unwrap(layer).name])
  x = _images(8, seed=3)
  small = unit_graph.build_shrunk_model(TINY, TINY_SHAPE, TINY_CLASSES, wrapped, ALIVE)
  # The wrapped model computes with kernel * mask; only the removed biases
  # differ, and those units feed nothing (their consumer rows are masked).
  np.testing.assert_allclose(
      small(x).numpy(), wrapped(x, training=False).numpy(), rtol=1e-5, atol=1e-5
  )


@pytest.mark.portability
def test_mnist_cnn_shrinks_with_parameters_by_hand():
  tf.keras.utils.set_random_seed(4)
  model = keras_models.build_model("mnist_cnn", (28, 28, 1), 10)
  rng = np.random.default_rng(4)
  alive = {n: rng.random(w) < 0.5 for n, w in keras_models.default_widths("mnist_cnn").items()}
  for a in alive.values():
    a[0] = True
  a, b, c = (int(alive[n].sum()) for n in ("conv1", "conv2", "dense1"))
  small = unit_graph.build_shrunk_model("mnist_cnn", (28, 28, 1), 10, model, alive)
  # conv1 25a + a; conv2 25ab + b; dense1 (16*16*b) c + c; logits 10c + 10.
  assert small.count_params() == 26 * a + 25 * a * b + b + 256 * b * c + c + 10 * c + 10
  x = _images(4, (28, 28, 1), seed=5)
  np.testing.assert_allclose(
      small(x).numpy(), _zeroed_copy(model, alive)(x).numpy(), rtol=1e-4, atol=1e-4
  )


def test_architecture_cost_by_hand():
  widths = {"conv1": 5, "conv2": 8, "dense1": 20}
  cost = unit_graph.architecture_cost("mnist_cnn", (28, 28, 1), 10, widths)
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
  full = unit_graph.architecture_cost("mnist_cnn", (28, 28, 1), 10)
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


def _finalizer_inputs(layout, scales):
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
  masks = []
  for i, v in enumerate(values):
    if i in layout.sparse.kernel_index:
      masks.append(np.ones(v.shape, np.float32))
    else:
      masks.append(np.float32(1.0))
  update = collections.OrderedDict(values=values, masks=masks)
  return weights, update


def _build_finalizer(layout, boundary, relative_to, rule=None):
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
      weights_type, update_type, layout, boundary=boundary, relative_to=relative_to,
      rule=rule,
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
  new = out.result
  kernels, masks = sparse_model.kernels_and_masks(new, tiny_layout.sparse)
  alive = unit_graph.alive_from_masks(tiny_layout.graph, masks)
  for name, want in expected_alive.items():
    np.testing.assert_array_equal(alive[name], want, err_msg=name)
  expected_masks = _np_masks(_shapes(tiny_layout.graph), expected_alive)
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
  alive = unit_graph.alive_from_masks(tiny_layout.graph, masks)
  np.testing.assert_array_equal(alive["dense2"], [False, True, True, True])
  assert out.measurements["removed"]["dense2"] == 1
  # The NumPy reference decides the same for every layer, and so does
  # `prune_step`.
  kernels = {
      name: update["values"][i]
      for name, i in zip(TINY_LAYERS, tiny_layout.sparse.kernel_index)
  }
  reference = _np_prune_step(kernels, {}, 0.9, "mean")
  decided = unit_graph.prune_step(tiny_layout.graph, kernels, None, 0.9, "mean")
  assert list(decided) == list(alive) == list(reference)
  for name in alive:
    np.testing.assert_array_equal(reference[name], alive[name], err_msg=name)
    np.testing.assert_array_equal(decided[name], alive[name], err_msg=name)


def test_prune_step_by_hand(tiny_graph):
  kernels = {n: np.ones(tiny_graph.layer(n).kernel_shape, np.float32) for n in tiny_graph.names}
  kernels["conv1"][..., 2] = 0.1  # importance [25, 25, 2.5], mean 17.5
  # Already dead units stay dead and count 0 (default: "original_mean").
  alive = {"dense1": np.array([True, True, True, False, True])}
  new = unit_graph.prune_step(tiny_graph, kernels, alive, 0.5)
  # conv1: < 8.75 -> filter 2 goes. conv2 reads 2 live channels: all 50,
  # none goes. dense1: all 16, R = 64 / 5, none goes (3 stays dead).
  # dense2 reads 4 live rows: all 4, none goes.
  expected = {
      "conv1": [True, True, False],
      "conv2": [True] * 4,
      "dense1": [True, True, True, False, True],
      "dense2": [True] * 4,
  }
  reference = _np_prune_step(kernels, alive, 0.5, "original_mean")
  for name, want in expected.items():
    np.testing.assert_array_equal(new[name], want, err_msg=name)
    np.testing.assert_array_equal(reference[name], want, err_msg=name)


def test_finalizer_never_empties_a_layer_and_breaks_ties_low(tiny_layout):
  finalizer = _build_finalizer(tiny_layout, 1.5, "max")
  weights, update = _finalizer_inputs(tiny_layout, SCALES)
  out = finalizer.next(finalizer.initialize(), weights, update)
  # Every unit is under 1.5 x max: the best one stays (ties: lowest index).
  assert dict(out.measurements["alive"]) == {"conv1": 1, "conv2": 1, "dense1": 1, "dense2": 1}
  _, masks = sparse_model.kernels_and_masks(out.result, tiny_layout.sparse)
  alive = unit_graph.alive_from_masks(tiny_layout.graph, masks)
  assert {n: int(np.flatnonzero(a)[0]) for n, a in alive.items()} == {
      "conv1": 1, "conv2": 0, "dense1": 4, "dense2": 0
  }


@pytest.fixture(scope="module")
def finalizer_for(tiny_layout, mean_finalizer):
  """finalizer_for(boundary, relative_to), each finalizer built once."""
  built = {(0.9, "mean"): mean_finalizer}

  def get(boundary, relative_to):
    if (boundary, relative_to) not in built:
      built[boundary, relative_to] = _build_finalizer(tiny_layout, boundary, relative_to)
    return built[boundary, relative_to]

  return get


# A second round, after SCALES's first (relative to the mean; alive: conv1
# [F T T], conv2 [T F T T], dense1 [F F F F T], dense2 all), boundary 0.9:
# conv1, fan-in 25, alive [-, 50, 75]:
#   original_mean R = 125 / 3 = 41.67, < 37.5: none goes;
#   mean R = 62.5, < 56.25: filter 1 goes;  max R = 75, < 67.5: filter 1 goes.
# conv2 reads conv1's live channels (2, or 1 once filter 1 went), alive
# units 0, 2, 3 at [4, 3, 2] x fan-in:
#   original_mean [200, -, 150, 100], R = 450 / 4 = 112.5, < 101.25: 3 goes;
#   mean [100, -, 75, 50], R = 75, < 67.5: 3 goes;
#   max [100, -, 75, 50], R = 100, < 90: 2 and 3 go.
# dense1: its one alive unit stays.
# dense2 reads one live row: [1, 2, 3, 4]; original_mean = mean (all
#   alive) R = 2.5, < 2.25: 0 and 1 go; max R = 4, < 3.6: 0, 1, 2 go.
SCALES_2 = {
    "conv1": [9.0, 2.0, 3.0],
    "conv2": [4.0, 9.0, 3.0, 2.0],
    "dense1": [9.0, 9.0, 9.0, 9.0, 1.0],
    "dense2": [1.0, 2.0, 3.0, 4.0],
}
_F, _T = False, True
EXPECTED_2 = {
    "original_mean": {
        "conv1": [_F, _T, _T], "conv2": [_T, _F, _T, _F],
        "dense1": [_F, _F, _F, _F, _T], "dense2": [_F, _F, _T, _T],
    },
    "mean": {
        "conv1": [_F, _F, _T], "conv2": [_T, _F, _T, _F],
        "dense1": [_F, _F, _F, _F, _T], "dense2": [_F, _F, _T, _T],
    },
    "max": {
        "conv1": [_F, _F, _T], "conv2": [_T, _F, _F, _F],
        "dense1": [_F, _F, _F, _F, _T], "dense2": [_F, _F, _F, _T],
    },
}
REMOVED_2 = {"original_mean": 3, "mean": 4, "max": 6}


def _np_finalizer(layout, weights, update, boundary, relative_to):
  """What the finalizer must return, by the NumPy reference: (alive, masks,
  trainable values). Dead units are ignored, so the aggregate's raw values
  are used, not values x the old masks."""
  sparse = layout.sparse
  old_masks = [np.asarray(weights.non_trainable[i]) for i in sparse.mask_index]
  old_alive = {n: _np_alive(m) for n, m in zip(TINY_LAYERS[:-1], old_masks)}
  values = [np.asarray(v) for v in update["values"]]
  kernels = {n: values[i] for n, i in zip(TINY_LAYERS, sparse.kernel_index)}
  alive = _np_prune_step(kernels, old_alive, boundary, relative_to)
  for name in alive:
    assert not np.any(alive[name] & ~old_alive[name])
  masks = _np_masks({n: k.shape for n, k in kernels.items()}, alive)
  trainable = list(values)
  for s, name in enumerate(TINY_LAYERS):
    k, b = sparse.kernel_index[s], layout.bias_index[s]
    trainable[k] = values[k] * masks[name]
    if name in alive:
      trainable[b] = values[b] * alive[name]
  return alive, masks, trainable


@pytest.mark.parametrize("relative_to", unit_graph.RELATIVE_TO)
def test_a_second_round_by_hand(tiny_layout, mean_finalizer, finalizer_for, relative_to):
  weights, update = _finalizer_inputs(tiny_layout, SCALES)
  first = mean_finalizer.next(mean_finalizer.initialize(), weights, update).result
  _, update2 = _finalizer_inputs(tiny_layout, SCALES_2)
  finalizer = finalizer_for(0.9, relative_to)
  out = finalizer.next(finalizer.initialize(), first, update2)
  _, masks = sparse_model.kernels_and_masks(out.result, tiny_layout.sparse)
  expected = EXPECTED_2[relative_to]
  for name, mask in zip(TINY_LAYERS, masks):
    if name in expected:
      np.testing.assert_array_equal(_np_alive(mask), expected[name], err_msg=name)
  assert out.measurements["removed_total"] == REMOVED_2[relative_to]
  # The reference agrees with the hand-made figures.
  alive, _, _ = _np_finalizer(tiny_layout, first, update2, 0.9, relative_to)
  for name, want in expected.items():
    np.testing.assert_array_equal(alive[name], want, err_msg=name)


def _np_alive_of(layout, weights):
  masks = [np.asarray(weights.non_trainable[i]) for i in layout.sparse.mask_index]
  return {n: _np_alive(m) for n, m in zip(TINY_LAYERS[:-1], masks)}


def _random_update(layout, rng):
  """A contributed aggregate with exactly representable kernels (multiples of
  1/4: float32 sums are exact in any order) and a spread of unit scales."""
  sparse = layout.sparse
  values = [None] * len(sparse.trainable_sizes)
  for s, shape in enumerate(sparse.kernel_shapes):
    scale = rng.integers(1, 5, shape[-1])
    kernel = rng.integers(-4, 5, shape) * scale / 4.0
    values[sparse.kernel_index[s]] = kernel.astype(np.float32)
    values[layout.bias_index[s]] = rng.normal(size=shape[-1]).astype(np.float32)
  masks = [
      np.ones(v.shape, np.float32) if i in sparse.kernel_index else np.float32(1.0)
      for i, v in enumerate(values)
  ]
  return collections.OrderedDict(values=values, masks=masks)


# "max" at 0.9 would leave one unit per layer at once on these aggregates.
@pytest.mark.parametrize(
    "relative_to, boundary", [("original_mean", 0.9), ("mean", 0.9), ("max", 0.5)]
)
def test_finalizer_matches_the_numpy_reference_over_rounds(
    tiny_layout, finalizer_for, relative_to, boundary
):
  finalizer = finalizer_for(boundary, relative_to)
  rng = np.random.default_rng(5)
  weights = structured.initial_search_weights(_tiny_keras, 0, tiny_layout)
  state = finalizer.initialize()
  partial = 0  # layer steps that removed units and kept more than one
  for round_num in range(3):
    update = _random_update(tiny_layout, rng)
    alive, masks, trainable = _np_finalizer(
        tiny_layout, weights, update, boundary, relative_to
    )
    out = finalizer.next(state, weights, update)
    _, got_masks = sparse_model.kernels_and_masks(out.result, tiny_layout.sparse)
    for name, got in zip(TINY_LAYERS, got_masks):
      np.testing.assert_array_equal(got, masks[name], err_msg=f"{round_num} {name}")
    for i, want in enumerate(trainable):
      np.testing.assert_array_equal(out.result.trainable[i], want, err_msg=str(i))
    assert dict(out.measurements["alive"]) == {
        n: int(a.sum()) for n, a in alive.items()
    }
    for name, old in _np_alive_of(tiny_layout, weights).items():
      partial += int(1 < alive[name].sum() < old.sum())
    state, weights = out.state, out.result
  # Not vacuous: the rule had real choices to make.
  assert partial >= 3


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


@pytest.fixture(scope="module")
def search_run():
  """Builds the search once and runs SEARCH_ROUNDS rounds."""
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
  return layout, initial, rounds


def _check_removed_units_are_zero(layout, weights):
  """Removed unit => its kernel slice, bias and consumer inputs are 0."""
  graph = layout.graph
  kernels, masks = sparse_model.kernels_and_masks(weights, layout.sparse)
  alive = unit_graph.alive_from_masks(graph, masks)
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


@pytest.mark.portability
def test_initial_search_masks_are_all_ones(search_run):
  layout, initial, _ = search_run
  _, masks = sparse_model.kernels_and_masks(initial, layout.sparse)
  assert all(m.min() == 1.0 for m in masks)


@pytest.mark.portability
def test_every_round_keeps_masks_structured_and_consistent(search_run):
  layout, _, rounds = search_run
  for previous, weights, metrics in rounds:
    _, masks = sparse_model.kernels_and_masks(weights, layout.sparse)
    assert all(set(np.unique(m)) <= {0.0, 1.0} for m in masks)
    alive = _check_removed_units_are_zero(layout, weights)
    # The masks are exactly the element masks of the alive vectors.
    expected = _np_masks(_shapes(layout.graph), alive)
    for mask, name in zip(masks, TINY_LAYERS):
      np.testing.assert_array_equal(mask, expected[name], err_msg=name)
    # Kernels are zero outside the mask.
    kernels, _ = sparse_model.kernels_and_masks(weights, layout.sparse)
    for kernel, mask in zip(kernels, masks):
      assert not (kernel * (1 - mask)).any()
    # Measurements match the masks; no layer is ever empty.
    _, old_masks = sparse_model.kernels_and_masks(previous, layout.sparse)
    old_alive = unit_graph.alive_from_masks(layout.graph, old_masks)
    fin = metrics["finalizer"]
    for name in layout.hidden_names:
      assert fin["alive"][name] == int(alive[name].sum()) >= 1
      assert fin["removed"][name] == int(old_alive[name].sum() - alive[name].sum())
      # Removed units stay removed.
      assert not np.any(alive[name] & ~old_alive[name])
    assert fin["removed_total"] == sum(fin["removed"].values())


@pytest.mark.portability
def test_the_search_removes_units(search_run):
  layout, _, rounds = search_run
  first = rounds[0][2]["finalizer"]
  assert first["removed_total"] > 0
  total = sum(m["finalizer"]["removed_total"] for _, _, m in rounds)
  start = sum(SEARCH_WIDTHS.values())
  final_alive = rounds[-1][2]["finalizer"]["alive"]
  assert sum(final_alive.values()) == start - total
  # Every client trained: FedAvg over 3 clients and 24 examples.
  assert rounds[0][2]["client_work"]["clients"]["examples"] == 24


@pytest.mark.portability
def test_the_found_architecture_shrinks_to_an_equivalent_model(search_run):
  layout, _, rounds = search_run
  weights = rounds[-1][1]
  alive = structured.alive_from_model_weights(layout, weights)
  wrapped = sparse_model.wrap_prunable(_search_keras())
  weights.assign_weights_to(wrapped)
  small = unit_graph.build_shrunk_model(TINY, TINY_SHAPE, TINY_CLASSES, wrapped, alive)
  widths = unit_graph.widths_from_alive(alive)
  assert widths == dict(rounds[-1][2]["finalizer"]["alive"])
  assert small.count_params() == unit_graph.count_params(
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


# ------------------------------------------- paper 2's rule: the std band
#
# A unit stays when |importance - mean| <= k x std over the layer's alive
# units (population std, bounds included); `_band` is that rule in NumPy.


def _band(importance, alive, k):
  values = np.asarray(importance, np.float64)[alive]
  mean, std = values.mean(), values.std()
  keep = np.zeros(len(alive), bool)
  keep[alive] = np.abs(values - mean) <= k * std
  return keep


def test_std_band_by_hand():
  # [1, 9, 10, 11, 30]: mean 61 / 5 = 12.2; squared deviations 125.44,
  # 10.24, 4.84, 1.44, 316.84, variance 458.8 / 5 = 91.76, std 9.579.
  importance = [1.0, 9.0, 10.0, 11.0, 30.0]
  alive = np.ones(5, bool)
  cases = {
      1.0: [False, True, True, True, False],  # band [2.62, 21.78]
      1.5: [True, True, True, True, False],  # [-2.17, 26.57]: 30 goes
      2.2: [True] * 5,  # [-8.87, 33.27]
  }
  for k, expected in cases.items():
    got = unit_graph.select_units(importance, alive, rule="std_band", std_k=k)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(got, _band(importance, alive, k))


def test_low_std_band_removes_only_the_low_tail_by_hand():
  # The same importances: mean 12.2, std 9.579.
  importance = [1.0, 9.0, 10.0, 11.0, 30.0]
  alive = np.ones(5, bool)
  cases = {
      1.0: [False, True, True, True, True],  # 1 < 2.62 goes; 30 > 21.78 stays
      1.5: [True] * 5,  # -2.17
      0.3: [False, False, True, True, True],  # 9.33: 9 goes, 10 stays
  }
  for k, expected in cases.items():
    got = unit_graph.select_units(importance, alive, rule="std_band_low", std_k=k)
    np.testing.assert_array_equal(got, expected)
  # A dead unit does not count; the bound itself stays ([0, 2]: mean 1,
  # std 1, k = 1 puts 0 on the bound).
  got = unit_graph.select_units([0.0, 0.0, 2.0], [False, True, True], rule="std_band_low", std_k=1.0)
  np.testing.assert_array_equal(got, [False, True, True])
  got = unit_graph.select_units([0.0, 2.0], [True, True], rule="std_band_low", std_k=0.99)
  np.testing.assert_array_equal(got, [False, True])
  # Unlike the two-sided band, the most important unit never goes.
  for k in (0.0, 0.5, 1.0, 2.0):
    for seed in range(5):
      values = np.random.default_rng(seed).random(7)
      got = unit_graph.select_units(values, np.ones(7, bool), rule="std_band_low", std_k=k)
      assert got[np.argmax(values)]
      np.testing.assert_array_equal(got, values >= values.mean() - k * values.std())


def test_std_band_ignores_dead_units_and_keeps_them_dead():
  # A dead unit of importance 100 would shift the mean and std; it must not.
  importance = [100.0, 1.0, 9.0, 10.0, 11.0, 30.0]
  alive = np.array([False, True, True, True, True, True])
  got = unit_graph.select_units(importance, alive, rule="std_band", std_k=1.0)
  np.testing.assert_array_equal(got, [False, False, True, True, True, False])


def test_std_band_bounds_equal_values_and_the_never_empty_rule():
  # [0, 2]: mean 1, std 1; with k = 1 both lie on the bounds and stay.
  np.testing.assert_array_equal(
      unit_graph.select_units([0.0, 2.0], [True, True], rule="std_band", std_k=1.0),
      [True, True],
  )
  # With k = 0.99 both are outside: the most important one stays.
  np.testing.assert_array_equal(
      unit_graph.select_units([0.0, 2.0], [True, True], rule="std_band", std_k=0.99),
      [False, True],
  )
  # [2, 0, 2]: mean 4/3, std 0.943; k = 0.5 gives [0.86, 1.80], nobody is
  # inside; of the two most important the lower index stays.
  np.testing.assert_array_equal(
      unit_graph.select_units([2.0, 0.0, 2.0], [True] * 3, rule="std_band", std_k=0.5),
      [True, False, False],
  )
  # Equal float32 importances have std 0: all stay, even with k = 0.
  equal = np.full(4, 0.1, np.float32)
  np.testing.assert_array_equal(
      unit_graph.select_units(equal, [True] * 4, rule="std_band", std_k=0.0), [True] * 4
  )


def test_std_band_argument_errors():
  with pytest.raises(ValueError, match="rule must be one of boundary, std_band"):
    unit_graph.select_units([1.0], [True], rule="band")
  with pytest.raises(ValueError, match="std_k must be a finite number >= 0"):
    unit_graph.select_units([1.0], [True], rule="std_band", std_k=-1.0)


def _scaled_kernels(graph, scales):
  """Unit j of a layer has every kernel entry equal to scales[layer][j]."""
  return {
      layer.name: np.broadcast_to(
          np.asarray(scales[layer.name], np.float32), layer.kernel_shape
      ).copy()
      for layer in graph.layers
      if layer.name in scales
  } | {"logits": np.ones(graph.layer("logits").kernel_shape, np.float32)}


def test_std_band_prune_step_by_hand_with_and_without_dense_layers(tiny_graph):
  # k = 1, SCALES on the tiny network, layers in model order:
  # conv1, fan-in 25: [25, 75, 50], mean 50, std 20.41: 25 and 75 go;
  # conv2, fan-in 1 live channel x 25: [100, 25, 100, 100], mean 81.25,
  #   std 32.48, band [48.8, 113.7]: filter 1 goes;
  # dense1 (with dense layers), fan-in: 16 rows, those of conv2's live
  #   channels 0, 2, 3 = 12: [12, 12, 12, 12, 60], mean 21.6, std 19.2,
  #   band [2.4, 40.8]: neuron 4 goes;
  # dense2, fan-in 4 live rows: all 4 equal: none goes.
  kernels = _scaled_kernels(tiny_graph, SCALES)
  conv_only = unit_graph.prune_step(
      tiny_graph, kernels, None, 0.9, rule="std_band", std_k=1.0, prune_dense=False
  )
  expected = {
      "conv1": [False, False, True],
      "conv2": [True, False, True, True],
      "dense1": [True] * 5,
      "dense2": [True] * 4,
  }
  for name, want in expected.items():
    np.testing.assert_array_equal(conv_only[name], want, err_msg=name)
  np.testing.assert_array_equal(
      _band([100.0, 25.0, 100.0, 100.0], np.ones(4, bool), 1.0), expected["conv2"]
  )
  with_dense = unit_graph.prune_step(
      tiny_graph, kernels, None, 0.9, rule="std_band", std_k=1.0, prune_dense=True
  )
  np.testing.assert_array_equal(with_dense["dense1"], [True, True, True, True, False])
  np.testing.assert_array_equal(with_dense["dense2"], [True] * 4)
  np.testing.assert_array_equal(
      _band([12.0, 12.0, 12.0, 12.0, 60.0], np.ones(5, bool), 1.0), with_dense["dense1"]
  )


def test_min_units_rounds_up_and_keeps_one():
  assert unit_graph.min_units(0.3, 20) == 6  # 0.3 x 20 is 6.000000000000001 in float
  assert unit_graph.min_units(0.25, 10) == 3
  assert unit_graph.min_units(0.5, 3) == 2
  assert unit_graph.min_units(1.0, 7) == 7
  assert unit_graph.min_units(0.0, 7) == 1
  assert unit_graph.min_units(0.01, 7) == 1


def test_min_width_keeps_the_most_important_of_the_removed_by_hand():
  # std band k = 1 on [1, 9, 10, 11, 30] (mean 12.2, std 9.58) removes 1
  # and 30, keeping 3 of 5.
  importance = [1.0, 9.0, 10.0, 11.0, 30.0]
  alive = np.ones(5, bool)
  cases = {
      0.0: [False, True, True, True, False],
      0.6: [False, True, True, True, False],  # 3: the band's 3 suffice
      0.61: [False, True, True, True, True],  # 4: 30 is back, before 1
      0.8: [False, True, True, True, True],
      1.0: [True] * 5,
  }
  for width, expected in cases.items():
    got = unit_graph.select_units(importance, alive, rule="std_band", std_k=1.0, min_width=width)
    np.testing.assert_array_equal(got, expected, err_msg=str(width))
  # Equal importances go back lowest index first: max-boundary 0.5 keeps
  # only the 10; a floor of 2 of 4 brings back unit 0 of the three 2s.
  got = unit_graph.select_units([2.0, 2.0, 2.0, 10.0], [True] * 4, 0.5, "max", min_width=0.5)
  np.testing.assert_array_equal(got, [True, False, False, True])
  # Dead units stay dead, even when fewer than the floor are alive.
  got = unit_graph.select_units(
      [50.0, 1.0, 2.0, 40.0, 3.0], [False, True, True, False, True], 0.9, "max", min_width=1.0
  )
  np.testing.assert_array_equal(got, [False, True, True, False, True])


def test_min_width_matches_a_numpy_reference_on_random_layers():
  rng = np.random.default_rng(7)
  for _ in range(40):
    n = int(rng.integers(2, 12))
    importance = rng.random(n).round(1)  # rounding makes ties
    alive = rng.random(n) < 0.8
    alive[rng.integers(n)] = True
    width = float(rng.choice([0.0, 0.2, 0.5, 0.75, 1.0]))
    k = float(rng.choice([0.3, 1.0]))
    keep = _band(importance, alive, k)
    least = max(1, int(np.ceil(width * n - 1e-9)))
    removed = np.flatnonzero(alive & ~keep)
    # Most important first, lowest index among equals.
    ranked = sorted(removed, key=lambda j: (-importance[j], j))
    expected = keep.copy()
    expected[ranked[: max(0, least - keep.sum())]] = True
    got = unit_graph.select_units(importance, alive, rule="std_band", std_k=k, min_width=width)
    np.testing.assert_array_equal(got, expected, err_msg=f"{importance} {alive} {width} {k}")
    assert got.sum() >= min(least, alive.sum())


def test_min_width_argument_errors():
  for bad in (-0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match="min_width must be"):
      unit_graph.select_units([1.0], [True], min_width=bad)
  with pytest.raises(ValueError, match="min_width must be"):
    structured.SearchRule(rule="std_band", min_width=2.0).check()


def test_min_width_in_the_prune_step_by_hand(tiny_graph):
  # As in the test above, k = 1: conv1 [25, 75, 50] loses 25 and 75. At
  # min_width 0.5 conv1 keeps ceil(1.5) = 2: 75, the stronger, comes back.
  # conv2 then has 2 live input channels: [200, 50, 200, 200], mean 162.5,
  # std 64.95, band [97.5, 227.5]: filter 1 goes, leaving 3 >= ceil(2).
  kernels = _scaled_kernels(tiny_graph, SCALES)
  got = unit_graph.prune_step(
      tiny_graph, kernels, None, 0.9, rule="std_band", std_k=1.0, prune_dense=False,
      min_width=0.5,
  )
  np.testing.assert_array_equal(got["conv1"], [False, True, True])
  np.testing.assert_array_equal(got["conv2"], [True, False, True, True])
  np.testing.assert_array_equal(
      _band([200.0, 50.0, 200.0, 200.0], np.ones(4, bool), 1.0), got["conv2"]
  )
  # With dense neurons too, at min_width 1.0 nothing goes anywhere.
  everything = unit_graph.prune_step(
      tiny_graph, kernels, None, 0.9, rule="std_band", std_k=1.0, prune_dense=True,
      min_width=1.0,
  )
  for name, alive in everything.items():
    assert alive.all(), name


def test_the_finalizer_applies_min_width(tiny_layout):
  rule = structured.SearchRule(rule="std_band", std_k=1.0, prune_dense=False, min_width=0.5)
  finalizer = _build_finalizer(tiny_layout, 0.9, "original_mean", rule=rule)
  weights, _ = _finalizer_inputs(tiny_layout, SCALES)
  out = _next_round(finalizer, finalizer.initialize(), weights, SCALES, tiny_layout)
  assert int(out.measurements["removed_total"]) == 2  # conv1 filter 0, conv2 filter 1
  alive = structured.alive_from_model_weights(tiny_layout, out.result)
  np.testing.assert_array_equal(alive["conv1"], [False, True, True])
  np.testing.assert_array_equal(alive["conv2"], [True, False, True, True])


def test_the_unit_graph_records_relu_outputs_and_input_ranges():
  layers = tf.keras.layers

  def described(model):
    return [(l.name, l.relu_output, l.input_max) for l in unit_graph.unit_graph(model).layers]

  # conv -> pool -> ReLU, as in the MNIST network; images in [0, 1].
  mnist = keras_models.build_model("mnist_cnn", (28, 28, 1), 10)
  assert described(mnist) == [
      ("conv1", True, 1.0), ("conv2", True, np.inf), ("dense1", True, np.inf),
      ("logits", False, np.inf),
  ]
  paper2 = keras_models.build_model("paper2_cnn", (28, 28, 1), 10)
  assert described(paper2) == [
      ("conv1", True, 1.0), ("conv2", True, np.inf), ("logits", False, np.inf)
  ]
  # A LeakyReLU passes negative values, a tanh is no ReLU, and a layer
  # before the first one may move the input out of [0, 1].
  other = tf.keras.Sequential([
      layers.InputLayer(input_shape=(8, 8, 1)),
      layers.Rescaling(2.0, offset=-1.0),
      layers.Conv2D(2, 3, name="c1"),
      layers.LeakyReLU(),
      layers.Conv2D(2, 3, activation="relu", name="c2"),
      layers.Softmax(),
      layers.Flatten(),
      layers.Dense(3, activation="tanh", name="d1"),
      layers.Dense(4, name="d2"),
      layers.Activation("relu"),
      layers.Dropout(0.5),
      layers.Dense(2, name="out"),
  ])
  assert described(other) == [
      ("c1", False, None), ("c2", False, None), ("d1", False, None),
      ("d2", True, None), ("out", False, np.inf),
  ]


def _dense_layer(relu_output, input_max, use_bias=True):
  return unit_graph.PrunableLayer("d", "dense", (2, 4), use_bias, relu_output, input_max)


def test_never_fires_by_hand():
  kernel = tf.constant([[0.2, 0.2, -1.0, 0.0], [-1.0, 0.0, -2.0, 0.0]])
  bias = tf.constant([-0.2, -0.19, 0.0, 0.1])
  # Inputs in [0, 1]: bounds 0.2 - 0.2 = 0, 0.2 - 0.19 > 0, 0 + 0, 0 + 0.1.
  np.testing.assert_array_equal(
      unit_graph.never_fires_tf(_dense_layer(True, 1.0), kernel, bias),
      [True, False, True, False],
  )
  # Inputs in [0, 2]: 0.4 - 0.2 > 0.
  np.testing.assert_array_equal(
      unit_graph.never_fires_tf(_dense_layer(True, 2.0), kernel, bias),
      [False, False, True, False],
  )
  # Inputs >= 0: only units without a positive weight and bias <= 0.
  np.testing.assert_array_equal(
      unit_graph.never_fires_tf(_dense_layer(True, np.inf), kernel, bias),
      [False, False, True, False],
  )
  # Without a ReLU behind it, or with inputs of unknown range, none.
  for layer in (_dense_layer(False, 1.0), _dense_layer(True, None)):
    assert not unit_graph.never_fires_tf(layer, kernel, bias).numpy().any()


def _mnist_with_dead_units():
  """The MNIST network with conv1 filter 3 and conv2 filter 5 that can never
  fire, and conv2 filter 7 that fires only through conv1 filter 3."""
  model = keras_models.build_model("mnist_cnn", (28, 28, 1), 10)
  rng = np.random.default_rng(3)
  weights = [rng.normal(0.0, 0.1, w.shape).astype(np.float32) for w in model.get_weights()]
  conv1_k, conv1_b, conv2_k, conv2_b = weights[:4]
  conv1_k[..., 3] = -np.abs(conv1_k[..., 3]) + 0.001  # 25 x 0.001 + bias < 0
  conv1_b[3] = -0.1
  conv2_k[..., 5] = -np.abs(conv2_k[..., 5])
  conv2_b[5] = -0.01
  conv2_k[..., 7] = -np.abs(conv2_k[..., 7])
  conv2_k[:, :, 3, 7] = 0.5
  conv2_b[7] = 0.0
  model.set_weights(weights)
  return model


def test_remove_dead_removes_exactly_the_units_that_never_fire_and_keeps_the_function():
  model = _mnist_with_dead_units()
  graph = unit_graph.unit_graph(model)
  kernels = {l.name: l.get_weights()[0] for l in model.layers if l.name in graph.names}
  biases = {l.name: l.get_weights()[1] for l in model.layers if l.name in graph.names}
  # A band so wide that it removes nothing by itself.
  band = dict(rule="std_band", std_k=100.0, prune_dense=True)
  kept = unit_graph.prune_step(graph, kernels, None, 0.9, **band)
  assert all(a.all() for a in kept.values())
  alive = unit_graph.prune_step(graph, kernels, None, 0.9, remove_dead=True, biases=biases, **band)
  expected = {"conv1": 10, "conv2": 20, "dense1": 50}
  assert {n: int(a.sum()) for n, a in alive.items()} == {"conv1": 9, "conv2": 18, "dense1": 50}
  assert not alive["conv1"][3] and not alive["conv2"][5] and not alive["conv2"][7]
  assert {n: len(a) for n, a in alive.items()} == expected
  # The network without them computes the same function on inputs in [0, 1].
  x = np.random.default_rng(4).random((64, 28, 28, 1)).astype(np.float32)
  small = unit_graph.build_shrunk_model("mnist_cnn", (28, 28, 1), 10, model, alive)
  np.testing.assert_allclose(small(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)
  # A bias is needed to tell.
  with pytest.raises(ValueError, match="remove_dead needs the bias of 'conv1'"):
    unit_graph.prune_step(graph, kernels, None, 0.9, remove_dead=True, **band)


def test_remove_dead_then_the_rule_chooses_among_the_others():
  # conv1 importance 25 x [1, 3, 2, 2]: filter 0 has only negative weights
  # and bias 0, so with inputs in [0, 1] it never fires. The band (k = 1)
  # is then taken over [75, 50, 50]: mean 58.3, std 11.8, band [46.5, 70.1]:
  # 75 goes too. Without remove_dead, over [25, 75, 50, 50] (mean 50,
  # std 17.7, band [32.3, 67.7]) 25 and 75 go.
  graph = unit_graph.UnitGraph(
      (
          unit_graph.PrunableLayer("c", "conv", (5, 5, 1, 4), True, True, 1.0),
          unit_graph.PrunableLayer("out", "dense", (4, 2), True, False, np.inf),
      ),
      (unit_graph.UnitLink("c", "out", "flatten", 4),),
  )
  kernel = np.broadcast_to(np.array([-1.0, 3.0, 2.0, 2.0], np.float32), (5, 5, 1, 4)).copy()
  kernels = {"c": kernel, "out": np.ones((4, 2), np.float32)}
  biases = {"c": np.zeros(4, np.float32), "out": np.zeros(2, np.float32)}
  band = dict(rule="std_band", std_k=1.0)
  np.testing.assert_array_equal(
      unit_graph.prune_step(graph, kernels, None, 0.9, **band)["c"], [False, False, True, True]
  )
  np.testing.assert_array_equal(
      unit_graph.prune_step(graph, kernels, None, 0.9, remove_dead=True, biases=biases, **band)["c"],
      [False, False, True, True],
  )
  np.testing.assert_array_equal(
      _band([25.0, 75.0, 50.0, 50.0], np.ones(4, bool), 1.0), [False, False, True, True]
  )
  np.testing.assert_array_equal(
      _band([25.0, 75.0, 50.0, 50.0], np.array([False, True, True, True]), 1.0),
      [False, False, True, True],
  )
  # The floor counts the units that can fire: min_width 0.75 keeps 3,
  # bringing 75 back but not the dead 25.
  np.testing.assert_array_equal(
      unit_graph.prune_step(
          graph, kernels, None, 0.9, remove_dead=True, biases=biases, min_width=0.75, **band
      )["c"],
      [False, True, True, True],
  )
  # Every filter dead: the most important stays.
  dead = {"c": -np.abs(kernel), "out": kernels["out"]}
  np.testing.assert_array_equal(
      unit_graph.prune_step(graph, dead, None, 0.9, remove_dead=True, biases=biases, **band)["c"],
      [False, True, False, False],
  )


def test_the_finalizer_removes_dead_units_first(tiny_layout):
  # SCALES with conv1 filter 0 negative and its bias -1 (the others' are
  # 2, 3): it never fires. The band (k = 1) over conv1's others [75, 50]
  # keeps both (mean 62.5, std 12.5, bounds included); without remove_dead
  # it would be taken over [25, 75, 50] and remove 75 too.
  scales = dict(SCALES, conv1=[-1.0, 3.0, 2.0])
  weights, update = _finalizer_inputs(tiny_layout, scales)
  update["values"][tiny_layout.bias_index[0]][0] = -1.0
  for remove_dead, conv1 in ((True, [False, True, True]), (False, [False, False, True])):
    rule = structured.SearchRule(
        rule="std_band", std_k=1.0, prune_dense=False, remove_dead=remove_dead
    )
    finalizer = _build_finalizer(tiny_layout, 0.9, "original_mean", rule=rule)
    out = finalizer.next(finalizer.initialize(), weights, update)
    alive = structured.alive_from_model_weights(tiny_layout, out.result)
    np.testing.assert_array_equal(alive["conv1"], conv1, err_msg=str(remove_dead))
    removed = sum(int((~a).sum()) for a in alive.values())
    assert int(out.measurements["removed_total"]) == removed


def _next_round(finalizer, state, weights, scales, layout):
  """One finalizer step on the SCALES-like aggregate `scales`, given the
  current weights (their masks are the current alive units)."""
  _, update = _finalizer_inputs(layout, scales)
  return finalizer.next(state, weights, update)


def test_patience_counts_quiet_rounds_in_a_row_and_then_stops(tiny_layout):
  rule = structured.SearchRule(
      rule="std_band", std_k=1.0, prune_dense=False, patience=2, max_prune_rounds=10
  )
  finalizer = _build_finalizer(tiny_layout, 0.9, "original_mean", rule=rule)
  weights, _ = _finalizer_inputs(tiny_layout, SCALES)
  quiet = dict(SCALES)  # after round 1 nothing more is outside the band
  # conv2's alive filters 0, 2, 3 at [100, 200, 100]: mean 133.3, std 47.1,
  # band [86.2, 180.5]: filter 2 goes.
  removing = dict(SCALES, conv2=[4.0, 1.0, 8.0, 4.0])
  # (aggregate, removed this round, pruning rounds, quiet rounds, stopped)
  steps = [
      (SCALES, 3, 1, 0, 0),  # conv1 filters 0, 1 and conv2 filter 1 go
      (quiet, 0, 2, 1, 0),
      (removing, 1, 3, 0, 0),  # a removal resets the count
      (quiet, 0, 4, 1, 0),
      (quiet, 0, 5, 2, 1),  # two quiet rounds in a row: stopped
      (dict(SCALES, conv2=[4.0, 1.0, 4.0, 8.0]), 0, 5, 2, 1),  # would remove
  ]
  state = finalizer.initialize()
  for number, (scales, removed, rounds, quiet_rounds, stopped) in enumerate(steps, 1):
    out = _next_round(finalizer, state, weights, scales, tiny_layout)
    state, weights = out.state, out.result
    got = (
        int(out.measurements["removed_total"]), int(state["pruning_rounds"]),
        int(state["quiet_rounds"]), int(out.measurements["stopped"]),
    )
    assert got == (removed, rounds, quiet_rounds, stopped), f"round {number}"
  alive = structured.alive_from_model_weights(tiny_layout, weights)
  np.testing.assert_array_equal(alive["conv2"], [True, False, False, True])
  np.testing.assert_array_equal(alive["dense1"], [True] * 5)


def test_the_search_stops_after_max_prune_rounds(tiny_layout):
  rule = structured.SearchRule(rule="std_band", std_k=1.0, max_prune_rounds=1)
  finalizer = _build_finalizer(tiny_layout, 0.9, "original_mean", rule=rule)
  weights, _ = _finalizer_inputs(tiny_layout, SCALES)
  out = _next_round(finalizer, finalizer.initialize(), weights, SCALES, tiny_layout)
  # Round 1 prunes (with dense layers: dense1 neuron 4 goes too).
  assert int(out.measurements["removed_total"]) == 4
  assert int(out.measurements["stopped"]) == 1
  removing = dict(SCALES, conv2=[4.0, 1.0, 8.0, 4.0])
  again = _next_round(finalizer, out.state, out.result, removing, tiny_layout)
  assert int(again.measurements["removed_total"]) == 0
  assert int(again.state["pruning_rounds"]) == 1


def test_the_stopping_counts_are_part_of_the_search_state(tiny_layout):
  """They live in the process state, which checkpoints save whole."""
  model_fn = sparse_model.make_model_fn(_tiny_keras, SPEC, True)
  initial = structured.initial_search_weights(_tiny_keras, 0, tiny_layout)
  rule = structured.SearchRule(rule="std_band", patience=3, max_prune_rounds=50)
  process = structured.build_structured_search(
      model_fn, tiny_layout, initial, optimizers.build_sgdw(), local_epochs=1, rule=rule
  )
  finalizer_state = process.initialize().finalizer
  assert {k: int(v) for k, v in finalizer_state.items()} == {
      "pruning_rounds": 0, "quiet_rounds": 0,
  }
  with pytest.raises(ValueError, match="patience must be >= 0"):
    structured.build_structured_search(
        model_fn, tiny_layout, initial, optimizers.build_sgdw(), local_epochs=1,
        rule=structured.SearchRule(patience=-1),
    )


def test_phase_two_starts_from_the_largest_whole_blocks_under_block_masks():
  """structured_feddst with --mask_block=1x4: the surviving weights start
  FedDST with each layer's budget of largest |w| (element-wise), and
  dense1's in whole 1x4 blocks of largest sum |w| (numpy, here)."""
  import functools  # pylint: disable=g-import-not-at-top
  import types  # pylint: disable=g-import-not-at-top

  widths = {"conv1": 6, "conv2": 9, "dense1": 18}
  keras_fn = functools.partial(keras_models.build_model, "mnist_cnn", (28, 28, 1), 10, widths=widths)
  layout = sparse_model.build_layout(sparse_model.wrap_prunable(keras_fn()), 0.8, "erk", 4)
  assert layout.all_rows == (1, 1, 4, 1)  # dense1: 144 inputs; logits: 18
  built = types.SimpleNamespace(
      layout=layout, initial_weights=sparse_model.initial_model_weights(keras_fn, 0, layout)
  )
  rng = np.random.default_rng(3)
  surviving = [rng.normal(size=w.shape).astype(np.float32) for w in keras_fn().get_weights()]
  start = structured.Found(widths, surviving).initial_weights(built)
  for slot, i in enumerate(layout.kernel_index):
    w, budget, rows = surviving[i], layout.budgets[slot], layout.rows(slot)
    mask = start.non_trainable[layout.mask_index[slot]]
    assert int(mask.sum()) == budget
    np.testing.assert_array_equal(start.trainable[i], w * mask)
    if rows == 1:
      kept = np.sort(np.abs(w).ravel())[::-1][:budget]
      np.testing.assert_array_equal(np.sort(np.abs(w[mask > 0]))[::-1], kept)
    else:
      sums = np.abs(w).reshape(w.shape[0] // rows, rows, w.shape[1]).sum(axis=1)
      grid = mask.reshape(w.shape[0] // rows, rows, w.shape[1])
      assert (grid.min(axis=1) == grid.max(axis=1)).all()  # whole blocks
      kept = np.sort(sums.ravel())[::-1][:budget // rows]
      np.testing.assert_array_equal(np.sort(sums[grid[:, 0] > 0])[::-1], kept)
