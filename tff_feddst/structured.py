"""Automatic structured pruning for federated learning (paper 2).

FEDDST_SPEC.md section 9. Phase 1 (architecture search) is FedAvg in which,
after every aggregation, the server removes whole output units (convolution
filters, dense neurons) of the hidden layers whose L1 importance falls under
a boundary, together with the matching input channels / rows of the layer
that consumes them. Phase 2 trains the physically smaller dense network
built with the found widths (`build_shrunk_model`, `keras_models.build_model(
..., widths=...)`).

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

During the search the pruning is carried by the tfmot wrappers' element
masks (`sparse_model.wrap_prunable`): a removed unit's kernel slice and the
consumer's matching input slice are masked (and zero), and its bias is set
to zero by the server. Clients then train under those masks with FedDST's
client work (readjustment ratio 0), so the averaged weights stay zero there.
Zeroing the consumer's input rows is what makes the masked network and the
shrunk network compute exactly the same function.

The process (`build_structured_search`) is composed like FedDST's
(`feddst.build_feddst`): broadcast, FedDST client work without
readjustment, `aggregation.SparseVotingFactory` (all clients share the mask,
so this is FedAvg's weighted average on the surviving weights) and the
structured finalizer of this module.

Numpy-facing helpers (`unit_importance`, `select_units`, `kernel_masks`,
`alive_from_masks`) run the same TensorFlow functions as the finalizer, so
what the tests check is what the server computes.
"""

import collections
import dataclasses
import math
import numbers
from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper

import keras_models
from tff_feddst import aggregation
from tff_feddst import client_work as client_work_lib
from tff_feddst import costs
from tff_feddst import feddst
from tff_feddst import finalizer as finalizer_lib
from tff_feddst import sparse_model

RELATIVE_TO = ("original_mean", "mean", "max")
LINK_MODES = ("conv", "flatten", "dense")

_layers = tf.keras.layers
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


def _unwrap(layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
  if isinstance(layer, pruning_wrapper.PruneLowMagnitude):
    return layer.layer
  return layer


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


def unit_graph(model: tf.keras.Model) -> UnitGraph:
  """Derives the unit graph of a (built) Sequential model from its layers.

  Works on plain models and on models wrapped by `sparse_model.wrap_prunable`.
  Between two prunable layers only channel-wise layers (pooling, activations,
  dropout) and, from conv to dense, one channels_last Flatten are allowed;
  anything else (e.g. normalisation with parameters, reshapes) raises
  ValueError, because removing a unit would then need more than slicing.
  """
  prunable: list[PrunableLayer] = []
  links: list[UnitLink] = []
  producer: PrunableLayer | None = None
  flattened = False
  blocker = None  # an unsupported layer seen after `producer`
  for wrapper in model.layers:
    layer = _unwrap(wrapper)
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
    elif producer is None or blocker is not None:
      continue
    elif isinstance(layer, _layers.Flatten):
      if getattr(layer, "data_format", "channels_last") != "channels_last":
        raise ValueError(f"unit graph: {layer.name!r} must flatten channels_last")
      # Flattening a dense layer's (batch, units) output changes nothing.
      flattened = flattened or producer.kind == "conv"
    elif not isinstance(layer, _CHANNELWISE):
      blocker = layer
  if not prunable:
    raise ValueError("unit graph: the model has no Conv2D or Dense layer")
  return UnitGraph(tuple(prunable), tuple(links))


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
  return tf.reduce_sum(tf.abs(kernel), axis=list(range(len(kernel.shape) - 1)))


def _alive_tf(mask: tf.Tensor) -> tf.Tensor:
  return tf.reduce_any(mask > 0, axis=list(range(len(mask.shape) - 1)))


def _select_tf(importance, alive, boundary: float, relative_to: str):
  """TF version of `select_units` (graph-safe: usable inside TFF)."""
  dtype = importance.dtype
  zeros = tf.zeros_like(importance)
  alive_importance = tf.where(alive, importance, zeros)
  if relative_to == "mean":
    count = tf.reduce_sum(tf.cast(alive, dtype))
    reference = tf.reduce_sum(alive_importance) / tf.maximum(count, 1.0)
  elif relative_to == "original_mean":
    # Over the layer's original units, removed ones counting 0.
    reference = tf.reduce_sum(alive_importance) / tf.cast(tf.size(importance), dtype)
  else:
    reference = tf.reduce_max(alive_importance)  # importance >= 0
  keep = tf.logical_and(alive, importance >= tf.cast(boundary, dtype) * reference)
  # Never empty the layer: the single most important alive unit, lowest
  # index among equals.
  candidates = tf.where(
      alive, importance, tf.fill(tf.shape(importance), tf.constant(-np.inf, dtype))
  )
  is_best = tf.logical_and(alive, tf.equal(candidates, tf.reduce_max(candidates)))
  size = tf.size(importance)
  positions = tf.range(size)
  best = tf.reduce_min(tf.where(is_best, positions, tf.fill([size], size)))
  only_best = tf.equal(positions, best)
  return tf.where(tf.reduce_any(keep), keep, only_best)


def _input_factor(link: UnitLink, consumer_shape, alive_f: tf.Tensor):
  """Broadcastable 0/1 factor zeroing the consumer's inputs of removed units."""
  channels = link.channels
  if link.mode == "conv":
    return tf.reshape(alive_f, [1, 1, channels, 1])
  if link.mode == "dense":
    return tf.reshape(alive_f, [channels, 1])
  rows = consumer_shape[0]  # "flatten": row f belongs to channel f % C
  return tf.reshape(tf.tile(alive_f, [rows // channels]), [rows, 1])


def _masks_tf(graph: UnitGraph, alive_f: Mapping[str, tf.Tensor]) -> list[tf.Tensor]:
  """Element masks of every prunable kernel (graph order) from float alive."""
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


def _prune_step_tf(graph: UnitGraph, kernels, old_alive, boundary, relative_to):
  """One server pruning step: new alive vectors (bool) of every hidden layer.

  Layers are visited in model order, and a layer's importance is measured
  on its kernel with the inputs of the producer's units removed in this
  same step already zeroed, i.e. on the weights that will remain.
  """
  new_alive = {}
  for name in graph.hidden_names:
    kernel = kernels[name]
    link = graph.link_into(name)
    if link is not None:
      kernel = kernel * _input_factor(
          link, graph.layer(name).kernel_shape,
          tf.cast(new_alive[link.producer], kernel.dtype),
      )
    new_alive[name] = _select_tf(
        _importance_tf(kernel), old_alive[name], boundary, relative_to
    )
  return new_alive


# ------------------------------------------------- numpy-facing functions


def _check_selection_args(boundary: float, relative_to: str) -> None:
  if relative_to not in RELATIVE_TO:
    raise ValueError(
        f"relative_to must be one of {', '.join(RELATIVE_TO)}, got {relative_to!r}"
    )
  if (
      isinstance(boundary, bool)
      or not isinstance(boundary, numbers.Real)
      or not math.isfinite(boundary)
      or boundary < 0
  ):
    raise ValueError(f"boundary must be a finite number >= 0, got {boundary!r}")


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
    importance, alive, boundary: float, relative_to: str = "mean"
) -> np.ndarray:
  """The units that stay alive after one pruning step of a layer.

  Among the alive units, those with importance < boundary * R are removed,
  where R is the mean (`relative_to="mean"`) or the maximum ("max") of the
  alive units' importance, or ("original_mean") the mean over the layer's
  original units with removed ones counting 0.

  Applied after every round, "mean" keeps removing: once the weakest units
  are gone the mean of the rest rises above more of them, so a layer whose
  importances spread more than the boundary shrinks towards one unit even
  if nothing changes. "original_mean" and "max" settle: removing units
  lowers (or keeps) R, so a step with unchanged importances removes nothing
  more. A layer is never emptied: when every alive unit
  would go, the single most important one stays (lowest index among equal
  importances). Dead units stay dead. Returns a new bool vector.
  """
  _check_selection_args(boundary, relative_to)
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
      tf.constant(importance), tf.constant(alive), float(boundary), relative_to
  ).numpy()


def prune_step(
    graph: UnitGraph,
    kernels,
    alive_per_layer: Mapping[str, object] | None,
    boundary: float,
    relative_to: str = "mean",
) -> dict[str, np.ndarray]:
  """The server's pruning decision of one round, in numpy.

  `kernels`: {layer name: kernel} or a list in graph order (the averaged
  kernels). Hidden layers are visited in model order; each one's L1
  importance is taken after zeroing the inputs of the producer's units that
  are dead or removed in this step, then `select_units` applies (dead units
  are ignored, so their kernel values do not matter).
  Returns the new alive vectors of every hidden layer.
  """
  _check_selection_args(boundary, relative_to)
  if not isinstance(kernels, Mapping):
    kernels = dict(zip(graph.names, kernels))
  alive = _complete_alive(graph, alive_per_layer)
  new = _prune_step_tf(
      graph,
      {n: tf.constant(np.asarray(kernels[n], np.float32)) for n in graph.names},
      {n: tf.constant(a) for n, a in alive.items()},
      float(boundary),
      relative_to,
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
  masks = _masks_tf(graph, alive_f)
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
  layer = _unwrap(wrapper)
  kernel = layer.kernel.numpy()
  if isinstance(wrapper, pruning_wrapper.PruneLowMagnitude):
    (_, mask_var, _), = wrapper.pruning_vars
    kernel = kernel * mask_var.numpy()
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
  wrappers = {
      _unwrap(layer).name: layer
      for layer in model.layers
      if keras_models.is_prunable(_unwrap(layer))
  }
  weights = []
  for info in graph.layers:
    kernel, bias = _kernel_and_bias(wrappers[info.name])
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


# ------------------------------------------------------ the search process


@dataclasses.dataclass(frozen=True)
class StructuredLayout:
  """Where the search reads and writes the model's variables.

  `sparse` is a `SparseLayout` at sparsity 0 (budgets = kernel sizes, so
  FedDST's client work never readjusts); `graph` the unit graph;
  `bias_index[i]` the position of `graph.layers[i]`'s bias in
  `ModelWeights.trainable` (None without a bias).
  """

  sparse: sparse_model.SparseLayout
  graph: UnitGraph
  bias_index: tuple[int | None, ...]

  @property
  def hidden_names(self) -> tuple[str, ...]:
    return self.graph.hidden_names


def build_structured_layout(wrapped: tf.keras.Model) -> StructuredLayout:
  """The layout of a model wrapped by `sparse_model.wrap_prunable`."""
  if not any(isinstance(l, pruning_wrapper.PruneLowMagnitude) for l in wrapped.layers):
    raise ValueError(
        "build_structured_layout needs a model wrapped by sparse_model.wrap_prunable"
    )
  sparse = sparse_model.build_layout(wrapped, 0.0, "uniform")
  graph = unit_graph(wrapped)
  if sparse.layer_names != graph.names:
    raise ValueError(
        f"wrapped layers {sparse.layer_names} do not match the unit graph {graph.names}"
    )
  position = {id(v): i for i, v in enumerate(wrapped.trainable_weights)}
  bias_index = []
  for layer in wrapped.layers:
    inner = _unwrap(layer)
    if isinstance(layer, pruning_wrapper.PruneLowMagnitude):
      bias_index.append(position[id(inner.bias)] if inner.use_bias else None)
  return StructuredLayout(sparse, graph, tuple(bias_index))


def initial_search_weights(
    keras_fn, seed: int, layout: StructuredLayout
) -> tff.learning.models.ModelWeights:
  """Seeded initial weights for the search: every mask all ones."""
  return sparse_model.initial_model_weights(keras_fn, seed, layout.sparse)


def alive_from_model_weights(
    layout: StructuredLayout, weights: tff.learning.models.ModelWeights
) -> dict[str, np.ndarray]:
  """The found architecture (alive vectors) in a search state's model weights."""
  _, masks = sparse_model.kernels_and_masks(weights, layout.sparse)
  return alive_from_masks(layout.graph, masks)


def _check_structured_weights(layout: StructuredLayout, weights) -> None:
  """Masks must be exactly those of some alive vectors (e.g. all ones)."""
  _, masks = sparse_model.kernels_and_masks(weights, layout.sparse)
  alive = alive_from_masks(layout.graph, masks)
  expected = kernel_masks(layout.graph, alive)
  for (name, want), got in zip(expected.items(), masks):
    if not np.array_equal(want, got):
      raise ValueError(
          f"the mask of {name!r} is not a structured (whole-unit) mask"
      )


def build_structured_finalizer(
    weights_type,
    update_type,
    layout: StructuredLayout,
    *,
    boundary: float,
    relative_to: str = "mean",
) -> tff.learning.templates.FinalizerProcess:
  """The server step of the search: remove units under the boundary.

  From the averaged values (`SparseVotingFactory` output) it computes, per
  hidden layer in model order, the L1 importance of every alive unit (on
  the weights that remain, see `prune_step`), removes those under
  `boundary` x mean/max (`select_units`; never empties a layer), writes the
  new element masks into the wrappers' mask variables, and zeroes the
  removed units' kernels and biases and the consumers' matching inputs. A
  round in which no client contributed keeps the previous weights and masks.
  Measurements: `alive` and `removed` (this round) per hidden layer,
  `removed_total`, and `skipped` (1 in a round without contributions).
  """
  _check_selection_args(boundary, relative_to)
  graph, sparse = layout.graph, layout.sparse
  hidden = graph.hidden_names
  slot = {name: i for i, name in enumerate(graph.names)}
  kernel_positions = set(sparse.kernel_index)
  boundary = float(boundary)

  @tff.tensorflow.computation
  def init_tf():
    return collections.OrderedDict()

  state_type = init_tf.type_signature.result

  @tff.tensorflow.computation(state_type, weights_type, update_type)
  def next_tf(state, weights, update):
    values, voted = list(update["values"]), update["masks"]
    # Unmasked tensors (biases) carry a scalar "had contributions" flag.
    flags = [voted[i] > 0 for i in range(len(values)) if i not in kernel_positions]
    if not flags:
      flags = [tf.reduce_any(voted[i] > 0) for i in sparse.kernel_index]
    contributed = tf.reduce_all(flags)

    non_trainable = list(weights.non_trainable)
    old_masks = [non_trainable[i] for i in sparse.mask_index]
    old_alive = {n: _alive_tf(old_masks[slot[n]]) for n in hidden}
    kernels = {
        n: values[sparse.kernel_index[slot[n]]] * old_masks[slot[n]]
        for n in graph.names
    }
    selected = _prune_step_tf(graph, kernels, old_alive, boundary, relative_to)
    new_alive = {
        n: tf.where(contributed, selected[n], old_alive[n]) for n in hidden
    }
    alive_f = {n: tf.cast(a, tf.float32) for n, a in new_alive.items()}
    new_masks = _masks_tf(graph, alive_f)

    trainable = list(values)
    for s, i in enumerate(sparse.kernel_index):
      trainable[i] = values[i] * new_masks[s]
    for s, info in enumerate(graph.layers):
      b = layout.bias_index[s]
      if b is not None and info.name in alive_f:
        trainable[b] = values[b] * alive_f[info.name]
    old = list(weights.trainable)
    trainable = [tf.where(contributed, n, o) for n, o in zip(trainable, old)]
    for s, i in enumerate(sparse.mask_index):
      non_trainable[i] = tf.where(contributed, new_masks[s], old_masks[s])

    alive_counts = collections.OrderedDict(
        (n, tf.reduce_sum(tf.cast(new_alive[n], tf.int32))) for n in hidden
    )
    removed = collections.OrderedDict(
        (n, tf.reduce_sum(tf.cast(old_alive[n], tf.int32)) - alive_counts[n])
        for n in hidden
    )
    measurements = collections.OrderedDict(
        alive=alive_counts,
        removed=removed,
        removed_total=tf.add_n(list(removed.values())) if hidden else tf.constant(0),
        skipped=tf.cast(tf.logical_not(contributed), tf.int32),
    )
    return (
        state,
        tff.learning.models.ModelWeights(trainable, non_trainable),
        measurements,
    )

  return finalizer_lib.server_step_finalizer(init_tf, next_tf, weights_type, update_type)


def build_structured_search(
    model_fn,
    layout: StructuredLayout,
    initial_weights: tff.learning.models.ModelWeights,
    client_optimizer: tff.learning.optimizers.Optimizer,
    *,
    local_epochs: int,
    boundary: float,
    relative_to: str = "mean",
    prox_mu: float = 0.0,
) -> tff.learning.templates.LearningProcess:
  """Phase 1 of paper 2: FedAvg with server-side removal of weak units.

  Args:
    model_fn: no-argument function returning a `tff.learning.models.VariableModel`
      over a Keras model wrapped by `sparse_model.wrap_prunable`
      (`sparse_model.make_model_fn(keras_fn, input_spec, wrapped=True)`).
    layout: `build_structured_layout(wrap_prunable(keras_fn()))`.
    initial_weights: numpy ModelWeights, e.g. `initial_search_weights`; its
      masks must be structured (all ones, or those of earlier removals).
    client_optimizer: the clients' optimizer (`optimizers.build_sgdw`).
    local_epochs: E.
    boundary: a unit is removed when its L1 importance < boundary x the mean
      (or max) importance of its layer's alive units.
    relative_to: "mean" or "max".
    prox_mu: FedProx strength (0 disables).
  """
  if local_epochs < 1:
    raise ValueError(f"local_epochs must be >= 1, got {local_epochs}")
  _check_selection_args(boundary, relative_to)
  if not isinstance(layout, StructuredLayout):
    raise TypeError(
        "layout must be a StructuredLayout (structured.build_structured_layout)"
    )
  _check_structured_weights(layout, initial_weights)
  client_work = client_work_lib.build_feddst_client_work(
      model_fn,
      layout.sparse,
      client_optimizer,
      local_epochs=local_epochs,
      readjustment_ratio=0.0,
      rounds_between_readjustments=1,
      readjustment_end_round=0,
      prox_mu=prox_mu,
  )
  weights_type = client_work.next.type_signature.parameter[1].member
  result_type = client_work.next.type_signature.result.result.member
  aggregator = aggregation.SparseVotingFactory().create(
      result_type.update, result_type.update_weight
  )
  update_out_type = aggregator.next.type_signature.result.result.member
  finalizer = build_structured_finalizer(
      weights_type,
      update_out_type,
      layout,
      boundary=boundary,
      relative_to=relative_to,
  )
  distributor = tff.learning.templates.build_broadcast_process(weights_type)
  return tff.learning.templates.compose_learning_process(
      feddst.constant_weights_fn(initial_weights),
      distributor,
      client_work,
      aggregator,
      finalizer,
  )
