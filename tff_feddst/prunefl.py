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
- g is the mean of the minibatch gradients of one local round (E epochs)
  of the client's training: of the one client in the initial pruning, of the
  round's clients (example-weighted) in a re-selection round.
- The network keeps a fixed total: the sum of the layers' budgets at the
  target sparsity (ERK or `--sparsity_distribution`), so that PruneFL
  uploads as much as FedDST and RandomMask at the same S; which layer keeps
  how many is PruneFL's choice. Ties go to the lower position in the
  network's order (layers in model order, each flattened).
"""

import dataclasses
import json
import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

import keras_models
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
  @tf.function
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

  @tf.function
  def step(opt_state, x, y):
    with tf.GradientTape() as tape:
      loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, variables)
    opt_state, new_weights = optimizer.next(opt_state, tuple(variables), tuple(grads))
    for v, w in zip(variables, new_weights):
      v.assign(w)
    return opt_state, grads, loss

  return step


def local_round(model: tf.keras.Model, optimizer, dataset, kernel_slots: Sequence[int]):
  """One local round of a client on `dataset` (its E epochs of batches),
  from a fresh optimizer state, as the clients' work does.

  Returns (the mean over the round's steps of the kernels' minibatch
  gradients, the number of steps). The model's weights are updated.
  """
  variables = model.trainable_variables
  step = _train_step_fn(model, optimizer)
  opt_state = optimizer.initialize(tuple(tf.TensorSpec(v.shape, v.dtype) for v in variables))
  sums = [np.zeros(variables[i].shape, np.float64) for i in kernel_slots]
  steps = 0
  for batch in dataset:
    opt_state, grads, _ = step(opt_state, batch["x"], batch["y"])
    for s, i in zip(sums, kernel_slots):
      s += grads[i].numpy()
    steps += 1
  return [s / max(steps, 1) for s in sums], steps


@dataclasses.dataclass(frozen=True)
class InitialPruning:
  """The initial pruning's result: the process's first global model."""

  client_id: str
  trained: list  # the client's trained dense trainable weights (numpy)
  gradients: list  # the last local round's mean kernel gradients
  masks: list
  steps: int


def prune_on_one_client(
    keras_fn, seed: int, fed_data, layout, optimizer, local_rounds: int,
    batch_size: int, local_epochs: int, per_weight: Sequence[float],
) -> InitialPruning:
  """PruneFL's initial pruning: one seeded client trains the dense model at
  the run's initial weights for `local_rounds` local rounds (E epochs each),
  then keeps the network's budget of weights by g^2 / t, g the mean
  gradient of its last local round."""
  client_id = initial_client(fed_data, seed)
  tf.keras.utils.set_random_seed(seed)
  model = keras_fn()
  kernel_slots = [
      i for i, v in enumerate(model.trainable_variables)
      if any(v is layer.kernel for layer in keras_models.prunable_layers(model))
  ]
  gradients, steps = None, 0
  for r in range(local_rounds):
    dataset = rounds.client_dataset(
        fed_data, client_id, batch_size, rounds.seed(seed, 9, r), local_epochs
    )
    gradients, steps = local_round(model, optimizer, dataset, kernel_slots)
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
