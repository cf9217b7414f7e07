"""Pruning at initialisation: SNIP and GraSP masks (docs/algorithms.md section 4.1).

SNIP and GraSP are RandomMask with another initial mask. Before the
process's first round, outside TFF, the plain Keras network at its seeded
initial weights scores every kernel weight on one mini-batch of one client's
training data (the client drawn with the run's seed, the batch the first of
its shuffled data); each layer then keeps its budget (ERK or
`--sparsity_distribution`, as every sparse algorithm) of best-scoring
positions, and that mask stays fixed. Ties go to the lower flat index.

- SNIP: score |g_j * w_j|, g the gradient of the loss on the batch; the
  largest scores are kept.
- GraSP: score -w_j * (H g)_j, H the Hessian of the loss with respect to the
  kernels and g its gradient (a Hessian-vector product of nested gradient
  tapes), with the logits divided by a temperature of 200 as in GraSP's and
  the FedDST reference code's GraSP; the smallest scores are kept (GraSP
  removes the weights of largest score, whose removal reduces the gradient
  flow least), which is keeping the largest w_j * (H g)_j.
"""

import dataclasses
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

import keras_models
from tff_feddst import phases
from tff_feddst import rounds
from tff_feddst import sparse_model

# GraSP's temperature: the logits are divided by it before the loss.
GRASP_TEMPERATURE = 200.0


def prunable_kernels(model: tf.keras.Model) -> list[tf.Variable]:
  """The kernels of the Conv2D and Dense layers, in model order."""
  return [layer.kernel for layer in model.layers if keras_models.is_prunable(layer)]


def _loss(model, x, y, temperature: float = 1.0):
  """Mean cross-entropy of the logits / temperature."""
  logits = model(x, training=False) / temperature
  return tf.reduce_mean(
      tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int32), logits=logits)
  )


def snip_scores(model: tf.keras.Model, x, y) -> list[np.ndarray]:
  """|g * w| of every kernel weight, g the gradient of the batch's mean loss."""
  kernels = prunable_kernels(model)
  with tf.GradientTape() as tape:
    loss = _loss(model, x, y)
  grads = tape.gradient(loss, kernels)
  return [np.abs(g.numpy() * w.numpy()) for g, w in zip(grads, kernels)]


def grasp_scores(
    model: tf.keras.Model, x, y, temperature: float = GRASP_TEMPERATURE
) -> list[np.ndarray]:
  """-w * (H g) of every kernel weight (H, g: Hessian and gradient of the loss)."""
  kernels = prunable_kernels(model)
  with tf.GradientTape() as outer:
    with tf.GradientTape() as inner:
      loss = _loss(model, x, y, temperature)
    grads = inner.gradient(loss, kernels)
    # d/dw of g(w) . stop(g) is H g.
    flow = tf.add_n([tf.reduce_sum(g * tf.stop_gradient(g)) for g in grads])
  hessian_grads = outer.gradient(flow, kernels)
  return [-(w.numpy() * hg.numpy()) for w, hg in zip(kernels, hessian_grads)]


def best_mask(scores: np.ndarray, k: int, largest: bool) -> np.ndarray:
  """A float32 mask of the k largest (or smallest) scores; ties: lowest flat index."""
  flat = np.asarray(scores, np.float64).ravel()
  order = np.argsort(-flat if largest else flat, kind="stable")
  mask = np.zeros(flat.shape, np.float32)
  mask[order[:k]] = 1.0
  return mask.reshape(np.shape(scores))


@dataclasses.dataclass(frozen=True)
class Criterion:
  """How to score a network's kernel weights, and which end of the scores to keep."""

  scores: Callable[[tf.keras.Model, np.ndarray, np.ndarray], list[np.ndarray]]
  keep_largest: bool

  def masks(self, model, x, y, budgets: Sequence[int]) -> list[np.ndarray]:
    """Per layer, the mask of its budget of best-scoring positions."""
    scores = self.scores(model, x, y)
    return [best_mask(s, k, self.keep_largest) for s, k in zip(scores, budgets)]


SNIP = Criterion(snip_scores, keep_largest=True)
GRASP = Criterion(grasp_scores, keep_largest=False)


def scoring_batch(fed_data, seed: int, batch_size: int):
  """(client id, x, y): the first batch of one seeded client's shuffled data."""
  population = list(fed_data.nonempty_train_client_ids)
  rng = np.random.default_rng(rounds.seed(seed, 6))
  client_id = population[int(rng.integers(len(population)))]
  dataset = rounds.client_dataset(fed_data, client_id, batch_size, rounds.seed(seed, 7), 1)
  batch = next(iter(dataset.take(1).as_numpy_iterator()))
  return client_id, batch["x"], batch["y"]


def initial_weights(keras_fn, seed: int, layout, criterion: Criterion, x, y):
  """The process's initial weights with the criterion's masks instead of random ones."""

  def choose(model):
    return criterion.masks(model, x, y, layout.budgets)

  return sparse_model.initial_model_weights(keras_fn, seed, layout, masks_fn=choose)


class PrunedAtInitPhase(phases.Phase):
  """The phase of a pruned-at-initialisation algorithm: its process starts
  from the criterion's mask (computed here, before the first round)."""

  def __init__(self, number, spec, config, context, *, criterion: Criterion, **kwargs):
    super().__init__(number, spec, config, context, **kwargs)
    client_id, x, y = scoring_batch(context.fed_data, config.seed, config.batch_size)
    self.scoring_client = client_id
    self.built.initial_weights = initial_weights(
        self.keras_fn, config.seed, self.built.layout, criterion, x, y
    )
