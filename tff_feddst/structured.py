"""Automatic structured pruning for federated learning (paper 2): the search.

See docs/algorithms.md. Phase 1 (architecture search) is FedAvg in which,
after every aggregation, the server removes whole output units (convolution
filters, dense neurons) of the hidden layers whose L1 importance falls under
a boundary, together with the matching input channels / rows of the layer
that consumes them (the arithmetic is `unit_graph`'s). Phase 2 trains the
physically smaller dense network built with the found widths
(`unit_graph.build_shrunk_model`, `keras_models.build_model(..., widths=...)`).

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
structured finalizer of this module (`build_structured_finalizer`), which
runs `unit_graph`'s TensorFlow functions on the server.
"""

import collections
import dataclasses
import json
import os

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

import keras_models
from tff_feddst import aggregation
from tff_feddst import client_work as client_work_lib
from tff_feddst import cohort_work
from tff_feddst import costs
from tff_feddst import feddst
from tff_feddst import files
from tff_feddst import finalizer as finalizer_lib
from tff_feddst import masks as masks_lib
from tff_feddst import phases
from tff_feddst import sparse_model
from tff_feddst import unit_graph as unit_graph_lib
from tff_feddst import wrappers


@dataclasses.dataclass(frozen=True)
class StructuredLayout:
  """Where the search reads and writes the model's variables.

  `sparse` is a `SparseLayout` at sparsity 0 (budgets = kernel sizes, so
  FedDST's client work never readjusts); `graph` the unit graph;
  `bias_index[i]` the position of `graph.layers[i]`'s bias in
  `ModelWeights.trainable` (None without a bias).
  """

  sparse: sparse_model.SparseLayout
  graph: unit_graph_lib.UnitGraph
  bias_index: tuple[int | None, ...]

  @property
  def hidden_names(self) -> tuple[str, ...]:
    return self.graph.hidden_names


def build_structured_layout(wrapped: tf.keras.Model) -> StructuredLayout:
  """The layout of a model wrapped by `sparse_model.wrap_prunable`."""
  if not any(wrappers.is_wrapper(l) for l in wrapped.layers):
    raise ValueError(
        "build_structured_layout needs a model wrapped by sparse_model.wrap_prunable"
    )
  sparse = sparse_model.build_layout(wrapped, 0.0, "uniform")
  graph = unit_graph_lib.unit_graph(wrapped)
  if sparse.layer_names != graph.names:
    raise ValueError(
        f"wrapped layers {sparse.layer_names} do not match the unit graph {graph.names}"
    )
  position = {id(v): i for i, v in enumerate(wrapped.trainable_weights)}
  bias_index = []
  for layer in wrapped.layers:
    if wrappers.is_wrapper(layer):
      inner = wrappers.unwrap(layer)
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
  return unit_graph_lib.alive_from_masks(layout.graph, masks)


def _check_structured_weights(layout: StructuredLayout, weights) -> None:
  """Masks must be exactly those of some alive vectors (e.g. all ones)."""
  _, masks = sparse_model.kernels_and_masks(weights, layout.sparse)
  alive = unit_graph_lib.alive_from_masks(layout.graph, masks)
  expected = unit_graph_lib.kernel_masks(layout.graph, alive)
  for (name, want), got in zip(expected.items(), masks):
    if not np.array_equal(want, got):
      raise ValueError(
          f"the mask of {name!r} is not a structured (whole-unit) mask"
      )


def _round_measurements(hidden, old_alive, new_alive):
  alive_counts = collections.OrderedDict(
      (n, tf.reduce_sum(tf.cast(new_alive[n], tf.int32))) for n in hidden
  )
  removed = collections.OrderedDict(
      (n, tf.reduce_sum(tf.cast(old_alive[n], tf.int32)) - alive_counts[n])
      for n in hidden
  )
  return collections.OrderedDict(
      alive=alive_counts,
      removed=removed,
      removed_total=tf.add_n(list(removed.values())) if hidden else tf.constant(0),
  )


@dataclasses.dataclass(frozen=True)
class SearchRule:
  """How the server chooses the units that stay, and when it stops.

  `boundary`, `relative_to`, `rule`, `std_k`, `prune_dense`: the selection
  of one pruning step (`unit_graph.prune_step`). The search stops removing
  units after `patience` consecutive pruning rounds that removed nothing
  (0: never) or after `max_prune_rounds` pruning rounds (None: no limit);
  the rounds after that train the network found (FedAvg under its masks).
  """

  boundary: float = 0.95
  relative_to: str = "original_mean"
  rule: str = "boundary"
  std_k: float = unit_graph_lib.DEFAULT_STD_K
  prune_dense: bool = True
  patience: int = 0
  max_prune_rounds: int | None = None
  min_width: float = 0.0
  remove_dead: bool = False

  def check(self) -> None:
    """Raises ValueError for a setting out of range."""
    unit_graph_lib.check_selection_args(
        self.boundary, self.relative_to, self.rule, self.std_k, self.min_width
    )
    if self.patience < 0:
      raise ValueError(f"patience must be >= 0, got {self.patience}")
    if self.max_prune_rounds is not None and self.max_prune_rounds < 1:
      raise ValueError(f"max_prune_rounds must be >= 1, got {self.max_prune_rounds}")

  def selection(self) -> dict:
    """The keyword arguments of `unit_graph.prune_step_tf`."""
    return dict(
        boundary=float(self.boundary), relative_to=self.relative_to,
        rule=self.rule, std_k=float(self.std_k), prune_dense=self.prune_dense,
        min_width=float(self.min_width), remove_dead=bool(self.remove_dead),
    )

  def initial_state(self) -> collections.OrderedDict:
    """The finalizer's state: pruning rounds run, and quiet ones in a row."""
    return collections.OrderedDict(
        pruning_rounds=tf.constant(0, tf.int32), quiet_rounds=tf.constant(0, tf.int32)
    )

  def stopped(self, state) -> tf.Tensor:
    """Bool scalar: the search removes no more units."""
    stop = tf.constant(False)
    if self.patience:
      stop = tf.logical_or(stop, state["quiet_rounds"] >= self.patience)
    if self.max_prune_rounds is not None:
      stop = tf.logical_or(stop, state["pruning_rounds"] >= self.max_prune_rounds)
    return stop

  def next_state(self, state, stopped, removed_total) -> collections.OrderedDict:
    """Counts a pruning round (none once stopped) and whether it was quiet."""
    ran = tf.logical_not(stopped)
    quiet = tf.where(removed_total > 0, 0, state["quiet_rounds"] + 1)
    return collections.OrderedDict(
        pruning_rounds=state["pruning_rounds"] + tf.cast(ran, tf.int32),
        quiet_rounds=tf.where(ran, quiet, state["quiet_rounds"]),
    )


def _prune_round(layout: StructuredLayout, weights, update, selection, stopped):
  """TF body of the structured finalizer: (new ModelWeights, measurements).

  `selection`: `SearchRule.selection()`; `stopped`: bool scalar, True keeps
  every unit.
  """
  graph, sparse = layout.graph, layout.sparse
  hidden = graph.hidden_names
  slot = {name: i for i, name in enumerate(graph.names)}
  values = list(update["values"])

  non_trainable = list(weights.non_trainable)
  old_masks = [non_trainable[i] for i in sparse.mask_index]
  old_alive = {
      n: unit_graph_lib.alive_from_mask_tf(old_masks[slot[n]]) for n in hidden
  }
  kernels = {
      n: values[sparse.kernel_index[slot[n]]] * old_masks[slot[n]]
      for n in graph.names
  }
  biases = {
      info.name: values[layout.bias_index[s]]
      for s, info in enumerate(graph.layers)
      if layout.bias_index[s] is not None
  }
  selected = unit_graph_lib.prune_step_tf(
      graph, kernels, old_alive, biases=biases, **selection
  )
  new_alive = {n: tf.where(stopped, old_alive[n], selected[n]) for n in hidden}
  alive_f = {n: tf.cast(a, tf.float32) for n, a in new_alive.items()}
  new_masks = unit_graph_lib.kernel_masks_tf(graph, alive_f)

  trainable = list(values)
  for s, i in enumerate(sparse.kernel_index):
    trainable[i] = values[i] * new_masks[s]
  for s, info in enumerate(graph.layers):
    b = layout.bias_index[s]
    if b is not None and info.name in alive_f:
      trainable[b] = values[b] * alive_f[info.name]
  for s, i in enumerate(sparse.mask_index):
    non_trainable[i] = new_masks[s]
  return (
      tff.learning.models.ModelWeights(trainable, non_trainable),
      _round_measurements(hidden, old_alive, new_alive),
  )


def build_structured_finalizer(
    weights_type,
    update_type,
    layout: StructuredLayout,
    *,
    boundary: float = 0.95,
    relative_to: str = "original_mean",
    rule: SearchRule | None = None,
) -> tff.learning.templates.FinalizerProcess:
  """The server step of the search: remove units outside the rule.

  From the averaged values (`SparseVotingFactory` output) it computes, per
  hidden layer in model order, the L1 importance of every alive unit (on
  the weights that remain, see `unit_graph.prune_step`) and removes, by
  `rule.rule`: "boundary", those under `boundary` x R, where R is by
  `relative_to` ("original_mean", "mean" or "max") the mean of the layer's
  original units (removed ones counting 0), the mean of its alive units or
  their maximum; "std_band", those outside mean +- `rule.std_k` x std of
  the alive units; "std_band_low", those below mean - `rule.std_k` x std
  (`unit_graph.select_units`; never empties a layer). It
  writes the new element masks into the wrappers' mask variables, and
  zeroes the removed units' kernels and biases and the consumers' matching
  inputs. `rule` (a `SearchRule`) gives every setting; without it,
  `boundary` and `relative_to` make one that never stops. Its state counts
  the pruning rounds and the quiet ones in a row (`SearchRule.stopped`), so
  a checkpoint keeps where the search stands. (A round in which no client
  contributed is discarded by the driver, `rounds.RoundStep.run_clients`.)
  Measurements: `alive` and `removed` (this round) per hidden layer,
  `removed_total`, and `stopped` (1 once the search removes no more).
  """
  if rule is None:
    rule = SearchRule(boundary=boundary, relative_to=relative_to)
  rule.check()
  selection = rule.selection()

  @tff.tensorflow.computation
  def init_tf():
    return rule.initial_state()

  state_type = init_tf.type_signature.result

  @tff.tensorflow.computation(state_type, weights_type, update_type)
  def next_tf(state, weights, update):
    stopped = rule.stopped(state)
    new_weights, measurements = _prune_round(
        layout, weights, update, selection, stopped
    )
    new_state = rule.next_state(state, stopped, measurements["removed_total"])
    measurements["stopped"] = tf.cast(rule.stopped(new_state), tf.int32)
    return new_state, new_weights, measurements

  return finalizer_lib.server_step_finalizer(init_tf, next_tf, weights_type, update_type)


def build_structured_search(
    model_fn,
    layout: StructuredLayout,
    initial_weights: tff.learning.models.ModelWeights,
    client_optimizer: tff.learning.optimizers.Optimizer,
    *,
    local_epochs: int,
    boundary: float = 0.95,
    relative_to: str = "original_mean",
    rule: SearchRule | None = None,
    prox_mu: float = 0.0,
    cohort: "cohort_work.CohortSettings | None" = None,
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
    boundary: a unit is removed when its L1 importance < boundary x R (a
      unit exactly at boundary x R stays; a layer is never emptied).
    relative_to: what R is, one of `unit_graph.RELATIVE_TO`:
      "original_mean" (the default) the mean importance over the layer's
      original units, removed ones counting 0; "mean" the mean over its
      alive units; "max" the maximum over its alive units.
    rule: every setting of the selection and of when the search stops (a
      `SearchRule`, e.g. paper 2's std band with patience); None: the
      boundary rule of `boundary` and `relative_to`, never stopping.
    prox_mu: FedProx strength (0 disables).
    cohort: train each TFF client's cohort of clients as one computation
      (`cohort_work`); None trains every client on its own.
  """
  if local_epochs < 1:
    raise ValueError(f"local_epochs must be >= 1, got {local_epochs}")
  if rule is None:
    rule = SearchRule(boundary=boundary, relative_to=relative_to)
  rule.check()
  if not isinstance(layout, StructuredLayout):
    raise TypeError(
        "layout must be a StructuredLayout (structured.build_structured_layout)"
    )
  _check_structured_weights(layout, initial_weights)
  schedule = dict(
      local_epochs=local_epochs,
      readjustment_ratio=0.0,
      rounds_between_readjustments=1,
      readjustment_end_round=0,
  )
  if cohort is None:
    client_work = client_work_lib.build_feddst_client_work(
        model_fn, layout.sparse, client_optimizer, prox_mu=prox_mu, **schedule
    )
  else:
    client_work = cohort_work.build_cohort_client_work(
        model_fn, cohort.keras_fn, layout.sparse, cohort.hyperparameters(prox_mu),
        image_shape=cohort.image_shape, **schedule,
    )
  weights_type = client_work.next.type_signature.parameter[1].member
  result_type = client_work.next.type_signature.result.result.member
  aggregator = aggregation.SparseVotingFactory(presummed=cohort is not None).create(
      result_type.update, result_type.update_weight
  )
  update_out_type = aggregator.next.type_signature.result.result.member
  finalizer = build_structured_finalizer(
      weights_type, update_out_type, layout, rule=rule
  )
  distributor = tff.learning.templates.build_broadcast_process(weights_type)
  return tff.learning.templates.compose_learning_process(
      feddst.constant_weights_fn(initial_weights),
      distributor,
      client_work,
      aggregator,
      finalizer,
  )


# ------------------------------------------------- the search as a run phase


def search_rule(config) -> SearchRule:
  """The `SearchRule` of a run's (resolved) settings."""
  return SearchRule(
      boundary=config.structured_boundary,
      relative_to=config.structured_relative_to,
      rule=config.structured_rule,
      std_k=config.structured_std_k,
      prune_dense=config.structured_prune_dense,
      patience=config.structured_patience,
      max_prune_rounds=config.structured_max_prune_rounds,
      min_width=config.structured_min_width,
      remove_dead=config.structured_remove_dead,
  )


def build_search_algorithm(config, keras_fn, input_spec):
  """The registry's builder of the search (`algorithms.STRUCTURED_SEARCH`)."""
  from tff_feddst import builders  # pylint: disable=g-import-not-at-top

  layout = build_structured_layout(sparse_model.wrap_prunable(keras_fn()))
  initial = initial_search_weights(keras_fn, config.seed, layout)
  cohort = builders.cohort_settings(config, keras_fn, input_spec)
  process = build_structured_search(
      sparse_model.make_model_fn(keras_fn, input_spec, wrapped=True),
      layout,
      initial,
      builders.build_client_optimizer(config),
      local_epochs=config.local_epochs,
      rule=search_rule(config),
      prox_mu=config.prox_mu,
      cohort=cohort,
  )
  size = costs.ModelSize(int(keras_fn().count_params()), 0)
  return builders.BuiltAlgorithm(
      process, initial, None, size, epochs_in_process=True, structured=layout,
      cohort=cohort,
  )


FOUND_ARCHITECTURE = "found_architecture.json"


@dataclasses.dataclass(frozen=True)
class Found:
  """What the search hands to phase 2: the widths, and the surviving weights.

  `weights` is None when phase 2 resumes from a checkpoint (its weights are
  in the checkpoint).
  """

  widths: dict[str, int]
  weights: list[np.ndarray] | None = None

  def initial_weights(self, built) -> tff.learning.models.ModelWeights:
    """Phase 2's initial weights from the surviving ones.

    Dense: the weights as they are. Sparse (FedDST): each layer keeps its
    budget of largest-magnitude weights (ties: lowest index), in whole
    blocks where the layout masks the layer in blocks (`--mask_block`).
    """
    trainable = [np.asarray(w, np.float32) for w in self.weights]
    non_trainable = [np.asarray(w) for w in built.initial_weights.non_trainable]
    layout = built.layout
    if layout is not None:
      for slot, i in enumerate(layout.kernel_index):
        mask = masks_lib.largest_magnitude_mask(
            trainable[i], layout.budgets[slot], layout.rows(slot)
        )
        trainable[i] = trainable[i] * mask
        m = layout.mask_index[slot]
        non_trainable[m] = mask.astype(non_trainable[m].dtype)
    return tff.learning.models.ModelWeights(trainable, non_trainable)


def read_found(output_dir: str) -> Found:
  """The widths the search of the run in `output_dir` found."""
  from tff_feddst.config import ConfigError  # pylint: disable=g-import-not-at-top

  path = os.path.join(output_dir, FOUND_ARCHITECTURE)
  try:
    with open(path) as f:
      widths = json.load(f)["widths"]
    return Found({str(k): int(v) for k, v in widths.items()})
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ConfigError(
        f"cannot resume the second phase: {path} is missing or corrupt ({e}); "
        "delete the output directory to start over"
    ) from None


class SearchPhase(phases.Phase):
  """Phase 1 of a structured run: the search on the original network.

  Its statistics: `sparsity` is the fraction of the original network's
  parameters removed so far, FLOPs those of the network found so far, and
  the ledger is resized to that network, which is what the next round's
  clients download and upload (removed units are never sent).
  """

  report_name = "search"

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._costs = {}
    self.current_widths = keras_models.resolve_widths(self.config.model_name, None)

  def describe(self) -> str:
    return f"{self.config.algorithm} phase 1 (search, {describe_rule(self.config)})"

  def architecture(self, widths) -> unit_graph_lib.ArchitectureCost:
    key = tuple(sorted(widths.items()))
    if key not in self._costs:
      self._costs[key] = unit_graph_lib.architecture_cost(
          self.config.model_name, self.input_shape, self.num_classes, widths
      )
    return self._costs[key]

  def stats(self, weights, ledger):
    alive = alive_from_model_weights(self.built.structured, weights)
    self.current_widths = unit_graph_lib.widths_from_alive(alive)
    cost = self.architecture(self.current_widths)
    ledger.size = costs.ModelSize(cost.params, 0)
    return 1.0 - cost.params / self.params, cost.forward_flops, None

  def console_note(self) -> str:
    return "widths " + ",".join(str(w) for w in self.current_widths.values())

  def report(self, weights, evaluation, ledger) -> dict:
    cost = self.architecture(self.current_widths)
    return {
        "last_round": self.last_round,
        "widths": dict(self.current_widths),
        "params": cost.params,
        "forward_flops": cost.forward_flops,
        "upload_bits_per_client_round": costs.dense_message_bits(
            costs.ModelSize(cost.params, 0)
        ),
        "clients_accuracy": evaluation.get("clients_accuracy"),
        "test_accuracy": evaluation.get("test_accuracy"),
        "cumulative_upload_bits": ledger.cumulative_upload_bits,
    }

  def hand_over(self, weights, output_dir) -> Found:
    """Shrinks the network to the units alive; writes found_architecture.json."""
    wrapped = sparse_model.wrap_prunable(self.keras_fn())
    weights.assign_weights_to(wrapped)
    alive = alive_from_model_weights(self.built.structured, weights)
    widths, small_weights = unit_graph_lib.shrink(wrapped, alive)
    files.write_atomic(
        os.path.join(output_dir, FOUND_ARCHITECTURE),
        files.json_text({"model": self.config.model_name, "widths": widths}, sort_keys=False),
    )
    return Found(widths, small_weights)


def describe_rule(config) -> str:
  """The search's rule in words, e.g. 'std band 2.2, conv only, patience 3'."""
  rule = search_rule(config)
  if rule.rule == "std_band":
    text = f"std band mean +- {rule.std_k} std"
  elif rule.rule == "std_band_low":
    text = f"std band, low side, mean - {rule.std_k} std"
  else:
    text = f"boundary {rule.boundary} x {rule.relative_to}"
  text += "" if rule.prune_dense else ", conv only"
  text += f", patience {rule.patience}" if rule.patience else ""
  if rule.max_prune_rounds is not None:
    text += f", at most {rule.max_prune_rounds} pruning rounds"
  if rule.min_width:
    text += f", layers keep at least {rule.min_width:g} of their units"
  if rule.remove_dead:
    text += ", units that can never fire go first"
  return text


def summary_section(config, found_widths, phase_results) -> dict:
  """summary.json["structured"] of a two-phase run."""
  return {
      "rule": config.structured_rule,
      "boundary": config.structured_boundary,
      "relative_to": config.structured_relative_to,
      "std_k": config.structured_std_k,
      "prune_dense": config.structured_prune_dense,
      "patience": config.structured_patience,
      "max_prune_rounds": config.structured_max_prune_rounds,
      "min_width": config.structured_min_width,
      "remove_dead": config.structured_remove_dead,
      "search_rounds": config.structured_search_rounds,
      "reinit": config.structured_reinit,
      "original_widths": keras_models.default_widths(config.model_name),
      "found_widths": found_widths,
      "phases": phase_results,
  }
