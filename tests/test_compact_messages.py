"""Compact messages in the TFF computation (docs/algorithms.md section 6.1).

- the per-client FedDST work uploads `messages.encode_upload`'s types: kept
  values float[budget_l], packed mask bits uint8[?], no dense kernel or mask;
- `CompactVotingFactory` + the server's finish equal a numpy voting average,
  and reject malformed messages;
- a FedDST run with compact uploads equals the run with dense uploads, and
  the bits its clients measure on what they send equal the formula in every
  round, readjustment rounds and plain ones, float32 and float16;
- compact downloads: the server's message round-trips, has no kernel-shaped
  tensor, and a run in which the mask goes only to the clients without it
  equals the dense run, with the bits the clients measure receiving equal
  to the ledger's formula for the same clients; cohorts receive it once
  and count a copy per client;
- gradual sparsification: messages of each round's length both ways,
  measured equal to the formula at that round's budgets;
- the dense algorithms' per-client messages, read from the TFF types of
  their rounds (`wire.py`), equal the formula.
"""

import collections
import dataclasses
import functools

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from tff_feddst import client_work
from tff_feddst import cohort_work
from tff_feddst import compact_download
from tff_feddst import compact_voting
from tff_feddst import costs
from tff_feddst import feddst
from tff_feddst import masks as masks_lib
from tff_feddst import messages
from tff_feddst import optimizers
from tff_feddst import sparse_model
from tff_feddst import wire

CLIENTS = 3
ROUNDS = 4
DELTA_R = 2
R_END = 4  # readjustment in rounds 1 and 3


def _keras(input_shape=(8, 8, 1), classes=3):
  layers = tf.keras.layers
  return tf.keras.Sequential([
      layers.InputLayer(input_shape=input_shape),
      layers.Conv2D(4, 3, activation="relu", name="conv"),
      layers.Flatten(),
      layers.Dense(6, activation="relu", name="dense"),
      layers.Dense(classes, name="logits"),
  ])


def _spec(shape=(8, 8, 1)):
  return collections.OrderedDict(
      x=tf.TensorSpec([None, *shape], tf.float32), y=tf.TensorSpec([None], tf.int32)
  )


def _clients(round_num):
  rng = np.random.default_rng(round_num)
  out = []
  for c in range(CLIENTS):
    n = 24 + 5 * c
    x = rng.random((n, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 3, n).astype(np.int32)
    ds = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y))
    out.append(ds.shuffle(64, seed=round_num * 10 + c).batch(8))
  return out


def _layout():
  return sparse_model.build_layout(sparse_model.wrap_prunable(_keras()), 0.6, "erk")


def _process(layout, compact, upload_dtype=tf.float32, download=False, budget_table=None):
  return feddst.build_feddst(
      sparse_model.make_model_fn(_keras, _spec(), True),
      layout,
      sparse_model.initial_model_weights(_keras, 3, layout),
      optimizers.build_sgdw(0.05, 0.9, 0.001),
      local_epochs=1,
      readjustment_ratio=0.3,
      rounds_between_readjustments=DELTA_R,
      readjustment_end_round=R_END,
      upload_dtype=upload_dtype,
      compact_messages=compact,
      compact_download=download,
      budget_table=budget_table,
  )


def _run(process):
  state = process.initialize()
  rounds = []
  for r in range(1, ROUNDS + 1):
    output = process.next(state, _clients(r))
    state = output.state
    rounds.append((process.get_model_weights(state), output.metrics))
  return rounds


@functools.cache
def _dense_run(upload_dtype):
  """The run with TFF's broadcast and dense uploads (the reference)."""
  return _run(_process(_layout(), False, upload_dtype))


@pytest.fixture(scope="module")
def layout():
  return _layout()


def test_the_client_work_uploads_the_compact_types(layout):
  work = client_work.build_feddst_client_work(
      sparse_model.make_model_fn(_keras, _spec(), True), layout,
      optimizers.build_sgdw(), local_epochs=1, readjustment_ratio=0.3,
      rounds_between_readjustments=DELTA_R, readjustment_end_round=R_END, compact=True,
  )
  upload = work.next.type_signature.result.result.member.update
  for slot, budget in enumerate(layout.budgets):
    layer = upload.layers[slot]
    assert (layer.values.dtype, tuple(layer.values.shape)) == (np.float32, (budget,))
    assert layer.mask_bits.dtype == np.uint8
    assert tuple(layer.mask_bits.shape) == (None,)  # empty unless the mask changed
  shapes = [tuple(t.shape) for t in tf.nest.flatten(tff.types.type_to_tf_tensor_specs(upload))]
  assert not set(shapes) & set(map(tuple, layout.kernel_shapes))


@pytest.mark.parametrize("upload_dtype", [tf.float32, tf.float16])
def test_compact_uploads_train_as_dense_ones_and_measure_the_formulas_bits(
    layout, upload_dtype
):
  compact = _run(_process(layout, True, upload_dtype))
  dense = _dense_run(upload_dtype)
  value_bits = 32 if upload_dtype == tf.float32 else 16
  packed_mask_bits = 8 * sum(
      messages.packed_size(messages.mask_units(s, r))
      for s, r in zip(layout.kernel_shapes, layout.all_rows)
  )
  readjusted = []
  for r, ((w_c, m_c), (w_d, m_d)) in enumerate(zip(compact, dense), start=1):
    _, masks_c = sparse_model.kernels_and_masks(w_c, layout)
    _, masks_d = sparse_model.kernels_and_masks(w_d, layout)
    for a, b in zip(masks_c, masks_d):
      np.testing.assert_array_equal(a, b)
    # Bit-identical here; TFF may sum the clients in another order (float32
    # rounding of a few additions of 3 clients), which the tolerance allows.
    for a, b in zip(w_c.trainable, w_d.trainable):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    stats = m_c["client_work"]["clients"]
    changed = int(stats["mask_changed"])
    if changed:
      readjusted.append(r)
    assert changed == int(m_d["client_work"]["clients"]["mask_changed"])
    # Measured on the tensors sent = docs/algorithms.md 6.1 with packed masks.
    assert int(stats["upload_bits"]) == (
        CLIENTS * value_bits * (layout.num_kept + layout.num_unmasked)
        + changed * packed_mask_bits
    )
    assert m_c["aggregator"]["rejected"] == 0
    assert m_c["finalizer"]["voting"]["rejected"] == 0
    assert (m_c["finalizer"]["voting"]["voted_positions"]
            == m_d["aggregator"]["voting"]["voted_positions"])
  assert readjusted == [1, 3]


def _cohort_process(layout, upload_dtype, download=False):
  settings = cohort_work.CohortSettings(_keras, 0.05, 0.9, 0.001, (8, 8, 1))
  return feddst.build_feddst(
      sparse_model.make_model_fn(_keras, _spec(), True), layout,
      sparse_model.initial_model_weights(_keras, 3, layout),
      optimizers.build_sgdw(0.05, 0.9, 0.001), local_epochs=1, readjustment_ratio=0.3,
      rounds_between_readjustments=DELTA_R, readjustment_end_round=R_END,
      upload_dtype=upload_dtype, compact_messages=True, cohort=settings,
      compact_download=download,
  )


def _cohort_values(r):
  """Round r's cohorts of 2 clients (the last one alone)."""
  per_epoch = [-(-(24 + 5 * c) // 8) for c in range(CLIENTS)]
  return cohort_work.pack_cohorts(_clients(r), 1, per_epoch, 8, 2)


@functools.cache
def _cohort_run(layout, upload_dtype):
  """The run with cohorts, each client's upload built, counted and decoded
  inside its cohort; TFF's broadcast of the model weights."""
  process = _cohort_process(layout, upload_dtype)
  state, rounds = process.initialize(), []
  for r in range(1, ROUNDS + 1):
    output = process.next(state, _cohort_values(r))
    state = output.state
    rounds.append((process.get_model_weights(state), output.metrics))
  return rounds


@pytest.mark.parametrize("upload_dtype", [tf.float32, tf.float16])
def test_cohorts_measure_their_clients_compact_uploads(layout, upload_dtype):
  """Cohorts: the bits counted on the clients' messages, built inside the
  cohort, equal the formula in every round; the run equals the one with
  dense per-client uploads."""
  value_bits = 32 if upload_dtype == tf.float32 else 16
  packed_mask_bits = 8 * sum(
      messages.packed_size(messages.mask_units(s, r))
      for s, r in zip(layout.kernel_shapes, layout.all_rows)
  )
  readjusted = []
  for r, ((w_c, m_c), (w_d, m_d)) in enumerate(
      zip(_cohort_run(layout, upload_dtype), _dense_run(upload_dtype)), start=1
  ):
    for a, b in zip(w_c.non_trainable, w_d.non_trainable):
      np.testing.assert_array_equal(a, b)
    # Batched against single-client arithmetic: float32 rounding; through
    # float16, one half-precision step (docs/testing.md).
    rtol, atol = (1e-5, 1e-6) if upload_dtype == tf.float32 else (1e-3, 1e-5)
    for a, b in zip(w_c.trainable, w_d.trainable):
      np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
    stats = m_c["client_work"]["clients"]
    changed = int(stats["mask_changed"])
    readjusted += [r] if changed else []
    assert changed == int(m_d["client_work"]["clients"]["mask_changed"])
    assert int(stats["upload_bits"]) == (
        CLIENTS * value_bits * (layout.num_kept + layout.num_unmasked)
        + changed * packed_mask_bits
    )
  assert readjusted == [1, 3]


# ------------------------------------------------- the aggregation, by hand


def _factory_process(layout):
  message_type = tff.types.tensorflow_to_type(collections.OrderedDict(
      layers=[
          collections.OrderedDict(
              values=tf.TensorSpec([b], tf.float32), mask_bits=tf.TensorSpec([None], tf.uint8)
          )
          for b in layout.budgets
      ],
      other=[tf.TensorSpec([s], tf.float32) for s in (2,)],
  ))
  return compact_voting.CompactVotingFactory(layout).create(
      message_type, tff.TensorType(np.float32)
  )


def _hand_layout():
  """One masked 3x4 kernel (budget 5) and one bias of 2: trainable [kernel, bias]."""
  return sparse_model.SparseLayout(
      layer_names=("k",), kernel_shapes=((3, 4),), kernel_index=(0,), mask_index=(0,),
      step_index=(), budgets=(5,), trainable_sizes=(12, 2),
  )


def _message(kernel, mask, bias, with_mask):
  flat = np.asarray(kernel, np.float32).ravel()[np.asarray(mask).ravel() > 0]
  flat = np.pad(flat, (0, 5 - flat.size))
  bits = messages.pack_bits_np(np.asarray(mask)) if with_mask else np.zeros([0], np.uint8)
  return collections.OrderedDict(
      layers=[collections.OrderedDict(values=flat, mask_bits=bits)],
      other=[np.asarray(bias, np.float32)],
  )


def test_the_sums_finish_into_a_numpy_voting_average():
  layout = _hand_layout()
  rng = np.random.default_rng(0)
  global_mask = np.zeros(12, np.float32)
  global_mask[[0, 3, 5, 8, 11]] = 1
  global_mask = global_mask.reshape(3, 4)
  own = np.zeros(12, np.float32)
  own[[1, 3, 6, 8]] = 1  # fewer than the budget: 4 values, one padding
  own = own.reshape(3, 4)
  client_masks = [global_mask, own, global_mask, own]
  carries = [False, True, False, True]
  kernels = [rng.normal(size=(3, 4)).astype(np.float32) * m for m in client_masks]
  biases = [rng.normal(size=2).astype(np.float32) for _ in client_masks]
  weights = [3.0, 5.0, 2.0, 7.0]
  out = _factory_process(layout).next(
      (), [_message(k, m, b, c) for k, m, b, c in zip(kernels, client_masks, biases, carries)],
      weights,
  )
  result, stats = compact_voting.finish_with_global_masks(
      out.result, [tf.constant(global_mask)], layout, min_votes=1
  )
  w = np.asarray(weights)[:, None, None]
  votes = (w * np.stack(client_masks)).sum(0)
  want = np.where(votes > 0, (w * np.stack(kernels)).sum(0) / np.maximum(votes, 1e-30), 0)
  np.testing.assert_allclose(result["values"][0], want, rtol=1e-6)
  np.testing.assert_allclose(
      result["values"][1], np.average(np.stack(biases), axis=0, weights=weights), rtol=1e-6
  )
  np.testing.assert_allclose(
      result["masks"][0], np.where(votes > 0, votes / sum(weights), 0), rtol=1e-6
  )
  assert int(stats["voted_positions"]) == int((votes > 0).sum())
  assert int(out.measurements["rejected"]) == 0


def test_malformed_messages_are_rejected():
  layout = _hand_layout()
  mask = np.zeros((3, 4), np.float32)
  mask[0] = 1
  good = _message(np.ones((3, 4)), mask, [1.0, 1.0], True)
  short = _message(np.ones((3, 4)), mask, [1.0, 1.0], True)
  short["layers"][0]["mask_bits"] = short["layers"][0]["mask_bits"][:1]
  over = _message(np.ones((3, 4)), mask, [1.0, 1.0], True)
  over["layers"][0]["mask_bits"] = messages.pack_bits_np(np.ones((3, 4)))
  nan = _message(np.ones((3, 4)), mask, [np.nan, 1.0], True)
  out = _factory_process(layout).next((), [good, short, over, nan], [1.0, 1.0, 1.0, 1.0])
  assert int(out.measurements["rejected"]) == 3
  result, _ = compact_voting.finish_with_global_masks(
      out.result, [tf.constant(mask)], layout, min_votes=1
  )
  np.testing.assert_array_equal(result["values"][0], mask)
  np.testing.assert_array_equal(result["values"][1], [1.0, 1.0])


# ---------------------------------------------------------- compact downloads


def test_the_broadcast_round_trips_padded_and_has_no_kernel_shaped_tensor(layout):
  hand = _hand_layout()
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(3, 4)).astype(np.float32)
  bias = rng.normal(size=2).astype(np.float32)
  mask = np.zeros(12, np.float32)
  mask[[0, 5, 6, 11]] = 1  # 4 ones, budget 5: one value of padding
  mask = mask.reshape(3, 4)
  message = compact_download.encode_broadcast(
      [tf.constant(kernel * mask), tf.constant(bias)], [tf.constant(mask)], hand
  )
  np.testing.assert_array_equal(message["layers"][0]["values"], [*kernel.ravel()[[0, 5, 6, 11]], 0])
  bits = compact_download.pack_masks([tf.constant(mask)], hand)
  np.testing.assert_array_equal(bits[0], messages.pack_bits_np(mask))
  weights = compact_download.decode_broadcast(message, bits, hand, [tf.ones([3, 4])])
  np.testing.assert_array_equal(weights.trainable[0], kernel * mask)
  np.testing.assert_array_equal(weights.trainable[1], bias)
  np.testing.assert_array_equal(weights.non_trainable[0], mask)

  _, weights_type, _ = client_work.model_types(sparse_model.make_model_fn(_keras, _spec(), True))
  sent = compact_download.message_type(weights_type, layout)
  shapes = [tuple(t.shape) for t in tf.nest.flatten(tff.types.type_to_tf_tensor_specs(sent))]
  assert shapes[:len(layout.budgets)] == [(b,) for b in layout.budgets]
  assert not set(shapes) & set(map(tuple, layout.kernel_shapes))


def _download_round(process, state, data, want, clients, ledger, masks, layout):
  """Runs a round on compact downloads; its measured download equals the
  ledger's formula for `clients` and its result equals `want` (the run on
  TFF's broadcast). Returns (state, the new global masks); the ledger
  learns whether the global mask changed."""
  output = process.next(state, data)
  measured = int(output.metrics["client_work"]["clients"]["download_bits"])
  assert measured == ledger.download(clients, layout.num_kept)
  weights = process.get_model_weights(output.state)
  new_masks = sparse_model.kernels_and_masks(weights, layout)[1]
  _, want_masks = sparse_model.kernels_and_masks(want, layout)
  for a, b in zip(new_masks, want_masks):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(weights.trainable, want.trainable):  # as in the upload test
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  if any(not np.array_equal(a, b) for a, b in zip(masks, new_masks)):
    ledger.global_mask_changed()
  return output.state, new_masks


def test_compact_downloads_send_the_mask_only_to_clients_without_it(layout):
  """Clients a and b come back in round 3, after a round that kept the
  global mask: they hold it, and receive only the values. Every round's
  measured download equals the ledger's formula for the same clients, and
  the run equals the dense one."""
  process = _process(layout, True, download=True)
  # The masks go by federated_select: what a client gets, its key says at
  # run time, so its type gives no bits.
  (select,) = [c for c in wire.crossings(process.next) if c.intrinsic == "federated_select"]
  assert select.direction == wire.DOWN and select.bits is None
  ledger = costs.CommunicationLedger(
      costs.ModelSize(layout.num_prunable, layout.num_unmasked, layout.num_mask_bits), True
  )
  ids = [["a", "b", "c"], ["a", "b", "d"], ["a", "b", "e"], ["a", "e", "f"]]
  state = process.initialize()
  masks = sparse_model.kernels_and_masks(process.get_model_weights(state), layout)[1]
  held_by_round = []
  for r, (clients, (want, _)) in enumerate(zip(ids, _dense_run(tf.float32)), start=1):
    held = [cid for cid in clients if not ledger.needs_mask(cid)]
    packed = compact_download.pack_masks_np(masks, layout)
    data = [
        compact_download.client_data(ds, packed if cid in held else None, layout)
        for cid, ds in zip(clients, _clients(r))
    ]
    state, masks = _download_round(process, state, data, want, clients, ledger, masks, layout)
    held_by_round.append(held)
  assert held_by_round == [[], [], ["a", "b"], []]


def test_cohorts_receive_compact_downloads_and_count_each_clients_copy(layout):
  """Cohorts of 2 on compact downloads: the broadcast is the compact
  message; a cohort receives the mask when any of its clients lacks it and
  counts the mask once per such client. Round 3's cohorts: [a, e] (a holds
  the mask, e does not), [b] (holds it). Every round's measured download
  equals the ledger's formula for the same clients, and the run equals the
  cohort run on TFF's broadcast of the model weights."""
  process = _cohort_process(layout, tf.float32, download=True)
  weights_type = process.get_model_weights.type_signature.result
  (broadcast,) = [
      c for c in wire.crossings(process.next) if c.intrinsic == "federated_broadcast"
      and c.bits == wire.type_bits(compact_download.message_type(weights_type, layout))
  ]
  assert broadcast.bits == 32 * (layout.num_kept + layout.num_unmasked)
  ledger = costs.CommunicationLedger(
      costs.ModelSize(layout.num_prunable, layout.num_unmasked, layout.num_mask_bits), True
  )
  ids = [["a", "b", "c"], ["a", "b", "d"], ["a", "e", "b"], ["a", "e", "f"]]
  state = process.initialize()
  masks = sparse_model.kernels_and_masks(process.get_model_weights(state), layout)[1]
  stale_by_round = []
  for r, (clients, (want, _)) in enumerate(zip(ids, _cohort_run(layout, tf.float32)), start=1):
    packed = compact_download.pack_masks_np(masks, layout)
    members = [clients[:2], clients[2:]]
    stale = [sum(ledger.needs_mask(cid) for cid in cohort) for cohort in members]
    data = [
        compact_download.cohort_data(value, len(cohort), n, packed, layout)
        for value, cohort, n in zip(_cohort_values(r), members, stale)
    ]
    state, masks = _download_round(process, state, data, want, clients, ledger, masks, layout)
    stale_by_round.append(stale)
  assert stale_by_round == [[2, 1], [2, 1], [1, 0], [2, 1]]


def test_gradual_sparsification_sends_each_rounds_budget_both_ways(layout):
  """Budgets that shrink by round (S 0.6 -> 0.8 by round 4): messages both
  ways hold exactly the round's kept values (`float32[?]`); the measured
  bits equal the ledger's formula at the round's budgets in every round,
  and the run equals the one with TFF's broadcast and dense uploads."""
  table = masks_lib.budget_table(layout.kernel_shapes, 0.6, 0.8, R_END, "erk", layout.all_rows)
  assert sum(table[0]) == layout.num_kept and sum(table[-1]) < sum(table[1]) < sum(table[0])
  table = tuple(tuple(row) for row in table)
  compact = _process(layout, True, download=True, budget_table=table)
  dense = _process(layout, False, budget_table=table)
  types = [c.type for c in wire.crossings(compact.next) if c.intrinsic == "federated_broadcast"]
  assert any("float32[?]" in t for t in types)
  ledger = costs.CommunicationLedger(
      costs.ModelSize(layout.num_prunable, layout.num_unmasked, layout.num_mask_bits), True
  )
  packed_mask_bits = 8 * sum(
      messages.packed_size(messages.mask_units(s, r))
      for s, r in zip(layout.kernel_shapes, layout.all_rows)
  )
  clients = ["a", "b", "c"]
  s_c, s_d = compact.initialize(), dense.initialize()
  changed_rounds = []
  for r in range(1, ROUNDS + 1):
    weights = compact.get_model_weights(s_c)
    masks = sparse_model.kernels_and_masks(weights, layout)[1]
    assert sum(int(np.sum(m)) for m in masks) == sum(table[r - 1])
    held = compact_download.pack_masks_np(masks, layout)
    data = [
        compact_download.client_data(ds, None if ledger.needs_mask(cid) else held, layout)
        for cid, ds in zip(clients, _clients(r))
    ]
    out_c, out_d = compact.next(s_c, data), dense.next(s_d, _clients(r))
    s_c, s_d = out_c.state, out_d.state
    stats = out_c.metrics["client_work"]["clients"]
    assert int(stats["download_bits"]) == ledger.download(clients, sum(table[r - 1]))
    assert int(stats["uploaded_values"]) == CLIENTS * sum(table[r - 1])
    changed = int(stats["mask_changed"])
    changed_rounds += [r] if changed else []
    assert int(stats["upload_bits"]) == (
        32 * (int(stats["uploaded_values"]) + CLIENTS * layout.num_unmasked)
        + changed * packed_mask_bits
    )
    assert int(out_c.metrics["aggregator"]["rejected"]) == 0
    w_c, w_d = compact.get_model_weights(s_c), dense.get_model_weights(s_d)
    for a, b in zip(w_c.non_trainable, w_d.non_trainable):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(w_c.trainable, w_d.trainable):  # as in the upload test
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    new_masks = sparse_model.kernels_and_masks(w_c, layout)[1]
    if any(not np.array_equal(a, b) for a, b in zip(masks, new_masks)):
      ledger.global_mask_changed()
  assert changed_rounds == [1, 3]


def test_a_cohorts_stale_count_is_checked(layout):
  value = _cohort_values(1)[0]
  with pytest.raises(ValueError, match="3 stale clients in a cohort of 2"):
    compact_download.cohort_data(value, 2, 3, None, layout)


# ------------------------------------------ dense algorithms: their TFF types


def test_type_bits_count_every_element_at_its_width():
  struct = tff.StructType([
      ("a", tff.TensorType(np.float32, [2, 3])),
      ("b", tff.StructType([tff.TensorType(np.float16, [5]), tff.TensorType(np.int64)])),
  ])
  assert wire.type_bits(struct) == 6 * 32 + 5 * 16 + 64
  assert wire.type_bits(tff.TensorType(np.float32, [None, 3])) is None


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox"])
def test_dense_messages_are_read_from_the_tff_types_and_equal_the_formula(algorithm):
  """Per client, FedAvg (TFF's own process) and FedProx (ours) broadcast
  the model (all its parameters, float32) and upload a float32 update of
  the same size, the formula's 32 (n + b); besides these, the clients'
  learning-rate settings go down, and the weight and metrics' sums go up
  (scalars). With cohorts, a TFF client is a cohort: it receives the
  model once and sends its clients' summed deltas (a delta's type, the
  model's trainable weights, plus their total weight and rejected count);
  each of its clients is charged the model and one delta, the formula."""
  from tff_feddst import algorithms  # pylint: disable=g-import-not-at-top
  from tff_feddst import builders  # pylint: disable=g-import-not-at-top

  build = builders.build_fedprox if algorithm == "fedprox" else builders.build_fedavg
  config = algorithms.AlgorithmConfig(algorithm=algorithm, client_execution="per_client")
  built = build(config, _keras, _spec())
  size = builders.dense_model_size(_keras())
  assert (size.num_prunable, size.num_unmasked) == (4 * 9 + 144 * 6 + 6 * 3, 4 + 6 + 3)
  dense = costs.dense_message_bits(size)
  assert dense == 32 * (36 + 864 + 18 + 13)
  assert built.wire_bits == (dense, dense)
  found = wire.crossings(built.process.next)
  down = sorted(c.bits for c in found if c.direction == wire.DOWN)
  up = sorted(c.bits for c in found if c.direction == wire.UP)
  assert down[-1] == dense and all(bits <= 3 * 32 for bits in down[:-1])
  assert up[-1] == dense and up.count(dense) == 1 and sum(up[:-1]) < 1000
  assert any(c.type == "float32" for c in found if c.direction == wire.UP)  # the weight
  cohort = build(dataclasses.replace(config, client_execution="cohort"), _keras, _spec())
  assert cohort.wire_bits == (dense, dense)
  found = wire.crossings(cohort.process.next)
  up = sorted(c.bits for c in found if c.direction == wire.UP)
  assert up[-1] == dense + 2 * 32  # the summed deltas, their total weight and rejected count
