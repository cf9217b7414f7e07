"""FedDST server step: re-prune the voted average to the budget.

docs/algorithms.md section 3.2, step 6. Per layer, the aggregated mask m' (votes
> 0) can hold more ones than the budget; keep the budget_l positions of
largest |theta'| among m'. That is m^{r+1}, and theta^{r+1} = theta' *
m^{r+1}. With a server optimizer (FedAvgM on top of FedDST), theta^r -
theta^{r+1} is a pseudo-gradient for server SGD with momentum, after which
the result is masked again. A round in which no client contributed (every
update rejected) is not this block's concern: the driver keeps the previous
state whole then (`rounds.RoundStep.run_clients`), for every algorithm.

Options of the public experiment code (docs/algorithms.md section 3.6):
gradual sparsification (`budget_table`: the state counts rounds, and round
r re-prunes to the budgets of round r + 1) and `remember_old` (a position of
the previous global mask that no client voted for keeps its previous value
instead of 0, and competes in the re-prune).
"""

import collections

import tensorflow as tf
import tensorflow_federated as tff

from tff_feddst import client_work as client_work_lib
from tff_feddst import compact_voting
from tff_feddst import masks as masks_lib
from tff_feddst.sparse_model import SparseLayout


# The vote share given to a remembered position: positive (it stays in the
# aggregated mask) and below every real share (at least 1e-12), so it loses
# ties in the re-prune to positions that clients voted for.
REMEMBERED_SHARE = 1e-13


def remember_unvoted(weights, values, voted, layout: SparseLayout):
  """--remember_old: positions of the previous global mask without votes
  keep their previous value. Returns (values, vote shares) of the kernels."""
  values, voted = list(values), list(voted)
  for slot, i in enumerate(layout.kernel_index):
    old_mask = weights.non_trainable[layout.mask_index[slot]]
    forgotten = tf.logical_and(voted[i] <= 0.0, old_mask > 0.0)
    values[i] = tf.where(forgotten, weights.trainable[i], values[i])
    voted[i] = tf.where(forgotten, tf.constant(REMEMBERED_SHARE, voted[i].dtype), voted[i])
  return values, voted


def _server_step(server_optimizer, optimizer_state, old, values, new_masks, layout):
  """(optimizer state, weights): the re-pruned average as is (no optimizer),
  or the optimizer's step towards it, kept inside the new masks."""
  if server_optimizer is None:
    return optimizer_state, values
  pseudo_gradient = tuple(w - v for w, v in zip(old, values))
  new_state, new_values = server_optimizer.next(optimizer_state, tuple(old), pseudo_gradient)
  new_values = list(new_values)
  for slot, i in enumerate(layout.kernel_index):
    new_values[i] = new_values[i] * new_masks[slot]
  return new_state, new_values


def _repruned(values, voted, budgets, layout):
  """(values, masks): per kernel the budget's positions of largest |v|
  among the voted ones (`masks.keep_top_k`), the values kept there."""
  values, new_masks = list(values), []
  for slot, i in enumerate(layout.kernel_index):
    mask = masks_lib.keep_top_k(values[i], voted[i], budgets[slot], layout.rows(slot))
    values[i] = values[i] * mask
    new_masks.append(mask)
  return values, new_masks


def _with_masks(weights, new_masks, layout):
  """(non_trainable weights holding `new_masks`, whether any mask changed)."""
  non_trainable = list(weights.non_trainable)
  changed = []
  for slot, i in enumerate(layout.mask_index):
    changed.append(tf.reduce_any(tf.not_equal(non_trainable[i], new_masks[slot])))
    non_trainable[i] = new_masks[slot]
  return non_trainable, tf.reduce_any(changed)


def build_sparse_finalizer(
    weights_type,
    update_type,
    layout: SparseLayout,
    server_optimizer: tff.learning.optimizers.Optimizer | None = None,
    budget_table=None,
    remember_old: bool = False,
    min_votes: int | None = None,
) -> tff.learning.templates.FinalizerProcess:
  """A `FinalizerProcess` re-pruning to `layout.budgets`.

  `budget_table` (`masks.budget_table`, rows in layout order): round r
  re-prunes to row r (the budgets of round r + 1); the state is then
  OrderedDict(optimizer=..., round_num=...). `remember_old`: see
  `remember_unvoted`. `min_votes`: the update is the sums of compact
  uploads (`compact_voting.CompactVotingFactory`), which this step
  finishes into the voting average against the global masks
  (`compact_voting.finish_with_global_masks`); the voting statistics are
  then among its measurements (`voting`).
  """
  trainable_specs = tff.types.type_to_tf_tensor_specs(weights_type.trainable)
  scheduled = budget_table is not None

  def optimizer_init():
    if server_optimizer is None:
      return collections.OrderedDict()
    return server_optimizer.initialize(tuple(trainable_specs))

  @tff.tensorflow.computation
  def init_tf():
    if scheduled:
      return collections.OrderedDict(
          optimizer=optimizer_init(), round_num=tf.constant(1, tf.int32)
      )
    return optimizer_init()

  state_type = init_tf.type_signature.result

  @tff.tensorflow.computation(state_type, weights_type, update_type)
  def next_tf(state, weights, update):
    voting = None
    if min_votes is not None:
      global_masks = [weights.non_trainable[i] for i in layout.mask_index]
      update, voting = compact_voting.finish_with_global_masks(
          update, global_masks, layout, min_votes
      )
    values, voted = list(update["values"]), list(update["masks"])
    if remember_old:
      values, voted = remember_unvoted(weights, values, voted, layout)
    budgets = list(layout.budgets)
    if scheduled:
      # Round r prepares round r + 1.
      row = client_work_lib.round_budgets(budget_table, state["round_num"] + 1)
      budgets = [row[slot] for slot in range(len(layout.budgets))]
    values, new_masks = _repruned(values, voted, budgets, layout)
    new_state, new_values = _server_step(
        server_optimizer, state["optimizer"] if scheduled else state,
        list(weights.trainable), values, new_masks, layout,
    )
    non_trainable, mask_changed = _with_masks(weights, new_masks, layout)
    measurements = collections.OrderedDict(
        mask_changed=tf.cast(mask_changed, tf.int32),
    )
    if voting is not None:
      measurements["voting"] = voting
    if scheduled:
      new_state = collections.OrderedDict(
          optimizer=new_state, round_num=state["round_num"] + 1
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
