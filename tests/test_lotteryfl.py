"""LotteryFL's client rule (docs/algorithms.md section 4.3), by hand and
TensorFlow against the numpy reference."""

import numpy as np
import pytest
import tensorflow as tf

from tff_feddst import lotteryfl


def test_each_layer_prunes_its_rate_of_what_it_keeps_down_to_its_budget():
  # round(0.2 * 100) = 20; 10 is at its budget; round(1.4) = 1; round(6.4) = 6.
  assert lotteryfl.pruned_counts([100, 10, 7, 32], [30, 10, 2, 30], 0.2) == [80, 10, 6, 30]
  assert lotteryfl.pruned_counts([5], [0], 0.5) == [3]  # round(2.5) = 2, half to even
  assert lotteryfl.should_prune(0.5, [100, 10], [30, 10], 0.5)
  assert not lotteryfl.should_prune(0.49, [100, 10], [30, 10], 0.5)
  assert not lotteryfl.should_prune(0.9, [30, 10], [30, 10], 0.5)  # at the target


def test_pruning_keeps_the_largest_kept_magnitudes():
  w = np.array([0.5, -3.0, 9.0, 2.0, -2.0, 1.0])
  mask = np.array([1, 1, 0, 1, 1, 1], np.float32)  # 9.0 is not kept: it cannot come back
  np.testing.assert_array_equal(lotteryfl.prune_np(w, mask, 3), [0, 1, 0, 1, 1, 0])
  np.testing.assert_array_equal(lotteryfl.prune_np(w, mask, 2), [0, 1, 0, 1, 0, 0])  # tie: lower
  np.testing.assert_array_equal(lotteryfl.prune_np(w, mask, 9), mask)


def test_a_client_resets_to_the_initial_weights_only_when_it_prunes():
  theta = [np.array([[1.0, -4.0], [0.5, 3.0]]), np.array([0.1, 0.2]), np.array([2.0, -1.0])]
  theta0 = [np.array([[9.0, 8.0], [7.0, 6.0]]), np.array([0.0, 0.0]), np.array([5.0, 4.0])]
  masks = [np.ones((2, 2), np.float32), np.ones(2, np.float32)]
  kernel_index = (0, 2)
  budgets = [2, 1]
  # Accuracy below the threshold: theta under the mask, nothing pruned.
  start, new, pruned = lotteryfl.client_start_np(
      theta, masks, theta0, kernel_index, 0.3, budgets, 0.5, 0.5
  )
  assert not pruned
  np.testing.assert_array_equal(start[0], theta[0])
  np.testing.assert_array_equal(new[0], masks[0])
  # Above it: layer 1 keeps 2 of 4 (|-4| and |3|), layer 2 keeps 1 of 2 (|2|);
  # the kept weights restart from theta0, the biases too.
  start, new, pruned = lotteryfl.client_start_np(
      theta, masks, theta0, kernel_index, 0.6, budgets, 0.5, 0.5
  )
  assert pruned
  np.testing.assert_array_equal(new[0], [[0, 1], [0, 1]])
  np.testing.assert_array_equal(new[1], [1, 0])
  np.testing.assert_array_equal(start[0], [[0, 8.0], [0, 6.0]])
  np.testing.assert_array_equal(start[1], theta0[1])
  np.testing.assert_array_equal(start[2], [5.0, 0.0])


@pytest.mark.parametrize("accuracy", [0.2, 0.8])
@pytest.mark.parametrize("seed", range(3))
def test_tensorflow_follows_the_numpy_rule(seed, accuracy):
  rng = np.random.default_rng(seed)
  shapes = [(3, 4), (4,), (4, 5), (5,)]
  kernel_index = (0, 2)
  theta = [rng.normal(size=s).astype(np.float32) for s in shapes]
  theta0 = [rng.normal(size=s).astype(np.float32) for s in shapes]
  masks = [(rng.random(shapes[i]) < 0.7).astype(np.float32) for i in kernel_index]
  # Layer 2 is at its budget in seed 0; the others are above theirs.
  budgets = [int(m.sum()) - int(rng.integers(1, 4)) for m in masks]
  budgets[1] += 3 if seed == 0 else 0
  budgets = [max(b, 1) for b in budgets]
  want = lotteryfl.client_start_np(theta, masks, theta0, kernel_index, accuracy, budgets, 0.5, 0.3)
  got = lotteryfl.client_start(
      [tf.constant(w) for w in theta], [tf.constant(m) for m in masks],
      [tf.constant(w) for w in theta0], kernel_index, tf.constant(accuracy), budgets, 0.5, 0.3,
  )
  assert bool(got[2]) == want[2] == (accuracy > 0.5)
  for a, b in zip(got[0], want[0]):
    np.testing.assert_array_equal(a.numpy(), b)
  for a, b in zip(got[1], want[1]):
    np.testing.assert_array_equal(a.numpy(), b)


def test_the_servers_store_packs_every_clients_mask_exactly():
  rng = np.random.default_rng(3)
  shapes = [(3, 5), (7,)]  # 22 bits a client: not a multiple of 8
  store = lotteryfl.ClientMasks(["a", "b", "c"], shapes)
  assert store.kept.tolist() == [[15, 7]] * 3
  masks = [(rng.random(s) < 0.5).astype(np.float32) for s in shapes]
  masks[1][:] = 0  # an empty layer
  store.set("b", masks)
  for a, b in zip(store.get("b"), masks):
    np.testing.assert_array_equal(a, b)
  assert store.kept_of("b") == [int(masks[0].sum()), 0]
  assert store.packed().shape == (3, 3)
  other = lotteryfl.ClientMasks(["a", "b", "c"], shapes)
  other.load_packed(store.packed())
  np.testing.assert_array_equal(other.table, store.table)
  np.testing.assert_array_equal(other.kept, store.kept)
  assert lotteryfl.index_sums(masks) == [int(np.flatnonzero(masks[0]).sum()), 0]


# ------------------------------------------------------------- the process


def _tiny_keras():
  inputs = tf.keras.Input((3,))
  hidden = tf.keras.layers.Dense(4, name="d1")(inputs)
  return tf.keras.Model(inputs, tf.keras.layers.Dense(2, name="d2")(hidden))


def _logits(weights, x):
  w1, b1, w2, b2 = [np.asarray(w, np.float64) for w in weights]
  return (x @ w1 + b1) @ w2 + b2


def _dataset(x, y, batch):
  import collections  # pylint: disable=g-import-not-at-top

  return tf.data.Dataset.from_tensor_slices(
      collections.OrderedDict(x=x.astype(np.float32), y=y.astype(np.int32))
  ).batch(batch)


def test_one_round_prunes_the_clients_that_pass_and_votes_per_position():
  """With a client learning rate of 0 the clients upload their start weights,
  so the round's result follows from the rule by hand: the client whose
  validation data the masked global model classifies right prunes and
  restarts from theta_0, the other starts from theta; each kernel position
  takes the example-weighted mean of the clients that keep it, a position
  neither keeps its previous value."""
  import collections  # pylint: disable=g-import-not-at-top

  from tff_feddst import optimizers  # pylint: disable=g-import-not-at-top
  from tff_feddst import sparse_model  # pylint: disable=g-import-not-at-top

  spec = collections.OrderedDict(
      x=tf.TensorSpec([None, 3], tf.float32), y=tf.TensorSpec([None], tf.int32)
  )
  layout = sparse_model.build_layout(sparse_model.wrap_prunable(_tiny_keras()), 0.5, "uniform")
  assert layout.budgets == (6, 4) and layout.kernel_index == (0, 2)
  ones = lambda _: [np.ones(s, np.float32) for s in layout.kernel_shapes]
  initial = sparse_model.initial_model_weights(_tiny_keras, 0, layout, masks_fn=ones)
  process = lotteryfl.build_process(
      sparse_model.make_model_fn(_tiny_keras, spec, wrapped=True), layout, initial,
      optimizers.build_sgdw(0.0, 0.0, 0.0), local_epochs=2, threshold=0.5, prune_rate=0.3,
      slots=3,
  )
  rng = np.random.default_rng(11)
  theta = [rng.normal(size=np.shape(w)).astype(np.float32) for w in initial.trainable]
  state = process.initialize()
  state = process.set_model_weights(
      state, type(initial)(trainable=theta, non_trainable=initial.non_trainable)
  )
  # Client A pruned the first row of d1 (8 of 12 kept) and B three of it
  # and two of d2: positions (0, 0..2) of d1 are kept by neither.
  masks_a = ones(None)
  masks_a[0][0, :] = 0
  masks_b = [np.ones(s, np.float32) for s in layout.kernel_shapes]
  masks_b[0][0, :3] = 0
  masks_b[1][1:3, 0] = 0
  x_a, x_b = rng.normal(size=(6, 3)), rng.normal(size=(5, 3))

  def masked(masks):
    out = list(theta)
    for m, i in zip(masks, layout.kernel_index):
      out[i] = theta[i] * m
    return out

  # A's labels are its masked model's worst guess (accuracy 0), B's its
  # own predictions (accuracy 1): only B passes the threshold of 0.5.
  y_a = np.argmin(_logits(masked(masks_a), x_a), axis=1)
  y_b = np.argmax(_logits(masked(masks_b), x_b), axis=1)
  n_a, n_b = 7, 4
  data = [
      lotteryfl.client_data(
          _dataset(rng.normal(size=(n_a, 3)), rng.integers(0, 2, n_a), 3),
          _dataset(x_a, y_a, 4), masks_a, 0),
      lotteryfl.client_data(
          _dataset(rng.normal(size=(n_b, 3)), rng.integers(0, 2, n_b), 3),
          _dataset(x_b, y_b, 4), masks_b, 2),
  ]
  out = process.next(state, data)

  theta0 = [np.asarray(w) for w in initial.trainable]
  want_a = lotteryfl.client_start_np(theta, masks_a, theta0, layout.kernel_index, 0.0, layout.budgets, 0.5, 0.3)
  want_b = lotteryfl.client_start_np(theta, masks_b, theta0, layout.kernel_index, 1.0, layout.budgets, 0.5, 0.3)
  assert not want_a[2] and want_b[2]
  # B: 9 of 12 kept -> 9 - round(2.7) = 6; 6 of 8 -> max(4, 6 - round(1.8)) = 4.
  assert [int(m.sum()) for m in want_b[1]] == [6, 4]
  for m, got in zip(lotteryfl.replay_pruning(theta, masks_b, layout.kernel_index, layout.budgets, 0.3), want_b[1]):
    np.testing.assert_array_equal(m, got)
  clients = out.metrics["client_work"]["clients"]
  assert int(clients["pruned"]) == 1 and int(clients["mask_changed"]) == 1
  assert np.asarray(clients["pruned_slots"]).tolist() == [0, 0, 1]
  final = [masks_a, want_b[1]]
  assert np.asarray(clients["kept"]).tolist() == [8 + 6, 8 + 4]
  assert np.asarray(clients["kept_index_sums"]).tolist() == np.sum(
      [lotteryfl.index_sums(m) for m in final], axis=0).tolist()
  # Their own models after training (the start, at learning rate 0) on their
  # validation data: A's labels are its worst guesses; B restarted from theta_0.
  want_b_accuracy = np.mean(np.argmax(_logits(want_b[0], x_b), axis=1) == y_b)
  assert int(clients["personalised_clients"]) == 2
  assert float(clients["personalised_accuracy_sum"]) == pytest.approx(0.0 + want_b_accuracy, abs=1e-6)

  got = process.get_model_weights(out.state)
  starts, weights = [want_a[0], want_b[0]], [n_a, n_b]
  for i, value in enumerate(got.trainable):
    slot = layout.kernel_index.index(i) if i in layout.kernel_index else None
    keeps = [np.ones(np.shape(value)) if slot is None else final[c][slot] for c in range(2)]
    votes = sum(w * k for w, k in zip(weights, keeps))
    total = sum(w * k * np.asarray(s[i], np.float64) for w, k, s in zip(weights, keeps, starts))
    want = np.where(votes > 0, total / np.maximum(votes, 1), theta[i])
    if i == 0:
      assert np.all(votes[0, :3] == 0)
    np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-7)
  # The global model has no mask of its own.
  for i in layout.mask_index:
    np.testing.assert_array_equal(got.non_trainable[i], 1.0)


# ------------------------------------------------------------------ a run


def _rows(path):
  import csv  # pylint: disable=g-import-not-at-top

  with open(path, newline="") as f:
    return [{k: v for k, v in r.items() if k != "round_seconds"} for r in csv.DictReader(f)]


def test_a_run_charges_each_clients_own_mask_and_resumes_identically(
    tmp_path, small_fashion_mnist
):
  """Threshold 0: every sampled client prunes (none reaches the target in 4
  rounds). Round 1's clients start dense; over the run, what the clients
  download minus what they upload (less their masks) is 32 bits for every
  weight they pruned. The same run, stopped after its third round and
  rerun, writes the same metrics (the clients' masks are in
  the checkpoint it resumes from)."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  from tff_feddst import checkpoint  # pylint: disable=g-import-not-at-top
  from tff_feddst import training  # pylint: disable=g-import-not-at-top
  from tff_feddst.config import ExperimentConfig  # pylint: disable=g-import-not-at-top

  config = ExperimentConfig(
      data_dir=small_fashion_mnist,  # the first Fashion-MNIST images (conftest)
      algorithm="lotteryfl", total_clients=40, clients_per_round=5, local_epochs=1, rounds=4,
      eval_every=2, checkpoint_every=2, lotteryfl_accuracy_threshold=0.0,
      output_dir=str(tmp_path / "run"),
  )
  lines = []
  summary = training.run_experiment(config, log=lines.append)
  rows = _rows(tmp_path / "run" / "metrics.csv")
  assert any(
      line.startswith("round    2/4") and line.endswith(
          f"personalised_acc {float(rows[1]['personalised_accuracy']):.4f}")
      for line in lines
  ), lines
  n, biases = 261750, 90
  m = 261760  # a mask message: each layer's bits in whole bytes (250 -> 256, 500 -> 504)
  assert summary["num_prunable"] == n and summary["num_unmasked"] == biases
  budgets = list(summary["layer_budgets"].values())
  first = lotteryfl.pruned_counts([250, 5000, 256000, 500], budgets, 0.2)
  assert first == [208, 4000, 204800, 500]  # conv1 and logits stop at their budgets
  assert int(rows[0]["round_download_bits"]) == 5 * 32 * (n + biases)
  assert int(rows[0]["round_upload_bits"]) == 5 * (32 * (sum(first) + biases) + m)
  assert [int(r["clients_mask_uploaded"]) for r in rows] == [5] * 4
  section = summary["lotteryfl"]
  assert section["clients"] == 40 and 5 <= section["clients_pruned"] <= 20
  assert section["clients_at_target"] == 0
  final_kept = 40 * sum(section["mean_layer_kept"].values())
  down, up = summary["cumulative_download_bits"], summary["cumulative_upload_bits"]
  assert down - (up - 20 * m) == pytest.approx(32 * (40 * n - final_kept), abs=1e-3)
  assert float(rows[-1]["sparsity"]) == pytest.approx(1 - final_kept / (40 * n), abs=1e-12)
  assert all(0 <= float(r["personalised_accuracy"]) <= 1 for r in rows)  # every round
  assert [r["masked_global_accuracy"] != "" for r in rows] == [False, True, False, True]
  for column in ("personalised_accuracy", "masked_global_accuracy"):
    assert summary[f"final_{column}"] == float(rows[-1][column])
  # The global model is dense: its masks keep everything.
  assert sum(summary["final_layer_kept"].values()) == n

  # The same run, stopped by an exception as its fourth round's line is
  # printed (before that round's row; three rows are written):
  # the rerun resumes from a checkpoint of the clients' pruned masks and
  # writes the same metrics. (Runs killed by signals, and their locks and
  # workers, are tests/test_resilience.py's.)
  killed = tmp_path / "killed"

  class Stop(Exception):
    pass

  def stop_at_round_4(line):
    if line.startswith("round    4/4"):
      raise Stop(line)

  with pytest.raises(Stop):
    training.run_experiment(
        dataclasses.replace(config, output_dir=str(killed), checkpoint_every=1),
        log=stop_at_round_4,
    )
  assert len(_rows(killed / "metrics.csv")) == 3
  resumed_from = checkpoint.RunCheckpoints(str(killed / "checkpoints")).latest_round()
  assert resumed_from in (2, 3)
  resumed = training.run_experiment(
      dataclasses.replace(config, output_dir=str(killed)), log=lambda line: None
  )
  assert resumed["resumed_from_round"] == resumed_from
  assert _rows(killed / "metrics.csv") == rows
  assert resumed["lotteryfl"] == section


def test_bad_lotteryfl_settings_are_one_line():
  from tff_feddst.config import ConfigError, ExperimentConfig  # pylint: disable=g-import-not-at-top

  with pytest.raises(ConfigError, match=r"^--lotteryfl_prune_rate=0.0 must be in \(0, 1\)$"):
    ExperimentConfig(algorithm="lotteryfl", lotteryfl_prune_rate=0.0).resolve()
  with pytest.raises(ConfigError, match=r"^--lotteryfl_accuracy_threshold=1.5 must be in \[0, 1\]$"):
    ExperimentConfig(algorithm="lotteryfl", lotteryfl_accuracy_threshold=1.5).resolve()


def test_the_masked_global_accuracy_uses_each_clients_own_mask(fashion_mnist_available):
  """All masks dense: it equals clients_accuracy. One client with every
  kernel weight masked: the network outputs its logits' bias whatever the
  image, so that client's accuracy is the share of its labels equal to the
  bias's largest entry (one of its two classes here)."""
  import fractions  # pylint: disable=g-import-not-at-top
  import functools  # pylint: disable=g-import-not-at-top

  import keras_models  # pylint: disable=g-import-not-at-top
  from tff_feddst import data  # pylint: disable=g-import-not-at-top
  from tff_feddst import phases  # pylint: disable=g-import-not-at-top
  from tff_feddst import sparse_model  # pylint: disable=g-import-not-at-top

  fed = data.load_federated_data("fashion_mnist", "pathological", total_clients=40, seed=0)
  keras_fn = functools.partial(
      keras_models.build_model, "mnist_cnn", fed.input_shape, fed.num_classes
  )
  layout = sparse_model.build_layout(sparse_model.wrap_prunable(keras_fn()), 0.8)
  model = keras_fn()
  weights = [w.numpy() for w in model.trainable_weights]
  store = lotteryfl.ClientMasks(fed.nonempty_train_client_ids, layout.kernel_shapes)
  evaluator = lotteryfl.MaskedGlobalEvaluator(
      phases.Evaluator(model, fed, phases.client_test_indices(fed)), fed, store,
      layout.kernel_index,
  )
  cid, idx = evaluator.clients[3]
  label = int(fed.arrays.y_test[idx][0])  # one of the client's two classes
  # A small bias: the dense model still answers by its kernels.
  weights[-1] = 1e-3 * np.eye(10, dtype=np.float32)[label]
  out = evaluator.evaluate(weights)
  assert out["masked_global_accuracy"] == out["clients_accuracy"]
  store.set(cid, [np.zeros(s, np.float32) for s in layout.kernel_shapes])
  dense = evaluator.base.correct(weights)
  want = [
      fractions.Fraction(int(np.sum(fed.arrays.y_test[i] == label)), len(i)) if c == cid
      else fractions.Fraction(int(dense[i].sum()), len(i))
      for c, i in evaluator.clients
  ]
  assert evaluator.evaluate(weights)["masked_global_accuracy"] == float(sum(want) / len(want))
  assert int(np.sum(fed.arrays.y_test[idx] == label)) != int(dense[idx].sum())
