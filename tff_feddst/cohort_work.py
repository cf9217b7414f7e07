"""The cohort client work: a TFF client is a cohort of clients trained at once.

With `--client_execution=cohort` the driver packs the round's clients into
cohorts (`pack_cohorts_from_arrays`); each cohort is one value at
`tff.CLIENTS` (`client_value`: its clients' examples and, step by
step, which of them each client's batch of that step holds), from which
its TF computation builds the sequence of steps (`cohort.steps_dataset`)
and trains its clients as one
computation (`cohort.train`), readjusts each client's mask (batched prune
and regrow), validates each client's update as the server would and sends
the sum of its clients' voting contributions (`aggregation.contributions`):
sum_c n_c m_c theta_c, sum_c n_c m_c, the client counts per position, the
total weight and the number rejected. The voting average is linear in
these, so the server (`SparseVotingFactory(presummed=True)`) sums the
cohorts' contributions and divides exactly as it does for single clients.
Training metrics and client statistics are sums over the cohort's clients.

The per-client client work (`client_work.build_feddst_client_work`) is the
reference implementation; the two give the same weights, masks and metrics.
"""

import collections
import dataclasses
import functools
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_feddst import aggregation
from tff_feddst import client_work as client_work_lib
from tff_feddst import cohort
from tff_feddst import compact_download
from tff_feddst import messages
from tff_feddst.sparse_model import SparseLayout


@dataclasses.dataclass(frozen=True)
class CohortSettings:
  """What a process needs to train cohorts: the plain Keras network, the
  clients' optimizer settings and the image shape of the data."""

  keras_fn: Callable[[], tf.keras.Model]
  learning_rate: float
  momentum: float
  weight_decay: float
  image_shape: tuple[int, ...]

  def hyperparameters(self, prox_mu: float = 0.0) -> cohort.Hyperparameters:
    return cohort.Hyperparameters(
        self.learning_rate, self.momentum, self.weight_decay, prox_mu
    )


def data_type(image_shape: Sequence[int]) -> tff.SequenceType:
  """The TFF type of a cohort's client value (any cohort size, pool size
  and batch size): a sequence of one element, the cohort's tensors
  (`cohort.Packed.value`). TFF's client-work template takes sequences only
  and sends a sequence as its data set's graph; this one holds the tensors
  as they are, and the steps are built from them inside the cohort's TF
  computation (`cohort.steps_dataset`), not traced by the driver every
  round."""
  return tff.SequenceType(
      collections.OrderedDict(
          pool_x=tff.TensorType(np.float32, [None, None, *image_shape]),
          pool_y=tff.TensorType(np.int32, [None, None]),
          index=tff.TensorType(np.int32, [None, None]),
          valid=tff.TensorType(np.float32, [None, None]),
          first=tff.TensorType(np.float32, [None, None]),
          starts=tff.TensorType(np.int64, [None]),
          ends=tff.TensorType(np.int64, [None]),
      )
  )


def client_value(packed: cohort.Packed) -> tf.data.Dataset:
  """A cohort's TFF client value (`data_type`)."""
  return tf.data.Dataset.from_tensors(packed.value())


def _steps(data):
  """(the cohort's steps as a data set, its number of clients G) from its
  client value."""
  value = data.get_single_element()
  steps = client_work_lib.without_autotune(cohort.steps_dataset(value))
  return steps, tf.shape(value["valid"])[0]


def pack_cohorts(datasets, epochs: int, batches_per_epoch: Sequence[int], batch_size: int,
                 cohort_size: int) -> list[tf.data.Dataset]:
  """The round's per-client data sets as the client values of cohorts of
  `cohort_size` clients (`client_value`).

  `datasets[c]` is client c's one-epoch data set (shuffled anew each
  epoch); its E epochs are read in the order the per-client computation
  would read them (`dataset.repeat(E)`). Runs pack from the data arrays
  instead (`pack_cohorts_from_arrays`, the same cohorts without reading
  the data sets); this is its reference in the tests.
  """
  client_epochs = []
  for dataset, per_epoch in zip(datasets, batches_per_epoch):
    batches = list(dataset.repeat(epochs).as_numpy_iterator())
    client_epochs.append([batches[e * per_epoch:(e + 1) * per_epoch] for e in range(epochs)])
  return [
      client_value(cohort.pack(client_epochs[start:start + cohort_size], batch_size))
      for start in range(0, len(client_epochs), cohort_size)
  ]


def _shuffled_positions(sizes: Sequence[int], seeds: Sequence[int], epochs: int) -> list[np.ndarray]:
  """Per client, [E, n]: the order in which its shuffled data set reads its
  n examples in each of E epochs (`rounds.client_dataset`).

  tf.data's shuffle draws its order from its seeds and the buffer, not from
  the elements, so a shuffled range of example positions, under the same
  seed, comes out in the order of the shuffled examples. The clients'
  ranges are concatenated and read in one step (a step per client costs
  about 4 ms each).
  """
  total = int(sum(sizes)) * epochs
  if not total:
    return [np.zeros((epochs, 0), np.int64) for _ in sizes]
  orders = functools.reduce(
      lambda a, b: a.concatenate(b),
      [
          tf.data.Dataset.range(n).shuffle(
              max(n, 1), seed=shuffle_seed, reshuffle_each_iteration=True
          ).repeat(epochs)
          for n, shuffle_seed in zip(sizes, seeds)
      ],
  )
  flat = next(iter(orders.batch(total).as_numpy_iterator()))
  ends = np.cumsum([n * epochs for n in sizes])
  return [part.reshape(epochs, n) for part, n in zip(np.split(flat, ends[:-1]), sizes)]


def client_epochs_from_arrays(fed_data, clients, epochs: int, batch_size: int) -> list:
  """For each (client id, shuffle seed) of `clients`, its E epochs of
  batches ({"x", "y"} arrays), exactly as
  `rounds.client_dataset(fed_data, client_id, batch_size, shuffle_seed, 1)`
  gives them epoch after epoch, taken from the data arrays."""
  indices = [fed_data.train_indices(cid) for cid, _ in clients]
  positions = _shuffled_positions(
      [len(i) for i in indices], [shuffle_seed for _, shuffle_seed in clients], epochs
  )
  x, y = fed_data.arrays.x_train, fed_data.arrays.y_train
  out = []
  for client_indices, order in zip(indices, positions):
    cuts = list(range(batch_size, len(client_indices), batch_size))
    out.append([
        [{"x": x[rows], "y": y[rows]} for rows in np.split(client_indices[epoch], cuts)]
        for epoch in order
    ])
  return out


def pack_positions(x, y, client_rows, positions, batch_size: int) -> cohort.Packed:
  """`cohort.pack` of the clients' batches, from where their examples are.

  `client_rows[g]`: the rows of (x, y) holding client g's n_g examples;
  `positions[g]`: [E, n_g], the order in which its epochs read them
  (`_shuffled_positions`). Each epoch is cut into batches of `batch_size`,
  the last one shorter, as the client's data set batches it. A client's
  pool holds its examples in row order (entry 0: the padding), so a step's
  index is 1 + the example's position (`cohort.pack`, the reference,
  finds the pool entries by comparing the examples' bytes).
  """
  sizes = [len(rows) for rows in client_rows]
  epochs = positions[0].shape[0] if positions else 0
  per_epoch = [-(-n // batch_size) for n in sizes]
  num_steps = max((epochs * b for b in per_epoch), default=0)
  g = len(client_rows)
  index = np.zeros((num_steps, g, batch_size), np.int32)
  valid = np.zeros((num_steps, g, batch_size), np.float32)
  pool_x = np.zeros((g, 1 + max(sizes, default=0), *x.shape[1:]), x.dtype)
  pool_y = np.zeros((g, 1 + max(sizes, default=0)), y.dtype)
  for c, (rows, order, batches) in enumerate(zip(client_rows, positions, per_epoch)):
    if not len(rows):
      continue
    pool_x[c, 1:len(rows) + 1] = x[rows]
    pool_y[c, 1:len(rows) + 1] = y[rows]
    # Each epoch's order, padded with -1 to whole batches: [E * batches, B].
    slots = np.full((epochs, batches * batch_size), -1, np.int64)
    slots[:, :len(rows)] = order
    slots = slots.reshape(epochs * batches, batch_size)
    index[:len(slots), c] = slots + 1
    valid[:len(slots), c] = slots >= 0
  first = valid.copy()
  for c, batches in enumerate(per_epoch):
    first[batches:, c] = 0.0
  return cohort.Packed(pool_x, pool_y, index, valid, first)


def pack_cohorts_from_arrays(fed_data, clients, epochs: int, batch_size: int,
                             cohort_size: int) -> list[tf.data.Dataset]:
  """`pack_cohorts` of the clients' data sets, from the data arrays:
  `clients` is a list of (client id, shuffle seed). The reference, through
  each client's batches (`client_epochs_from_arrays`) and `cohort.pack`, is
  `pack_cohorts_by_batches`."""
  rows = [fed_data.train_indices(cid) for cid, _ in clients]
  positions = _shuffled_positions(
      [len(r) for r in rows], [shuffle_seed for _, shuffle_seed in clients], epochs
  )
  x, y = fed_data.arrays.x_train, fed_data.arrays.y_train
  return [
      client_value(pack_positions(
          x, y, rows[start:start + cohort_size], positions[start:start + cohort_size], batch_size
      ))
      for start in range(0, len(clients), cohort_size)
  ]


def pack_cohorts_by_batches(fed_data, clients, epochs: int, batch_size: int,
                            cohort_size: int) -> list[tf.data.Dataset]:
  """`pack_cohorts_from_arrays` through each client's batches and
  `cohort.pack` (the reference in the tests)."""
  client_epochs = client_epochs_from_arrays(fed_data, clients, epochs, batch_size)
  return [
      client_value(cohort.pack(client_epochs[start:start + cohort_size], batch_size))
      for start in range(0, len(client_epochs), cohort_size)
  ]


def _tile(t, g):
  return tf.broadcast_to(t[tf.newaxis], tf.concat([[g], tf.shape(t)], 0))


def _changed(masks, initial_masks, g):
  """bool [G]: whose mask differs from the one it received."""
  per_client = lambda t: tf.reshape(t, [g, -1])  # noqa: E731
  return tf.reduce_any(tf.stack([
      tf.reduce_any(tf.not_equal(per_client(m), per_client(m0)), axis=1)
      for m, m0 in zip(masks, initial_masks)
  ]), axis=0)


def _as_sent(params, kernel_masks, initial_masks, changed, *, layout, upload_dtype, compact,
             padded):
  """(values, masks, extra stats) of the clients' uploads as the server
  reads them: with `compact`, each client's compact message (the mask bits
  if its mask `changed`), its bits counted (`upload_bits`) and decoded as
  the server decodes it; otherwise the values at the upload's dtype."""
  if compact:
    # `decode_cohort_uploads(encode_cohort_uploads(...))` and the message's
    # bits, without the gathers and scatters of the values (equal, tested).
    values, sent_masks, bits = messages.cohort_uploads_as_received(
        params, kernel_masks, layout, upload_dtype, initial_masks, changed, padded
    )
    return values, sent_masks, {"upload_bits": bits}
  values = params
  if upload_dtype != tf.float32:
    values = [tf.cast(tf.cast(v, upload_dtype), tf.float32) for v in values]
  return values, kernel_masks, {}


def _cohort_update(network, layout, hp, local_epochs, upload_dtype, validate, compact,
                   padded=True):
  """The TF body: (contributions, train sums, client stats) of a cohort.

  `validate`: reject a client whose mask keeps more than the round's budget
  of a layer (`round_budgets`, from the server's plan). `compact`: each
  client's upload is built as its compact message
  (`messages.encode_cohort_uploads`, `padded` to the layout's budgets or,
  with budgets that change by round, as long as the kept values), its bits
  counted (`upload_bits`), and decoded as the server decodes it before the
  sum.
  """
  slot_of = layout.mask_slot()
  kernel_index = layout.kernel_index
  sent = functools.partial(_as_sent, layout=layout, upload_dtype=upload_dtype,
                           compact=compact, padded=padded)

  def update(weights, data, num_to_readjust, round_budgets):
    steps, g = _steps(data)
    params = [_tile(w, g) for w in weights.trainable]
    initial_masks = [_tile(weights.non_trainable[i], g) for i in layout.mask_index]
    masks = [initial_masks[slot_of[i]] if i in slot_of else None for i in range(len(params))]
    params, (examples, loss_sum, correct) = cohort.train(network, hp, params, masks, steps)
    params = [p * m if m is not None else p for p, m in zip(params, masks)]

    def readjusted():
      sums = cohort.gradient_sums(network, params, kernel_index, steps)
      per_epoch = tf.maximum(tf.math.floordiv(examples, float(local_epochs)), 1.0)
      new_params, new_masks = list(params), []
      for slot, i in enumerate(kernel_index):
        gradient = sums[slot] / tf.reshape(per_epoch, [-1] + [1] * (sums[slot].shape.rank - 1))
        mask, new_params[i] = cohort.readjust(
            params[i], initial_masks[slot], gradient, num_to_readjust[slot],
            layout.rows(slot),
        )
        new_masks.append(mask)
      return tuple(new_params), tuple(new_masks)

    params, kernel_masks = tf.cond(
        tf.reduce_sum(num_to_readjust) > 0,
        readjusted,
        lambda: (tuple(params), tuple(initial_masks)),
    )
    params, kernel_masks = list(params), list(kernel_masks)
    per_client = lambda t: tf.reshape(t, [g, -1])  # noqa: E731
    changed = _changed(kernel_masks, initial_masks, g)
    values, sent_masks, extra_stats = sent(params, kernel_masks, initial_masks, changed)
    upload_masks = [sent_masks[slot_of[i]] if i in slot_of else tf.ones([g]) for i in range(len(values))]
    budgets = {}
    if validate:
      budgets = {i: tf.cast(round_budgets[slot], tf.int64) for slot, i in enumerate(kernel_index)}
    finite = tf.reduce_all(
        tf.stack([tf.reduce_all(tf.math.is_finite(per_client(v)), axis=1) for v in values]), axis=0
    )
    contributions = aggregation.contributions(values, upload_masks, examples, budgets, finite)
    kept = tf.cast(finite, tf.float32)  # a rejected update's loss stays out of the metrics
    # 0/1 masks: a row's sum is its number of ones (exact in float32 below 2**24).
    active = tf.cast(
        tf.add_n([tf.reduce_sum(per_client(m), axis=1) for m in kernel_masks]), tf.int64
    )
    stats = collections.OrderedDict(
        mask_changed=tf.reduce_sum(tf.cast(changed, tf.int32)),
        uploaded_values=tf.reduce_sum(active),
        clients=g,
        examples=tf.reduce_sum(tf.cast(examples, tf.int64)),
        **extra_stats,
    )
    train = collections.OrderedDict(
        loss=tf.reduce_sum(loss_sum * kept),
        correct=tf.reduce_sum(correct * kept),
        examples=tf.reduce_sum(examples * kept),
    )
    return contributions, train, stats

  # No autograph: the body's control flow is explicit (tf.cond, data set
  # reductions), and converting it took about 1 s of every build.
  return tf.function(update, autograph=False)


def _on_compact_download(update, layout, non_trainable):
  """`update` (`_cohort_update`'s) on the server's compact message and the
  cohort's `compact_download.cohort_data`; its stats add `download_bits`."""

  def on_message(message, data, num_to_readjust, round_budgets):
    weights, message_bits, mask_bits = compact_download.receive_parts(
        message, data, layout, non_trainable
    )
    contributions, train, stats = update(weights, data["train"], num_to_readjust, round_budgets)
    stale = tf.cast(data[compact_download.STALE].get_single_element()[0], tf.int64)
    stats["download_bits"] = (
        tf.cast(stats["clients"], tf.int64) * message_bits + stale * mask_bits
    )
    return contributions, train, stats

  return tf.function(on_message, autograph=False)


def _finalize_train(sums):
  count = tf.maximum(sums["examples"], 1.0)
  return collections.OrderedDict(
      loss=sums["loss"] / count,
      accuracy=sums["correct"] / count,
      num_examples=tf.cast(sums["examples"], tf.int64),
  )


def build_cohort_client_work(
    model_fn,
    keras_fn: Callable[[], tf.keras.Model],
    layout: SparseLayout,
    hp: cohort.Hyperparameters,
    *,
    local_epochs: int,
    readjustment_ratio: float,
    rounds_between_readjustments: int,
    readjustment_end_round: int,
    image_shape: Sequence[int],
    upload_dtype: tf.DType = tf.float32,
    budgets: dict[int, int] | None = None,
    readjustment_schedule: str = "cosine",
    budget_table=None,
    compact: bool = False,
    download_non_trainable=None,
) -> tff.learning.templates.ClientWorkProcess:
  """FedDST's client work for cohorts (alpha = 0 gives RandomMask).

  Its update is the cohort's summed voting contributions (for
  `aggregation.SparseVotingFactory(presummed=True)`). Given `budgets`, each
  client's update is checked against the round's budgets (`layout.budgets`,
  or the row of `budget_table` for the round: `client_work.build_schedule`).
  `compact`: each client's upload is its compact message, decoded before
  the sum, and the stats count its bits (`upload_bits`); with a budget
  table, messages both ways hold exactly the kept values.
  `download_non_trainable` (with `compact`; the model's non-trainable
  values, numpy): compact downloads. The work takes the server's compact
  message (`compact_download.message_type`) and the cohort's
  `compact_download.cohort_data`, decodes the message once for its clients
  (`compact_download.receive_parts`) and counts what its clients received
  (`download_bits`): the message once per client and the mask once per
  client that needed it.
  """
  cohort.check_grouped_convolutions()
  _, weights_type, _ = client_work_lib.model_types(model_fn)
  steps_type = data_type(image_shape)
  network = cohort.CohortNetwork(keras_fn())
  schedule = client_work_lib.build_schedule(
      layout, readjustment_ratio, rounds_between_readjustments, readjustment_end_round,
      readjustment_schedule, budget_table,
  )
  k_type = tff.TensorType(np.int32, [len(layout.budgets)])
  padded = budget_table is None
  update = _cohort_update(
      network, layout, hp, local_epochs, upload_dtype, budgets is not None, compact, padded
  )
  if download_non_trainable is not None:
    if not compact:
      raise ValueError("compact downloads go with compact uploads")
    update = _on_compact_download(update, layout, download_non_trainable)
    weights_type = compact_download.message_type(weights_type, layout, padded)
    steps_type = compact_download.cohort_data_type(steps_type, layout)

  @tff.tensorflow.computation(weights_type, steps_type, k_type, k_type)
  def cohort_update_tf(weights, steps, num_to_readjust, round_budgets):
    contributions, train, stats = update(weights, steps, num_to_readjust, round_budgets)
    result = tff.learning.templates.ClientResult(
        update=contributions, update_weight=contributions["total"]
    )
    return result, train, stats

  train_type = cohort_update_tf.type_signature.result[1]
  finalize_train = tff.tensorflow.computation(_finalize_train, train_type)

  @tff.federated_computation(tff.FederatedType(train_type, tff.CLIENTS))
  def aggregate_train(train):
    return tff.federated_map(finalize_train, tff.federated_sum(train))

  return client_work_lib.scheduled_client_work(
      schedule, cohort_update_tf, weights_type, steps_type, aggregate_train,
      with_budgets=True,
  )


# ------------------------------------------------ dense: FedAvg, FedAvgM, FedProx


def _dense_cohort_update(network, hp):
  """The TF body of the dense cohort: (sums, train sums, client stats).

  sums: OrderedDict(deltas = sum_c n_c (w - theta_c) over the accepted
  clients, one per trainable tensor; total = sum_c n_c; rejected). A client
  is accepted, as by `aggregation.ValidatingMeanFactory`, when its update is
  finite and it has examples.
  """

  def update(weights, data):
    steps, g = _steps(data)
    initial = list(weights.trainable)
    params = [_tile(w, g) for w in initial]
    params, (examples, loss_sum, correct) = cohort.train(
        network, hp, params, [None] * len(params), steps
    )
    # TFF's model delta: the initial weights minus the trained ones.
    deltas = [w[tf.newaxis] - p for w, p in zip(initial, params)]
    per_client = lambda t: tf.reshape(t, [g, -1])  # noqa: E731
    finite = tf.reduce_all(
        tf.stack([tf.reduce_all(tf.math.is_finite(per_client(d)), axis=1) for d in deltas]), axis=0
    )
    accepted = tf.logical_and(finite, examples > 0)
    weight = tf.where(accepted, examples, tf.zeros_like(examples))

    def weighted_sum(d):
      kept = cohort._where_client(accepted, d, tf.zeros_like(d))  # pylint: disable=protected-access
      return tf.tensordot(weight, kept, axes=1)

    sums = collections.OrderedDict(
        deltas=[weighted_sum(d) for d in deltas],
        total=tf.reduce_sum(weight),
        rejected=tf.reduce_sum(tf.cast(tf.logical_not(accepted), tf.int32)),
    )
    kept = tf.cast(accepted, tf.float32)  # a rejected update's loss stays out of the metrics
    train = collections.OrderedDict(
        loss=tf.reduce_sum(loss_sum * kept),
        correct=tf.reduce_sum(correct * kept),
        examples=tf.reduce_sum(examples * kept),
    )
    stats = collections.OrderedDict(
        clients=g, examples=tf.reduce_sum(tf.cast(examples, tf.int64)),
    )
    return sums, train, stats

  return tf.function(update, autograph=False)


def build_dense_cohort_client_work(
    model_fn,
    keras_fn: Callable[[], tf.keras.Model],
    hp: cohort.Hyperparameters,
    image_shape: Sequence[int],
) -> tff.learning.templates.ClientWorkProcess:
  """The client work of FedAvg (FedProx with `hp.prox_mu`) for cohorts.

  Each TFF client is a cohort (`pack_cohorts`, all local epochs in its
  steps); its update is the cohort's weighted sum of model deltas, for
  `aggregation.PresummedMeanFactory`. The reference is TFF's own
  `tff.learning.algorithms.build_weighted_fed_avg` / `_fed_prox` client work.
  """
  cohort.check_grouped_convolutions()
  _, weights_type, _ = client_work_lib.model_types(model_fn)
  steps_type = data_type(image_shape)
  network = cohort.CohortNetwork(keras_fn())
  update = _dense_cohort_update(network, hp)

  @tff.tensorflow.computation(weights_type, steps_type)
  def cohort_update_tf(weights, steps):
    sums, train, stats = update(weights, steps)
    result = tff.learning.templates.ClientResult(update=sums, update_weight=sums["total"])
    return result, train, stats

  train_type = cohort_update_tf.type_signature.result[1]
  finalize_train = tff.tensorflow.computation(_finalize_train, train_type)

  @tff.federated_computation
  def init_fn():
    return tff.federated_value((), tff.SERVER)

  @tff.federated_computation(
      init_fn.type_signature.result,
      tff.FederatedType(weights_type, tff.CLIENTS),
      tff.FederatedType(steps_type, tff.CLIENTS),
  )
  def next_fn(state, weights, client_data):
    result, train, stats = tff.federated_map(cohort_update_tf, (weights, client_data))
    measurements = tff.federated_zip(
        collections.OrderedDict(
            train=tff.federated_map(finalize_train, tff.federated_sum(train)),
            clients=tff.federated_sum(stats),
        )
    )
    return tff.templates.MeasuredProcessOutput(state, result, measurements)

  return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)


def build_dense_cohort_process(
    model_fn,
    initial_weights: tff.learning.models.ModelWeights,
    settings: CohortSettings,
    server_optimizer: tff.learning.optimizers.Optimizer,
    prox_mu: float = 0.0,
) -> tff.learning.templates.LearningProcess:
  """FedAvg / FedAvgM / FedProx training cohorts (`feddst.compose_dense`
  with the cohort client work and the presummed weighted mean)."""
  from tff_feddst import feddst  # pylint: disable=g-import-not-at-top

  client_work = build_dense_cohort_client_work(
      model_fn, settings.keras_fn, settings.hyperparameters(prox_mu), settings.image_shape
  )
  return feddst.compose_dense(
      client_work, aggregation.PresummedMeanFactory(), initial_weights, server_optimizer
  )
