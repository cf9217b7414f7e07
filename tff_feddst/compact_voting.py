"""The voting average of compact uploads (docs/algorithms.md sections 3.2
and 6.1): what crosses from the clients is `messages.encode_upload`'s
message, and it is decoded where it is summed.

`CompactVotingFactory` sums the clients' messages with
`tff.federated_aggregate`: its `accumulate` step, which runs in the
aggregation and not on the client, validates each message as the server
must, decodes it and adds its weighted contribution. A message with its
mask bits is decoded in full (a dense kernel and its mask, as
`aggregation.contributions` sums them). A message without them comes from
a client whose mask is the global mask it received, which the aggregation
does not hold: its kept values are summed in their compact order
(`float32[budget_l]`), with the clients' total weight and count, and the
server, which holds the global mask, scatters that sum onto it
(`finish_with_global_masks`, run by the finalizer). The voting average is
linear in these sums, so the result equals `SparseVotingFactory`'s on the
decoded updates.

The aggregation's result is the sums (`VotingSums`); its measurements are
the number of rejected clients. The finalizer
(`finalizer.build_sparse_finalizer(..., voting=...)`) finishes the
average and reports the voting statistics.
"""

import collections

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_feddst import aggregation
from tff_feddst import client_work as client_work_lib
from tff_feddst import messages
from tff_feddst.sparse_model import SparseLayout


def _trainable_shapes(layout: SparseLayout, value_type):
  """The shapes of ModelWeights.trainable, from the layout's kernels and
  the message's other values."""
  others = iter([tuple(t.shape) for t in value_type.other])
  slot_of = layout.mask_slot()
  count = len(layout.kernel_index) + len(value_type.other)
  return [
      tuple(layout.kernel_shapes[slot_of[i]]) if i in slot_of else next(others)
      for i in range(count)
  ]


def zero_sums(layout: SparseLayout, shapes, shared_sizes=None):
  """The sums before any client: VotingSums of zeros. `shared_sizes`: the
  length of each layer's sum of values on the global mask (default: the
  layout's budgets)."""
  shared_sizes = layout.budgets if shared_sizes is None else shared_sizes
  slot_of = layout.mask_slot()
  per_value = lambda: [  # noqa: E731
      tf.zeros(shape if i in slot_of else [], tf.float32) for i, shape in enumerate(shapes)
  ]
  layers = len(layout.kernel_index)
  return collections.OrderedDict(
      weighted=[tf.zeros(shape, tf.float32) for shape in shapes],
      votes=per_value(),
      counts=per_value(),
      total=tf.constant(0.0),
      rejected=tf.constant(0, tf.int32),
      shared=collections.OrderedDict(
          weighted=[tf.zeros([b], tf.float32) for b in shared_sizes],
          total=tf.zeros([layers], tf.float32),
          clients=tf.zeros([layers], tf.float32),
      ),
  )


def _fit(values, budget: int):
  """float32[budget]: `values` cut or padded with zeros (a client's values
  without their mask bits are the global mask's, at most its budget)."""
  values = values[:budget]
  return tf.ensure_shape(tf.pad(values, [[0, budget - tf.shape(values)[0]]]), [budget])


def accumulate(sums, message, weight, layout: SparseLayout, budgets=None):
  """`sums` plus one client's validated, weighted contribution.

  A message is rejected (weight 0, no votes, counted) when its weight is
  not positive and finite, a value is not finite, a layer's mask bits are
  neither absent nor ceil(units / 8) bytes, or a mask keeps more positions
  than its layer's budget (`budgets`, int32 [L] in layout order: the
  round's; default `layout.budgets`), or than the values sent (with mask
  bits; values of any length, `padded=False` uploads, are decoded against
  them)."""
  if budgets is None:
    budgets = list(layout.budgets)
  w = tf.cast(weight, tf.float32)
  checks = [tf.math.is_finite(w), w > 0]
  for leaf in tf.nest.flatten(message):
    if leaf.dtype.is_floating:
      checks.append(tf.reduce_all(tf.math.is_finite(leaf)))
  decoded_masks, carried = [], []
  for slot, layer in enumerate(message["layers"]):
    shape, rows = list(layout.kernel_shapes[slot]), layout.rows(slot)
    nbytes = tf.size(layer["mask_bits"])
    has_mask = tf.equal(nbytes, messages.packed_size(messages.mask_units(shape, rows)))
    checks.append(tf.logical_or(has_mask, tf.equal(nbytes, 0)))
    mask = tf.cond(
        has_mask,
        lambda layer=layer, shape=shape, rows=rows: messages.unpack_bits(
            layer["mask_bits"], shape, rows),
        lambda shape=shape: tf.zeros(shape, tf.float32),
    )
    kept = tf.reduce_sum(tf.cast(mask > 0, tf.int64))
    checks.append(kept <= tf.cast(budgets[slot], tf.int64))
    checks.append(kept <= tf.size(layer["values"], out_type=tf.int64))
    decoded_masks.append(mask)
    carried.append(has_mask)
  valid = tf.reduce_all(tf.stack(checks))
  w = tf.where(valid, w, 0.0)
  voter = tf.cast(w > 0, tf.float32)

  def clean(t):
    t = tf.cast(t, tf.float32)
    return tf.where(valid, t, tf.zeros_like(t))

  slot_of = layout.mask_slot()
  others = iter(message["other"])
  new = collections.OrderedDict(
      (key, list(sums[key])) for key in ("weighted", "votes", "counts")
  )
  shared = collections.OrderedDict(
      weighted=list(sums["shared"]["weighted"]), total=[], clients=[]
  )
  for i in range(len(new["weighted"])):
    if i not in slot_of:
      v = clean(next(others))
      new["weighted"][i] += w * v
      new["votes"][i] += w
      new["counts"][i] += voter
      continue
    slot = slot_of[i]
    values, mask = clean(message["layers"][slot]["values"]), decoded_masks[slot]
    wm = w * mask
    new["weighted"][i] += wm * messages.scatter_kept(values, mask)
    new["votes"][i] += wm
    new["counts"][i] += voter * mask
    on_global = tf.cast(tf.logical_not(carried[slot]), tf.float32)
    size = sums["shared"]["weighted"][slot].shape[0]
    shared["weighted"][slot] += on_global * w * _fit(values, size)
    shared["total"].append(on_global * w)
    shared["clients"].append(on_global * voter)
  return collections.OrderedDict(
      weighted=new["weighted"],
      votes=new["votes"],
      counts=new["counts"],
      total=sums["total"] + w,
      rejected=sums["rejected"] + tf.cast(tf.logical_not(valid), tf.int32),
      shared=collections.OrderedDict(
          weighted=shared["weighted"],
          total=sums["shared"]["total"] + tf.stack(shared["total"]),
          clients=sums["shared"]["clients"] + tf.stack(shared["clients"]),
      ),
  )


def finish_with_global_masks(sums, global_masks, layout: SparseLayout, min_votes: int):
  """The voting average (`aggregation.finish_sums`' result and statistics)
  once the server has put the sums of the clients that sent no mask onto
  `global_masks` (in layout order), the masks those clients trained."""
  weighted, votes, counts = list(sums["weighted"]), list(sums["votes"]), list(sums["counts"])
  for slot, i in enumerate(layout.kernel_index):
    mask = tf.cast(global_masks[slot], tf.float32)
    shared = sums["shared"]
    weighted[i] += messages.scatter_kept(shared["weighted"][slot], mask)
    votes[i] += mask * shared["total"][slot]
    counts[i] += mask * shared["clients"][slot]
  masked = [i in layout.mask_slot() for i in range(len(weighted))]
  full = collections.OrderedDict(
      weighted=weighted, votes=votes, counts=counts, total=sums["total"],
      rejected=sums["rejected"],
  )
  return aggregation.finish_sums(full, masked, min_votes)


class CompactVotingFactory(tff.aggregators.WeightedAggregationFactory):
  """Sums compact uploads (`messages.encode_upload`) for the voting average;
  the finalizer finishes it (module docstring).

  `budget_table` (gradual sparsification, `masks.budget_table`: rows in
  layout order, row j for round j + 1): the state counts rounds
  (OrderedDict(round_num)), and each message is checked against its round's
  budgets, which the server sends with the round (as
  `aggregation.SparseVotingFactory` does for dense updates).
  """

  def __init__(self, layout: SparseLayout, budget_table=None):
    self._layout = layout
    self._table = None if budget_table is None else [[int(b) for b in r] for r in budget_table]

  def create(self, value_type, weight_type) -> tff.templates.AggregationProcess:
    layout = self._layout
    if len(value_type.layers) != len(layout.kernel_index):
      raise TypeError(f"expected {len(layout.kernel_index)} layers, got {value_type}")
    shapes = _trainable_shapes(layout, value_type)
    if self._table is not None:
      return _scheduled_process(layout, self._table, shapes, value_type, weight_type)

    @tff.tensorflow.computation
    def zero_fn():
      return zero_sums(layout, shapes)

    sums_type = zero_fn.type_signature.result

    @tff.tensorflow.computation(sums_type, (value_type, weight_type))
    def accumulate_fn(sums, client):
      return accumulate(sums, client[0], client[1], layout)

    merge_fn, report_fn, rejected_fn = _sum_steps(sums_type)

    @tff.federated_computation
    def init_fn():
      return tff.federated_value((), tff.SERVER)

    @tff.federated_computation(
        init_fn.type_signature.result,
        tff.FederatedType(value_type, tff.CLIENTS),
        tff.FederatedType(weight_type, tff.CLIENTS),
    )
    def next_fn(state, value, weight):
      sums = tff.federated_aggregate(
          tff.federated_zip((value, weight)), zero_fn(), accumulate_fn, merge_fn, report_fn
      )
      measurements = tff.federated_zip(
          collections.OrderedDict(rejected=tff.federated_map(rejected_fn, sums))
      )
      return tff.templates.MeasuredProcessOutput(state, sums, measurements)

    return tff.templates.AggregationProcess(init_fn, next_fn)


def _sum_steps(sums_type):
  """`federated_aggregate`'s merge and report steps for the sums, and the
  sums' rejected count."""

  @tff.tensorflow.computation(sums_type, sums_type)
  def merge_fn(a, b):
    return tf.nest.map_structure(tf.add, a, b)

  @tff.tensorflow.computation(sums_type)
  def report_fn(sums):
    return sums

  @tff.tensorflow.computation(sums_type)
  def rejected_fn(sums):
    return sums["rejected"]

  return merge_fn, report_fn, rejected_fn


def _scheduled_process(layout: SparseLayout, table, shapes, value_type, weight_type):
  """`CompactVotingFactory`'s process whose budgets change by round."""
  if any(len(row) != len(layout.budgets) for row in table):
    raise ValueError("every row of budget_table needs one budget per layer")
  # The sums of values on the global mask hold the largest budget of any round.
  sizes = [max([layout.budgets[slot]] + [row[slot] for row in table])
           for slot in range(len(layout.budgets))]
  budgets_type = tff.TensorType(np.int32, [len(layout.budgets)])

  @tff.tensorflow.computation
  def zero_fn():
    return zero_sums(layout, shapes, sizes)

  sums_type = zero_fn.type_signature.result

  @tff.tensorflow.computation(sums_type, (value_type, weight_type, budgets_type))
  def accumulate_fn(sums, client):
    return accumulate(sums, client[0], client[1], layout, client[2])

  merge_fn, report_fn, rejected_fn = _sum_steps(sums_type)
  init_tf, advance = client_work_lib.round_counter()  # OrderedDict(round_num)

  @tff.tensorflow.computation(init_tf.type_signature.result)
  def lookup(state):
    return client_work_lib.round_budgets(table, state["round_num"])

  @tff.federated_computation
  def init_fn():
    return tff.federated_eval(init_tf, tff.SERVER)

  @tff.federated_computation(
      init_fn.type_signature.result,
      tff.FederatedType(value_type, tff.CLIENTS),
      tff.FederatedType(weight_type, tff.CLIENTS),
  )
  def next_fn(state, value, weight):
    budgets = tff.federated_broadcast(tff.federated_map(lookup, state))
    sums = tff.federated_aggregate(
        tff.federated_zip((value, weight, budgets)), zero_fn(), accumulate_fn, merge_fn,
        report_fn,
    )
    measurements = tff.federated_zip(
        collections.OrderedDict(rejected=tff.federated_map(rejected_fn, sums))
    )
    return tff.templates.MeasuredProcessOutput(
        tff.federated_map(advance, state), sums, measurements
    )

  return tff.templates.AggregationProcess(init_fn, next_fn)
