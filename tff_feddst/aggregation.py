"""Sparse weighted averaging with voting, as a TFF aggregation factory.

The value aggregated is `OrderedDict(values=[t_1..t_p], masks=[m_1..m_p])`:
one mask per value, either a 0/1 tensor of the value's shape (a masked
kernel) or a scalar 1 (an unmasked tensor such as a bias). Element-wise, with
client weights n_c (FEDDST_SPEC.md section 3, step 5):

    votes  = sum_c n_c m_c
    avg    = sum_c n_c m_c t_c / votes      where votes > 0, else 0

so a client that pruned a weight does not pull it towards zero, and for a
scalar mask this is the plain weighted average. With `min_votes`, masked
positions kept by fewer than `min_votes` clients count as having no votes.

The result has the same structure: the averaged values and, as masks, the
vote share votes / sum_c n_c of every position (0 where no client voted), so
the aggregated mask is m' = (share > 0) and the server can break ties by
support. For unmasked tensors the share is a scalar: 1 if any client
contributed (total weight > 0), 0 otherwise, so the finalizer can tell an
empty round.

The sums go through an inner `tff.aggregators.UnweightedAggregationFactory`
(plain `SumFactory` by default), so secure or compressed summation can be
swapped in without touching client or server code.
"""

import collections

import tensorflow as tf
import tensorflow_federated as tff


def _check_value_type(value_type):
  names = [n for n, _ in tff.structure.iter_elements(value_type)]
  if names != ["values", "masks"]:
    raise TypeError(
        "sparse voting aggregation expects OrderedDict(values=..., masks=...), "
        f"got {value_type}"
    )
  values, masks = value_type.values, value_type.masks
  if len(values) != len(masks):
    raise TypeError("values and masks must have the same length")
  for v, m in zip(values, masks):
    if tuple(m.shape) != () and tuple(m.shape) != tuple(v.shape):
      raise TypeError(f"mask shape {m.shape} does not match value {v.shape}")


class SparseVotingFactory(tff.aggregators.WeightedAggregationFactory):
  """Weighted average in which each client votes only for the weights it kept."""

  def __init__(self, min_votes: int = 1, sum_factory=None):
    if min_votes < 1:
      raise ValueError(f"min_votes must be >= 1, got {min_votes}")
    self._min_votes = int(min_votes)
    self._sum_factory = sum_factory or tff.aggregators.SumFactory()

  def create(self, value_type, weight_type) -> tff.templates.AggregationProcess:
    _check_value_type(value_type)
    masked = [tuple(m.shape) != () for m in value_type.masks]
    min_votes = self._min_votes

    @tff.tensorflow.computation(value_type, weight_type)
    def contribution(update, weight):
      w = tf.cast(weight, tf.float32)
      weighted, votes, counts = [], [], []
      total = w
      for v, m in zip(update["values"], update["masks"]):
        weighted.append(w * m * v)
        votes.append(w * m)
        counts.append(tf.cast(w > 0, tf.float32) * m)
      return collections.OrderedDict(
          weighted=weighted, votes=votes, counts=counts, total=total
      )

    sums_type = contribution.type_signature.result
    inner = self._sum_factory.create(sums_type)

    @tff.tensorflow.computation(sums_type)
    def finish(sums):
      values, masks = [], []
      voted = tf.constant(0, tf.int64)
      dropped = tf.constant(0, tf.int64)
      for i, is_masked in enumerate(masked):
        total, votes = sums["weighted"][i], sums["votes"][i]
        keep = votes > 0
        if is_masked:
          enough = sums["counts"][i] >= float(min_votes)
          dropped += tf.reduce_sum(
              tf.cast(tf.logical_and(keep, tf.logical_not(enough)), tf.int64)
          )
          keep = tf.logical_and(keep, enough)
          voted += tf.reduce_sum(tf.cast(keep, tf.int64))
        safe_votes = tf.where(keep, votes, tf.ones_like(votes))
        values.append(tf.where(keep, total / safe_votes, tf.zeros_like(total)))
        share = votes / tf.maximum(sums["total"], 1e-30)
        masks.append(tf.where(keep, tf.maximum(share, 1e-12), 0.0))
      stats = collections.OrderedDict(
          voted_positions=voted, dropped_by_min_votes=dropped
      )
      return collections.OrderedDict(values=values, masks=masks), stats

    @tff.federated_computation
    def init_fn():
      return inner.initialize()

    @tff.federated_computation(
        init_fn.type_signature.result,
        tff.FederatedType(value_type, tff.CLIENTS),
        tff.FederatedType(weight_type, tff.CLIENTS),
    )
    def next_fn(state, value, weight):
      contributions = tff.federated_map(contribution, (value, weight))
      summed = inner.next(state, contributions)
      result, stats = tff.federated_map(finish, summed.result)
      measurements = tff.federated_zip(
          collections.OrderedDict(voting=stats, sum=summed.measurements)
      )
      return tff.templates.MeasuredProcessOutput(
          summed.state, result, measurements
      )

    return tff.templates.AggregationProcess(init_fn, next_fn)
