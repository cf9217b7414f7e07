"""FedDST client work: masked local training and mask readjustment.

Each sampled client (docs/algorithms.md section 3.2, steps 2-4):
- loads the global weights and masks (the masks live in the tfmot wrappers'
  `mask` variables, part of `ModelWeights.non_trainable`), with a fresh
  optimizer state;
- trains E local epochs of momentum SGD with weight decay; gradients (and
  the FedProx term) are multiplied by the mask, so masked weights stay exactly
  zero and the momentum never moves them;
- in readjustment rounds, computes the gradient of the task loss (the mean
  over all its local examples, never the proximal term) and, per layer,
  prunes k_l weights by magnitude and regrows k_l by gradient magnitude;
- returns its weights, its masks and its example count.

The round number lives in the client work's server state; the server turns it
into the per-layer counts k_l = round(alpha_r * budget_l) and broadcasts them.
"""

import collections

import numpy as np

import tensorflow as tf
import tensorflow_federated as tff

from tff_feddst import masks as masks_lib
from tff_feddst import messages
from tff_feddst import sparse_model
from tff_feddst.sparse_model import SparseLayout

def without_autotune(dataset: tf.data.Dataset) -> tf.data.Dataset:
  """`dataset` with tf.data's autotuning off.

  Measured here: with it on, about one local-training computation in three
  waited about 2 s with both cores idle; client data sets are small and in
  memory, so there is nothing for it to tune.
  """
  options = tf.data.Options()
  options.autotune.enabled = False
  return dataset.with_options(options)


def _client_stats(mask_changed, active, examples):
  return collections.OrderedDict(
      mask_changed=tf.cast(mask_changed, tf.int32),
      uploaded_values=tf.cast(active, tf.int64),
      clients=tf.constant(1, tf.int32),
      examples=tf.cast(examples, tf.int64),
  )


def run_if(pred, fn) -> tf.Tensor:
  """Runs `fn` (for its effect on variables) where the scalar `pred` holds.

  The clients' TF functions are traced without autograph (its conversion
  took seconds of every build), so their conditionals are explicit.
  """

  def run():
    fn()
    return tf.constant(True)

  return tf.cond(pred, run, lambda: tf.constant(False))


def _train_locally(
    model, optimizer, trainable, mask_vars, slot_of, global_params, dataset,
    local_epochs, prox_mu,
):
  """E epochs of masked local training (FedProx term if prox_mu); examples seen."""

  def mask_gradients(grads):
    return [
        g * mask_vars[slot_of[i]] if i in slot_of else g
        for i, g in enumerate(grads)
    ]

  def train_step(state, batch):
    num_examples, opt_state = state
    with tf.GradientTape() as tape:
      output = model.forward_pass(batch, training=True)
    grads = tape.gradient(output.loss, trainable)
    if prox_mu:
      grads = [
          g + prox_mu * (w - w0)
          for g, w, w0 in zip(grads, trainable, global_params)
      ]
    opt_state, new_values = optimizer.next(
        opt_state, tuple(trainable), tuple(mask_gradients(grads))
    )
    for var, value in zip(trainable, new_values):
      var.assign(value)
    num_examples += tf.shape(output.predictions, out_type=tf.int64)[0]
    return num_examples, opt_state

  specs = tuple(tf.TensorSpec(v.shape, v.dtype) for v in trainable)
  initial_state = (tf.constant(0, tf.int64), optimizer.initialize(specs))
  num_examples, _ = dataset.repeat(local_epochs).reduce(
      initial_state, train_step
  )
  return num_examples


def mean_kernel_gradients(
    model, loss_fn, trainable, kernel_index, dataset, num_examples, local_epochs,
):
  """The mean gradient of the task loss over the local data at the current
  weights, for every kernel (dense: inactive positions get a gradient too).
  `loss_fn` sums over a batch; `num_examples` counts all E epochs."""

  def accumulate(sums, batch):
    with tf.GradientTape() as tape:
      logits = model.predict_on_batch(batch["x"], training=False)
      loss = loss_fn(batch["y"], logits)
    grads = tape.gradient(loss, [trainable[i] for i in kernel_index])
    return tuple(s + g for s, g in zip(sums, grads))

  zeros = tuple(tf.zeros_like(trainable[i]) for i in kernel_index)
  grad_sums = dataset.reduce(zeros, accumulate)
  denominator = tf.cast(tf.maximum(num_examples // local_epochs, 1), tf.float32)
  return tuple(g / denominator for g in grad_sums)


def _readjust_masks(
    model, loss_fn, trainable, mask_vars, kernel_index, dataset, num_examples,
    local_epochs, num_to_readjust, block_rows,
):
  """Prunes and regrows num_to_readjust[l] weights of each masked kernel
  (in blocks of block_rows[l] where that is > 1)."""
  gradients = mean_kernel_gradients(
      model, loss_fn, trainable, kernel_index, dataset, num_examples, local_epochs
  )
  for slot, i in enumerate(kernel_index):
    new_mask, new_kernel = masks_lib.readjust(
        trainable[i],
        mask_vars[slot],
        gradients[slot],
        num_to_readjust[slot],
        block_rows[slot],
    )
    mask_vars[slot].assign(new_mask)
    trainable[i].assign(new_kernel)


def _client_outputs(
    model, trainable, mask_vars, initial_masks, slot_of, num_examples,
    upload_dtype, compact_layout=None, send_mask=None, padded=True,
):
  """The client's (ClientResult, unfinalized metrics, stats). With
  `compact_layout` the update is the compact message
  (`messages.encode_upload`: the mask bits only if the mask changed) and
  the stats count its bits (`upload_bits`); otherwise it is
  OrderedDict(values, masks) of dense tensors. `send_mask` (a boolean
  tensor) replaces "the mask changed" as the reason to send the mask
  bits, and `padded=False` sends exactly the kept values
  (`messages.encode_upload`); both for clients of a tier (`tier_work`)."""
  values = [v.read_value() for v in trainable]
  mask_changed = tf.reduce_any(
      [tf.reduce_any(tf.not_equal(m, m0)) for m, m0 in zip(mask_vars, initial_masks)]
  )
  if send_mask is not None:
    mask_changed = send_mask
  if compact_layout is not None:
    update = messages.encode_upload(
        values, [m.read_value() for m in mask_vars], compact_layout, upload_dtype,
        mask_changed, padded,
    )
    sent = tf.nest.flatten(update)
  else:
    if upload_dtype != tf.float32:
      values = [tf.cast(tf.cast(v, upload_dtype), tf.float32) for v in values]
    masks = [
        mask_vars[slot_of[i]].read_value() if i in slot_of else tf.ones([])
        for i in range(len(values))
    ]
    update = collections.OrderedDict(values=values, masks=masks)
    sent = values
  active = tf.add_n([tf.reduce_sum(tf.cast(m > 0, tf.int64)) for m in mask_vars])
  # The server rejects a non-finite update (aggregation.SparseVotingFactory);
  # its loss is kept out of the round's training metrics here.
  finite = tf.reduce_all(
      [tf.reduce_all(tf.math.is_finite(v)) for v in sent if v.dtype.is_floating]
  )
  run_if(tf.logical_not(finite), model.reset_metrics)
  weight = tf.cast(num_examples, tf.float32)
  stats = _client_stats(mask_changed, active, num_examples)
  if compact_layout is not None:
    stats["upload_bits"] = messages.tensor_bits(update)
  return (
      tff.learning.templates.ClientResult(update=update, update_weight=weight),
      model.report_local_unfinalized_metrics(),
      stats,
  )


def train_under_mask(model, layout, optimizer, initial_weights, dataset, local_epochs, prox_mu):
  """Loads the broadcast weights and masks into `model` and trains E masked
  local epochs. Returns (trainable variables, mask variables, the masks as
  received, examples seen); masked kernel positions are exactly zero."""
  weights = tff.learning.models.ModelWeights.from_model(model)
  tf.nest.map_structure(lambda v, t: v.assign(t), weights, initial_weights)
  trainable = list(weights.trainable)
  mask_vars = [weights.non_trainable[i] for i in layout.mask_index]
  initial_masks = [initial_weights.non_trainable[i] for i in layout.mask_index]
  num_examples = _train_locally(
      model, optimizer, trainable, mask_vars, layout.mask_slot(),
      list(initial_weights.trainable), dataset, local_epochs, prox_mu,
  )
  # Steps already keep masked weights at zero; this makes it explicit.
  for slot, i in enumerate(layout.kernel_index):
    trainable[i].assign(trainable[i] * mask_vars[slot])
  return trainable, mask_vars, initial_masks, num_examples


def build_client_update(
    model_fn,
    layout: SparseLayout,
    optimizer: tff.learning.optimizers.Optimizer,
    local_epochs: int,
    prox_mu: float = 0.0,
    upload_dtype: tf.DType = tf.float32,
    compact: bool = False,
    padded: bool = True,
):
  """Returns the `tf.function` run by each client (`compact`: it uploads
  `messages.encode_upload`'s message, `padded` or exactly its kept values)."""
  model = model_fn()
  loss_fn = sparse_model.summed_loss()
  kernel_index = layout.kernel_index
  slot_of = layout.mask_slot()

  @tf.function(autograph=False)
  def client_update(initial_weights, dataset, num_to_readjust):
    dataset = without_autotune(dataset)
    trainable, mask_vars, initial_masks, num_examples = train_under_mask(
        model, layout, optimizer, initial_weights, dataset, local_epochs, prox_mu
    )
    run_if(
        tf.reduce_sum(num_to_readjust) > 0,
        lambda: _readjust_masks(
            model, loss_fn, trainable, mask_vars, kernel_index, dataset,
            num_examples, local_epochs, num_to_readjust, layout.all_rows,
        ),
    )
    return _client_outputs(
        model, trainable, mask_vars, initial_masks, slot_of, num_examples,
        upload_dtype, layout if compact else None, padded=padded,
    )

  return client_update


def model_types(model_fn):
  """(metrics aggregation fn, model weights type, client data type)."""
  with tf.Graph().as_default():
    model = model_fn()
    metrics_aggregation_fn = tff.learning.metrics.sum_then_finalize(
        model.metric_finalizers()
    )
    weights_type = tff.learning.models.weights_type_from_model(model)
    element_type = tff.types.tensorflow_to_type(model.input_spec)
  return metrics_aggregation_fn, weights_type, tff.SequenceType(element_type)


def round_budgets(table, round_num):
  """Row min(r - 1, last) of a budget table (`masks.budget_table`), int32 [L]."""
  table = tf.constant(table, tf.int32)
  row = tf.minimum(tf.maximum(round_num - 1, 0), tf.shape(table)[0] - 1)
  return tf.gather(table, row)


def round_counter():
  """(init_tf, advance): a server state counting rounds,
  OrderedDict(round_num) starting at 1, and its step to the next round."""

  @tff.tensorflow.computation
  def init_tf():
    return collections.OrderedDict(round_num=tf.constant(1, tf.int32))

  @tff.tensorflow.computation(init_tf.type_signature.result)
  def advance(state):
    return collections.OrderedDict(round_num=state["round_num"] + 1)

  return init_tf, advance


def build_schedule(
    layout: SparseLayout,
    readjustment_ratio: float,
    rounds_between_readjustments: int,
    readjustment_end_round: int,
    readjustment_schedule: str = "cosine",
    budget_table=None,
):
  """The server state's computations: (init_tf, plan_round, advance).

  `budget_table` (`masks.budget_table`) gives the layers' budgets of every
  round (gradual sparsification); None: `layout.budgets` in every round.
  """
  table = budget_table if budget_table is not None else [list(layout.budgets)]
  init_tf, advance = round_counter()
  state_type = init_tf.type_signature.result

  @tff.tensorflow.computation(state_type)
  def plan_round(state):
    """The round's budgets and per-layer k_l (all zero outside readjustment rounds)."""
    r = state["round_num"]
    ratio = masks_lib.readjustment_ratio(
        r, readjustment_ratio, readjustment_end_round, readjustment_schedule
    )
    on_schedule = tf.equal((r - 1) % rounds_between_readjustments, 0)
    readjust = tf.logical_and(on_schedule, ratio > 0.0)
    budgets = round_budgets(table, r)
    ks = masks_lib.num_to_readjust(ratio, budgets, layout.all_rows)
    ks = tf.where(readjust, ks, tf.zeros_like(ks))
    return collections.OrderedDict(
        round_num=r, readjustment_ratio=tf.where(readjust, ratio, 0.0), num_readjusted=ks,
        budgets=budgets,
    )

  return init_tf, plan_round, advance


def build_feddst_client_work(
    model_fn,
    layout: SparseLayout,
    optimizer: tff.learning.optimizers.Optimizer,
    *,
    local_epochs: int,
    readjustment_ratio: float,
    rounds_between_readjustments: int,
    readjustment_end_round: int,
    prox_mu: float = 0.0,
    upload_dtype: tf.DType = tf.float32,
    readjustment_schedule: str = "cosine",
    budget_table=None,
    compact: bool = False,
) -> tff.learning.templates.ClientWorkProcess:
  """The FedDST `ClientWorkProcess` (alpha = 0 gives RandomMask). `compact`:
  clients upload compact messages (`messages.encode_upload`, summed by
  `compact_voting.CompactVotingFactory`): with a budget table, whose
  budgets change by round, exactly their kept values (`float[?]`)."""
  metrics_aggregation_fn, weights_type, data_type = model_types(model_fn)
  num_layers = len(layout.budgets)
  k_type = tff.TensorType(np.int32, [num_layers])
  init_tf, plan_round, advance = build_schedule(
      layout, readjustment_ratio, rounds_between_readjustments,
      readjustment_end_round, readjustment_schedule, budget_table,
  )

  @tff.tensorflow.computation(weights_type, data_type, k_type)
  def client_update_tf(initial_weights, dataset, num_to_readjust):
    client_update = build_client_update(
        model_fn, layout, optimizer, local_epochs, prox_mu, upload_dtype, compact,
        padded=budget_table is None,
    )
    return client_update(initial_weights, dataset, num_to_readjust)

  return scheduled_client_work(
      (init_tf, plan_round, advance), client_update_tf, weights_type, data_type,
      metrics_aggregation_fn,
  )


def scheduled_client_work(
    schedule, update_tf, weights_type, data_type, aggregate_train, with_budgets=False,
    broadcast="num_readjusted",
) -> tff.learning.templates.ClientWorkProcess:
  """The ClientWorkProcess around a client computation and the schedule.

  `schedule` is `build_schedule`'s (init_tf, plan_round, advance);
  `update_tf(weights, data, k)` returns (ClientResult, train metrics, client
  statistics), k the plan's field `broadcast`; `aggregate_train` turns the
  clients' train metrics into the round's (a federated computation). The
  per-client and the cohort client work differ only in these.
  `with_budgets`: `update_tf` takes the round's per-layer budgets as a
  fourth argument (the cohort validates its updates).
  """
  init_tf, plan_round, advance = schedule

  @tff.federated_computation
  def init_fn():
    return tff.federated_eval(init_tf, tff.SERVER)

  @tff.federated_computation(
      init_fn.type_signature.result,
      tff.FederatedType(weights_type, tff.CLIENTS),
      tff.FederatedType(data_type, tff.CLIENTS),
  )
  def next_fn(state, weights, client_data):
    plan = tff.federated_map(plan_round, state)
    ks = tff.federated_broadcast(getattr(plan, broadcast))
    if with_budgets:
      budgets = tff.federated_broadcast(plan.budgets)
      result, train, stats = tff.federated_map(update_tf, (weights, client_data, ks, budgets))
    else:
      result, train, stats = tff.federated_map(update_tf, (weights, client_data, ks))
    measurements = tff.federated_zip(
        collections.OrderedDict(
            train=aggregate_train(train),
            clients=tff.federated_sum(stats),
            readjustment=plan,
        )
    )
    return tff.templates.MeasuredProcessOutput(
        tff.federated_map(advance, state), result, measurements
    )

  return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)


def build_dense_client_work(
    model_fn,
    optimizer: tff.learning.optimizers.Optimizer,
    prox_mu: float,
) -> tff.learning.templates.ClientWorkProcess:
  """The per-client client work of FedProx (FedAvg with `prox_mu` 0).

  Each client trains on its data set (all local epochs in it) with the
  gradient of f(w) + mu/2 ||w - w0||^2, w0 the broadcast weights, and sends
  TFF's model delta w0 - w weighted by its examples (a non-finite delta
  gets weight 0 and its metrics are dropped). TFF 0.87's own
  `build_weighted_fed_prox` adds mu (w0 - w) to the gradient, the opposite
  sign, which pushes the client away from w0 (docs/algorithms.md, FedProx).
  """
  metrics_aggregation_fn, weights_type, data_type = model_types(model_fn)

  @tff.tensorflow.computation(weights_type, data_type)
  def client_update_tf(initial_weights, dataset):
    model = model_fn()

    @tf.function(autograph=False)
    def update(initial_weights, dataset):
      dataset = without_autotune(dataset)
      weights = tff.learning.models.ModelWeights.from_model(model)
      tf.nest.map_structure(lambda v, t: v.assign(t), weights, initial_weights)
      trainable = list(weights.trainable)
      num_examples = _train_locally(
          model, optimizer, trainable, [], {}, list(initial_weights.trainable),
          dataset, 1, prox_mu,
      )
      delta = [w0 - v.read_value() for w0, v in zip(initial_weights.trainable, trainable)]
      finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(d)) for d in delta])
      run_if(tf.logical_not(finite), model.reset_metrics)
      delta = [tf.where(finite, d, tf.zeros_like(d)) for d in delta]
      weight = tf.where(finite, tf.cast(num_examples, tf.float32), 0.0)
      return (
          tff.learning.templates.ClientResult(update=delta, update_weight=weight),
          model.report_local_unfinalized_metrics(),
      )

    return update(initial_weights, dataset)

  @tff.federated_computation
  def init_fn():
    return tff.federated_value((), tff.SERVER)

  @tff.federated_computation(
      init_fn.type_signature.result,
      tff.FederatedType(weights_type, tff.CLIENTS),
      tff.FederatedType(data_type, tff.CLIENTS),
  )
  def next_fn(state, weights, client_data):
    result, metrics = tff.federated_map(client_update_tf, (weights, client_data))
    measurements = tff.federated_zip(
        collections.OrderedDict(train=metrics_aggregation_fn(metrics))
    )
    return tff.templates.MeasuredProcessOutput(state, result, measurements)

  return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)
