"""PruneFL's parts (docs/algorithms.md section 4.2): the time cost of a kept
weight, the mask chosen by g^2 / t, and the initial pruning on one client.

PruneFL ranks every kernel weight j of the network by g_j^2 / t_j, g the
gradient of the training loss and t_j the time it costs a client to keep
weight j, and keeps the best of the whole network (the layers trade
weights: a weight of a layer that is cheap per weight is worth keeping at a
smaller gradient). Here:

- t_j is the cost per kept weight of j's layer, measured on this machine
  (`measure_layer_costs`): TensorFlow runs a masked kernel dense, as fast
  at any density, so each layer is timed at a few densities made real, as
  the same layer with that share of its output units (filters, neurons),
  one forward and backward pass on a batch of its real inputs; a least-
  squares line, seconds = fixed + t * kept weights, gives t (the fixed part
  is what a call costs whatever its size). PruneFL's own cost table is of
  this kind: one time per weight for each layer.
- g is the gradient of a client's mean task loss over its local data at its
  trained weights (the gradient FedDST's regrowth uses): of the one client
  in the initial pruning, the example-weighted mean over the round's
  clients in a re-selection round.
- The network keeps a fixed total: the sum of the layers' budgets at the
  target sparsity (ERK or `--sparsity_distribution`), so that PruneFL
  uploads as much as FedDST and RandomMask at the same S; which layer keeps
  how many is PruneFL's choice. Ties go to the lower position in the
  network's order (layers in model order, each flattened).
"""

import collections
import dataclasses
import functools
import json
import os
import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

import keras_models
from tff_feddst import phases
from tff_feddst import rounds
from tff_feddst import sparse_model

# Densities at which each layer is timed (shares of its output units).
COST_DENSITIES = (1.0, 0.75, 0.5, 0.25)


@dataclasses.dataclass(frozen=True)
class LayerCosts:
  """Measured seconds of one forward+backward pass of each prunable layer,
  at a few densities, and the cost per kept weight fitted to them."""

  layer_names: tuple[str, ...]
  num_weights: tuple[int, ...]
  batch_size: int
  densities: tuple[float, ...]
  # kept[l][d], seconds[l][d]: layer l at densities[d], its kernel's weights
  # and the median seconds of its step.
  kept: tuple[tuple[int, ...], ...]
  seconds: tuple[tuple[float, ...], ...]

  @property
  def fits(self) -> tuple[tuple[float, float], ...]:
    """(fixed seconds, seconds per kept weight) of each layer: least squares."""
    out = []
    for kept, seconds in zip(self.kept, self.seconds):
      slope, intercept = np.polyfit(np.asarray(kept, np.float64), np.asarray(seconds), 1)
      out.append((float(intercept), float(slope)))
    return tuple(out)

  @property
  def per_weight(self) -> tuple[float, ...]:
    """t of each layer: its fitted seconds per kept weight. A layer so small
    that its fixed cost hides its size (a fit not above 0) gets the smallest
    positive fit of the network: it costs no more per weight than anything
    measurable here (or, with no positive fit at all, its seconds per weight)."""
    slopes = [slope for _, slope in self.fits]
    positive = [s for s in slopes if s > 0]
    out = []
    for slope, kept, seconds in zip(slopes, self.kept, self.seconds):
      if slope > 0:
        out.append(slope)
      elif positive:
        out.append(min(positive))
      else:
        out.append(max(seconds) / max(kept))
    return tuple(out)

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    out["fits"] = [list(f) for f in self.fits]
    out["per_weight_seconds"] = list(self.per_weight)
    return out

  @classmethod
  def from_json(cls, value: dict) -> "LayerCosts":
    return cls(
        layer_names=tuple(value["layer_names"]),
        num_weights=tuple(int(n) for n in value["num_weights"]),
        batch_size=int(value["batch_size"]),
        densities=tuple(float(d) for d in value["densities"]),
        kept=tuple(tuple(int(k) for k in row) for row in value["kept"]),
        seconds=tuple(tuple(float(s) for s in row) for row in value["seconds"]),
    )


def _layer_inputs(model: tf.keras.Model, x: np.ndarray) -> list[np.ndarray]:
  """What each prunable layer receives when the model runs on `x`."""
  prunable = keras_models.prunable_layers(model)
  probe = tf.keras.Model(model.inputs, [layer.input for layer in prunable])
  outputs = probe(x, training=False)
  if not isinstance(outputs, (list, tuple)):
    outputs = [outputs]
  return [np.asarray(o) for o in outputs]


def _narrower(layer, density: float):
  """A fresh layer like `layer` with `density` of its output units."""
  config = dict(layer.get_config())
  key = "filters" if "filters" in config else "units"
  config[key] = max(1, int(round(density * config[key])))
  config["name"] = f"{layer.name}_cost_{config[key]}"
  return type(layer).from_config(config)


def _median_step_seconds(layer, x, repeats: int) -> float:
  @tf.function(autograph=False)
  def step(inp):
    with tf.GradientTape() as tape:
      tape.watch(inp)
      out = tf.reduce_sum(layer(inp))
    return tape.gradient(out, [layer.kernel, inp])

  for _ in range(2):
    step(x)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    grads = step(x)
    grads[0].numpy()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure_layer_costs(
    keras_fn: Callable[[], tf.keras.Model],
    x: np.ndarray,
    densities: Sequence[float] = COST_DENSITIES,
    repeats: int = 30,
) -> LayerCosts:
  """Times each prunable layer's forward and backward pass on the batch `x`.

  For every layer and density, a layer of the same kind with that share of
  the output units runs one traced step on the layer's real inputs (the
  output's sum, differentiated with respect to the kernel and the input);
  the median of `repeats` timed steps (after two untimed ones) is recorded.
  """
  model = keras_fn()
  inputs = _layer_inputs(model, x)
  names, sizes, kept_rows, seconds = [], [], [], []
  for layer, layer_x in zip(keras_models.prunable_layers(model), inputs):
    layer_x = tf.constant(layer_x)
    kept, row = [], []
    for density in densities:
      timed = _narrower(layer, density)
      timed.build(layer_x.shape)
      kept.append(int(np.prod(timed.kernel.shape)))
      row.append(_median_step_seconds(timed, layer_x, repeats))
    names.append(layer.name)
    sizes.append(int(np.prod(layer.kernel.shape)))
    kept_rows.append(tuple(kept))
    seconds.append(tuple(row))
  return LayerCosts(
      tuple(names), tuple(sizes), int(x.shape[0]), tuple(float(d) for d in densities),
      tuple(kept_rows), tuple(seconds),
  )


def scores(gradients: Sequence[np.ndarray], per_weight: Sequence[float]) -> list[np.ndarray]:
  """g_j^2 / t_j of every kernel weight (float64)."""
  return [
      np.square(np.asarray(g, np.float64)) / float(t) for g, t in zip(gradients, per_weight)
  ]


def select_masks(
    gradients: Sequence[np.ndarray], per_weight: Sequence[float], total: int
) -> list[np.ndarray]:
  """PruneFL's masks: the `total` weights of the network with the largest
  g^2 / t; ties go to the lower position (layers in order, each flattened)."""
  per_layer = scores(gradients, per_weight)
  flat = np.concatenate([s.ravel() for s in per_layer])
  if not 0 <= total <= flat.size:
    raise ValueError(f"cannot keep {total} of {flat.size} weights")
  keep = np.zeros(flat.size, np.float32)
  keep[np.argsort(-flat, kind="stable")[:total]] = 1.0
  masks, start = [], 0
  for s in per_layer:
    masks.append(keep[start : start + s.size].reshape(s.shape))
    start += s.size
  return masks


def initial_client(fed_data, seed: int) -> str:
  """The client that prunes first, drawn with the run's seed."""
  population = list(fed_data.nonempty_train_client_ids)
  rng = np.random.default_rng(rounds.seed(seed, 8))
  return population[int(rng.integers(len(population)))]


def _train_step_fn(model: tf.keras.Model, optimizer):
  loss_fn = sparse_model.keras_loss()
  variables = model.trainable_variables

  @tf.function(reduce_retracing=True, autograph=False)
  def step(opt_state, x, y):
    with tf.GradientTape() as tape:
      loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, variables)
    opt_state, new_weights = optimizer.next(opt_state, tuple(variables), tuple(grads))
    for v, w in zip(variables, new_weights):
      v.assign(w)
    return opt_state

  return step


def local_round(model: tf.keras.Model, optimizer, dataset, step=None) -> int:
  """One local round of a client on `dataset` (its E epochs of batches),
  from a fresh optimizer state, as the clients' work does; the model's
  weights are updated. Returns the number of steps. `step`: a traced step
  of `_train_step_fn` to reuse across rounds."""
  variables = model.trainable_variables
  step = step or _train_step_fn(model, optimizer)
  opt_state = tf.nest.map_structure(
      tf.convert_to_tensor,
      optimizer.initialize(tuple(tf.TensorSpec(v.shape, v.dtype) for v in variables)),
  )
  steps = 0
  for batch in dataset:
    opt_state = step(opt_state, batch["x"], batch["y"])
    steps += 1
  return steps


def mean_gradient(model: tf.keras.Model, dataset, kernel_slots: Sequence[int]) -> list:
  """The gradient of the mean task loss over `dataset` (one epoch) at the
  model's weights, for the kernels at `kernel_slots` of its trainable
  variables (float64 sums); what each client sends in a re-selection round
  (`client_work.mean_kernel_gradients`)."""
  loss_fn = sparse_model.summed_loss()
  kernels = [model.trainable_variables[i] for i in kernel_slots]

  @tf.function(reduce_retracing=True, autograph=False)
  def batch_gradient(x, y):
    with tf.GradientTape() as tape:
      loss = loss_fn(y, model(x, training=False))
    return tape.gradient(loss, kernels)

  sums = [np.zeros(k.shape, np.float64) for k in kernels]
  count = 0
  for batch in dataset:
    for s, g in zip(sums, batch_gradient(batch["x"], batch["y"])):
      s += g.numpy()
    count += int(batch["y"].shape[0])
  return [s / max(count, 1) for s in sums]


@dataclasses.dataclass(frozen=True)
class InitialPruning:
  """The initial pruning's result: the process's first global model."""

  client_id: str
  trained: list  # the client's trained dense trainable weights (numpy)
  gradients: list  # the mean kernel gradients over its data at `trained`
  masks: list
  steps: int


def prune_on_one_client(
    keras_fn, seed: int, fed_data, layout, optimizer, local_rounds: int,
    batch_size: int, local_epochs: int, per_weight: Sequence[float],
) -> InitialPruning:
  """PruneFL's initial pruning: one seeded client trains the dense model at
  the run's initial weights for `local_rounds` local rounds (E epochs each,
  its data reshuffled each round), then keeps the network's budget of
  weights by g^2 / t, g the mean gradient of its loss over its data at the
  trained weights."""
  client_id = initial_client(fed_data, seed)
  tf.keras.utils.set_random_seed(seed)
  model = keras_fn()
  kernel_slots = [
      i for i, v in enumerate(model.trainable_variables)
      if any(v is layer.kernel for layer in keras_models.prunable_layers(model))
  ]
  steps, step = 0, _train_step_fn(model, optimizer)
  for r in range(local_rounds):
    dataset = rounds.client_dataset(
        fed_data, client_id, batch_size, rounds.seed(seed, 9, r), local_epochs
    )
    steps += local_round(model, optimizer, dataset, step)
  one_epoch = rounds.client_dataset(fed_data, client_id, batch_size, rounds.seed(seed, 9), 1)
  gradients = mean_gradient(model, one_epoch, kernel_slots)
  masks = select_masks(gradients, per_weight, layout.num_kept)
  trained = [v.numpy() for v in model.trainable_variables]
  return InitialPruning(client_id, trained, gradients, masks, steps)


def initial_weights(keras_fn, seed: int, layout, pruning: InitialPruning):
  """The process's initial ModelWeights: the client's trained weights under its masks."""
  base = sparse_model.initial_model_weights(
      keras_fn, seed, layout, masks_fn=lambda _: pruning.masks
  )
  trainable = [np.array(w, np.float32) for w in pruning.trained]
  for slot, mask in enumerate(pruning.masks):
    trainable[layout.kernel_index[slot]] = trainable[layout.kernel_index[slot]] * mask
  return type(base)(trainable=trainable, non_trainable=base.non_trainable)


def write_costs(path: str, costs: LayerCosts) -> None:
  from tff_feddst import files  # pylint: disable=g-import-not-at-top

  files.write_atomic(path, json.dumps(costs.to_json(), indent=1))


# --------------------------------------------------------------- the process


def is_reselection_round(round_num, rounds_between: int, end_round: int):
  """PruneFL re-selects the mask in rounds Delta_R, 2 Delta_R, ... up to R_end."""
  return tf.logical_and(
      tf.equal(round_num % rounds_between, 0), round_num <= end_round
  )


def _client_update_tf(model_fn, layout, optimizer, local_epochs: int, weights_type, data_type):
  """One client's computation: (weights, data, reselect) -> (ClientResult,
  train metrics, statistics)."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from tff_feddst import client_work as cw  # pylint: disable=g-import-not-at-top

  @tff.tensorflow.computation(weights_type, data_type, np.int32)
  def client_update_tf(initial_weights, dataset, reselect):
    model = model_fn()
    loss_fn = sparse_model.summed_loss()
    kernel_index = layout.kernel_index
    slot_of = layout.mask_slot()

    @tf.function(autograph=False)  # explicit control flow (tf.cond)
    def update(initial_weights, dataset, reselect):
      dataset = cw.without_autotune(dataset)
      trainable, mask_vars, initial_masks, num_examples = cw.train_under_mask(
          model, layout, optimizer, initial_weights, dataset, local_epochs, 0.0
      )
      gradients = list(tf.cond(
          reselect > 0,
          lambda: tuple(cw.mean_kernel_gradients(
              model, loss_fn, trainable, kernel_index, dataset, num_examples, local_epochs
          )),
          lambda: tuple(tf.zeros_like(trainable[i]) for i in kernel_index),
      ))
      result, metrics, stats = cw._client_outputs(  # pylint: disable=protected-access
          model, trainable, mask_vars, initial_masks, slot_of, num_examples, tf.float32,
      )
      body = collections.OrderedDict(result.update)
      body["gradients"] = gradients
      stats = collections.OrderedDict(stats)
      stats["gradients_uploaded"] = tf.cast(reselect > 0, tf.int32)
      result = tff.learning.templates.ClientResult(update=body, update_weight=result.update_weight)
      return result, metrics, stats

    return update(initial_weights, dataset, reselect)

  return client_update_tf


def build_client_work(
    model_fn, layout, optimizer, *, local_epochs: int, rounds_between: int, end_round: int,
):
  """PruneFL's clients: masked training under the global mask (RandomMask's
  client work); in re-selection rounds each client also sends the mean
  gradient of its task loss over its local data at its trained weights
  (dense, every kernel position). The update is OrderedDict(values, masks,
  gradients); TFF's types are static, so outside re-selection rounds the
  gradients are zeros and the ledger does not count them."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from tff_feddst import client_work as cw  # pylint: disable=g-import-not-at-top

  metrics_aggregation_fn, weights_type, data_type = cw.model_types(model_fn)
  init_tf, advance = cw.round_counter()
  state_type = init_tf.type_signature.result

  @tff.tensorflow.computation(state_type)
  def plan_round(state):
    r = state["round_num"]
    return collections.OrderedDict(
        round_num=r,
        reselect=tf.cast(is_reselection_round(r, rounds_between, end_round), tf.int32),
    )

  update_tf = _client_update_tf(model_fn, layout, optimizer, local_epochs, weights_type, data_type)
  return cw.scheduled_client_work(
      (init_tf, plan_round, advance), update_tf, weights_type, data_type,
      metrics_aggregation_fn, broadcast="reselect",
  )


def build_aggregator(value_type, weight_type, min_votes: int = 1):
  """The voting average of (values, masks), as FedDST's, and the checked
  example-weighted mean of the clients' gradients. Measurements: the
  voting's."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from tff_feddst import aggregation  # pylint: disable=g-import-not-at-top

  sparse_type = tff.StructType([("values", value_type.values), ("masks", value_type.masks)])
  gradients_type = value_type.gradients
  voting = aggregation.SparseVotingFactory(min_votes).create(sparse_type, weight_type)
  mean = aggregation.ValidatingMeanFactory(
      tff.aggregators.MeanFactory(no_nan_division=True)
  ).create(gradients_type, weight_type)

  @tff.tensorflow.computation(value_type)
  def split(value):
    return (
        collections.OrderedDict(values=value["values"], masks=value["masks"]),
        value["gradients"],
    )

  result_type = voting.next.type_signature.result.result.member

  @tff.tensorflow.computation(result_type, gradients_type)
  def join(voted, gradients):
    return collections.OrderedDict(
        values=voted["values"], masks=voted["masks"], gradients=gradients
    )

  @tff.federated_computation
  def init_fn():
    return tff.federated_zip(
        collections.OrderedDict(voting=voting.initialize(), mean=mean.initialize())
    )

  @tff.federated_computation(
      init_fn.type_signature.result,
      tff.FederatedType(value_type, tff.CLIENTS),
      tff.FederatedType(weight_type, tff.CLIENTS),
  )
  def next_fn(state, value, weight):
    sparse, gradients = tff.federated_map(split, value)
    voted = voting.next(state.voting, sparse, weight)
    averaged = mean.next(state.mean, gradients, weight)
    new_state = tff.federated_zip(
        collections.OrderedDict(voting=voted.state, mean=averaged.state)
    )
    result = tff.federated_map(join, (voted.result, averaged.result))
    return tff.templates.MeasuredProcessOutput(new_state, result, voted.measurements)

  return tff.templates.AggregationProcess(init_fn, next_fn)


def reselect_masks_tf(gradients, per_weight: Sequence[float], total: int):
  """`select_masks` in TensorFlow (float64 scores, the same order: top_k puts
  the lower index first among equal values)."""
  flat = tf.concat(
      [
          tf.reshape(tf.square(tf.cast(g, tf.float64)) / tf.constant(float(t), tf.float64), [-1])
          for g, t in zip(gradients, per_weight)
      ],
      axis=0,
  )
  _, kept = tf.math.top_k(flat, k=total, sorted=True)
  keep = tf.scatter_nd(
      tf.expand_dims(kept, 1), tf.ones([total], tf.float32), tf.shape(flat, out_type=tf.int32)
  )
  masks, start = [], 0
  for g in gradients:
    size = int(np.prod(g.shape))
    masks.append(tf.reshape(keep[start : start + size], g.shape))
    start += size
  return masks


def build_finalizer(
    weights_type, update_type, layout, per_weight: Sequence[float], total: int,
    rounds_between: int, end_round: int,
):
  """PruneFL's server step: the voted average under the global mask; in a
  re-selection round, the mask of the `total` largest g^2 / t of the
  averaged gradients instead (weights leaving it set to 0, joining it at
  0). Measurements: mask_changed."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from tff_feddst import client_work as cw  # pylint: disable=g-import-not-at-top
  from tff_feddst import finalizer as finalizer_lib  # pylint: disable=g-import-not-at-top

  init_tf, _ = cw.round_counter()
  state_type = init_tf.type_signature.result

  @tff.tensorflow.computation(state_type, weights_type, update_type)
  def next_tf(state, weights, update):
    values = list(update["values"])
    old_masks = [weights.non_trainable[i] for i in layout.mask_index]
    reselect = is_reselection_round(state["round_num"], rounds_between, end_round)
    chosen = reselect_masks_tf(list(update["gradients"]), per_weight, total)
    new_masks = [tf.where(reselect, c, m) for c, m in zip(chosen, old_masks)]
    for slot, i in enumerate(layout.kernel_index):
      values[i] = values[i] * new_masks[slot]
    non_trainable = list(weights.non_trainable)
    for slot, i in enumerate(layout.mask_index):
      non_trainable[i] = new_masks[slot]
    changed = tf.reduce_any(
        [tf.reduce_any(tf.not_equal(a, b)) for a, b in zip(new_masks, old_masks)]
    )
    return (
        collections.OrderedDict(round_num=state["round_num"] + 1),
        tff.learning.models.ModelWeights(values, non_trainable),
        collections.OrderedDict(mask_changed=tf.cast(changed, tf.int32)),
    )

  return finalizer_lib.server_step_finalizer(init_tf, next_tf, weights_type, update_type)


def build_process(
    model_fn, layout, initial_weights, client_optimizer, *, per_weight: Sequence[float],
    local_epochs: int, rounds_between: int, end_round: int, min_votes: int = 1,
):
  """PruneFL as a TFF LearningProcess: broadcast, `build_client_work`,
  `build_aggregator`, `build_finalizer` (docs/algorithms.md section 4.2)."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from tff_feddst import feddst  # pylint: disable=g-import-not-at-top

  if rounds_between < 1:
    raise ValueError("rounds_between_readjustments must be >= 1")
  if len(per_weight) != len(layout.kernel_index):
    raise ValueError(f"{len(per_weight)} costs for {len(layout.kernel_index)} layers")
  client_work = build_client_work(
      model_fn, layout, client_optimizer, local_epochs=local_epochs,
      rounds_between=rounds_between, end_round=end_round,
  )
  weights_type = client_work.next.type_signature.parameter[1].member
  result_type = client_work.next.type_signature.result.result.member
  aggregator = build_aggregator(result_type.update, result_type.update_weight, min_votes)
  update_type = aggregator.next.type_signature.result.result.member
  finalizer = build_finalizer(
      weights_type, update_type, layout, per_weight, layout.num_kept, rounds_between, end_round,
  )
  return tff.learning.templates.compose_learning_process(
      feddst.constant_weights_fn(initial_weights),
      tff.learning.templates.build_broadcast_process(weights_type),
      client_work,
      aggregator,
      finalizer,
  )


# ----------------------------------------------------------------- the phase

COSTS_FILE = "prunefl_costs.json"


def read_costs(path: str) -> LayerCosts:
  """A costs file (`LayerCosts.to_json`); ConfigError (one line) if unreadable."""
  from tff_feddst.config import ConfigError  # pylint: disable=g-import-not-at-top

  try:
    with open(path) as f:
      return LayerCosts.from_json(json.load(f))
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"cannot read PruneFL costs {path}: {e}") from None


def run_costs(config, fed_data, keras_fn, log) -> LayerCosts:
  """The run's layer costs: its output directory's file (a resumed run),
  else `--prunefl_costs`, else measured here on a seeded batch of training
  images; written to the output directory before the first round."""
  path = os.path.join(config.output_dir, COSTS_FILE)
  if os.path.exists(path):
    return read_costs(path)
  if config.prunefl_costs:
    costs = read_costs(config.prunefl_costs)
    source = config.prunefl_costs
  else:
    x_train = fed_data.arrays.x_train
    rng = np.random.default_rng(rounds.seed(config.seed, 10))
    x = x_train[rng.choice(len(x_train), min(config.batch_size, len(x_train)), replace=False)]
    costs = measure_layer_costs(keras_fn, np.asarray(x, np.float32))
    source = "measured on this machine"
  names = tuple(layer.name for layer in keras_models.prunable_layers(keras_fn()))
  if costs.layer_names != names:
    from tff_feddst.config import ConfigError  # pylint: disable=g-import-not-at-top

    raise ConfigError(
        f"PruneFL costs {config.prunefl_costs} are for layers {list(costs.layer_names)}, "
        f"the model has {list(names)}"
    )
  write_costs(path, costs)
  log(
      "PruneFL costs per kept weight (" + source + "): "
      + ", ".join(f"{n} {t:.3g} s" for n, t in zip(costs.layer_names, costs.per_weight))
  )
  return costs


class PruneFLPhase(phases.Phase):
  """PruneFL's phase: its process at this run's layer costs, starting from
  the initial pruning on one seeded client (computed here, before the first
  round; a resumed run restores its state instead)."""

  def __init__(self, number, spec, config, context, **kwargs):
    self.costs = run_costs(
        config, context.fed_data,
        functools.partial(
            keras_models.build_model, config.model_name, context.fed_data.input_shape,
            context.fed_data.num_classes,
        ),
        context.log,
    )
    super().__init__(number, spec, config, context, **kwargs)
    from tff_feddst import builders  # pylint: disable=g-import-not-at-top

    algorithm_config = config.algorithm_config(spec.name)
    self.initial_pruning = prune_on_one_client(
        self.keras_fn, config.seed, context.fed_data, self.built.layout,
        builders.build_client_optimizer(algorithm_config), config.prunefl_initial_rounds,
        config.batch_size, config.local_epochs, self.costs.per_weight,
    )
    self.built.initial_weights = initial_weights(
        self.keras_fn, config.seed, self.built.layout, self.initial_pruning
    )

  def build_process(self, spec, algorithm_config, context):
    return phases.build_algorithm(
        spec, algorithm_config, self.keras_fn, context.input_spec,
        per_weight=tuple(self.costs.per_weight),
    )

  def summary(self) -> dict:
    from tff_feddst import costs as costs_lib  # pylint: disable=g-import-not-at-top

    out = super().summary()
    pruning, size = self.initial_pruning, self.built.model_size
    out["prunefl"] = {
        "initial_client": pruning.client_id,
        "initial_rounds": self.config.prunefl_initial_rounds,
        "initial_layer_kept": dict(
            zip(self.built.layout.layer_names, [int(m.sum()) for m in pruning.masks])
        ),
        # The first client's upload of its pruned model (values, biases and
        # mask), before round 1 and outside the rounds' ledger.
        "initial_upload_bits": costs_lib.sparse_message_bits(
            size, self.built.layout.num_kept, True
        ),
        "per_weight_seconds": dict(zip(self.costs.layer_names, self.costs.per_weight)),
    }
    return out
