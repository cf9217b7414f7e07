"""Compact downloads (docs/algorithms.md section 6.1): what the server sends
a client is the global model's kept values and biases, and the global mask
only to a client that does not hold it.

Three parts, around the process `feddst.build_feddst` composes:

- `build_broadcast`: the distributor. The server encodes its global model
  (`encode_broadcast`: per prunable layer `float32[budget_l]`, the kept
  values in increasing position, zero-padded where the global mask keeps
  fewer; then the biases) and `tff.federated_broadcast`s that message, the
  same to every client.
- `wrap_process`: the round. The driver gives each client
  `OrderedDict(train, held, key)`: its data set, the packed global mask it
  holds from an earlier round (`uint8[?]` per layer; empty when it holds
  none or an older one) and `key`, `int32[1]`, 1 when it needs the mask.
  `tff.federated_select` sends each client the packed global mask for key
  1 and empty tensors for key 0 (`select_mask`), so the mask crosses to the
  clients that need it only.
- `build_client_work`: the client decodes the message against the mask it
  received or holds (`decode_broadcast`), trains as
  `client_work.build_client_update` does, uploads the compact message, and
  counts the bits it received (`download_bits`: the message's and the
  selected mask's tensors, at run time).

Cohorts (`cohort_work`): a TFF client is a cohort of clients, whose value
(`cohort_data`) adds how many of them lack the mask; the cohort decodes the
message once for all of them and counts one copy of the message per client
and one of the mask per client that lacked it.

TFF's clients keep nothing between rounds; the mask a client holds travels
in its own data (TFF's way of keeping client state in simulation), is not
sent by the server and is not counted. The driver keeps it per client in
the ledger's mask versions (`rounds.RoundStep.client_inputs`).
"""

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_feddst import client_work as client_work_lib
from tff_feddst import messages
from tff_feddst.sparse_model import SparseLayout


def encode_broadcast(trainable, masks, layout: SparseLayout, padded: bool = True):
  """The server's message: OrderedDict(layers=[OrderedDict(values=
  float32[budget_l])], other=[the other trainable values]), values in
  increasing position of the global mask, zero-padded to the budget;
  `padded=False` (budgets that change by round): float32[?], exactly the
  global mask's kept values."""
  layers = [
      collections.OrderedDict(values=messages.padded_values(
          trainable[i], masks[slot], layout.budgets[slot], tf.float32) if padded
          else messages.kept_values(trainable[i], masks[slot], tf.float32))
      for slot, i in enumerate(layout.kernel_index)
  ]
  kernels = set(layout.kernel_index)
  other = [tf.cast(v, tf.float32) for i, v in enumerate(trainable) if i not in kernels]
  return collections.OrderedDict(layers=layers, other=other)


def pack_masks(masks, layout: SparseLayout):
  """The packed masks, per layer `uint8[ceil(u_l / 8)]` (`messages.pack_bits`)."""
  return tuple(
      messages.pack_bits(mask, list(layout.kernel_shapes[slot]), layout.rows(slot))
      for slot, mask in enumerate(masks)
  )


def pack_masks_np(masks, layout: SparseLayout) -> list[np.ndarray]:
  """`pack_masks` in numpy (what the driver hands a client as its held mask)."""
  return [messages.pack_bits_np(np.asarray(m), layout.rows(slot)) for slot, m in enumerate(masks)]


def no_mask(layout: SparseLayout) -> list[np.ndarray]:
  """A client's `held` when it holds no current mask: empty per layer."""
  return [np.zeros([0], np.uint8) for _ in layout.kernel_index]


def decode_broadcast(message, mask_bits, layout: SparseLayout, non_trainable):
  """ModelWeights of the server's message on the mask `mask_bits` (packed,
  per layer). `non_trainable`: the model's non-trainable values, whose
  masks are replaced by the decoded ones."""
  masks = [
      messages.unpack_bits(bits, list(layout.kernel_shapes[slot]), layout.rows(slot))
      for slot, bits in enumerate(mask_bits)
  ]
  slot_of = layout.mask_slot()
  others = iter(message["other"])
  trainable = [
      messages.scatter_kept(message["layers"][slot_of[i]]["values"], masks[slot_of[i]])
      if i in slot_of else next(others)
      for i in range(len(layout.kernel_index) + len(message["other"]))
  ]
  non_trainable = list(non_trainable)
  for slot, i in enumerate(layout.mask_index):
    non_trainable[i] = tf.cast(masks[slot], non_trainable[i].dtype)
  return tff.learning.models.ModelWeights(trainable=trainable, non_trainable=non_trainable)


def message_type(weights_type, layout: SparseLayout, padded: bool = True):
  """The type of `encode_broadcast`'s message."""
  slot_of = layout.mask_slot()
  layer_types = [
      tff.types.StructWithPythonType(
          [("values", tff.TensorType(np.float32, [b if padded else None]))],
          collections.OrderedDict,
      )
      for b in layout.budgets
  ]
  other_types = [
      tff.TensorType(np.float32, t.shape)
      for i, t in enumerate(weights_type.trainable) if i not in slot_of
  ]
  sent = tff.types.StructWithPythonType([
      ("layers", tff.types.StructWithPythonType(layer_types, list)),
      ("other", tff.types.StructWithPythonType(other_types, list)),
  ], collections.OrderedDict)
  return sent


def client_data_type(data_type, layout: SparseLayout, extra=()):
  """What the client work takes: OrderedDict(train, *extra, held,
  received); `extra`: (name, sequence type) pairs of the client's own."""
  bits_type = _bits_type(layout)
  return tff.types.StructWithPythonType([
      ("train", data_type), *extra, ("held", tff.SequenceType(bits_type)),
      ("received", tff.SequenceType(bits_type)),
  ], collections.OrderedDict)


def _bits_type(layout: SparseLayout):
  """Packed masks: per layer uint8[?] (empty: no mask)."""
  return tff.types.StructWithPythonType(
      [tff.TensorType(np.uint8, [None]) for _ in layout.budgets], tuple
  )


def driver_data_type(inner_data_type):
  """What the driver gives each client (`client_data`): the client work's
  data (`client_data_type`) with `key` in place of `received`, each a data
  set (TFF's client data are sequences)."""
  key_type = tff.SequenceType(tff.TensorType(np.int32, [1]))
  return tff.types.StructWithPythonType([
      ("key", key_type) if name == "received" else (name, t)
      for name, t in tff.structure.iter_elements(inner_data_type)
  ], collections.OrderedDict)


def client_data(dataset, held, layout: SparseLayout, **extra):
  """A client's value of the round (`wrap_process`): its data set, its own
  `extra` data sets, and `held`, the packed global mask it holds
  (`pack_masks_np`), or None when it holds no current one and the server
  sends it (key 1)."""
  bits = tuple(no_mask(layout) if held is None else held)
  key = np.array([1 if held is None else 0], np.int32)
  return collections.OrderedDict(
      train=dataset, **extra,
      held=tf.data.Dataset.from_tensors(bits),
      key=tf.data.Dataset.from_tensors(key),
  )


def receive(message, data, layout: SparseLayout, non_trainable):
  """On a client: (ModelWeights, bits received) of the server's message on
  the mask it holds (`data["held"]`) or was sent (`data["received"]`).
  The bits are the message's and the selected mask's tensors (at run
  time: an empty selection counts 0). `non_trainable`: numpy values of
  the model's non-trainable variables (`decode_broadcast`)."""
  weights, message_bits, mask_bits = receive_parts(message, data, layout, non_trainable)
  return weights, message_bits + mask_bits


def receive_parts(message, data, layout: SparseLayout, non_trainable):
  """`receive`, the bits apart: (ModelWeights, the message's bits, the
  selected mask's bits)."""
  received = data["received"].get_single_element()
  mask_bits = [
      tf.cond(tf.size(held) > 0, lambda held=held: held, lambda got=got: got)
      for held, got in zip(data["held"].get_single_element(), received)
  ]
  weights = decode_broadcast(message, mask_bits, layout, [tf.constant(v) for v in non_trainable])
  return weights, messages.tensor_bits(message), messages.tensor_bits(received)


# A cohort's own field (`cohort_data`): how many of its clients need the mask.
STALE = "stale"


def cohort_data_type(steps_type, layout: SparseLayout):
  """What a cohort's client work takes on compact downloads:
  OrderedDict(train, stale, held, received) (`client_data_type`), `stale`
  a one-element sequence of int32[1]."""
  stale_type = tff.SequenceType(tff.TensorType(np.int32, [1]))
  return client_data_type(steps_type, layout, extra=((STALE, stale_type),))


def cohort_data(cohort_value, num_clients: int, num_stale: int, held, layout: SparseLayout):
  """A cohort's value of the round (`wrap_process`): the cohort's steps
  (`cohort_work.client_value`), `stale`, the number of its `num_clients`
  clients that hold no current global mask, and the packed global mask the
  others hold (`pack_masks_np`; none when every client is stale).

  The server sends the mask to the cohort when any of its clients needs it
  (its key is `num_stale`); the cohort counts it once per stale client.
  """
  if not 0 <= num_stale <= num_clients:
    raise ValueError(f"{num_stale} stale clients in a cohort of {num_clients}")
  value = client_data(cohort_value, None if num_stale == num_clients else held, layout)
  value[STALE] = tf.data.Dataset.from_tensors(np.array([num_stale], np.int32))
  value["key"] = value[STALE]
  return collections.OrderedDict(
      (name, value[name]) for name in ("train", STALE, "held", "key")
  )


def build_broadcast(weights_type, layout: SparseLayout,
                    padded: bool = True) -> tff.templates.MeasuredProcess:
  """The distributor: `encode_broadcast` on the server, then broadcast."""
  sent_type = message_type(weights_type, layout, padded)

  @tff.tensorflow.computation(weights_type)
  def encode_tf(weights):
    masks = [weights.non_trainable[i] for i in layout.mask_index]
    return encode_broadcast(list(weights.trainable), masks, layout, padded)

  encode_tf.type_signature.result.check_equivalent_to(sent_type)

  @tff.federated_computation
  def init_fn():
    return tff.federated_value((), tff.SERVER)

  @tff.federated_computation(init_fn.type_signature.result, tff.FederatedType(weights_type, tff.SERVER))
  def next_fn(state, weights):
    message = tff.federated_broadcast(tff.federated_map(encode_tf, weights))
    return tff.templates.MeasuredProcessOutput(state, message, tff.federated_value((), tff.SERVER))

  return tff.learning.templates.DistributionProcess(init_fn, next_fn)


def build_client_work(model_fn, layout: SparseLayout, optimizer, initial_non_trainable, *,
                      local_epochs,
                      readjustment_ratio, rounds_between_readjustments, readjustment_end_round,
                      prox_mu=0.0, upload_dtype=tf.float32, readjustment_schedule="cosine",
                      budget_table=None):
  """FedDST's per-client work (`client_work.build_feddst_client_work`,
  compact uploads) on the compact download: weights are `encode_broadcast`'s
  message, data OrderedDict(train, held, received). `initial_non_trainable`:
  the model's non-trainable values (numpy; the masks among them are
  replaced by the decoded ones, and the pruning wrappers' other
  variables never change under `sparse_model.KeepMaskSchedule`).
  `budget_table` (gradual sparsification): messages both ways hold exactly
  the kept values (`padded=False`)."""
  metrics_aggregation_fn, weights_type, data_type = client_work_lib.model_types(model_fn)
  padded = budget_table is None
  sent_type = message_type(weights_type, layout, padded)
  data_type = client_data_type(data_type, layout)
  k_type = tff.TensorType(np.int32, [len(layout.budgets)])
  schedule = client_work_lib.build_schedule(
      layout, readjustment_ratio, rounds_between_readjustments, readjustment_end_round,
      readjustment_schedule, budget_table,
  )

  @tff.tensorflow.computation(sent_type, data_type, k_type)
  def client_update_tf(message, data, num_to_readjust):
    client_update = client_work_lib.build_client_update(
        model_fn, layout, optimizer, local_epochs, prox_mu, upload_dtype, compact=True,
        padded=padded,
    )
    weights, download_bits = receive(message, data, layout, initial_non_trainable)
    result, train, stats = client_update(weights, data["train"], num_to_readjust)
    stats["download_bits"] = download_bits
    return result, train, stats

  return client_work_lib.scheduled_client_work(
      schedule, client_update_tf, sent_type, data_type, metrics_aggregation_fn,
  )


def wrap_process(inner: tff.learning.templates.LearningProcess,
                 layout: SparseLayout) -> tff.learning.templates.LearningProcess:
  """`inner` (whose clients take `client_data_type`'s values) as a process
  whose clients take `client_data`'s: the round sends the packed global
  mask to the clients whose key is 1."""
  state_type = inner.next.type_signature.parameter[0]
  inner_data_type = inner.next.type_signature.parameter[1].member
  names = [name for name, _ in tff.structure.iter_elements(inner_data_type)]
  weights_type = inner.get_model_weights.type_signature.result
  bits_type = _bits_type(layout)

  @tff.tensorflow.computation(weights_type)
  def pack_tf(weights):
    return pack_masks([weights.non_trainable[i] for i in layout.mask_index], layout)

  @tff.tensorflow.computation(bits_type, tff.TensorType(np.int32))
  def select_mask(bits, key):
    return tuple(
        tf.cond(key > 0, lambda b=b: b, lambda: tf.zeros([0], tf.uint8)) for b in bits
    )

  @tff.tensorflow.computation(tff.SequenceType(tff.TensorType(np.int32, [1])))
  def first_key(keys):
    return keys.get_single_element()

  @tff.federated_computation(
      state_type, tff.FederatedType(driver_data_type(inner_data_type), tff.CLIENTS)
  )
  def next_fn(state, data):
    weights = tff.federated_map(inner.get_model_weights, state)
    bits = tff.federated_map(pack_tf, weights)
    keys = tff.federated_map(first_key, data.key)
    received = tff.federated_select(keys, tff.federated_value(2, tff.SERVER), bits, select_mask)
    client_data = tff.federated_zip(collections.OrderedDict(
        (name, received if name == "received" else getattr(data, name)) for name in names
    ))
    return inner.next(state, client_data)

  return tff.learning.templates.LearningProcess(
      inner.initialize, next_fn, inner.get_model_weights, inner.set_model_weights,
      get_hparams_fn=inner.get_hparams, set_hparams_fn=inner.set_hparams,
  )
