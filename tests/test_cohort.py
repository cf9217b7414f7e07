"""The cohort engine equals training the clients one by one.

`cohort.CohortNetwork` runs G clients' networks as grouped convolutions and
batched matmuls; `cohort_work` trains a cohort in one TF computation and
sends its summed voting contributions. The per-client client work is the
reference: the same weights, masks, metrics and statistics must come out.
"""

import collections
import functools

import numpy as np
import pytest
import tensorflow as tf

import keras_models
from tff_feddst import cohort
from tff_feddst import cohort_work
from tff_feddst import compact_download
from tff_feddst import feddst
from tff_feddst import masks as masks_lib
from tff_feddst import messages
from tff_feddst import optimizers
from tff_feddst import sparse_model
from tff_feddst import structured

# `portability` (pyproject.toml) marks the tests that run the networks
# (convolutions and matrix products, whose oneDNN kernels change with the
# instruction set): `make test` runs them under another one too. Packing and
# the readjustment rule use no oneDNN kernel. Of parametrized tests, the
# second pass runs the cases whose networks compute differently: FedAvgM
# trains its clients as FedAvg does (its momentum is the server's), and 1x16
# blocks train as 1x4 ones do.
PORTABLE = pytest.mark.portability


@PORTABLE
@pytest.mark.parametrize(
    "name, shape, classes, widths",
    [
        ("mnist_cnn", (28, 28, 1), 10, {"conv1": 3, "conv2": 4, "dense1": 6}),
        ("cifar10_cnn", (32, 32, 3), 10, {"conv1": 2, "conv2": 3, "dense1": 5, "dense2": 4}),
        ("cifar100_cnn", (32, 32, 3), 100, {"conv1": 2, "conv2": 3, "dense1": 5}),
        ("leaf_cnn", (28, 28, 1), 62, {"conv1": 3, "conv2": 4, "dense1": 8}),
        # Global average pooling: each client's channel means, in its order.
        ("paper2_cnn", (28, 28, 1), 10, {"conv1": 3, "conv2": 5}),
    ],
)
def test_cohort_logits_equal_each_clients_keras_logits(name, shape, classes, widths):
  models = []
  for g in range(3):
    tf.keras.utils.set_random_seed(g)
    models.append(keras_models.build_model(name, shape, classes, widths=widths))
  params = [
      tf.stack([m.trainable_weights[i] for m in models])
      for i in range(len(models[0].trainable_weights))
  ]
  x = np.random.default_rng(0).random((3, 5, *shape), np.float32)
  got = cohort.CohortNetwork(sparse_model.wrap_prunable(models[0])).logits(params, x)
  for g, model in enumerate(models):
    np.testing.assert_allclose(got[g], model(x[g]), rtol=1e-5, atol=1e-5)


def test_default_cohorts_hold_at_most_10_clients_split_evenly():
  from tff_feddst import rounds  # pylint: disable=g-import-not-at-top

  size = rounds.default_cohort_size
  assert [size(k) for k in (1, 5, 10, 11, 20, 21, 25, 50, 100)] == [1, 5, 10, 6, 10, 7, 9, 10, 10]
  # Cohorts of that size cover the clients in the fewest cohorts of <= 10.
  for k in range(1, 130):
    s = size(k)
    assert s <= 10 and -(-k // s) == -(-k // 10), k
  # With remote workers, one cohort per worker, however large.
  assert [size(100, 2), size(7, 2), size(1, 3)] == [50, 4, 1]


def test_pack_pads_short_clients_and_marks_the_first_epoch():
  def batch(n, start):
    return {"x": np.full((n, 1), start, np.float32), "y": np.arange(start, start + n, dtype=np.int32)}

  packed = cohort.pack(
      [
          [[batch(2, 0), batch(1, 2)], [batch(2, 10), batch(1, 12)]],  # 3 examples, 2 epochs
          [[batch(2, 20)], [batch(2, 30)]],  # 2 examples: one batch per epoch
      ],
      batch_size=2,
  )
  assert packed.x.shape == (4, 2, 2, 1)
  np.testing.assert_array_equal(packed.valid[:, 0], [[1, 1], [1, 0], [1, 1], [1, 0]])
  np.testing.assert_array_equal(packed.valid[:, 1], [[1, 1], [1, 1], [0, 0], [0, 0]])
  np.testing.assert_array_equal(packed.first[:, 0], [[1, 1], [1, 0], [0, 0], [0, 0]])
  np.testing.assert_array_equal(packed.first[:, 1], [[1, 1], [0, 0], [0, 0], [0, 0]])
  np.testing.assert_array_equal(packed.y[:, 1, 0], [20, 30, 0, 0])
  np.testing.assert_array_equal(packed.num_examples, [6, 4])
  # The data set cuts each step to the most examples a client has in it.
  np.testing.assert_array_equal(packed.widths, [2, 2, 2, 1])
  steps = list(packed.dataset().as_numpy_iterator())
  assert [s["x"].shape for s in steps] == [(2, 2, 1), (2, 2, 1), (2, 2, 1), (2, 1, 1)]
  for t, step in enumerate(steps):
    w = packed.widths[t]
    for key in ("x", "y", "valid", "first"):
      np.testing.assert_array_equal(step[key], getattr(packed, key)[t, :, :w])


def test_clients_packed_from_the_arrays_read_what_their_data_sets_give(fashion_mnist_available):
  """The driver packs cohorts from the data arrays, in the order each
  client's shuffled data set would give its batches (`rounds.client_dataset`):
  unequal clients (a Dirichlet split), sizes that are and are not multiples
  of the batch, a client smaller than one batch; the packed cohorts are equal."""
  from tff_feddst import data as data_lib  # pylint: disable=g-import-not-at-top
  from tff_feddst import rounds  # pylint: disable=g-import-not-at-top

  fed = data_lib.load_federated_data(
      "fashion_mnist", "dirichlet", total_clients=1000, dirichlet_beta=0.5, seed=3
  )
  # A run sets TensorFlow's global seed (its initial weights), and
  # tf.data's shuffle then seeds from the pair (global seed, op seed).
  tf.keras.utils.set_random_seed(5)
  ids = list(fed.nonempty_train_client_ids)
  sizes = {cid: fed.num_train_examples(cid) for cid in ids}
  batch, epochs = 32, 3
  chosen = [
      next(c for c in ids if sizes[c] % batch == 0),
      next(c for c in ids if sizes[c] % batch and sizes[c] > batch),
      next(c for c in ids if sizes[c] < batch),
      ids[0],
  ]
  clients = [(cid, 1000 + i) for i, cid in enumerate(chosen)]
  from_arrays = cohort_work.client_epochs_from_arrays(fed, clients, epochs, batch)
  for (cid, shuffle_seed), got in zip(clients, from_arrays):
    want = list(
        rounds.client_dataset(fed, cid, batch, shuffle_seed, 1).repeat(epochs).as_numpy_iterator()
    )
    got = [b for epoch in got for b in epoch]
    assert len(got) == len(want) == epochs * -(-sizes[cid] // batch)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a["x"], b["x"])
      np.testing.assert_array_equal(a["y"], b["y"])
  per_epoch = [-(-sizes[cid] // batch) for cid, _ in clients]
  datasets = [rounds.client_dataset(fed, cid, batch, s, 1) for cid, s in clients]
  from_sets = cohort_work.pack_cohorts(datasets, epochs, per_epoch, batch, 3)
  # What runs use (each pool in row order, indexed by position) and the
  # reference through each client's batches (pools found by the bytes).
  for packer in (cohort_work.pack_cohorts_from_arrays, cohort_work.pack_cohorts_by_batches):
    from_arrays = packer(fed, clients, epochs, batch, 3)
    assert len(from_sets) == len(from_arrays) == 2
    for a, b in zip(from_sets, from_arrays):
      steps_a, steps_b = (
          list(cohort.steps_dataset(v.get_single_element()).as_numpy_iterator()) for v in (a, b)
      )
      assert len(steps_a) == len(steps_b)
      for step_a, step_b in zip(steps_a, steps_b):
        assert set(step_a) == set(step_b)
        for key in ("x", "y", "valid", "first"):
          assert step_a[key].dtype == step_b[key].dtype
          np.testing.assert_array_equal(step_a[key], step_b[key])


@PORTABLE
@pytest.mark.parametrize(
    "hp",
    [
        cohort.Hyperparameters(0.05, 0.9, 0.001, prox_mu=0.1),
        cohort.Hyperparameters(0.05, 0.0, 0.001),
    ],
    ids=["momentum_fedprox", "plain_sgd"],
)
def test_training_in_variables_equals_training_on_tensors(hp):
  """`cohort.train`'s ResourceApplyMomentum path is the tensor path's
  arithmetic: the same float32 operations in the same order. Client 1 has
  fewer examples, so its steps after its last batch take the path for
  steps with idle clients; masks keep masked weights at exactly 0."""
  tf.keras.utils.set_random_seed(0)
  model = sparse_model.wrap_prunable(
      keras_models.build_model("mnist_cnn", (28, 28, 1), 10, widths={"conv1": 3, "conv2": 4, "dense1": 8})
  )
  network = cohort.CohortNetwork(model)
  rng = np.random.default_rng(1)
  g = 3
  params = [tf.constant(np.stack([rng.normal(0, 0.3, w.shape) for _ in range(g)]), tf.float32)
            for w in model.trainable_weights]
  masks = [tf.constant(rng.random(p.shape) < 0.3, tf.float32) if p.shape.rank > 2 else None
           for p in params]
  params = [p * m if m is not None else p for p, m in zip(params, masks)]

  def batches(n, seed):
    r = np.random.default_rng(seed)
    return [[{"x": r.random((min(4, n - s), 28, 28, 1), np.float32),
              "y": r.integers(0, 10, min(4, n - s)).astype(np.int32)} for s in range(0, n, 4)]
            for _ in range(2)]  # 2 epochs

  packed = cohort.pack([batches(10, 0), batches(5, 1), batches(10, 2)], batch_size=4)
  # Steps 1-4 train every client (the apply path), steps 5-6 clients 0 and 2.
  assert packed.valid.sum(axis=2).min(axis=1).tolist() == [4, 1, 2, 1, 0, 0]

  # In TFF's worker, as runs train them.
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  value = packed.value()

  def computation(fused):
    @tff.tensorflow.computation
    def run():
      trained, totals = cohort.train(
          network, hp, [tf.constant(p) for p in params],
          [None if m is None else tf.constant(m) for m in masks],
          cohort.steps_dataset(value), fused=fused,
      )
      return trained, list(totals)

    return run()

  fused, tensors = computation(True), computation(False)
  # Without graph optimisations the two are equal bit for bit (checked by
  # hand in a process started with Grappler off). The worker's Grappler
  # regroups float32 products and sums differently in the two graphs: last-
  # bit differences, which 6 steps of lr 0.05 carry to about 1e-5 relative,
  # the tolerance of cohort against per-client training.
  for a, b in zip(fused[0] + fused[1], tensors[0] + tensors[1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for p, m in zip(fused[0], masks):
    if m is not None:
      assert np.all(p[m.numpy() == 0] == 0)
  assert not np.array_equal(fused[0][4], params[4].numpy())  # it trained
  np.testing.assert_array_equal(fused[1][0], [20, 10, 20])  # examples per client


def test_batched_readjust_equals_the_per_client_rule():
  from tff_feddst import masks as masks_lib  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(1)
  weights = rng.normal(size=(4, 6, 5)).astype(np.float32)
  weights[:, 0, :2] = 0.25  # ties in magnitude
  mask = (rng.random((4, 6, 5)) < 0.5).astype(np.float32)
  gradient = rng.normal(size=(4, 6, 5)).astype(np.float32)
  gradient[:, 1, :3] = 1.5  # ties in gradient
  weights *= mask
  new_mask, new_weights = cohort.readjust(weights, mask, gradient, 3)
  for g in range(4):
    want_mask, want_weights = masks_lib.readjust(weights[g], mask[g], gradient[g], 3)
    np.testing.assert_array_equal(new_mask[g], want_mask)
    np.testing.assert_array_equal(new_weights[g], want_weights)


def test_batched_readjust_in_whole_filters_equals_the_per_client_rule():
  """--conv_block=kernel: 3x3 filters of a [3, 3, 4, 6] kernel, 2 of them
  moved per client, as `masks.readjust` moves them one client at a time."""
  rng = np.random.default_rng(2)
  grid = rng.random((4, 1, 1, 4, 6)) < 0.5
  mask = np.broadcast_to(grid, (4, 3, 3, 4, 6)).astype(np.float32)
  weights = rng.normal(size=(4, 3, 3, 4, 6)).astype(np.float32) * mask
  gradient = rng.normal(size=(4, 3, 3, 4, 6)).astype(np.float32)
  new_mask, new_weights = cohort.readjust(weights, mask, gradient, 18, rows=9)
  for g in range(4):
    want_mask, want_weights = masks_lib.readjust(weights[g], mask[g], gradient[g], 18, rows=9)
    np.testing.assert_array_equal(new_mask[g], want_mask)
    np.testing.assert_array_equal(new_weights[g], want_weights)
    assert np.asarray(new_mask[g]).sum() == mask[g].sum()


WIDTHS = {"conv1": 3, "conv2": 4, "dense1": 8}
SPEC = collections.OrderedDict(
    x=tf.TensorSpec([None, 28, 28, 1], tf.float32), y=tf.TensorSpec([None], tf.int32)
)
SIZES = (9, 4, 14, 3, 9)  # unequal clients: different batch counts and sizes
EPOCHS, BATCH = 2, 4


def _keras():
  return keras_models.build_model("mnist_cnn", (28, 28, 1), 10, widths=WIDTHS)


def _datasets(round_num, poisoned=None):
  rng = np.random.default_rng(round_num)
  datasets = []
  for c, n in enumerate(SIZES):
    x = rng.random((n, 28, 28, 1), np.float32)
    if c == poisoned:
      x[0, 0, 0, 0] = np.nan
    y = rng.integers(0, 10, n).astype(np.int32)
    ds = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y))
    datasets.append(ds.shuffle(n, seed=10 * round_num + c, reshuffle_each_iteration=True).batch(BATCH))
  return datasets


def _cohorts(datasets, cohort_size=3):
  per_epoch = [-(-n // BATCH) for n in SIZES]
  return cohort_work.pack_cohorts(datasets, EPOCHS, per_epoch, BATCH, cohort_size)


def _settings():
  return cohort_work.CohortSettings(_keras, 0.05, 0.9, 0.001, (28, 28, 1))


def _assert_same_round(ref, coh, out_ref, out_coh, layout_masks, upload_dtype=tf.float32,
                       layout=None):
  """The cohort round equals the per-client one; given `layout`, the cohort
  sent compact uploads and measured the formula's bits."""
  w_ref, w_coh = ref.get_model_weights(out_ref.state), coh.get_model_weights(out_coh.state)
  # float16 uploads: a float32 rounding difference can move an uploaded value
  # by one float16 step (2**-11 of it).
  rtol, atol = (1e-5, 1e-6) if upload_dtype == tf.float32 else (1e-3, 1e-5)
  for a, b in zip(w_ref.trainable, w_coh.trainable):
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
  for i in layout_masks:
    np.testing.assert_array_equal(w_ref.non_trainable[i], w_coh.non_trainable[i])
  m_ref, m_coh = out_ref.metrics["client_work"], out_coh.metrics["client_work"]
  clients = dict(m_coh["clients"])
  if layout is not None:  # compact uploads: the bits measured on the clients' messages
    value_bits = 32 if upload_dtype == tf.float32 else 16
    packed_mask_bits = 8 * sum(
        messages.packed_size(messages.mask_units(s, r))
        for s, r in zip(layout.kernel_shapes, layout.all_rows)
    )
    assert int(clients.pop("upload_bits")) == (
        int(clients["clients"]) * value_bits * (layout.num_kept + layout.num_unmasked)
        + int(clients["mask_changed"]) * packed_mask_bits
    )
  assert dict(m_ref["clients"]) == clients
  for key in ("loss", "accuracy"):
    assert float(m_coh["train"][key]) == pytest.approx(float(m_ref["train"][key]), rel=1e-5)
  assert out_ref.metrics["aggregator"]["voting"] == out_coh.metrics["aggregator"]["voting"]


@functools.cache
def _feddst_pair(upload_dtype):
  """(layout, the per-client FedDST process, the cohort one): readjusting
  every round, with a FedProx term; built once for the module's tests."""
  layout = sparse_model.build_layout(sparse_model.wrap_prunable(_keras()), 0.6, "erk")
  initial = sparse_model.initial_model_weights(_keras, 0, layout)
  common = dict(
      local_epochs=EPOCHS, readjustment_ratio=0.3, rounds_between_readjustments=1,
      readjustment_end_round=5, prox_mu=0.01, upload_dtype=upload_dtype,
  )
  model_fn = sparse_model.make_model_fn(_keras, SPEC, wrapped=True)
  optimizer = optimizers.build_sgdw(0.05, 0.9, 0.001)
  ref = feddst.build_feddst(model_fn, layout, initial, optimizer, **common)
  coh = feddst.build_feddst(
      model_fn, layout, initial, optimizer, cohort=_settings(), compact_messages=True, **common
  )
  return layout, ref, coh


@PORTABLE
@pytest.mark.parametrize("upload_dtype", [tf.float32, tf.float16])
def test_cohort_feddst_equals_per_client_feddst(upload_dtype):
  layout, ref, coh = _feddst_pair(upload_dtype)
  s_ref, s_coh = ref.initialize(), coh.initialize()
  for round_num in (1, 2):  # both readjust
    out_ref = ref.next(s_ref, _datasets(round_num))
    out_coh = coh.next(s_coh, _cohorts(_datasets(round_num)))
    assert int(out_coh.metrics["client_work"]["clients"]["mask_changed"]) > 0
    _assert_same_round(ref, coh, out_ref, out_coh, layout.mask_index, upload_dtype, layout)
    s_ref, s_coh = out_ref.state, out_coh.state


@pytest.mark.parametrize(
    "mask_block, conv_kernels", [pytest.param(4, False, marks=PORTABLE), (16, False), (4, True)]
)
def test_block_feddst_cohort_equals_per_client_and_keeps_whole_blocks(mask_block, conv_kernels):
  """--mask_block: dense1 (1024 inputs) is masked in blocks at 1x4 and
  1x16, logits (8 inputs) at 1x4 only; --conv_block=kernel: the
  convolutions in whole 5x5 filters. Two readjusting rounds: both engines
  agree, and every mask holds whole blocks at exactly its budget."""
  layout = sparse_model.build_layout(
      sparse_model.wrap_prunable(_keras()), 0.6, "erk", mask_block, conv_kernels
  )
  conv_rows = (25, 25) if conv_kernels else (1, 1)
  assert layout.all_rows == conv_rows + ((4, 4) if mask_block == 4 else (16, 1))
  assert layout.budgets[2] < 1024 * 8  # dense1 is sparse: its blocks must move
  initial = sparse_model.initial_model_weights(_keras, 0, layout)
  common = dict(
      local_epochs=EPOCHS, readjustment_ratio=0.3, rounds_between_readjustments=1,
      readjustment_end_round=5,
  )
  model_fn = sparse_model.make_model_fn(_keras, SPEC, wrapped=True)
  optimizer = optimizers.build_sgdw(0.05, 0.9, 0.001)
  ref = feddst.build_feddst(model_fn, layout, initial, optimizer, **common)
  coh = feddst.build_feddst(
      model_fn, layout, initial, optimizer, cohort=_settings(), compact_messages=True, **common
  )
  s_ref, s_coh = ref.initialize(), coh.initialize()
  masks_before = [initial.non_trainable[i] for i in layout.mask_index]
  for round_num in (1, 2):
    out_ref = ref.next(s_ref, _datasets(round_num))
    out_coh = coh.next(s_coh, _cohorts(_datasets(round_num)))
    assert int(out_coh.metrics["client_work"]["clients"]["mask_changed"]) > 0
    _assert_same_round(ref, coh, out_ref, out_coh, layout.mask_index, layout=layout)
    s_ref, s_coh = out_ref.state, out_coh.state
  weights = ref.get_model_weights(s_ref)
  for slot, i in enumerate(layout.mask_index):
    mask, rows = np.asarray(weights.non_trainable[i]), layout.rows(slot)
    assert mask.sum() == layout.budgets[slot] and layout.budgets[slot] % rows == 0
    if rows > 1:
      grid = mask.reshape(masks_lib.block_view(mask.shape, rows))
      np.testing.assert_array_equal(grid.min(axis=1), grid.max(axis=1))
      if slot == 2:  # dense1's global blocks moved
        assert not np.array_equal(mask, masks_before[slot])
    kernel = np.asarray(weights.trainable[layout.kernel_index[slot]])
    assert np.all(kernel[mask == 0] == 0)


@PORTABLE
def test_a_nan_client_in_a_cohort_is_rejected_like_a_single_client():
  layout, ref, coh = _feddst_pair(tf.float32)
  out_ref = ref.next(ref.initialize(), _datasets(1, poisoned=2))
  out_coh = coh.next(coh.initialize(), _cohorts(_datasets(1, poisoned=2), cohort_size=5))
  assert out_coh.metrics["aggregator"]["voting"]["rejected"] == 1
  # The rejected client's upload was sent and counts.
  _assert_same_round(ref, coh, out_ref, out_coh, layout.mask_index, layout=layout)


@PORTABLE
def test_cohort_structured_search_equals_per_client():
  layout = structured.build_structured_layout(sparse_model.wrap_prunable(_keras()))
  initial = structured.initial_search_weights(_keras, 0, layout)
  model_fn = sparse_model.make_model_fn(_keras, SPEC, wrapped=True)
  optimizer = optimizers.build_sgdw(0.05, 0.9, 0.001)
  common = dict(local_epochs=EPOCHS, boundary=0.9)
  ref = structured.build_structured_search(model_fn, layout, initial, optimizer, **common)
  coh = structured.build_structured_search(
      model_fn, layout, initial, optimizer, cohort=_settings(), **common
  )
  out_ref = ref.next(ref.initialize(), _datasets(3))
  out_coh = coh.next(coh.initialize(), _cohorts(_datasets(3)))
  assert out_ref.metrics["finalizer"] == out_coh.metrics["finalizer"]
  _assert_same_round(ref, coh, out_ref, out_coh, layout.sparse.mask_index)


@PORTABLE
def test_cohort_gradual_sparsification_equals_per_client():
  from tff_feddst import masks as masks_lib  # pylint: disable=g-import-not-at-top

  layout = sparse_model.build_layout(sparse_model.wrap_prunable(_keras()), 0.5, "erk")
  initial = sparse_model.initial_model_weights(_keras, 2, layout)
  table = masks_lib.budget_table(layout.kernel_shapes, 0.5, 0.8, 2, "erk")
  common = dict(
      local_epochs=EPOCHS, readjustment_ratio=0.2, rounds_between_readjustments=1,
      readjustment_end_round=2, readjustment_schedule="constant", budget_table=table,
  )
  model_fn = sparse_model.make_model_fn(_keras, SPEC, wrapped=True)
  optimizer = optimizers.build_sgdw(0.05, 0.9, 0.001)
  ref = feddst.build_feddst(model_fn, layout, initial, optimizer, **common)
  # The cohort sends and receives compact messages of each round's length.
  coh = feddst.build_feddst(
      model_fn, layout, initial, optimizer, cohort=_settings(), compact_messages=True,
      compact_download=True, **common,
  )
  packed_mask_bits = 8 * sum(
      messages.packed_size(messages.mask_units(s, r))
      for s, r in zip(layout.kernel_shapes, layout.all_rows)
  )
  s_ref, s_coh = ref.initialize(), coh.initialize()
  for round_num in (1, 2):  # round 1 readjusts; each re-prunes to the next round's budgets
    out_ref = ref.next(s_ref, _datasets(round_num))
    # Every client lacks the mask: it changes in every round.
    values = _cohorts(_datasets(round_num))
    out_coh = coh.next(s_coh, [
        compact_download.cohort_data(v, n, n, None, layout) for v, n in zip(values, (3, 2))
    ])
    clients = out_coh.metrics["client_work"]["clients"]
    kept = sum(table[round_num - 1])
    assert int(clients["uploaded_values"]) == len(SIZES) * kept
    assert int(clients.pop("upload_bits")) == (
        32 * len(SIZES) * (kept + layout.num_unmasked)
        + int(clients["mask_changed"]) * packed_mask_bits
    )
    assert int(clients.pop("download_bits")) == len(SIZES) * (
        32 * (kept + layout.num_unmasked) + packed_mask_bits
    )
    _assert_same_round(ref, coh, out_ref, out_coh, layout.mask_index)
    assert out_coh.metrics["aggregator"]["voting"]["rejected"] == 0
    _, kept = sparse_model.kernels_and_masks(coh.get_model_weights(out_coh.state), layout)
    assert [int(m.sum()) for m in kept] == table[round_num]
    s_ref, s_coh = out_ref.state, out_coh.state


# ------------------------------------------- dense: FedAvg, FedAvgM, FedProx

# Large enough that the proximal term moves the weights well past the
# tolerance within two rounds (FedProx's default is 0.01).
PROX_MU = 0.5


@functools.cache
def _dense_pair(name):
  """(the per-client process, the cohort process, their initial states),
  built once for the module's tests."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from tff_feddst import aggregation  # pylint: disable=g-import-not-at-top

  initial = sparse_model.initial_model_weights(_keras, 4, None)
  model_fn = sparse_model.make_model_fn(_keras, SPEC, wrapped=False)
  client = optimizers.build_sgdw(0.05, 0.9, 0.001)
  momentum = 0.9 if name == "fedavgm" else None
  server = lambda: tff.learning.optimizers.build_sgdm(1.0, momentum=momentum)  # noqa: E731
  if name == "fedprox":
    # The reference: our per-client FedProx (TFF 0.87's has the wrong sign).
    ref = feddst.build_fedprox(model_fn, initial, client, server(), PROX_MU)
  else:
    # The reference: TFF's own FedAvg (with the server's check of updates).
    ref = tff.learning.algorithms.build_weighted_fed_avg(
        model_fn, client_optimizer_fn=client, server_optimizer_fn=server(),
        model_aggregator=aggregation.ValidatingMeanFactory(),
    )
  mu = PROX_MU if name == "fedprox" else 0.0
  coh = cohort_work.build_dense_cohort_process(model_fn, initial, _settings(), server(), prox_mu=mu)
  return ref, coh, ref.set_model_weights(ref.initialize(), initial), coh.initialize()


def _assert_same_dense_round(ref, coh, out_ref, out_coh, atol=1e-6):
  w_ref, w_coh = ref.get_model_weights(out_ref.state), coh.get_model_weights(out_coh.state)
  for a, b in zip(w_ref.trainable, w_coh.trainable):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol)


# FedProx's tolerance. On an AVX-512 processor (AMD Zen 4) the two engines'
# last-bit differences flip a max-pool or ReLU selection in one client's
# steps at PROX_MU = 0.5 and the weights differ by up to 1.3e-4 after a
# round (1.8e-7 at mu 0, 2.4e-7 at 0.01, 7e-8 at 2.0 on the same machine;
# the AVX2 machines met 1e-6 at 0.5). A wrong proximal term moves them by
# far more: the reference's round at mu 0.45 instead of 0.5 differs by
# 4.4e-3, at 0.01 by 4.5e-2 (measured on the same machine).
PROX_ATOL = 1e-3


@pytest.mark.parametrize(
    "name", [pytest.param("fedavg", marks=PORTABLE), "fedavgm", pytest.param("fedprox", marks=PORTABLE)]
)
def test_cohort_fedavg_equals_tff_fedavg(name):
  ref, coh, s_ref, s_coh = _dense_pair(name)
  for round_num in (1, 2):
    out_ref = ref.next(s_ref, [d.repeat(EPOCHS) for d in _datasets(round_num)])
    out_coh = coh.next(s_coh, _cohorts(_datasets(round_num)))
    _assert_same_dense_round(ref, coh, out_ref, out_coh, PROX_ATOL if name == "fedprox" else 1e-6)
    train_ref, train_coh = out_ref.metrics["client_work"]["train"], out_coh.metrics["client_work"]["train"]
    assert int(train_coh["num_examples"]) == EPOCHS * sum(SIZES)
    assert int(train_ref["num_examples"]) == EPOCHS * sum(SIZES)
    for key in ("loss", "accuracy"):
      assert float(train_coh[key]) == pytest.approx(float(train_ref[key]), rel=1e-5)
    assert int(out_coh.metrics["aggregator"]["rejected"]) == 0
    s_ref, s_coh = out_ref.state, out_coh.state


@PORTABLE
def test_a_nan_client_in_a_dense_cohort_counts_for_nothing():
  ref, coh, s_ref, s_coh = _dense_pair("fedavg")
  # The reference without the poisoned client; the cohort with it.
  clean = [d.repeat(EPOCHS) for c, d in enumerate(_datasets(1)) if c != 2]
  out_ref = ref.next(s_ref, clean)
  out_coh = coh.next(s_coh, _cohorts(_datasets(1, poisoned=2), cohort_size=5))
  assert int(out_coh.metrics["aggregator"]["rejected"]) == 1
  _assert_same_dense_round(ref, coh, out_ref, out_coh)


@PORTABLE
def test_fedprox_pulls_towards_the_broadcast_weights():
  """lr * mu = 1, no momentum or decay: each step lands on w0 - lr g(w_t), so
  two steps on one batch end at w0 - lr g(w0 - lr g(w0)) (Keras, by hand)."""
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  lr = 0.1
  initial = sparse_model.initial_model_weights(_keras, 5, None)
  model_fn = sparse_model.make_model_fn(_keras, SPEC, wrapped=False)
  process = feddst.build_fedprox(
      model_fn, initial, optimizers.build_sgdw(lr, 0.0, 0.0),
      tff.learning.optimizers.build_sgdm(1.0), 1.0 / lr,
  )
  rng = np.random.default_rng(0)
  x = rng.random((6, 28, 28, 1), np.float32)
  y = rng.integers(0, 10, 6).astype(np.int32)
  data = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(6).repeat(2)
  state = process.set_model_weights(process.initialize(), initial)
  got = process.get_model_weights(process.next(state, [data]).state).trainable

  model = _keras()
  w0 = [np.asarray(w) for w in initial.trainable]

  def gradient_at(weights):
    for var, value in zip(model.trainable_weights, weights):
      var.assign(value)
    with tf.GradientTape() as tape:
      loss = tf.reduce_mean(
          tf.keras.losses.sparse_categorical_crossentropy(y, model(x), from_logits=True)
      )
    return [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]

  w1 = [w - lr * g for w, g in zip(w0, gradient_at(w0))]
  want = [w - lr * g for w, g in zip(w0, gradient_at(w1))]
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
