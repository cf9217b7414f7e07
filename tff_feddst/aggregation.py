"""Sparse weighted averaging with voting, as a TFF aggregation factory.

The value aggregated is `OrderedDict(values=[t_1..t_p], masks=[m_1..m_p])`:
one mask per value, either a 0/1 tensor of the value's shape (a masked
kernel) or a scalar 1 (an unmasked tensor such as a bias). Element-wise, with
client weights n_c (docs/algorithms.md section 3.2, step 5):

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

Every update is validated first, as a server must treat what clients send:
an update with a NaN or Inf value, or whose mask keeps more positions of a
layer than the layer's budget (when `budgets` is given), gets weight 0 and
no votes, and is counted in the `rejected` measurement. So is an update that
arrives with weight 0.

The sums go through an inner `tff.aggregators.UnweightedAggregationFactory`
(plain `SumFactory` by default), so secure or compressed summation can be
swapped in without touching client or server code.
"""

import collections

import numpy as np
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


def contributions(values, masks, weights, budgets, finite=None):
  """The validated, weighted contributions of G clients, summed over them.

  values[i]: [G, ...] (client g's i-th tensor); masks[i]: [G, ...] for a
  masked tensor or [G] (a scalar per client) for an unmasked one;
  weights: [G]. A client whose update is not finite, whose weight is not
  positive and finite, or whose mask keeps more than `budgets[i]`
  positions of a masked tensor i gets weight 0 and no votes. Returns
  OrderedDict(weighted, votes, counts, total, rejected): sums over the
  clients of w m v, w m, [w > 0] m, w and the number rejected. The
  per-client aggregator calls it with G = 1, the cohort client work with
  its cohort. `finite` (bool [G], optional): whether each client's values
  are all finite, when the caller has it already.
  """
  w = tf.cast(weights, tf.float32)

  def per_client(t):
    return tf.reshape(t, [tf.shape(t)[0], -1])

  checks = [tf.math.is_finite(w), w > 0]
  if finite is not None:
    checks.append(finite)
  for i, (v, m) in enumerate(zip(values, masks)):
    if finite is None:
      checks.append(tf.reduce_all(tf.math.is_finite(per_client(v)), axis=1))
    checks.append(tf.reduce_all(tf.math.is_finite(per_client(m)), axis=1))
    if i in budgets:
      kept = tf.reduce_sum(tf.cast(tf.not_equal(per_client(m), 0.0), tf.int32), axis=1)
      checks.append(tf.cast(kept, tf.int64) <= tf.cast(budgets[i], tf.int64))
  valid = tf.reduce_all(tf.stack(checks), axis=0)
  w = tf.where(valid, w, 0.0)

  def by_client(t, like):
    """[G] -> [G, 1, ..., 1] of `like`'s rank."""
    return tf.reshape(t, tf.concat([tf.shape(t), tf.ones([tf.rank(like) - 1], tf.int32)], 0))

  all_valid = tf.reduce_all(valid)

  def zero_rejected(tensors):
    """`tensors` with the rejected clients' rows zeroed (a pass over them
    only when some client is rejected). One `tf.cond` for all of them: each
    cond traces two branch graphs, 0.4 s of a cohort FedDST build when it
    was one per tensor."""
    return tf.cond(
        all_valid, lambda: list(tensors),
        lambda: [tf.where(by_client(valid, t), t, tf.zeros_like(t)) for t in tensors],
    )

  n = len(values)
  kept = zero_rejected([*values, *masks])
  weighted, votes, counts = [], [], []
  for v, m in zip(kept[:n], kept[n:]):
    wm = by_client(w, m) * m
    wm_v = wm if m.shape.rank == v.shape.rank else by_client(wm, v)
    weighted.append(tf.reduce_sum(wm_v * v, axis=0))
    votes.append(tf.reduce_sum(wm, axis=0))
    counts.append(tf.reduce_sum(by_client(tf.cast(w > 0, tf.float32), m) * m, axis=0))
  return collections.OrderedDict(
      weighted=weighted,
      votes=votes,
      counts=counts,
      total=tf.reduce_sum(w),
      rejected=tf.reduce_sum(tf.cast(tf.logical_not(valid), tf.int32)),
  )


def _build_contribution(value_type, weight_type, budgets, budgets_type=None):
  """Per client: the validated update's weighted values, votes and counts.

  With `budgets_type` the computation takes the round's budgets as a third
  argument, one per key of `budgets` in key order (`budgets` then only says
  which values are checked).
  """
  one = lambda t: tf.expand_dims(t, 0)  # noqa: E731  (a cohort of one)

  def run(update, weight, limits):
    return contributions(
        [one(v) for v in update["values"]],
        [one(m) for m in update["masks"]],
        one(weight),
        limits,
    )

  if budgets_type is None:

    @tff.tensorflow.computation(value_type, weight_type)
    def contribution(update, weight):
      return run(update, weight, budgets)

    return contribution

  @tff.tensorflow.computation(value_type, weight_type, budgets_type)
  def scheduled_contribution(update, weight, round_budgets):
    limits = {i: tf.cast(round_budgets[j], tf.int64) for j, i in enumerate(sorted(budgets))}
    return run(update, weight, limits)

  return scheduled_contribution


def _budget_schedule(budgets, budget_table):
  """(init, budgets of the state's round, advance) over a round counter."""
  table = [[int(b) for b in row] for row in budget_table]
  if any(len(row) != len(budgets) for row in table):
    raise ValueError("every row of budget_table needs one budget per key of budgets")

  @tff.tensorflow.computation
  def init_round():
    return tf.constant(1, tf.int32)

  @tff.tensorflow.computation(np.int32)
  def lookup(round_num):
    table_t = tf.constant(table, tf.int32)
    row = tf.minimum(tf.maximum(round_num - 1, 0), tf.shape(table_t)[0] - 1)
    return tf.gather(table_t, row)

  @tff.tensorflow.computation(np.int32)
  def advance(round_num):
    return round_num + 1

  return init_round, lookup, advance


def finish_sums(sums, masked, min_votes):
  """(OrderedDict(values, masks), stats) from the summed contributions:
  the voting average and the vote shares (module docstring)."""
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
      voted_positions=voted,
      dropped_by_min_votes=dropped,
      rejected=sums["rejected"],
  )
  return collections.OrderedDict(values=values, masks=masks), stats


def _build_finish(sums_type, masked, min_votes):
  """From the summed contributions: the averaged update and voting stats."""

  @tff.tensorflow.computation(sums_type)
  def finish(sums):
    return finish_sums(sums, masked, min_votes)

  return finish


def _voting_measurements(stats, sum_measurements):
  return collections.OrderedDict(voting=stats, sum=sum_measurements)


def _voting_process(
    inner, contribution, finish, value_type, weight_type, measure=_voting_measurements
):
  """contribution on clients (None: already made), the inner sum, finish on the
  server; `measure(finish's second output, the sum's measurements)` builds the
  measurements."""

  @tff.federated_computation
  def init_fn():
    return inner.initialize()

  @tff.federated_computation(
      init_fn.type_signature.result,
      tff.FederatedType(value_type, tff.CLIENTS),
      tff.FederatedType(weight_type, tff.CLIENTS),
  )
  def next_fn(state, value, weight):
    if contribution is None:
      del weight  # the cohort's contributions are weighted already
      summed = inner.next(state, value)
    else:
      summed = inner.next(state, tff.federated_map(contribution, (value, weight)))
    result, stats = tff.federated_map(finish, summed.result)
    measurements = tff.federated_zip(measure(stats, summed.measurements))
    return tff.templates.MeasuredProcessOutput(
        summed.state, result, measurements
    )

  return tff.templates.AggregationProcess(init_fn, next_fn)


def _scheduled_voting_process(inner, contribution, finish, schedule, value_type, weight_type):
  """`_voting_process` whose budgets change by round: the state holds the
  inner sum's state and the round counter (`round_num`, advanced every
  round, as the client work's)."""
  init_round, lookup, advance = schedule

  @tff.federated_computation
  def init_fn():
    return tff.federated_zip(collections.OrderedDict(
        sum=inner.initialize(), round_num=tff.federated_eval(init_round, tff.SERVER)
    ))

  @tff.federated_computation(
      init_fn.type_signature.result,
      tff.FederatedType(value_type, tff.CLIENTS),
      tff.FederatedType(weight_type, tff.CLIENTS),
  )
  def next_fn(state, value, weight):
    budgets = tff.federated_broadcast(tff.federated_map(lookup, state.round_num))
    summed = inner.next(state.sum, tff.federated_map(contribution, (value, weight, budgets)))
    result, stats = tff.federated_map(finish, summed.result)
    measurements = tff.federated_zip(
        collections.OrderedDict(voting=stats, sum=summed.measurements)
    )
    new_state = tff.federated_zip(collections.OrderedDict(
        sum=summed.state, round_num=tff.federated_map(advance, state.round_num)
    ))
    return tff.templates.MeasuredProcessOutput(new_state, result, measurements)

  return tff.templates.AggregationProcess(init_fn, next_fn)


class SparseVotingFactory(tff.aggregators.WeightedAggregationFactory):
  """Weighted average in which each client votes only for the weights it kept."""

  def __init__(
      self,
      min_votes: int = 1,
      sum_factory=None,
      budgets: dict[int, int] | None = None,
      presummed: bool = False,
      budget_table=None,
  ):
    """Args:
      min_votes: masked positions kept by fewer clients get no votes.
      sum_factory: the inner unweighted sum (default `SumFactory`).
      budgets: {index of a masked value: most positions its mask may keep};
        an update exceeding any is rejected.
      presummed: each TFF client is a cohort of clients that sends the sum
        of its clients' validated contributions (`contributions`, computed
        by the cohort client work with the same budgets) instead of one
        update: the value type is that of `contributions`' result and the
        weight is not used. The result is the same voting average.
      budget_table: the budgets of every round (gradual sparsification,
        `masks.budget_table`: row j for round j + 1, the last row from
        then on; one entry per key of `budgets`, in key order). The state
        then counts rounds and an update is checked against its round's
        budgets.
    """
    if min_votes < 1:
      raise ValueError(f"min_votes must be >= 1, got {min_votes}")
    self._min_votes = int(min_votes)
    self._sum_factory = sum_factory or tff.aggregators.SumFactory()
    self._budgets = dict(budgets or {})
    self._presummed = presummed
    self._budget_table = budget_table

  def create(self, value_type, weight_type) -> tff.templates.AggregationProcess:
    if self._presummed:
      masked = [tuple(v.shape) != () for v in value_type.votes]
      contribution, sums_type = None, value_type
    else:
      _check_value_type(value_type)
      masked = [tuple(m.shape) != () for m in value_type.masks]
      for i in self._budgets:
        if not 0 <= i < len(masked) or not masked[i]:
          raise ValueError(f"budget given for value {i}, which has no mask")
      budgets_type = None
      if self._budget_table is not None:
        budgets_type = tff.TensorType(np.int32, [len(self._budgets)])
      contribution = _build_contribution(value_type, weight_type, self._budgets, budgets_type)
      sums_type = contribution.type_signature.result
    inner = self._sum_factory.create(sums_type)
    finish = _build_finish(sums_type, masked, self._min_votes)
    if self._budget_table is not None and not self._presummed:
      schedule = _budget_schedule(self._budgets, self._budget_table)
      return _scheduled_voting_process(
          inner, contribution, finish, schedule, value_type, weight_type
      )
    return _voting_process(inner, contribution, finish, value_type, weight_type)


class ValidatingMeanFactory(tff.aggregators.WeightedAggregationFactory):
  """TFF's weighted mean, after the server's check of every update.

  For the dense algorithms (FedAvg, FedAvgM, FedProx): an update with a NaN
  or Inf value, or with a weight that is not positive and finite, gets weight
  0 and zero values, and is counted in the `rejected` measurement.
  """

  def __init__(self, inner: tff.aggregators.WeightedAggregationFactory | None = None):
    self._inner = inner or tff.aggregators.MeanFactory()

  def create(self, value_type, weight_type) -> tff.templates.AggregationProcess:
    inner = self._inner.create(value_type, weight_type)

    @tff.tensorflow.computation(value_type, weight_type)
    def validate(value, weight):
      leaves = tf.nest.flatten(value)
      checks = [tf.reduce_all(tf.math.is_finite(v)) for v in leaves]
      checks += [tf.math.is_finite(weight), weight > 0]
      valid = tf.reduce_all(checks)
      value = tf.nest.map_structure(
          lambda v: tf.where(valid, v, tf.zeros_like(v)), value
      )
      weight = tf.where(valid, weight, tf.zeros_like(weight))
      return value, weight, tf.cast(tf.logical_not(valid), tf.int32)

    @tff.federated_computation
    def init_fn():
      return inner.initialize()

    @tff.federated_computation(
        init_fn.type_signature.result,
        tff.FederatedType(value_type, tff.CLIENTS),
        tff.FederatedType(weight_type, tff.CLIENTS),
    )
    def next_fn(state, value, weight):
      checked = tff.federated_map(validate, (value, weight))
      output = inner.next(state, checked[0], checked[1])
      measurements = tff.federated_zip(
          collections.OrderedDict(
              mean=output.measurements, rejected=tff.federated_sum(checked[2])
          )
      )
      return tff.templates.MeasuredProcessOutput(
          output.state, output.result, measurements
      )

    return tff.templates.AggregationProcess(init_fn, next_fn)


class PresummedMeanFactory(tff.aggregators.WeightedAggregationFactory):
  """The weighted mean of cohorts' presummed updates (dense cohorts).

  Each client value is OrderedDict(deltas, total, rejected) from
  `cohort_work.build_dense_cohort_client_work`: its clients' weighted sum of
  accepted model deltas, their total weight, and the clients it rejected.
  The result is sum(deltas) / sum(total), the weighted mean that
  `ValidatingMeanFactory` computes from single clients (zeros when no client
  was accepted); the weight argument is not used. Measurements: `rejected`.
  """

  def __init__(self, sum_factory=None):
    self._sum_factory = sum_factory or tff.aggregators.SumFactory()

  def create(self, value_type, weight_type) -> tff.templates.AggregationProcess:
    inner = self._sum_factory.create(value_type)

    @tff.tensorflow.computation(value_type)
    def finish(sums):
      mean = [tf.math.divide_no_nan(d, sums["total"]) for d in sums["deltas"]]
      return mean, sums["rejected"]

    # The weights are in the sums.
    return _voting_process(
        inner, None, finish, value_type, weight_type,
        measure=lambda rejected, sums: collections.OrderedDict(sum=sums, rejected=rejected),
    )
