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

import collections
from typing import Sequence

import numpy as np
import tensorflow as tf

from tff_feddst import masks as masks_lib
from tff_feddst import phases
from tff_feddst import rounds


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


# --------------------------------------------------------------- the process
#
# TFF's client data are sequences and `process.next` returns no per-client
# values, so a client's mask travels to it as a one-element data set next to
# its training and validation data (`client_data`), and the driver learns
# which clients pruned from a sum: each client adds its flag at its slot of
# the round (`pruned_slots`). The driver replays the deterministic cut on
# its copy of those clients' masks (`LotteryFLStep`) and checks it against
# the kept counts and kept-position sums the clients report.


def index_sums(masks) -> list[int]:
  """Per layer, the sum of the flat indices of its kept positions (with the
  kept counts, the driver's check that its replayed masks are the clients')."""
  return [int(np.flatnonzero(np.asarray(m).ravel() > 0).sum()) for m in masks]


def _index_sums_tf(masks):
  out = []
  for m in masks:
    flat = tf.reshape(m, [-1])
    positions = tf.range(tf.size(flat, out_type=tf.int64), dtype=tf.int64)
    out.append(tf.reduce_sum(tf.where(flat > 0, positions, tf.zeros_like(positions))))
  return tf.stack(out)


def client_data_type(layout, element_type):
  """The TFF type of one client's data: OrderedDict(train, validation: its
  batches; client: one element OrderedDict(masks: a tuple, one per layer
  (tf.data would stack a list), slot))."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  own = tff.StructType([
      ("masks", tff.StructWithPythonType(
          [tff.TensorType(np.float32, s) for s in layout.kernel_shapes], tuple
      )),
      ("slot", tff.TensorType(np.int32)),
  ])
  return tff.StructType([
      ("train", tff.SequenceType(element_type)),
      ("validation", tff.SequenceType(element_type)),
      ("client", tff.SequenceType(own)),
  ])


def client_data(train, validation, masks, slot: int) -> collections.OrderedDict:
  """One client's value of `client_data_type` (numpy masks, per layer)."""
  own = collections.OrderedDict(
      masks=tuple(np.asarray(m, np.float32) for m in masks), slot=np.int32(slot)
  )
  return collections.OrderedDict(
      train=train, validation=validation, client=tf.data.Dataset.from_tensors(own)
  )


def _accuracy(model, dataset):
  """Share of `dataset`'s examples the model classifies right (NaN if none)."""

  def count(totals, batch):
    logits = model.predict_on_batch(batch["x"], training=False)
    right = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), tf.cast(batch["y"], tf.int32))
    return (
        totals[0] + tf.reduce_sum(tf.cast(right, tf.int64)),
        totals[1] + tf.size(right, out_type=tf.int64),
    )

  hits, total = dataset.reduce((tf.constant(0, tf.int64), tf.constant(0, tf.int64)), count)
  return tf.cast(hits, tf.float32) / tf.cast(total, tf.float32)


def _client_update_tf(model_fn, layout, optimizer, theta0, settings, weights_type, data_type):
  """One client's computation: (global weights, data, round) -> (ClientResult,
  train metrics, statistics)."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from tff_feddst import client_work as cw  # pylint: disable=g-import-not-at-top

  threshold, prune_rate, slots, local_epochs = settings
  budgets = list(layout.budgets)

  @tff.tensorflow.computation(weights_type, data_type, np.int32)
  def client_update_tf(global_weights, data, round_num):
    del round_num
    model = model_fn()
    initial = [tf.constant(w) for w in theta0]

    @tf.function(autograph=False)  # explicit control flow (tf.where, reductions)
    def update(global_weights, data):
      own = data["client"].reduce(
          collections.OrderedDict(
              masks=tuple(tf.zeros(s, tf.float32) for s in layout.kernel_shapes),
              slot=tf.constant(0, tf.int32),
          ),
          lambda _, element: element,
      )
      masks = list(own["masks"])
      theta = list(global_weights.trainable)
      non_trainable = list(global_weights.non_trainable)
      for slot, i in enumerate(layout.mask_index):
        non_trainable[i] = masks[slot]
      masked = list(theta)
      for slot, i in enumerate(layout.kernel_index):
        masked[i] = theta[i] * masks[slot]
      weights = tff.learning.models.ModelWeights.from_model(model)
      tf.nest.map_structure(
          lambda v, t: v.assign(t), weights,
          tff.learning.models.ModelWeights(masked, non_trainable),
      )
      accuracy = _accuracy(model, cw.without_autotune(data["validation"]))
      start, new_masks, pruned = client_start(
          theta, masks, initial, layout.kernel_index, accuracy, budgets, threshold, prune_rate
      )
      for slot, i in enumerate(layout.mask_index):
        non_trainable[i] = new_masks[slot]
      trainable, mask_vars, _, num_examples = cw.train_under_mask(
          model, layout, optimizer, tff.learning.models.ModelWeights(start, non_trainable),
          cw.without_autotune(data["train"]), local_epochs, 0.0,
      )
      result, metrics, stats = cw._client_outputs(  # pylint: disable=protected-access
          model, trainable, mask_vars, masks, layout.mask_slot(), num_examples, tf.float32,
      )
      final = [m.read_value() for m in mask_vars]
      # The client's own model after its training, on its validation data.
      own_accuracy = _accuracy(model, cw.without_autotune(data["validation"]))
      has_validation = tf.logical_not(tf.math.is_nan(own_accuracy))
      stats = collections.OrderedDict(stats)
      stats["personalised_accuracy_sum"] = tf.where(has_validation, own_accuracy, 0.0)
      stats["personalised_clients"] = tf.cast(has_validation, tf.int32)
      flag = tf.cast(pruned, tf.int32)
      stats["pruned"] = flag
      stats["pruned_slots"] = tf.one_hot(own["slot"], slots, dtype=tf.int32) * flag
      stats["kept"] = tf.stack([tf.reduce_sum(tf.cast(m > 0, tf.int64)) for m in final])
      stats["kept_index_sums"] = _index_sums_tf(final)
      return result, metrics, stats

    return update(global_weights, data)

  return client_update_tf


def build_client_work(model_fn, layout, optimizer, theta0, *, local_epochs: int,
                      threshold: float, prune_rate: float, slots: int):
  """LotteryFL's clients (the rule of `client_start`, then E epochs under the
  client's own mask). `theta0`: the run's initial trainable weights, which
  every client holds; `slots`: the most clients in a round."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from tff_feddst import client_work as cw  # pylint: disable=g-import-not-at-top

  metrics_aggregation_fn, weights_type, sequence_type = cw.model_types(model_fn)
  data_type = client_data_type(layout, sequence_type.element)
  init_tf, advance = cw.round_counter()

  @tff.tensorflow.computation(init_tf.type_signature.result)
  def plan_round(state):
    return collections.OrderedDict(round_num=state["round_num"])

  update_tf = _client_update_tf(
      model_fn, layout, optimizer, [np.asarray(w, np.float32) for w in theta0],
      (float(threshold), float(prune_rate), int(slots), int(local_epochs)),
      weights_type, data_type,
  )
  return cw.scheduled_client_work(
      (init_tf, plan_round, advance), update_tf, weights_type, data_type,
      metrics_aggregation_fn, broadcast="round_num",
  )


def build_finalizer(weights_type, update_type, layout):
  """LotteryFL's server step: each position takes the voted average of the
  clients that kept it; a position none of them kept keeps its previous
  value (other clients still hold it). The global model has no mask of its
  own (its masks stay all ones). Measurements: mask_changed (always 0)."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from tff_feddst import client_work as cw  # pylint: disable=g-import-not-at-top
  from tff_feddst import finalizer as finalizer_lib  # pylint: disable=g-import-not-at-top

  init_tf, _ = cw.round_counter()
  state_type = init_tf.type_signature.result

  @tff.tensorflow.computation(state_type, weights_type, update_type)
  def next_tf(state, weights, update):
    values = list(update["values"])
    for i in layout.kernel_index:
      values[i] = tf.where(update["masks"][i] > 0.0, values[i], weights.trainable[i])
    return (
        collections.OrderedDict(round_num=state["round_num"] + 1),
        tff.learning.models.ModelWeights(values, list(weights.non_trainable)),
        collections.OrderedDict(mask_changed=tf.constant(0, tf.int32)),
    )

  return finalizer_lib.server_step_finalizer(init_tf, next_tf, weights_type, update_type)


def build_process(model_fn, layout, initial_weights, client_optimizer, *, local_epochs: int,
                  threshold: float, prune_rate: float, slots: int, min_votes: int = 1):
  """LotteryFL as a TFF LearningProcess: broadcast of the global weights,
  `build_client_work`, the voting average, `build_finalizer`. The initial
  weights' masks must be all ones (the global model is dense)."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from tff_feddst import aggregation  # pylint: disable=g-import-not-at-top
  from tff_feddst import feddst  # pylint: disable=g-import-not-at-top

  client_work = build_client_work(
      model_fn, layout, client_optimizer, initial_weights.trainable,
      local_epochs=local_epochs, threshold=threshold, prune_rate=prune_rate, slots=slots,
  )
  weights_type = client_work.next.type_signature.parameter[1].member
  result_type = client_work.next.type_signature.result.result.member
  aggregator = aggregation.SparseVotingFactory(min_votes).create(
      result_type.update, result_type.update_weight
  )
  update_type = aggregator.next.type_signature.result.result.member
  return tff.learning.templates.compose_learning_process(
      feddst.constant_weights_fn(initial_weights),
      tff.learning.templates.build_broadcast_process(weights_type),
      client_work,
      aggregator,
      build_finalizer(weights_type, update_type, layout),
  )


# ------------------------------------------------------------ the driver


class ClientMasks:
  """The server's store of every client's own mask, by client id (all ones
  until the client first prunes): a boolean table, one row per client of
  the population, the layers' flattened masks side by side."""

  def __init__(self, client_ids: Sequence[str], kernel_shapes):
    self.client_ids = list(client_ids)
    self._row = {cid: r for r, cid in enumerate(self.client_ids)}
    self.shapes = [tuple(s) for s in kernel_shapes]
    self.sizes = np.array([int(np.prod(s)) for s in self.shapes], np.int64)
    self._starts = np.concatenate([[0], np.cumsum(self.sizes)])
    self.table = np.ones((len(self.client_ids), int(self.sizes.sum())), bool)
    # kept[r, l]: client r's kept weights in layer l.
    self.kept = np.tile(self.sizes, (len(self.client_ids), 1))

  def get(self, client_id: str) -> list[np.ndarray]:
    row = self.table[self._row[client_id]]
    return [
        row[a:b].reshape(s).astype(np.float32)
        for a, b, s in zip(self._starts[:-1], self._starts[1:], self.shapes)
    ]

  def set(self, client_id: str, masks) -> None:
    r = self._row[client_id]
    self.table[r] = np.concatenate([np.asarray(m).ravel() > 0 for m in masks])
    self.kept[r] = [int(np.count_nonzero(m)) for m in masks]

  def __contains__(self, client_id: str) -> bool:
    return client_id in self._row

  def is_dense(self, client_id: str) -> bool:
    """The client has not pruned yet."""
    return bool(np.all(self.kept[self._row[client_id]] == self.sizes))

  def kept_of(self, client_id: str) -> list[int]:
    return [int(k) for k in self.kept[self._row[client_id]]]

  def packed(self) -> np.ndarray:
    """The table as bits (uint8, `np.packbits` per row): the checkpoint's copy."""
    return np.packbits(self.table, axis=1)

  def load_packed(self, packed: np.ndarray) -> None:
    table = np.unpackbits(np.asarray(packed, np.uint8), axis=1, count=self.table.shape[1])
    if table.shape != self.table.shape:
      raise ValueError(f"client masks of shape {table.shape}, expected {self.table.shape}")
    self.table = table.astype(bool)
    self.kept = np.stack(
        [self.table[:, a:b].sum(axis=1) for a, b in zip(self._starts[:-1], self._starts[1:])],
        axis=1,
    ).astype(np.int64)


def replay_pruning(theta, masks, kernel_index, budgets, prune_rate) -> list[np.ndarray]:
  """The masks a client that pruned now holds (`client_start_np`'s cut of
  the global weights `theta` it received), without its accuracy check."""
  counts = pruned_counts([int(np.sum(m)) for m in masks], budgets, prune_rate)
  return [
      prune_np(np.asarray(theta[i]) * m, m, c)
      for i, m, c in zip(kernel_index, masks, counts)
  ]


class MaskedGlobalEvaluator:
  """The phase's evaluator: the global model's `test_accuracy` and
  `clients_accuracy` (`phases.Evaluator`), and `masked_global_accuracy`,
  the mean over the clients of the global weights under the client's own
  mask on its local test set (the model the client starts its next round
  from, unless it prunes)."""

  def __init__(self, base, fed_data, store: ClientMasks, kernel_index):
    self.base = base
    self.store = store
    self.kernel_index = kernel_index
    self.clients = [
        (cid, fed_data.test_indices(cid))
        for cid in fed_data.client_ids
        if fed_data.num_test_examples(cid) > 0 and cid in store
    ]

  def evaluate(self, trainable_weights) -> dict[str, float]:
    import fractions  # pylint: disable=g-import-not-at-top

    dense_hits = self.base.correct(trainable_weights)
    out = self.base.figures(dense_hits)
    per_client = []
    for cid, idx in self.clients:
      if self.store.is_dense(cid):
        hits = dense_hits[idx]
      else:
        weights = [np.asarray(w) for w in trainable_weights]
        for i, m in zip(self.kernel_index, self.store.get(cid)):
          weights[i] = weights[i] * m
        hits = self.base.correct_on(weights, idx)
      per_client.append(fractions.Fraction(int(hits.sum()), len(idx)))
    out["masked_global_accuracy"] = (
        float(sum(per_client) / len(per_client)) if per_client else float("nan")
    )
    return out


class LotteryFLStep(rounds.RoundStep):
  """A LotteryFL round: each client's data carries its own mask (`client_data`);
  the download is the global weights at the client's kept positions and the
  biases (the client knows its mask); after `process.next`, the store takes
  the new masks of the clients that pruned (replayed, then checked against
  the clients' reported kept counts and kept-position sums)."""

  def client_inputs(self, survivors) -> list:
    store, fed_data = self.phase.store, self.fed_data
    x_test, y_test = fed_data.arrays.x_test, fed_data.arrays.y_test
    out = []
    for slot, (cid, dataset, _) in enumerate(survivors):
      idx = fed_data.test_indices(cid)
      validation = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
          x=np.asarray(x_test[idx], np.float32), y=np.asarray(y_test[idx], np.int32)
      )).batch(self.config.batch_size)
      out.append(client_data(dataset, validation, store.get(cid), slot))
    return out

  def round_extra(self) -> dict:
    """`personalised_accuracy`: the mean over the round's clients (that have
    local test data) of their own trained model's accuracy on it."""
    if self.last_metrics is None:
      return {}
    reported = self.last_metrics["client_work"]["clients"]
    count = int(reported["personalised_clients"])
    if count == 0:
      return {}
    return {"personalised_accuracy": float(reported["personalised_accuracy_sum"]) / count}

  def charge_download(self, client_ids, state) -> int:
    del state
    return self.ledger.download_kept([sum(self.phase.store.kept_of(c)) for c in client_ids])

  def run_clients(self, state, survivors):
    theta = [np.asarray(w) for w in rounds.model_weights(self.phase.built.process, state).trainable]
    new_state, outcome, skipped = super().run_clients(state, survivors)
    if survivors:
      self._store_new_masks(theta, survivors, self.last_metrics["client_work"]["clients"])
    return new_state, outcome, skipped

  def _store_new_masks(self, theta, survivors, reported) -> None:
    phase, store = self.phase, self.phase.store
    layout = phase.built.layout
    flags = np.asarray(reported["pruned_slots"])[: len(survivors)]
    for flag, (cid, _, _) in zip(flags, survivors):
      if flag:
        store.set(cid, replay_pruning(
            theta, store.get(cid), layout.kernel_index, layout.budgets, phase.prune_rate
        ))
    kept = np.sum([store.kept_of(cid) for cid, _, _ in survivors], axis=0)
    sums = np.sum([index_sums(store.get(cid)) for cid, _, _ in survivors], axis=0)
    if not (np.array_equal(kept, reported["kept"])
            and np.array_equal(sums, reported["kept_index_sums"])):
      raise RuntimeError(
          f"LotteryFL: the clients report kept {list(reported['kept'])} (index sums "
          f"{list(reported['kept_index_sums'])}), the server's masks keep {kept.tolist()} "
          f"({sums.tolist()})"
      )


class LotteryFLPhase(phases.Phase):
  """LotteryFL's phase: its process, the store of the clients' masks
  (checkpointed with the run), the clients' mean sparsity and FLOPs as the
  round's `sparsity` and `forward_flops`, the personalised accuracy of
  the round's clients and the global model under the clients' masks."""

  extra_columns = ("personalised_accuracy", "masked_global_accuracy")

  def __init__(self, number, spec, config, context, **kwargs):
    super().__init__(number, spec, config, context, **kwargs)
    layout = self.built.layout
    self.prune_rate = config.lotteryfl_prune_rate
    self.store = ClientMasks(context.fed_data.nonempty_train_client_ids, layout.kernel_shapes)
    self.evaluator = MaskedGlobalEvaluator(
        self.evaluator, context.fed_data, self.store, layout.kernel_index
    )

  def build_process(self, spec, algorithm_config, context):
    return phases.build_algorithm(
        spec, algorithm_config, self.keras_fn, context.input_spec,
        slots=self.config.clients_per_round,
    )

  def make_step(self, config, fed_data, sampler, ledger, state):
    return LotteryFLStep(config, self, fed_data, sampler, ledger, state)

  def driver_arrays(self) -> list:
    return [self.store.packed()]

  def load_driver_arrays(self, arrays) -> None:
    self.store.load_packed(arrays[0])

  def stats(self, weights, ledger):
    """(the clients' mean sparsity, their mean forward FLOPs, the global
    masks): every client of the population, pruned or not."""
    from tff_feddst import costs  # pylint: disable=g-import-not-at-top

    _, _, masks = phases.mask_stats(self.built, weights, self.dense_flops)
    names, sizes = self.built.layout.layer_names, self.store.sizes
    kept = self.store.kept
    sparsity = float(np.mean(1.0 - kept.sum(axis=1) / sizes.sum()))
    flops = float(np.mean([
        costs.forward_flops(self.dense_flops, dict(zip(names, row / sizes))) for row in kept
    ]))
    return sparsity, flops, masks

  def summary(self) -> dict:
    out = super().summary()
    layout, kept = self.built.layout, self.store.kept
    out["lotteryfl"] = {
        "accuracy_threshold": self.config.lotteryfl_accuracy_threshold,
        "prune_rate": self.prune_rate,
        "clients": len(self.store.client_ids),
        "clients_pruned": int(np.sum(np.any(kept < self.store.sizes, axis=1))),
        "clients_at_target": int(np.sum(np.all(kept <= np.asarray(layout.budgets), axis=1))),
        "mean_layer_kept": dict(zip(layout.layer_names, kept.mean(axis=0).tolist())),
    }
    return out
