"""LotteryFL's client rule (docs/algorithms.md section 4.3): a client with a
mask of its own prunes by magnitude and resets to the initial weights when
the global model does well enough on its validation data.

Every client k keeps its own mask m_k (all ones before its first round). At
the start of a round in which it is sampled, with the global weights theta
and the run's initial weights theta_0:

- it measures the accuracy of theta * m_k on its validation data (its local
  test set);
- if that accuracy is at least the threshold (`--lotteryfl_accuracy_threshold`)
  and its mask is still above the target budget, it prunes: each layer l
  keeps max(budget_l, |m_k,l| - round(p * |m_k,l|)) of its kept weights, those
  of largest |theta| (ties to the lower flat index), p the prune rate
  (`--lotteryfl_prune_rate`), budget_l the layer's budget at the target
  sparsity (ERK or `--sparsity_distribution`); the kept weights restart
  from theta_0 (the lottery ticket's reset);
- otherwise it starts from theta * m_k.

It then trains under its mask and uploads its weights and (when it
changed) its mask. This module holds the rule in numpy (the reference) and
TensorFlow (`client_start`, which runs inside the client's computation).
"""

from typing import Sequence

import numpy as np
import tensorflow as tf

from tff_feddst import masks as masks_lib


def pruned_counts(kept: Sequence[int], budgets: Sequence[int], prune_rate: float) -> list[int]:
  """Each layer's new count: max(budget, kept - round(prune_rate * kept))."""
  return [
      max(int(b), int(k) - int(np.round(prune_rate * int(k))))
      for k, b in zip(kept, budgets)
  ]


def should_prune(accuracy: float, kept: Sequence[int], budgets: Sequence[int],
                 threshold: float) -> bool:
  """The global model is good enough on the client's data and its mask is
  still above the target budget in some layer."""
  return accuracy >= threshold and any(int(k) > int(b) for k, b in zip(kept, budgets))


def prune_np(weights: np.ndarray, mask: np.ndarray, count: int) -> np.ndarray:
  """The mask of the `count` kept positions of largest |w| (ties: lower index)."""
  flat_w = np.abs(np.asarray(weights, np.float64)).ravel()
  flat_m = np.asarray(mask).ravel() > 0
  order = np.argsort(-np.where(flat_m, flat_w, -1.0), kind="stable")
  new = np.zeros(flat_w.size, np.float32)
  new[order[: min(count, int(flat_m.sum()))]] = 1.0
  return new.reshape(np.shape(mask))


def client_start_np(theta, masks, theta0, kernel_index, accuracy, budgets, threshold,
                    prune_rate):
  """(start weights, masks, pruned) of a client: the numpy reference of
  `client_start`. `theta`, `theta0`: trainable lists; `masks`: per layer."""
  kept = [int(np.sum(m)) for m in masks]
  pruned = should_prune(accuracy, kept, budgets, threshold)
  if pruned:
    counts = pruned_counts(kept, budgets, prune_rate)
    masks = [
        prune_np(np.asarray(theta[i]) * m, m, c)
        for i, m, c in zip(kernel_index, masks, counts)
    ]
  source = theta0 if pruned else theta
  start = [np.array(w, np.float32) for w in source]
  for slot, i in enumerate(kernel_index):
    start[i] = start[i] * masks[slot]
  return start, [np.asarray(m, np.float32) for m in masks], pruned


def client_start(theta, masks, theta0, kernel_index, accuracy, budgets, threshold: float,
                 prune_rate: float):
  """`client_start_np` in TensorFlow (tensors in, tensors out)."""
  kept = [tf.cast(tf.reduce_sum(m), tf.int32) for m in masks]
  above = tf.reduce_any([k > b for k, b in zip(kept, budgets)])
  pruned = tf.logical_and(accuracy >= threshold, above)
  new_masks = []
  for slot, i in enumerate(kernel_index):
    k = tf.cast(kept[slot], tf.float32)
    count = tf.maximum(
        tf.constant(budgets[slot], tf.int32),
        kept[slot] - tf.cast(tf.round(prune_rate * k), tf.int32),
    )
    cut = masks_lib.keep_top_k(theta[i] * masks[slot], masks[slot], count)
    new_masks.append(tf.where(pruned, cut, masks[slot]))
  start = []
  kernel_slot = {i: slot for slot, i in enumerate(kernel_index)}
  for i, (w, w0) in enumerate(zip(theta, theta0)):
    value = tf.where(pruned, w0, w)
    if i in kernel_slot:
      value = value * new_masks[kernel_slot[i]]
    start.append(value)
  return start, new_masks, pruned
