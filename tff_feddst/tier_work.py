"""FedDST client work for clients of different sparsity tiers (issue #15,
part 3; the arithmetic: `tiers.py`).

The global model is at the lowest sparsity of any tier (`layout`'s
budgets). A client of tier t receives the global weights and masks, and
its own budgets and tier in its data (`client_data`); it
- cuts its mask from the global one: per layer the budget_l^t positions of
  the global mask with the largest |w| (`masks.keep_top_k`; the numpy
  reference is `tiers.client_mask_np`), and zeroes the rest of its kernels;
- trains E masked local epochs and, in readjustment rounds, prunes and
  regrows k_l = round(alpha_r * budget_l^t) weights per layer;
- uploads a compact message of exactly its kept values
  (`messages.encode_upload(padded=False)`: value_dtype[?] per layer) and,
  whenever its mask is not the global one, its mask bits.
`compact_voting.CompactVotingFactory` merges the messages of different
budgets; the finalizer re-prunes to the global budgets. The client's
statistics add, per tier, the bits it uploaded and a client count
(`tier_upload_bits`, `tier_clients`: int[T], one-hot by its tier).
"""

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_feddst import client_work as cw
from tff_feddst import compact_download
from tff_feddst import masks as masks_lib
from tff_feddst import sparse_model
from tff_feddst.sparse_model import SparseLayout


def client_data_type(layout: SparseLayout, element_type):
  """One client's data: OrderedDict(train: its batches, client: one
  element OrderedDict(budgets=int32[L], tier=int32))."""
  own = tff.StructType([
      ("budgets", tff.TensorType(np.int32, [len(layout.budgets)])),
      ("tier", tff.TensorType(np.int32)),
  ])
  return tff.StructType([
      ("train", tff.SequenceType(element_type)),
      ("client", tff.SequenceType(own)),
  ])


def client_data(train: tf.data.Dataset, budgets, tier: int) -> collections.OrderedDict:
  """One client's value of `client_data_type`."""
  own = collections.OrderedDict(
      budgets=np.asarray(budgets, np.int32), tier=np.int32(tier)
  )
  return collections.OrderedDict(train=train, client=tf.data.Dataset.from_tensors(own))


def client_masks(global_weights, layout: SparseLayout, budgets):
  """ModelWeights with the client's masks (the top-|w| positions of the
  global masks at `budgets`) and its kernels zero outside them."""
  trainable = list(global_weights.trainable)
  non_trainable = list(global_weights.non_trainable)
  for slot, (i, j) in enumerate(zip(layout.kernel_index, layout.mask_index)):
    mask = masks_lib.keep_top_k(trainable[i], non_trainable[j], budgets[slot], layout.rows(slot))
    non_trainable[j] = mask
    trainable[i] = trainable[i] * mask
  return tff.learning.models.ModelWeights(trainable, non_trainable)


def build_client_work(
    model_fn,
    layout: SparseLayout,
    optimizer: tff.learning.optimizers.Optimizer,
    num_tiers: int,
    *,
    local_epochs: int,
    readjustment_ratio: float,
    rounds_between_readjustments: int,
    readjustment_end_round: int,
    prox_mu: float = 0.0,
    upload_dtype: tf.DType = tf.float32,
    readjustment_schedule: str = "cosine",
    initial_non_trainable=None,
) -> tff.learning.templates.ClientWorkProcess:
  """The tiered FedDST `ClientWorkProcess` (module docstring); with
  `initial_non_trainable`, on compact downloads (`compact_download.receive`)."""
  metrics_aggregation_fn, weights_type, sequence_type = cw.model_types(model_fn)
  data_type = client_data_type(layout, sequence_type.element)
  compact, nt = initial_non_trainable is not None, initial_non_trainable
  if compact:
    weights_type = compact_download.message_type(weights_type, layout)
    data_type = compact_download.client_data_type(
        data_type.train, layout, [("client", data_type.client)]
    )
  schedule = cw.build_schedule(
      layout, readjustment_ratio, rounds_between_readjustments,
      readjustment_end_round, readjustment_schedule,
  )

  @tff.tensorflow.computation(weights_type, data_type, np.float64)
  def client_update_tf(global_weights, data, ratio):
    model = model_fn()
    loss_fn = sparse_model.summed_loss()

    @tf.function(autograph=False)
    def update(global_weights, data, ratio):
      if compact:  # the message and the mask, decoded
        global_weights, got = compact_download.receive(global_weights, data, layout, nt)
      own_zero = collections.OrderedDict(
          budgets=tf.zeros([len(layout.budgets)], tf.int32), tier=tf.constant(0, tf.int32)
      )
      own = data["client"].reduce(own_zero, lambda _, element: element)
      budgets = tf.unstack(own["budgets"], num=len(layout.budgets))
      start = client_masks(global_weights, layout, budgets)
      dataset = cw.without_autotune(data["train"])
      trainable, mask_vars, _, num_examples = cw.train_under_mask(
          model, layout, optimizer, start, dataset, local_epochs, prox_mu
      )
      ks = masks_lib.num_to_readjust(ratio, own["budgets"], layout.all_rows)
      cw.run_if(
          tf.reduce_sum(ks) > 0,
          lambda: cw._readjust_masks(  # pylint: disable=protected-access
              model, loss_fn, trainable, mask_vars, layout.kernel_index, dataset,
              num_examples, local_epochs, ks, layout.all_rows,
          ),
      )
      global_masks = [global_weights.non_trainable[i] for i in layout.mask_index]
      off_global = tf.reduce_any(
          [tf.reduce_any(tf.not_equal(m, g)) for m, g in zip(mask_vars, global_masks)]
      )
      result, metrics, stats = cw._client_outputs(  # pylint: disable=protected-access
          model, trainable, mask_vars, global_masks, layout.mask_slot(), num_examples,
          upload_dtype, layout, send_mask=off_global, padded=False,
      )
      stats = collections.OrderedDict(stats)
      one_hot = tf.one_hot(own["tier"], num_tiers, dtype=tf.int64)
      stats["tier_upload_bits"] = one_hot * stats["upload_bits"]
      stats["tier_clients"] = tf.cast(one_hot, tf.int32)
      if compact:
        stats["download_bits"], stats["tier_download_bits"] = got, one_hot * got
      return result, metrics, stats

    return update(global_weights, data, ratio)

  return cw.scheduled_client_work(
      schedule, client_update_tf, weights_type, data_type, metrics_aggregation_fn,
      broadcast="readjustment_ratio",
  )

