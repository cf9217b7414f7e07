"""`build_feddst`: FedDST (Algorithm 1 of the paper) as a TFF LearningProcess.

Four swappable blocks composed with `compose_learning_process`:
  distributor  -> TFF's broadcast of the global ModelWeights (kernels, biases
                  and the wrappers' masks), or with compact downloads
                  `compact_download.build_broadcast` (kept values and
                  biases; the mask by `tff.federated_select` to the clients
                  that need it, `compact_download.wrap_process`)
  client work  -> `client_work.build_feddst_client_work` (masked training,
                  prune-and-regrow readjustment)
  aggregator   -> `aggregation.SparseVotingFactory` (sparse weighted average
                  with voting)
  finalizer    -> `finalizer.build_sparse_finalizer` (re-prune to the budget,
                  optional server momentum)
RandomMask is the same process with readjustment_ratio = 0; FedProx on the
sparse network adds prox_mu.
"""

import tensorflow as tf
import tensorflow_federated as tff

from tff_feddst import aggregation
from tff_feddst import client_work as client_work_lib
from tff_feddst import cohort_work
from tff_feddst import compact_download
from tff_feddst import compact_voting
from tff_feddst import finalizer as finalizer_lib
from tff_feddst import tier_work
from tff_feddst.sparse_model import SparseLayout


def constant_weights_fn(initial_weights: tff.learning.models.ModelWeights):
  """A no-argument tff computation returning fixed (seeded) initial weights."""

  @tff.tensorflow.computation
  def initial_weights_fn():
    return tff.learning.models.ModelWeights(
        trainable=[tf.constant(w) for w in initial_weights.trainable],
        non_trainable=[tf.constant(w) for w in initial_weights.non_trainable],
    )

  return initial_weights_fn


def build_feddst(
    model_fn,
    layout: SparseLayout,
    initial_weights: tff.learning.models.ModelWeights,
    client_optimizer: tff.learning.optimizers.Optimizer,
    *,
    local_epochs: int,
    readjustment_ratio: float = 0.05,
    rounds_between_readjustments: int = 10,
    readjustment_end_round: int = 0,
    min_votes: int = 1,
    prox_mu: float = 0.0,
    server_optimizer: tff.learning.optimizers.Optimizer | None = None,
    upload_dtype: tf.DType = tf.float32,
    aggregation_factory: tff.aggregators.WeightedAggregationFactory | None = None,
    cohort: "cohort_work.CohortSettings | None" = None,
    readjustment_schedule: str = "cosine",
    budget_table=None,
    remember_old: bool = False,
    compact_messages: bool = False,
    num_tiers: int = 0,
    compact_download: bool = False,
) -> tff.learning.templates.LearningProcess:
  """Builds the FedDST learning process.

  Args:
    model_fn: no-argument function returning a `tff.learning.models.VariableModel`
      over a Keras model wrapped by `sparse_model.wrap_prunable`.
    layout: kernel/mask positions and per-layer budgets.
    initial_weights: numpy ModelWeights (from `sparse_model.initial_model_weights`).
    client_optimizer: the clients' optimizer (`optimizers.build_sgdw`).
    local_epochs: E.
    readjustment_ratio: alpha (0 gives RandomMask).
    rounds_between_readjustments: Delta_R.
    readjustment_end_round: R_end; alpha_r = 0 from this round on.
    min_votes: positions kept by fewer clients are dropped in aggregation.
    prox_mu: FedProx strength (0 disables).
    server_optimizer: None applies the re-pruned average directly (the paper);
      otherwise e.g. `build_sgdm(server_lr, server_momentum)`.
    upload_dtype: tf.float16 rounds uploaded values to half precision.
    aggregation_factory: replaces the sparse voting average.
    cohort: train each TFF client's cohort of clients as one computation
      (`cohort_work`); None trains every client on its own.
    readjustment_schedule: how alpha_r decays, "cosine" or "constant".
    budget_table: gradual sparsification, the layers' budgets of every round
      (`masks.budget_table`, rows in layout order); None: `layout.budgets`.
    remember_old: unvoted global-mask positions keep their previous value.
    compact_messages: compact uploads (`messages`), summed by
      `compact_voting`, or decoded in the cohort before its sum.
    num_tiers: clients of this many sparsity tiers (`tier_work`, section 3.8
      of docs/algorithms.md; `layout` is at the lowest tier sparsity).
    compact_download: with `compact_messages`, compact downloads too.
  """
  schedule = _schedule(
      local_epochs, readjustment_ratio, rounds_between_readjustments,
      readjustment_end_round, upload_dtype, readjustment_schedule, budget_table,
  )
  if num_tiers:  # sparser tiers cannot vote for every position of the global mask
    compact_messages, remember_old = True, True
  # Cohorts decode their clients' compact uploads and send summed contributions.
  cohort_compact = cohort is not None and compact_messages
  finalizer_options = dict(
      budget_table=budget_table, remember_old=remember_old,
      min_votes=min_votes if compact_messages and not cohort_compact else None,
  )
  if compact_download:
    if not compact_messages:
      raise ValueError("compact downloads go with compact uploads")
    return _compose_compact_download(
        model_fn, layout, initial_weights, client_optimizer, schedule, prox_mu,
        server_optimizer, finalizer_options, num_tiers, cohort, min_votes,
    )
  client_work, factory = _pick_client_work(
      compact_messages and not cohort_compact, cohort_compact, model_fn, layout,
      client_optimizer, schedule, min_votes, prox_mu, aggregation_factory, cohort,
      num_tiers,
  )
  return _compose_sparse(
      client_work, factory, initial_weights, layout, server_optimizer, **finalizer_options
  )


def _pick_client_work(per_client_compact, cohort_compact, model_fn, layout,
                      client_optimizer, schedule, min_votes, prox_mu,
                      aggregation_factory, cohort, num_tiers):
  """The client work and its aggregation factory: compact per-client uploads
  summed by the compact voting factory, or dense (cohorts: compact inside)."""
  args = (model_fn, layout, client_optimizer, schedule, min_votes, prox_mu,
          aggregation_factory, cohort, num_tiers)
  if per_client_compact:
    return _compact_client_work_and_factory(*args)
  return _client_work_and_factory(*args, compact=cohort_compact)


def _schedule(local_epochs, readjustment_ratio, rounds_between_readjustments,
              readjustment_end_round, upload_dtype, readjustment_schedule, budget_table):
  """The client work's schedule settings, checked."""
  if local_epochs < 1:
    raise ValueError(f"local_epochs must be >= 1, got {local_epochs}")
  if rounds_between_readjustments < 1:
    raise ValueError("rounds_between_readjustments must be >= 1")
  return dict(
      local_epochs=local_epochs, readjustment_ratio=readjustment_ratio,
      rounds_between_readjustments=rounds_between_readjustments,
      readjustment_end_round=readjustment_end_round, upload_dtype=upload_dtype,
      readjustment_schedule=readjustment_schedule, budget_table=budget_table,
  )


def _compose_compact_download(model_fn, layout, initial_weights, client_optimizer, schedule,
                              prox_mu, server_optimizer, finalizer_options, num_tiers=0,
                              cohort=None, min_votes=1):
  """The process of compact downloads and uploads (`compact_download`), of
  clients of `num_tiers` tiers (`tier_work`), of cohorts (`cohort_work`,
  whose sums the presummed voting factory adds; `min_votes` applies there)
  or of single clients at the layout's budgets."""
  table = schedule["budget_table"]
  if table is not None and num_tiers:
    raise ValueError("compact messages of tiers need fixed budgets (no budget table)")
  _, weights_type, _ = client_work_lib.model_types(model_fn)
  fixed = {k: v for k, v in schedule.items() if k != "budget_table"}
  factory = compact_voting.CompactVotingFactory(layout, table)
  if cohort is not None:
    if num_tiers:
      raise ValueError("clients of sparsity tiers train one by one, not in cohorts")
    budgets = dict(zip(layout.kernel_index, layout.budgets))
    client_work = cohort_work.build_cohort_client_work(
        model_fn, cohort.keras_fn, layout, cohort.hyperparameters(prox_mu),
        image_shape=cohort.image_shape, budgets=budgets, compact=True,
        download_non_trainable=initial_weights.non_trainable, **schedule,
    )
    factory = aggregation.SparseVotingFactory(min_votes, budgets=budgets, presummed=True)
  elif num_tiers:
    client_work = tier_work.build_client_work(
        model_fn, layout, client_optimizer, num_tiers, prox_mu=prox_mu,
        initial_non_trainable=initial_weights.non_trainable, **fixed,
    )
  else:
    client_work = compact_download.build_client_work(
        model_fn, layout, client_optimizer, initial_weights.non_trainable, prox_mu=prox_mu,
        **schedule,
    )
  inner = _compose_sparse(
      client_work, factory, initial_weights, layout,
      server_optimizer, weights_type=weights_type,
      distributor=compact_download.build_broadcast(weights_type, layout, padded=table is None),
      **finalizer_options,
  )
  return compact_download.wrap_process(inner, layout)


def _compose_sparse(client_work, factory, initial_weights, layout, server_optimizer,
                    weights_type=None, distributor=None, **finalizer_options):
  """The process of `distributor` (default: TFF's broadcast of the model
  weights), `client_work`, `factory`'s aggregator and the sparse finalizer
  (`finalizer.build_sparse_finalizer`). `weights_type`: the model weights'
  type (default: what `client_work` takes)."""
  if weights_type is None:
    weights_type = client_work.next.type_signature.parameter[1].member
  result_type = client_work.next.type_signature.result.result.member
  aggregator = factory.create(result_type.update, result_type.update_weight)
  update_out_type = aggregator.next.type_signature.result.result.member
  finalizer = finalizer_lib.build_sparse_finalizer(
      weights_type, update_out_type, layout, server_optimizer, **finalizer_options
  )
  if distributor is None:
    distributor = tff.learning.templates.build_broadcast_process(weights_type)
  return tff.learning.templates.compose_learning_process(
      constant_weights_fn(initial_weights), distributor, client_work, aggregator, finalizer,
  )


def _compact_client_work_and_factory(
    model_fn, layout, client_optimizer, schedule, min_votes, prox_mu, aggregation_factory,
    cohort, num_tiers,
):
  """Per-client work sending compact messages (of `num_tiers` tiers, or
  all at the layout's budgets) and the factory that sums them (the
  finalizer applies `min_votes`)."""
  del min_votes
  table = schedule["budget_table"]
  if cohort is not None or aggregation_factory is not None or (table and num_tiers):
    raise ValueError(
        "compact messages are sent by per-client work with the voting aggregation "
        "(clients of tiers: with fixed budgets)"
    )
  if num_tiers:
    client_work = tier_work.build_client_work(
        model_fn, layout, client_optimizer, num_tiers, prox_mu=prox_mu,
        **{k: v for k, v in schedule.items() if k != "budget_table"},
    )
  else:
    client_work = client_work_lib.build_feddst_client_work(
        model_fn, layout, client_optimizer, prox_mu=prox_mu, compact=True, **schedule
    )
  return client_work, compact_voting.CompactVotingFactory(layout, table)


def _client_work_and_factory(
    model_fn, layout, client_optimizer, schedule, min_votes, prox_mu,
    aggregation_factory, cohort, num_tiers=0, compact=False,
):
  """FedDST's client work (per client or cohorts) and its aggregation
  factory; `compact`: cohorts of clients sending compact uploads."""
  del num_tiers  # 0: clients of tiers send compact messages
  budgets = dict(zip(layout.kernel_index, layout.budgets))
  if cohort is not None:
    client_work = cohort_work.build_cohort_client_work(
        model_fn, cohort.keras_fn, layout, cohort.hyperparameters(prox_mu),
        image_shape=cohort.image_shape, budgets=budgets, compact=compact, **schedule,
    )
    return client_work, aggregation.SparseVotingFactory(
        min_votes, budgets=budgets, presummed=True
    )
  by_key = sorted(range(len(layout.kernel_index)), key=lambda slot: layout.kernel_index[slot])
  table_by_key = None
  if schedule["budget_table"] is not None:
    table_by_key = [[row[slot] for slot in by_key] for row in schedule["budget_table"]]
  client_work = client_work_lib.build_feddst_client_work(
      model_fn, layout, client_optimizer, prox_mu=prox_mu, **schedule
  )
  return client_work, aggregation_factory or aggregation.SparseVotingFactory(
      min_votes, budgets=budgets, budget_table=table_by_key
  )


def compose_dense(
    client_work: tff.learning.templates.ClientWorkProcess,
    factory: tff.aggregators.WeightedAggregationFactory,
    initial_weights: tff.learning.models.ModelWeights,
    server_optimizer: tff.learning.optimizers.Optimizer,
) -> tff.learning.templates.LearningProcess:
  """A dense process from TFF's blocks, as `build_weighted_fed_avg` composes
  them: broadcast, `client_work` (model deltas), `factory`'s weighted mean,
  and the server optimizer applied to the mean delta."""
  weights_type = client_work.next.type_signature.parameter[1].member
  result_type = client_work.next.type_signature.result.result.member
  aggregator = factory.create(result_type.update, result_type.update_weight)
  finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
      server_optimizer, weights_type
  )
  return tff.learning.templates.compose_learning_process(
      constant_weights_fn(initial_weights),
      tff.learning.templates.build_broadcast_process(weights_type),
      client_work,
      aggregator,
      finalizer,
  )


def build_fedprox(
    model_fn,
    initial_weights: tff.learning.models.ModelWeights,
    client_optimizer: tff.learning.optimizers.Optimizer,
    server_optimizer: tff.learning.optimizers.Optimizer,
    prox_mu: float,
) -> tff.learning.templates.LearningProcess:
  """FedProx, one computation per client (`client_work.build_dense_client_work`;
  the server's check of every update: `aggregation.ValidatingMeanFactory`)."""
  client_work = client_work_lib.build_dense_client_work(model_fn, client_optimizer, prox_mu)
  return compose_dense(
      client_work, aggregation.ValidatingMeanFactory(), initial_weights, server_optimizer
  )
