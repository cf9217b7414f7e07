"""Unit-graph arithmetic for automatic structured pruning (paper 2).

Pure functions over Keras layer descriptions, TensorFlow tensors and NumPy
arrays; nothing here knows about TFF (the search process that uses them is
`structured.build_structured_search`). See docs/algorithms.md.

Vocabulary
- A *unit* is one output filter of a Conv2D layer or one output neuron of a
  Dense layer: the slice `kernel[..., j]` and `bias[j]`.
- The *hidden* prunable layers are every Conv2D / Dense layer but the last
  (the logits, whose width is the number of classes and never changes).
- `alive` vectors: one bool per unit of a hidden layer; a removed unit never
  comes back.
- The *unit graph* (`unit_graph`) says, for every hidden layer, which layer
  consumes its units and how (`UnitLink.mode`):
    "conv"    conv -> (pool / activation) -> conv: consumer kernel (HWIO),
              input channel axis 2;
    "flatten" conv -> ... -> Flatten -> dense: NHWC flatten, consumer
              kernel row f belongs to channel f % C (C = producer filters);
    "dense"   dense -> (activation / dropout) -> dense: consumer kernel row.

Selection (`select_units`, `prune_step`): a unit's importance is the L1
norm of its kernel slice. By `rule` (RULES): "boundary" (the default)
removes, among the alive units of a layer, those with importance
< boundary x R, R being chosen by `relative_to` (RELATIVE_TO;
"original_mean" is the configured default); "std_band" (paper 2's code)
removes the alive units whose importance lies outside mean +- k x std of
the layer's alive units; "std_band_low" only those below mean - k x std.
A layer is never emptied. Removing a unit also zeroes the consumer's
matching input channels / rows (`kernel_masks`), which is what makes the masked network and
the physically smaller one (`shrink`, `build_shrunk_model`) compute exactly
the same function. `architecture_cost` gives the size and FLOPs of a network
built with given widths.

The server (`structured`'s finalizer) runs the graph-safe TensorFlow
functions `alive_from_mask_tf`, `prune_step_tf` and `kernel_masks_tf`;
`select_units`, `prune_step` and `kernel_masks` are their NumPy-facing
entry points (`alive_from_masks` and `shrink` are plain NumPy).
"""

import collections
import dataclasses
import math
import numbers
from typing import Mapping

import numpy as np
import tensorflow as tf

import keras_models
from tff_feddst import costs
from tff_feddst import wrappers
from tff_feddst.names import DEFAULT_STD_K, PRUNES_DENSE, RELATIVE_TO, RULES  # noqa: F401

LINK_MODES = ("conv", "flatten", "dense")

_layers = tf.keras.layers
# Layers that turn conv channels into dense inputs: an NHWC Flatten, or a
# global pooling (one input per channel, the "flatten" link with H = W = 1).
_TO_ROWS = (
    _layers.Flatten,
    _layers.GlobalAveragePooling2D,
    _layers.GlobalMaxPooling2D,
)
# Layers that act on each channel / unit separately (or only on spatial
# positions), so unit j of the producer is still channel j of their output.
_CHANNELWISE = (
    _layers.MaxPooling2D,
    _layers.AveragePooling2D,
    _layers.ReLU,
    _layers.LeakyReLU,
    _layers.ELU,
    _layers.Activation,
    _layers.Softmax,
    _layers.Dropout,  # SpatialDropout2D is a subclass
    _layers.InputLayer,
)


# ------------------------------------------------------------- unit graph


@dataclasses.dataclass(frozen=True)
class PrunableLayer:
  """A Conv2D ("conv") or Dense ("dense") layer of the network."""

  name: str
  kind: str
  kernel_shape: tuple[int, ...]
  use_bias: bool
  # Every unit's output passes a ReLU before the next prunable layer (with
  # only pooling and dropout around it), so a unit whose pre-activation is
  # never > 0 outputs 0.
  relu_output: bool = False
  # The layer's inputs lie in [0, input_max] (inf: >= 0; None: not known).
  input_max: float | None = None

  @property
  def units(self) -> int:
    """Output filters / neurons (the kernel's last axis)."""
    return self.kernel_shape[-1]


@dataclasses.dataclass(frozen=True)
class UnitLink:
  """How `consumer` reads the `channels` output units of `producer`."""

  producer: str
  consumer: str
  mode: str  # one of LINK_MODES
  channels: int


@dataclasses.dataclass(frozen=True)
class UnitGraph:
  """The prunable layers of a Sequential network, and who consumes whom.

  `layers` holds every Conv2D / Dense layer in model order (the order of
  `keras_models.prunable_layers` and of `SparseLayout.layer_names`); the last
  one is the output layer. `links[i]` connects `layers[i]` to `layers[i+1]`,
  so there is one link per hidden layer.
  """

  layers: tuple[PrunableLayer, ...]
  links: tuple[UnitLink, ...]

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(layer.name for layer in self.layers)

  @property
  def hidden_names(self) -> tuple[str, ...]:
    """The layers whose units can be removed (all but the output layer)."""
    return tuple(link.producer for link in self.links)

  def layer(self, name: str) -> PrunableLayer:
    for layer in self.layers:
      if layer.name == name:
        return layer
    raise KeyError(name)

  def link_into(self, name: str) -> UnitLink | None:
    """The link whose consumer is `name` (None for the first layer)."""
    for link in self.links:
      if link.consumer == name:
        return link
    return None

  def link_from(self, name: str) -> UnitLink | None:
    """The link whose producer is `name` (None for the output layer)."""
    for link in self.links:
      if link.producer == name:
        return link
    return None


def _describe(layer: tf.keras.layers.Layer) -> PrunableLayer:
  if type(layer) is _layers.Conv2D:  # pylint: disable=unidiomatic-typecheck
    if layer.data_format != "channels_last" or layer.groups != 1:
      raise ValueError(
          f"unit graph: conv layer {layer.name!r} must be channels_last with "
          "groups=1"
      )
    kind = "conv"
  elif type(layer) is _layers.Dense:  # pylint: disable=unidiomatic-typecheck
    kind = "dense"
  else:
    raise ValueError(
        f"unit graph: layer {layer.name!r} ({type(layer).__name__}) is not a "
        "plain Conv2D or Dense layer"
    )
  return PrunableLayer(
      name=layer.name,
      kind=kind,
      kernel_shape=tuple(int(d) for d in layer.kernel.shape),
      use_bias=bool(layer.use_bias),
  )


def _is_relu(layer: tf.keras.layers.Layer) -> bool:
  """A layer that maps every value <= 0 to 0 (a ReLU, with any max_value)."""
  if isinstance(layer, _layers.ReLU):
    return float(layer.negative_slope) == 0.0 and float(layer.threshold) >= 0.0
  if type(layer) is _layers.Activation:  # pylint: disable=unidiomatic-typecheck
    return getattr(layer.activation, "__name__", "") == "relu"
  return False


# Layers that keep values <= 0 at <= 0 per unit (and values >= 0 at >= 0).
_SIGN_KEEPING = (_layers.MaxPooling2D, _layers.AveragePooling2D, _layers.Dropout) + _TO_ROWS


def unit_graph(model: tf.keras.Model) -> UnitGraph:
  """Derives the unit graph of a (built) Sequential model from its layers.

  Works on plain models and on models wrapped by `sparse_model.wrap_prunable`.
  Between two prunable layers only channel-wise layers (pooling, activations,
  dropout) and, from conv to dense, one channels_last Flatten or global
  pooling (a "flatten" link whose rows are the channels) are allowed;
  anything else (e.g. normalisation with parameters, reshapes) raises
  ValueError, because removing a unit would then need more than slicing.

  It also records, per layer, whether its units' outputs pass a ReLU
  (`PrunableLayer.relu_output`) and the range of its inputs
  (`PrunableLayer.input_max`): [0, 1] for a first layer that reads the
  model's input directly (the models' images are scaled to [0, 1]), >= 0
  for a layer whose producer's outputs pass a ReLU.
  """
  prunable: list[PrunableLayer] = []
  links: list[UnitLink] = []
  producer: PrunableLayer | None = None
  flattened = False
  blocker = None  # an unsupported layer seen after `producer`
  relu = {}  # per prunable layer: None (no ReLU yet), True, or False (broken)
  only_input_before = True
  for wrapper in model.layers:
    layer = wrappers.unwrap(wrapper)
    if keras_models.is_prunable(layer):
      info = _describe(layer)
      if producer is not None:
        if blocker is not None:
          raise ValueError(
              f"unit graph: layer {blocker.name!r} "
              f"({type(blocker).__name__}) between {producer.name!r} and "
              f"{info.name!r} is not supported"
          )
        links.append(_link(producer, info, flattened))
      prunable.append(info)
      producer, flattened = info, False
      activation = getattr(layer.activation, "__name__", "")
      relu[info.name] = {"relu": True, "linear": None}.get(activation, False)
      continue
    if producer is None:
      only_input_before = only_input_before and isinstance(layer, _layers.InputLayer)
      continue
    if _is_relu(layer):
      relu[producer.name] = relu[producer.name] is not False
    elif not isinstance(layer, _SIGN_KEEPING):
      relu[producer.name] = False
    if blocker is not None:
      continue
    if isinstance(layer, _TO_ROWS):
      if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise ValueError(f"unit graph: {layer.name!r} must flatten channels_last")
      # Flattening a dense layer's (batch, units) output changes nothing.
      flattened = flattened or producer.kind == "conv"
    elif not isinstance(layer, _CHANNELWISE):
      blocker = layer
  if not prunable:
    raise ValueError("unit graph: the model has no Conv2D or Dense layer")
  described = []
  for i, info in enumerate(prunable):
    if i == 0:
      input_max = 1.0 if only_input_before else None
    else:
      input_max = math.inf if relu[prunable[i - 1].name] else None
    described.append(
        dataclasses.replace(info, relu_output=bool(relu[info.name]), input_max=input_max)
    )
  return UnitGraph(tuple(described), tuple(links))


def _link(producer: PrunableLayer, consumer: PrunableLayer, flattened: bool):
  channels = producer.units
  shape = consumer.kernel_shape
  if producer.kind == "conv" and consumer.kind == "conv" and not flattened:
    mode, ok = "conv", shape[2] == channels
  elif producer.kind == "conv" and consumer.kind == "dense" and flattened:
    mode, ok = "flatten", shape[0] % channels == 0
  elif producer.kind == "dense" and consumer.kind == "dense":
    mode, ok = "dense", shape[0] == channels
  else:
    raise ValueError(
        f"unit graph: {producer.kind} {producer.name!r} -> {consumer.kind} "
        f"{consumer.name!r}{' through Flatten' if flattened else ''} is not "
        "supported"
    )
  if not ok:
    raise ValueError(
        f"unit graph: {consumer.name!r} kernel {shape} does not read the "
        f"{channels} units of {producer.name!r} as {mode}"
    )
  return UnitLink(producer.name, consumer.name, mode, channels)


# --------------------------------------- importance, selection, masks (TF)


def _importance_tf(kernel: tf.Tensor) -> tf.Tensor:
  """L1 norm of every output unit (sum of |w| over all axes but the last)."""
  return tf.reduce_sum(tf.abs(kernel), axis=list(range(len(kernel.shape) - 1)))


def alive_from_mask_tf(mask: tf.Tensor) -> tf.Tensor:
  """Bool per output unit: any entry of its kernel mask slice is > 0."""
  return tf.reduce_any(mask > 0, axis=list(range(len(mask.shape) - 1)))


def _boundary_keep_tf(importance, alive, boundary: float, relative_to: str):
  """Alive units with importance >= boundary x R (R by `relative_to`)."""
  dtype = importance.dtype
  alive_importance = tf.where(alive, importance, tf.zeros_like(importance))
  if relative_to == "mean":
    count = tf.reduce_sum(tf.cast(alive, dtype))
    reference = tf.reduce_sum(alive_importance) / tf.maximum(count, 1.0)
  elif relative_to == "original_mean":
    # Over the layer's original units, removed ones counting 0.
    reference = tf.reduce_sum(alive_importance) / tf.cast(tf.size(importance), dtype)
  else:
    reference = tf.reduce_max(alive_importance)  # importance >= 0
  return tf.logical_and(alive, importance >= tf.cast(boundary, dtype) * reference)


def _std_band_keep_tf(importance, alive, std_k: float, low_only: bool = False):
  """Alive units whose importance lies in mean +- std_k x std of the alive
  units' importance (population std; bounds included); with `low_only`,
  those at or above mean - std_k x std.

  The statistics are taken in float64, so that equal float32 importances
  give a std of exactly 0 and all stay.
  """
  values = tf.cast(importance, tf.float64)
  weight = tf.cast(alive, tf.float64)
  count = tf.maximum(tf.reduce_sum(weight), 1.0)
  mean = tf.reduce_sum(values * weight) / count
  std = tf.sqrt(tf.reduce_sum(weight * tf.square(values - mean)) / count)
  bound = tf.cast(std_k, tf.float64) * std
  inside = values - mean >= -bound if low_only else tf.abs(values - mean) <= bound
  return tf.logical_and(alive, inside)


def _most_important_tf(importance, alive):
  """Bool: only the most important alive unit (lowest index among equals)."""
  candidates = tf.where(
      alive, importance, tf.fill(tf.shape(importance), tf.constant(-np.inf, importance.dtype))
  )
  is_best = tf.logical_and(alive, tf.equal(candidates, tf.reduce_max(candidates)))
  size = tf.size(importance)
  positions = tf.range(size)
  best = tf.reduce_min(tf.where(is_best, positions, tf.fill([size], size)))
  return tf.equal(positions, best)


def min_units(min_width: float, units: int) -> int:
  """The fewest units a layer of `units` original units keeps under
  `min_width`: ceil(min_width x units), at least 1 (the product is taken
  to 1e-9, so that 0.3 x 20 gives 6, not 7)."""
  return max(1, math.ceil(min_width * units - 1e-9))


def _fill_to_tf(importance, alive, keep, least: int):
  """`keep` with, where it holds fewer than `least` units, the most
  important of the other alive units added (lowest index among equals)
  until it holds `least` or every alive unit."""
  candidates = tf.logical_and(alive, tf.logical_not(keep))
  need = least - tf.reduce_sum(tf.cast(keep, tf.int32))
  score = tf.where(
      candidates, -tf.cast(importance, tf.float64),
      tf.fill(tf.shape(importance), tf.constant(np.inf, tf.float64)),
  )
  order = tf.argsort(score, stable=True)
  size = tf.size(importance)
  rank = tf.scatter_nd(order[:, None], tf.range(size), [size])
  return tf.logical_or(keep, tf.logical_and(candidates, rank < need))


def _select_tf(
    importance, alive, boundary: float, relative_to: str,
    rule: str = "boundary", std_k: float = DEFAULT_STD_K, min_width: float = 0.0,
):
  """TF version of `select_units` (graph-safe: usable inside TFF).

  The arguments must already be checked (`check_selection_args`).
  """
  if rule in ("std_band", "std_band_low"):
    keep = _std_band_keep_tf(importance, alive, std_k, low_only=rule == "std_band_low")
  else:
    keep = _boundary_keep_tf(importance, alive, boundary, relative_to)
  least = min_units(min_width, int(importance.shape[0]))
  if least > 1:
    return _fill_to_tf(importance, alive, keep, least)
  # Never empty the layer.
  return tf.where(tf.reduce_any(keep), keep, _most_important_tf(importance, alive))


def _input_factor(link: UnitLink, consumer_shape, alive_f: tf.Tensor):
  """Broadcastable 0/1 factor zeroing the consumer's inputs of removed units."""
  channels = link.channels
  if link.mode == "conv":
    return tf.reshape(alive_f, [1, 1, channels, 1])
  if link.mode == "dense":
    return tf.reshape(alive_f, [channels, 1])
  rows = consumer_shape[0]  # "flatten": row f belongs to channel f % C
  return tf.reshape(tf.tile(alive_f, [rows // channels]), [rows, 1])


def kernel_masks_tf(graph: UnitGraph, alive_f: Mapping[str, tf.Tensor]) -> list[tf.Tensor]:
  """Element masks of every prunable kernel (graph order), TF version of
  `kernel_masks`; `alive_f` holds float32 0/1 alive vectors of every hidden
  layer."""
  masks = []
  for layer in graph.layers:
    shape = layer.kernel_shape
    mask = tf.ones(shape, tf.float32)
    if layer.name in alive_f:
      mask *= tf.reshape(alive_f[layer.name], [1] * (len(shape) - 1) + [shape[-1]])
    link = graph.link_into(layer.name)
    if link is not None:
      mask *= _input_factor(link, shape, alive_f[link.producer])
    masks.append(mask)
  return masks


def never_fires_tf(layer: PrunableLayer, kernel, bias=None):
  """Bool per unit of `layer`: its pre-activation is <= 0 for every input in
  the layer's range, so that, behind its ReLU, it outputs 0 (always False
  where `layer` has no ReLU output or its input range is not known).

  With inputs in [0, m] the largest pre-activation is m x (sum of the
  unit's positive weights) + bias; with inputs >= 0 (m infinite) it is
  unbounded unless no weight is positive, and then it is the bias. Zero
  padding only adds inputs 0, which lie in the range.
  """
  units = layer.kernel_shape[-1]
  if not layer.relu_output or layer.input_max is None:
    return tf.zeros([units], tf.bool)
  positive = tf.reduce_sum(
      tf.maximum(kernel, 0.0), axis=list(range(len(kernel.shape) - 1))
  )
  bias = tf.zeros([units], kernel.dtype) if bias is None else tf.cast(bias, kernel.dtype)
  if math.isinf(layer.input_max):
    return tf.logical_and(tf.equal(positive, 0.0), bias <= 0.0)
  return tf.cast(layer.input_max, kernel.dtype) * positive + bias <= 0.0


def prune_step_tf(
    graph: UnitGraph, kernels, old_alive, boundary: float, relative_to: str,
    *, rule: str = "boundary", std_k: float = DEFAULT_STD_K, prune_dense: bool = True,
    min_width: float = 0.0, remove_dead: bool = False, biases=None,
):
  """One server pruning step: new alive vectors (bool) of every hidden layer.

  TF version of `prune_step` (graph-safe). `kernels`: {layer name: kernel
  tensor}; `old_alive`: {hidden layer name: bool tensor}. Layers are visited
  in model order, and a layer's importance is measured on its kernel with
  the inputs of the producer's dead units and of those removed in this same
  step zeroed, i.e. on the weights that will remain. Without `prune_dense`
  the hidden dense layers keep their units. `min_width`: see `select_units`.

  With `remove_dead`, the alive units that can never fire (`never_fires_tf`
  on the remaining weights and `biases`, {layer name: bias tensor}, of
  the layers that take part) are removed first, and the rule then chooses
  among the others; the floor of `min_width` counts those others only. A
  layer whose every alive unit can never fire keeps its most important one.
  """
  check_selection_args(boundary, relative_to, rule, std_k, min_width)
  new_alive = {}
  for name in graph.hidden_names:
    if graph.layer(name).kind == "dense" and not prune_dense:
      new_alive[name] = old_alive[name]
      continue
    kernel = kernels[name]
    link = graph.link_into(name)
    if link is not None:
      kernel = kernel * _input_factor(
          link, graph.layer(name).kernel_shape,
          tf.cast(new_alive[link.producer], kernel.dtype),
      )
    importance = _importance_tf(kernel)
    alive = candidates = old_alive[name]
    if remove_dead:
      bias = None if biases is None else biases.get(name)
      if bias is None and graph.layer(name).use_bias:
        raise ValueError(f"remove_dead needs the bias of {name!r}")
      candidates = tf.logical_and(
          alive, tf.logical_not(never_fires_tf(graph.layer(name), kernel, bias))
      )
    selected = _select_tf(
        importance, candidates, boundary, relative_to, rule, std_k, min_width
    )
    if remove_dead:
      selected = tf.where(
          tf.reduce_any(candidates), selected, _most_important_tf(importance, alive)
      )
    new_alive[name] = selected
  return new_alive


# ------------------------------------------------- numpy-facing functions


def _check_number(name: str, value) -> None:
  if (
      isinstance(value, bool)
      or not isinstance(value, numbers.Real)
      or not math.isfinite(value)
      or value < 0
  ):
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_selection_args(
    boundary: float, relative_to: str, rule: str = "boundary",
    std_k: float = DEFAULT_STD_K, min_width: float = 0.0,
) -> None:
  """Raises ValueError unless rule is in RULES, relative_to in RELATIVE_TO,
  boundary and std_k are finite numbers >= 0 and min_width is in [0, 1]."""
  if rule not in RULES:
    raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
  _check_number("std_k", std_k)
  _check_number("min_width", min_width)
  if min_width > 1:
    raise ValueError(f"min_width must be in [0, 1], got {min_width!r}")
  if relative_to not in RELATIVE_TO:
    raise ValueError(
        f"relative_to must be one of {', '.join(RELATIVE_TO)}, got {relative_to!r}"
    )
  _check_number("boundary", boundary)


def unit_importance(kernel) -> np.ndarray:
  """L1 importance per output unit: sum of |w| over all axes but the last.

  For a conv kernel (k_h, k_w, c_in, c_out) one value per filter, for a
  dense kernel (n_in, n_out) one per neuron.
  """
  kernel = tf.convert_to_tensor(np.asarray(kernel))
  if len(kernel.shape) < 2:
    raise ValueError(f"a kernel has at least 2 axes, got shape {tuple(kernel.shape)}")
  return _importance_tf(kernel).numpy()


def select_units(
    importance, alive, boundary: float = 0.95, relative_to: str = "original_mean",
    *, rule: str = "boundary", std_k: float = DEFAULT_STD_K, min_width: float = 0.0,
) -> np.ndarray:
  """The units that stay alive after one pruning step of a layer.

  rule "std_band" (paper 2's code): among the alive units, those whose
  importance lies outside [mean - std_k * std, mean + std_k * std] of the
  alive units' importances (population std) are removed, unusually
  important ones included; `boundary` and `relative_to` are not used.
  rule "std_band_low": the same band, one-sided: only the alive units
  below mean - std_k * std are removed.

  rule "boundary": among the alive units, those with importance < boundary * R are removed
  (a unit exactly at boundary * R stays), where R is, by `relative_to`:
  "original_mean" (the default) the mean over the layer's original units,
  removed ones counting 0; "mean" the mean of the alive units' importance;
  "max" their maximum.

  Applied after every round, "mean" keeps removing: once the weakest units
  are gone the mean of the rest rises above more of them, so a layer whose
  importances spread more than the boundary shrinks towards one unit even
  if nothing changes. "original_mean" and "max" settle: removing units
  lowers (or keeps) R, so a step with unchanged importances removes nothing
  more. A layer is never emptied: when every alive unit
  would go, the single most important one stays (lowest index among equal
  importances). Dead units stay dead.

  `min_width` (any rule): a floor, as a share of the layer's original
  units (the vector's length). When the step would leave fewer than
  `min_units(min_width, len(alive))` units, the most important of those it
  would remove stay (lowest index among equals) up to that number, or all
  alive units where fewer are alive. Returns a new bool vector.
  """
  check_selection_args(boundary, relative_to, rule, std_k, min_width)
  importance = np.asarray(importance)
  alive = np.asarray(alive, bool)
  if importance.ndim != 1 or importance.shape != alive.shape:
    raise ValueError(
        f"importance {importance.shape} and alive {alive.shape} must be "
        "vectors of the same length"
    )
  if not alive.any():
    raise ValueError("select_units: the layer has no alive unit")
  if not np.issubdtype(importance.dtype, np.floating):
    importance = importance.astype(np.float64)
  return _select_tf(
      tf.constant(importance), tf.constant(alive), float(boundary), relative_to,
      rule, float(std_k), float(min_width),
  ).numpy()


def prune_step(
    graph: UnitGraph,
    kernels,
    alive_per_layer: Mapping[str, object] | None,
    boundary: float,
    relative_to: str = "original_mean",
    *,
    rule: str = "boundary",
    std_k: float = DEFAULT_STD_K,
    prune_dense: bool = True,
    min_width: float = 0.0,
    remove_dead: bool = False,
    biases: Mapping[str, object] | None = None,
) -> dict[str, np.ndarray]:
  """The server's pruning decision of one round, in numpy.

  `kernels`: {layer name: kernel} or a list in graph order (the averaged
  kernels). Hidden layers are visited in model order; each one's L1
  importance is taken after zeroing the inputs of the producer's units that
  are dead or removed in this step, then `select_units` applies (dead units
  are ignored, so their kernel values do not matter). Without
  `prune_dense`, hidden dense layers keep their units. `min_width`: the
  floor of `select_units`, per layer. `remove_dead`, `biases` ({layer
  name: bias} of the layers with one): see `prune_step_tf`.
  Returns the new alive vectors of every hidden layer.
  """
  check_selection_args(boundary, relative_to, rule, std_k, min_width)
  if not isinstance(kernels, Mapping):
    kernels = dict(zip(graph.names, kernels))
  alive = _complete_alive(graph, alive_per_layer)
  new = prune_step_tf(
      graph,
      {n: tf.constant(np.asarray(kernels[n], np.float32)) for n in graph.names},
      {n: tf.constant(a) for n, a in alive.items()},
      float(boundary),
      relative_to,
      rule=rule,
      std_k=float(std_k),
      prune_dense=prune_dense,
      min_width=float(min_width),
      remove_dead=bool(remove_dead),
      biases=None if biases is None else {
          n: tf.constant(np.asarray(b, np.float32)) for n, b in biases.items()
      },
  )
  return collections.OrderedDict((n, new[n].numpy()) for n in graph.hidden_names)


def _complete_alive(
    graph: UnitGraph, alive_per_layer: Mapping[str, object] | None
) -> dict[str, np.ndarray]:
  """Alive bool vectors for every hidden layer (all alive where not given)."""
  alive_per_layer = dict(alive_per_layer or {})
  hidden = graph.hidden_names
  unknown = [n for n in alive_per_layer if n not in hidden]
  if unknown:
    raise ValueError(
        f"no hidden prunable layer {unknown[0]!r}; hidden layers are "
        f"{', '.join(hidden)}"
    )
  out = {}
  for name in hidden:
    units = graph.layer(name).units
    vector = np.asarray(alive_per_layer.get(name, np.ones(units, bool)), bool)
    if vector.shape != (units,):
      raise ValueError(
          f"alive vector of {name!r} has shape {vector.shape}, expected ({units},)"
      )
    if not vector.any():
      raise ValueError(f"layer {name!r} has no alive unit")
    out[name] = vector
  return out


def kernel_masks(
    graph: UnitGraph, alive_per_layer: Mapping[str, object] | None
) -> dict[str, np.ndarray]:
  """Element masks (float32, kernel shapes) of every prunable kernel.

  A removed unit's output slice is 0, and so are the consumer layer's
  matching input channels (conv), flattened rows (row f for channel f % C)
  or rows (dense), the logits layer's included. Hidden layers missing from
  `alive_per_layer` are all alive. Returns {layer name: mask} in graph order.
  """
  alive = _complete_alive(graph, alive_per_layer)
  alive_f = {n: tf.constant(v.astype(np.float32)) for n, v in alive.items()}
  masks = kernel_masks_tf(graph, alive_f)
  return collections.OrderedDict(
      (name, m.numpy()) for name, m in zip(graph.names, masks)
  )


def alive_from_masks(graph: UnitGraph, masks) -> dict[str, np.ndarray]:
  """Alive vectors of the hidden layers, read off element masks.

  `masks` is a list in graph order (e.g. `sparse_model.kernels_and_masks(...)
  [1]`) or a mapping {layer name: mask}. A unit is alive when any entry of
  its kernel mask slice is 1.
  """
  if isinstance(masks, Mapping):
    by_name = dict(masks)
  else:
    masks = list(masks)
    if len(masks) != len(graph.layers):
      raise ValueError(f"expected {len(graph.layers)} masks, got {len(masks)}")
    by_name = dict(zip(graph.names, masks))
  out = collections.OrderedDict()
  for name in graph.hidden_names:
    mask = np.asarray(by_name[name])
    if mask.shape != graph.layer(name).kernel_shape:
      raise ValueError(
          f"mask of {name!r} has shape {mask.shape}, expected "
          f"{graph.layer(name).kernel_shape}"
      )
    out[name] = (mask > 0).reshape(-1, mask.shape[-1]).any(axis=0)
  return out


def widths_from_alive(alive_per_layer: Mapping[str, object]) -> dict[str, int]:
  """{layer name: number of alive units}."""
  return {n: int(np.count_nonzero(np.asarray(a, bool))) for n, a in alive_per_layer.items()}


# ------------------------------------------------------------- shrinking


def _input_keep(link: UnitLink, consumer_shape, alive: np.ndarray) -> np.ndarray:
  """Bool over the consumer kernel's input axis (axis -2): inputs kept."""
  if link.mode == "flatten":
    return np.tile(alive, consumer_shape[0] // link.channels)
  return alive


def _kernel_and_bias(wrapper: tf.keras.layers.Layer):
  """Numpy kernel (times the wrapper's mask, if wrapped) and bias."""
  layer = wrappers.unwrap(wrapper)
  kernel = layer.kernel.numpy()
  if wrappers.is_wrapper(wrapper):
    kernel = kernel * wrappers.mask_variable(wrapper).numpy()
  bias = layer.bias.numpy() if layer.use_bias else None
  return kernel, bias


def shrink(
    model: tf.keras.Model, alive_per_layer: Mapping[str, object] | None
) -> tuple[dict[str, int], list[np.ndarray]]:
  """Slices the surviving units out of `model`.

  `model` is a network from `keras_models.build_model`, plain or wrapped
  by `sparse_model.wrap_prunable` (then kernel * mask is used). Returns
  (widths, weights): widths = {hidden layer: alive units}, for
  `build_model(name, ..., widths=widths)`; weights = the kernels and biases
  of that smaller model in its `get_weights()` order (per layer: kernel, then
  bias). Removed units lose their kernel slice and bias, and the consumer
  layer loses the matching input channels / rows.
  """
  graph = unit_graph(model)
  alive = _complete_alive(graph, alive_per_layer)
  by_name = {
      wrappers.unwrap(layer).name: layer
      for layer in model.layers
      if keras_models.is_prunable(wrappers.unwrap(layer))
  }
  weights = []
  for info in graph.layers:
    kernel, bias = _kernel_and_bias(by_name[info.name])
    link = graph.link_into(info.name)
    if link is not None:
      keep_in = _input_keep(link, info.kernel_shape, alive[link.producer])
      kernel = np.compress(keep_in, kernel, axis=kernel.ndim - 2)
    if info.name in alive:
      kernel = np.compress(alive[info.name], kernel, axis=kernel.ndim - 1)
      if bias is not None:
        bias = bias[alive[info.name]]
    weights.append(np.ascontiguousarray(kernel))
    if bias is not None:
      weights.append(np.ascontiguousarray(bias))
  return widths_from_alive(alive), weights


def build_shrunk_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    model: tf.keras.Model,
    alive_per_layer: Mapping[str, object] | None,
) -> tf.keras.Model:
  """The physically smaller network `name` holding `model`'s surviving weights.

  Its outputs equal `model`'s with the removed units (kernel slices, biases)
  and the consumers' matching inputs zeroed.
  """
  widths, weights = shrink(model, alive_per_layer)
  small = keras_models.build_model(name, input_shape, num_classes, widths=widths)
  small.set_weights(weights)
  return small


# ------------------------------------------------------------- costs


@dataclasses.dataclass(frozen=True)
class ArchitectureCost:
  """Size and compute of a (dense) network built with given widths."""

  widths: dict[str, int]
  params: int
  layer_flops: dict[str, int]

  @property
  def forward_flops(self) -> int:
    """Dense forward FLOPs (2 x MACs) of one example."""
    return int(sum(self.layer_flops.values()))

  def upload_bits_per_client(self, value_bits: int = 32) -> int:
    """One client's per-round upload of the whole (dense) model."""
    return value_bits * self.params


def count_params(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    widths: Mapping[str, int] | None = None,
) -> int:
  """Parameters of `build_model(name, input_shape, num_classes, widths)`."""
  return int(
      keras_models.build_model(name, input_shape, num_classes, widths).count_params()
  )


def architecture_cost(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    widths: Mapping[str, int] | None = None,
) -> ArchitectureCost:
  """Parameters and forward FLOPs of the network built with `widths`.

  Per-round upload per client is `upload_bits_per_client()` (32 bits per
  parameter of the dense, shrunk model).
  """
  model = keras_models.build_model(name, input_shape, num_classes, widths)
  return ArchitectureCost(
      widths=keras_models.resolve_widths(name, widths),
      params=int(model.count_params()),
      layer_flops=costs.layer_forward_flops(model),
  )
