"""FedDST's TFF blocks run through the real TFF runtime.

- the sparse voting aggregation factory against hand-computed results;
- per-round invariants of a short real FedDST run (budgets held exactly,
  zeros outside the mask, readjustment schedule, upload bits = formula);
- S = 0 FedDST equals TFF's own `build_weighted_fed_avg`.
"""

import collections
import functools

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

import keras_models
from tff_feddst import aggregation
from tff_feddst import costs
from tff_feddst import feddst
from tff_feddst import optimizers
from tff_feddst import rounds as rounds_lib
from tff_feddst import sparse_model

# `portability` (pyproject.toml), on the tests that compare floating-point
# results within tolerances: they also run under another instruction set
# (`make test`). The run's budget, mask and bit checks are exact.


# ---------------------------------------------------------------- aggregation


def _aggregate(values, masks, weights, min_votes=1):
  """Runs the factory through TFF on per-client lists of numpy arrays."""
  value_type = tff.types.tensorflow_to_type(
      collections.OrderedDict(
          values=[tf.TensorSpec(np.shape(v), tf.float32) for v in values[0]],
          masks=[tf.TensorSpec(np.shape(m), tf.float32) for m in masks[0]],
      )
  )
  process = aggregation.SparseVotingFactory(min_votes).create(
      value_type, tff.TensorType(np.float32)
  )
  clients = [
      collections.OrderedDict(
          values=[np.asarray(v, np.float32) for v in vs],
          masks=[np.asarray(m, np.float32) for m in ms],
      )
      for vs, ms in zip(values, masks)
  ]
  out = process.next(process.initialize(), clients, [float(w) for w in weights])
  return out.result, out.measurements


# Three clients, one masked 2x3 kernel and one unmasked bias of size 2.
KERNELS = [
    [[1.0, 2.0, 0.0], [4.0, 0.0, 6.0]],
    [[3.0, 0.0, 0.0], [0.0, 5.0, 9.0]],
    [[5.0, 7.0, 0.0], [0.0, 0.0, 3.0]],
]
KERNEL_MASKS = [
    [[1, 1, 0], [1, 0, 1]],
    [[1, 0, 0], [0, 1, 1]],
    [[1, 1, 0], [0, 0, 1]],
]
BIASES = [[1.0, -1.0], [2.0, 0.0], [4.0, 3.0]]
WEIGHTS = [10.0, 20.0, 30.0]


@pytest.mark.portability
def test_voting_average_matches_hand_computation():
  values = [[k, b] for k, b in zip(KERNELS, BIASES)]
  masks = [[m, 1.0] for m in KERNEL_MASKS]
  result, measurements = _aggregate(values, masks, WEIGHTS)
  # Position (0,0): all three vote: (10*1 + 20*3 + 30*5) / 60 = 220/60.
  # Position (0,1): clients 1 and 3: (10*2 + 30*7) / 40 = 230/40.
  # Position (0,2): nobody kept it -> 0.
  # Position (1,0): client 1 only: 10*4/10 = 4.
  # Position (1,1): client 2 only: 5.
  # Position (1,2): all: (10*6 + 20*9 + 30*3) / 60 = 330/60.
  expected_kernel = np.array(
      [[220 / 60, 230 / 40, 0.0], [4.0, 5.0, 330 / 60]], np.float32
  )
  np.testing.assert_allclose(result["values"][0], expected_kernel, rtol=1e-6)
  # Bias: plain weighted average (10*1 + 20*2 + 30*4)/60, (-10 + 0 + 90)/60.
  np.testing.assert_allclose(
      result["values"][1], [170 / 60, 80 / 60], rtol=1e-6
  )
  # Aggregated mask = vote share (votes / total weight), 0 where no vote.
  np.testing.assert_allclose(
      result["masks"][0],
      [[1.0, 40 / 60, 0.0], [10 / 60, 20 / 60, 1.0]],
      rtol=1e-6,
  )
  assert float(result["masks"][1]) == 1.0
  assert measurements["voting"]["voted_positions"] == 5
  assert measurements["voting"]["dropped_by_min_votes"] == 0


def test_position_pruned_by_every_client_is_zero_not_nan():
  values = [[k] for k in KERNELS]
  masks = [[m] for m in KERNEL_MASKS]
  result, _ = _aggregate(values, masks, WEIGHTS)
  kernel = np.asarray(result["values"][0])
  assert np.all(np.isfinite(kernel))
  assert kernel[0, 2] == 0.0
  assert result["masks"][0][0, 2] == 0.0


@pytest.mark.portability
def test_pruned_value_does_not_pull_towards_zero():
  # Client 2 pruned (0,1) and sends 0 there; a plain average would give
  # (10*2 + 20*0 + 30*7)/60; voting ignores client 2.
  values = [[k] for k in KERNELS]
  masks = [[m] for m in KERNEL_MASKS]
  result, _ = _aggregate(values, masks, WEIGHTS)
  assert result["values"][0][0, 1] == pytest.approx(230 / 40)
  assert result["values"][0][0, 1] != pytest.approx(230 / 60)


def test_min_votes_drops_positions_with_too_few_clients():
  values = [[k] for k in KERNELS]
  masks = [[m] for m in KERNEL_MASKS]
  result, measurements = _aggregate(values, masks, WEIGHTS, min_votes=2)
  # Kept by 3, 2, 0, 1, 1, 3 clients: (1,0) and (1,1) are dropped.
  expected = np.array([[220 / 60, 230 / 40, 0.0], [0.0, 0.0, 330 / 60]])
  np.testing.assert_allclose(result["values"][0], expected, rtol=1e-6)
  np.testing.assert_array_equal(
      np.asarray(result["masks"][0]) > 0, [[1, 1, 0], [0, 0, 1]]
  )
  assert measurements["voting"]["dropped_by_min_votes"] == 2
  assert measurements["voting"]["voted_positions"] == 3


def test_client_with_zero_weight_has_no_vote():
  values = [[k] for k in KERNELS]
  masks = [[m] for m in KERNEL_MASKS]
  result, _ = _aggregate(values, masks, [10.0, 0.0, 30.0])
  # (1,1) was kept by client 2 only, whose weight is 0.
  assert result["values"][0][1, 1] == 0.0
  assert result["masks"][0][1, 1] == 0.0
  assert result["values"][0][1, 2] == pytest.approx((10 * 6 + 30 * 3) / 40)


@pytest.mark.portability
def test_all_ones_masks_give_the_plain_weighted_average():
  values = [[k] for k in KERNELS]
  ones = [[np.ones((2, 3))] for _ in KERNELS]
  result, _ = _aggregate(values, ones, WEIGHTS)
  expected = sum(w * np.array(k) for w, k in zip(WEIGHTS, KERNELS)) / 60
  np.testing.assert_allclose(result["values"][0], expected, rtol=1e-6)


# ------------------------------------------------------- a short real run

ROUNDS = 5
CLIENTS = 4
DELTA_R = 2
R_END = 4  # readjust in rounds 1 and 3 only (round 5 has alpha_r = 0)


def _input_spec(shape):
  return collections.OrderedDict(
      x=tf.TensorSpec([None, *shape], tf.float32), y=tf.TensorSpec([None], tf.int32)
  )


def _client_datasets(fed_data, round_num, epochs=1):
  ids = fed_data.nonempty_train_client_ids
  rng = np.random.default_rng(round_num)
  chosen = rng.choice(len(ids), CLIENTS, replace=False)
  out = []
  for i in chosen:
    ds = fed_data.train_client_data.create_tf_dataset_for_client(ids[i])
    ds = ds.shuffle(64, seed=round_num * 100 + int(i)).batch(16)
    out.append(ds.repeat(epochs) if epochs > 1 else ds)
  return out


@pytest.fixture(scope="module")
def small_federated_data(fashion_mnist_available):
  from tff_feddst import data

  return data.load_federated_data(
      "fashion_mnist", "pathological", total_clients=20, seed=3
  )


@pytest.fixture(scope="module")
def feddst_run(small_federated_data):
  """Runs FedDST (S=0.8) on real data and keeps every round's output."""
  fed = small_federated_data
  keras_fn = lambda: keras_models.build_model("mnist_cnn", fed.input_shape, 10)  # noqa: E731
  layout = sparse_model.build_layout(
      sparse_model.wrap_prunable(keras_fn()), 0.8, "erk"
  )
  initial = sparse_model.initial_model_weights(keras_fn, 0, layout)
  process = feddst.build_feddst(
      sparse_model.make_model_fn(keras_fn, _input_spec(fed.input_shape), True),
      layout,
      initial,
      optimizers.build_sgdw(),
      local_epochs=1,
      readjustment_ratio=0.1,
      rounds_between_readjustments=DELTA_R,
      readjustment_end_round=R_END,
  )
  state = process.initialize()
  rounds = []
  previous = process.get_model_weights(state)
  READ_FROM_STATE.append(_read_from_state(process, state))
  for r in range(1, ROUNDS + 1):
    output = process.next(state, _client_datasets(fed, r))
    state = output.state
    weights = process.get_model_weights(state)
    rounds.append((previous, weights, output.metrics))
    READ_FROM_STATE.append(_read_from_state(process, state))
    previous = weights
  return layout, initial, rounds


# The weights the driver reads from each state (`rounds.model_weights`), by
# round from 0, filled by `feddst_run`.
READ_FROM_STATE = []


def _read_from_state(process, state):
  # The state holds the weights: the driver reads them without calling
  # the process (the path under test, not its fallback).
  assert isinstance(state, tff.learning.templates.LearningAlgorithmState)
  return rounds_lib.model_weights(process, state)


def test_the_driver_reads_what_get_model_weights_returns(feddst_run):
  """A run reads the global weights from the state in Python, without a
  call to TFF's worker; they are what the process's get_model_weights
  gives, bit for bit, in every round."""
  _, initial, rounds = feddst_run
  by_process = [rounds[0][0]] + [weights for _, weights, _ in rounds]
  assert len(READ_FROM_STATE) == len(by_process) == ROUNDS + 1
  for read, want in zip(READ_FROM_STATE, by_process):
    assert isinstance(read, tff.learning.models.ModelWeights)
    for part in ("trainable", "non_trainable"):
      got, expected = getattr(read, part), getattr(want, part)
      assert len(got) == len(expected)
      for a, b in zip(got, expected):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(READ_FROM_STATE[0].trainable[0], initial.trainable[0])


def test_initial_model_holds_exact_budgets(feddst_run):
  layout, initial, _ = feddst_run
  kernels, masks = sparse_model.kernels_and_masks(initial, layout)
  for kernel, mask, budget in zip(kernels, masks, layout.budgets):
    assert int(mask.sum()) == budget
    assert np.count_nonzero(kernel * (1 - mask)) == 0


def test_every_round_holds_the_budget_and_zeros_outside_the_mask(feddst_run):
  layout, _, rounds = feddst_run
  for _, weights, _ in rounds:
    kernels, masks = sparse_model.kernels_and_masks(weights, layout)
    for kernel, mask, budget in zip(kernels, masks, layout.budgets):
      assert set(np.unique(mask)) <= {0.0, 1.0}
      assert int(mask.sum()) == budget
      assert np.count_nonzero(kernel * (1 - mask)) == 0
      assert np.count_nonzero(kernel) <= budget
    # Global sparsity is the target up to one weight per layer.
    kept = sum(int(m.sum()) for m in masks)
    assert abs(kept - 0.2 * layout.num_prunable) <= len(masks)


def test_readjustment_happens_exactly_on_schedule(feddst_run):
  layout, _, rounds = feddst_run
  readjusted = []
  for r, (_, _, metrics) in enumerate(rounds, start=1):
    plan = metrics["client_work"]["readjustment"]
    ks = np.asarray(plan["num_readjusted"])
    alpha_r = 0.1 / 2 * (1 + np.cos(np.pi * r / R_END)) if r < R_END else 0.0
    if ks.sum() > 0:
      readjusted.append(r)
      # k_l = round(alpha_r * budget_l); a full (dense) layer changes nothing.
      np.testing.assert_array_equal(
          ks, [round(alpha_r * b) for b in layout.budgets]
      )
      assert metrics["client_work"]["clients"]["mask_changed"] == CLIENTS
    else:
      assert metrics["client_work"]["clients"]["mask_changed"] == 0
  assert readjusted == [1, 3]


def test_global_mask_changes_only_after_readjustment_rounds(feddst_run):
  layout, _, rounds = feddst_run
  changed = []
  for r, (before, after, metrics) in enumerate(rounds, start=1):
    _, m0 = sparse_model.kernels_and_masks(before, layout)
    _, m1 = sparse_model.kernels_and_masks(after, layout)
    differs = any(not np.array_equal(a, b) for a, b in zip(m0, m1))
    assert metrics["finalizer"]["mask_changed"] == int(differs)
    if differs:
      changed.append(r)
  assert set(changed) <= {1, 3}
  assert 1 in changed


def test_upload_bits_equal_the_formula_every_round(feddst_run):
  layout, _, rounds = feddst_run
  size = costs.ModelSize(layout.num_prunable, layout.num_unmasked)
  n, b, kept = layout.num_prunable, layout.num_unmasked, layout.num_kept
  for r, (_, _, metrics) in enumerate(rounds, start=1):
    stats = metrics["client_work"]["clients"]
    ledger = costs.CommunicationLedger(size, sparse=True)
    bits = ledger.upload(
        CLIENTS, int(stats["uploaded_values"]), int(stats["mask_changed"])
    )
    readjust_round = r in (1, 3)
    # Spec: 32 (1 - S) n + 32 b per client, + n mask bits in readjustment rounds.
    expected = CLIENTS * (32 * kept + 32 * b + (n if readjust_round else 0))
    assert bits == expected
    assert bits <= CLIENTS * ((32 * kept + n) + 32 * b)


def test_download_charges_the_mask_only_when_the_client_lacks_it():
  size = costs.ModelSize(num_prunable=1000, num_unmasked=10)
  ledger = costs.CommunicationLedger(size, sparse=True)
  # New clients get the mask.
  assert ledger.download(["a", "b"], active=200) == 2 * (32 * 210 + 1000)
  # Same mask again: values only.
  assert ledger.download(["a"], active=200) == 32 * 210
  ledger.global_mask_changed()
  assert ledger.download(["a", "c"], active=200) == 2 * (32 * 210 + 1000)
  assert ledger.download(["a"], active=200) == 32 * 210
  assert ledger.cumulative_download_bits == 6 * 32 * 210 + 4 * 1000


def test_dense_costs_are_32_bits_per_parameter():
  size = costs.ModelSize(num_prunable=1000, num_unmasked=10)
  ledger = costs.CommunicationLedger(size, sparse=False)
  assert ledger.download(["a", "b", "c"], active=None) == 3 * 32 * 1010
  assert ledger.upload(3) == 3 * 32 * 1010
  half = costs.CommunicationLedger(size, sparse=True, upload_value_bits=16)
  assert half.upload(2, uploaded_values=400, masks_sent=1) == 16 * (400 + 20) + 1000


# ------------------------------------------- S = 0 equals TFF's own FedAvg


def _tiny_keras(input_shape=(8, 8, 1), classes=3):
  layers = tf.keras.layers
  return tf.keras.Sequential(
      [
          layers.InputLayer(input_shape=input_shape),
          layers.Conv2D(4, 3, activation="relu", name="conv"),
          layers.Flatten(),
          layers.Dense(classes, name="logits"),
      ]
  )


def test_rescaled_initial_weights_divide_each_kernel_by_sqrt_of_its_density():
  """`--sparse_init=rescaled`: the same masks, and each kernel's kept Keras
  weights divided by sqrt(kept / size); a dense kernel (S = 0) unchanged."""
  for sparsity in (0.0, 0.5, 0.9):
    layout = sparse_model.build_layout(
        sparse_model.wrap_prunable(_tiny_keras()), sparsity, "uniform"
    )
    plain = sparse_model.initial_model_weights(_tiny_keras, 3, layout)
    rescaled = sparse_model.initial_model_weights(_tiny_keras, 3, layout, rescaled=True)
    for a, b in zip(plain.non_trainable, rescaled.non_trainable, strict=True):
      np.testing.assert_array_equal(a, b)
    kernels, masks = sparse_model.kernels_and_masks(plain, layout)
    new_kernels, _ = sparse_model.kernels_and_masks(rescaled, layout)
    for kernel, new, mask, budget in zip(kernels, new_kernels, masks, layout.budgets):
      density = budget / mask.size
      assert (density == 1.0) == (sparsity == 0.0)
      # One float32 rounding of a division.
      np.testing.assert_allclose(new, kernel / np.sqrt(density), rtol=1e-7, atol=0)
      assert np.count_nonzero(new) == np.count_nonzero(kernel) == budget
      if density == 1.0:
        np.testing.assert_array_equal(new, kernel)
    others = [i for i in range(len(plain.trainable)) if i not in layout.kernel_index]
    for i in others:  # biases
      np.testing.assert_array_equal(plain.trainable[i], rescaled.trainable[i])


def _tiny_client_data(seed, num_clients=3):
  rng = np.random.default_rng(seed)
  out = []
  for c in range(num_clients):
    n = 20 + 7 * c  # unequal sizes, so weighting matters
    x = rng.random((n, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 3, n).astype(np.int32)
    out.append(
        tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y))
    )
  return out


@pytest.mark.portability
def test_zero_sparsity_feddst_equals_tff_fed_avg():
  epochs = 2
  spec = _input_spec((8, 8, 1))
  optimizer = optimizers.build_sgdw(0.05, 0.9, 0.001)
  layout = sparse_model.build_layout(
      sparse_model.wrap_prunable(_tiny_keras()), 0.0, "erk"
  )
  initial = sparse_model.initial_model_weights(_tiny_keras, 7, layout)
  sparse_process = feddst.build_feddst(
      sparse_model.make_model_fn(_tiny_keras, spec, True),
      layout,
      initial,
      optimizer,
      local_epochs=epochs,
      readjustment_ratio=0.05,  # a no-op at S = 0: every position is kept
      rounds_between_readjustments=1,
      readjustment_end_round=10,
  )
  fedavg = tff.learning.algorithms.build_weighted_fed_avg(
      sparse_model.make_model_fn(_tiny_keras, spec, False),
      client_optimizer_fn=optimizer,
      server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0),
  )
  s_state = sparse_process.initialize()
  d_state = fedavg.initialize()
  d_state = fedavg.set_model_weights(
      d_state,
      tff.learning.models.ModelWeights(list(initial.trainable), []),
  )
  for r in range(2):
    clients = _tiny_client_data(seed=r)
    one_epoch = [ds.shuffle(64, seed=r * 10 + i).batch(8) for i, ds in enumerate(clients)]
    s_state = sparse_process.next(s_state, one_epoch).state
    d_state = fedavg.next(d_state, [ds.repeat(epochs) for ds in one_epoch]).state
  sparse_weights = sparse_process.get_model_weights(s_state).trainable
  dense_weights = fedavg.get_model_weights(d_state).trainable
  assert len(sparse_weights) == len(dense_weights)
  moved = False
  for a, b, w0 in zip(sparse_weights, dense_weights, initial.trainable):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    moved |= not np.allclose(a, w0)
  assert moved, "training did not change the weights"


@functools.cache
def _readjusting_tiny_feddst():
  """(layout, initial weights, process): FedDST at 50% sparsity on the tiny
  network, readjusting 30% every round; built once for the tests below."""
  layout = sparse_model.build_layout(sparse_model.wrap_prunable(_tiny_keras()), 0.5, "erk")
  initial = sparse_model.initial_model_weights(_tiny_keras, 3, layout)
  process = feddst.build_feddst(
      sparse_model.make_model_fn(_tiny_keras, _input_spec((8, 8, 1)), True), layout, initial,
      optimizers.build_sgdw(0.05, 0.9, 0.001), local_epochs=2, readjustment_ratio=0.3,
      rounds_between_readjustments=1, readjustment_end_round=10,
  )
  return layout, initial, process


@pytest.mark.portability
def test_the_runs_compile_computes_what_tffs_own_compile_does():
  """Runs and tests run computations through `runtime.install_local_context`:
  on a CPU, TFF's native compile without its static Grappler pass
  (`runtime.compile_for_cpu`). Two readjusting FedDST rounds, under it and
  under TFF's own context, from the same state: the same masks, the same
  weights. Grappler's rewrites may reorder a sum, hence a float32 tolerance
  (same kernels, same process, two rounds)."""
  from tff_feddst import runtime  # pylint: disable=g-import-not-at-top

  on_gpu = bool(tf.config.list_physical_devices("GPU"))
  want = tff.backends.native.desugar_and_transform_to_native if on_gpu else runtime.compile_for_cpu
  assert runtime.native_compiler() is want
  layout, initial, process = _readjusting_tiny_feddst()

  def two_rounds():
    state = process.initialize()
    for r in range(2):
      data = [ds.shuffle(64, seed=r * 10 + i).batch(8) for i, ds in enumerate(_tiny_client_data(r))]
      state = process.next(state, data).state
    return process.get_model_weights(state)

  runtime.install_local_context()
  ours = two_rounds()
  tffs_own = tff.backends.native.create_sync_local_cpp_execution_context()
  try:
    with tff.framework.get_context_stack().install(tffs_own):
      theirs = two_rounds()
  finally:
    del tffs_own  # its worker stops when the context is finalised
  for i in layout.mask_index:
    np.testing.assert_array_equal(ours.non_trainable[i], theirs.non_trainable[i])
  assert any(  # the rounds readjusted
      not np.array_equal(ours.non_trainable[i], initial.non_trainable[i]) for i in layout.mask_index
  )
  for a, b in zip(ours.trainable, theirs.trainable):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_compile_for_cpu_gives_the_proto_of_tffs_native_form():
  """`runtime.compile_for_cpu` takes `transform_to_native_form`'s steps on
  the desugared building block instead of on a copy read back from its
  proto: the same computation, for FedDST's round and its other
  computations. TFF names the
  locals it introduces with a random three-letter prefix (`_abc12`), so
  those names compare by their numbers."""
  import re  # pylint: disable=g-import-not-at-top

  from tff_feddst import runtime  # pylint: disable=g-import-not-at-top

  def text(comp):
    return re.sub(r'"_[a-z]{3}(\d+)"', r'"_\1"', str(comp.get_proto(comp)))

  _, _, process = _readjusting_tiny_feddst()
  for comp in (process.initialize, process.next, process.get_model_weights):
    ours, tffs = runtime.compile_for_cpu(comp), runtime.compile_for_cpu_reference(comp)
    assert text(ours) == text(tffs)
    assert ours.type_signature.is_equivalent_to(tffs.type_signature)
  assert text(runtime.compile_for_cpu(process.next)) != text(process.next)  # it did compile


def test_the_local_worker_is_polled_quickly_and_restarts():
  """`runtime.install_local_context` sets TFF's local-worker wait to 10 ms
  polls and a 20-100 ms gRPC reconnect backoff (TFF 0.87 sleeps 1 s per
  poll and gRPC first retries after about 1 s). A worker stopped between
  two computations is replaced by a new one that answers."""
  from tensorflow_federated.python.core.impl.executor_stacks import executor_factory  # pylint: disable=g-import-not-at-top

  from tff_feddst import runtime  # pylint: disable=g-import-not-at-top

  runtime.install_local_context()
  assert executor_factory._LOCALHOST_SERVER_WAIT_TIME_SEC == runtime.WORKER_POLL_SECONDS  # pylint: disable=protected-access
  options = executor_factory._GRPC_CHANNEL_OPTIONS  # pylint: disable=protected-access
  assert set(runtime.WORKER_RECONNECT_OPTIONS) <= set(options)
  runtime.connect_to_local_worker_quickly()  # a second call adds nothing
  assert len(options) == len(set(options))

  @tff.tensorflow.computation(tf.int32)
  def add_one(x):
    return x + 1

  assert add_one(1) == 2
  first = {p.pid for p in runtime.tff_worker_processes()}
  assert first
  runtime.stop_tff_workers()
  assert add_one(41) == 42
  second = {p.pid for p in runtime.tff_worker_processes()}
  assert second and not second & first
