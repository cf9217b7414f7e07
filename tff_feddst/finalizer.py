"""FedDST server step: re-prune the voted average to the budget.

docs/algorithms.md section 3.2, step 6. Per layer, the aggregated mask m' (votes
> 0) can hold more ones than the budget; keep the budget_l positions of
largest |theta'| among m'. That is m^{r+1}, and theta^{r+1} = theta' *
m^{r+1}. With a server optimizer (FedAvgM on top of FedDST), theta^r -
theta^{r+1} is a pseudo-gradient for server SGD with momentum, after which
the result is masked again. A round in which no client contributed (every
update rejected) is not this block's concern: the driver keeps the previous
state whole then (`rounds.RoundStep.run_clients`), for every algorithm.
"""

import collections

import tensorflow as tf
import tensorflow_federated as tff

from tff_feddst import masks as masks_lib
from tff_feddst.sparse_model import SparseLayout


def build_sparse_finalizer(
    weights_type,
    update_type,
    layout: SparseLayout,
    server_optimizer: tff.learning.optimizers.Optimizer | None = None,
) -> tff.learning.templates.FinalizerProcess:
  """A `FinalizerProcess` re-pruning to `layout.budgets`."""
  trainable_specs = tff.types.type_to_tf_tensor_specs(weights_type.trainable)

  @tff.tensorflow.computation
  def init_tf():
    if server_optimizer is None:
      return collections.OrderedDict()
    return server_optimizer.initialize(tuple(trainable_specs))

  state_type = init_tf.type_signature.result

  @tff.tensorflow.computation(state_type, weights_type, update_type)
  def next_tf(state, weights, update):
    values, voted = list(update["values"]), update["masks"]
    new_masks = []
    for slot, i in enumerate(layout.kernel_index):
      mask = masks_lib.keep_top_k(values[i], voted[i], layout.budgets[slot])
      values[i] = values[i] * mask
      new_masks.append(mask)
    old = list(weights.trainable)
    if server_optimizer is None:
      new_state, new_values = state, values
    else:
      pseudo_gradient = tuple(w - v for w, v in zip(old, values))
      new_state, new_values = server_optimizer.next(
          state, tuple(old), pseudo_gradient
      )
      new_values = list(new_values)
      for slot, i in enumerate(layout.kernel_index):
        new_values[i] = new_values[i] * new_masks[slot]
    non_trainable = list(weights.non_trainable)
    old_masks = [non_trainable[i] for i in layout.mask_index]
    for slot, i in enumerate(layout.mask_index):
      non_trainable[i] = new_masks[slot]
    mask_changed = tf.reduce_any(
        [
            tf.reduce_any(tf.not_equal(non_trainable[i], m))
            for i, m in zip(layout.mask_index, old_masks)
        ]
    )
    measurements = collections.OrderedDict(
        mask_changed=tf.cast(mask_changed, tf.int32),
    )
    return (
        new_state,
        tff.learning.models.ModelWeights(new_values, non_trainable),
        measurements,
    )

  return server_step_finalizer(init_tf, next_tf, weights_type, update_type)


def server_step_finalizer(
    init_tf, next_tf, weights_type, update_type
) -> tff.learning.templates.FinalizerProcess:
  """A `FinalizerProcess` running `next_tf(state, weights, update)` on the server.

  `init_tf` returns the state; `next_tf` returns (state, ModelWeights,
  measurements).
  """

  @tff.federated_computation
  def init_fn():
    return tff.federated_eval(init_tf, tff.SERVER)

  @tff.federated_computation(
      init_fn.type_signature.result,
      tff.FederatedType(weights_type, tff.SERVER),
      tff.FederatedType(update_type, tff.SERVER),
  )
  def next_fn(state, weights, update):
    new_state, new_weights, measurements = tff.federated_map(
        next_tf, (state, weights, update)
    )
    return tff.templates.MeasuredProcessOutput(new_state, new_weights, measurements)

  return tff.learning.templates.FinalizerProcess(init_fn, next_fn)
