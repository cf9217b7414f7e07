"""PruneFL's parts (docs/algorithms.md section 4.2): the mask by g^2 / t, the
measured cost per kept weight, a client's local round, the initial pruning.

The masks are worked out by hand on small arrays; the local round's
gradients and weights in numpy (float64) from the softmax cross-entropy's
gradient and the client optimizer's rule written out.
"""

import collections
import functools
import json

import numpy as np
import pytest
import tensorflow as tf

import keras_models
from tff_feddst import optimizers
from tff_feddst import prunefl
from tff_feddst import sparse_model

# `portability` (pyproject.toml) marks the tests that compare TensorFlow's
# training arithmetic with numpy within tolerances: they also run under
# another instruction set (`make test`). The others compare exactly (masks,
# bits, a resumed run against its own uninterrupted one) or float64 scores,
# which every processor rounds alike.


def test_masks_keep_the_largest_g2_over_t_of_the_whole_network():
  g1 = np.array([[1.0, -2.0], [0.5, 3.0]])  # t = 4: scores 0.25, 1, 0.0625, 2.25
  g2 = np.array([0.3, -1.0, 2.0])  # t = 1: scores 0.09, 1, 4
  got = prunefl.select_masks([g1, g2], [4.0, 1.0], 3)
  # 4 and 2.25, then the tie at 1 goes to the lower position (layer 1).
  np.testing.assert_array_equal(got[0], [[0, 1], [0, 1]])
  np.testing.assert_array_equal(got[1], [0, 0, 1])
  got = prunefl.select_masks([g1, g2], [4.0, 1.0], 4)
  np.testing.assert_array_equal(got[0], [[0, 1], [0, 1]])
  np.testing.assert_array_equal(got[1], [0, 1, 1])
  # The cost moves weights between layers: at t = 1 for both, layer 1's 2
  # and 3 outrank layer 2's 1.
  got = prunefl.select_masks([g1, g2], [1.0, 1.0], 3)
  np.testing.assert_array_equal(got[0], [[0, 1], [0, 1]])
  np.testing.assert_array_equal(got[1], [0, 0, 1])
  got = prunefl.select_masks([g1, g2], [1.0, 1.0], 4)
  np.testing.assert_array_equal(got[0], [[1, 1], [0, 1]])
  np.testing.assert_array_equal(got[1], [0, 0, 1])
  assert [m.sum() for m in prunefl.select_masks([g1, g2], [4.0, 1.0], 0)] == [0, 0]
  assert [m.sum() for m in prunefl.select_masks([g1, g2], [4.0, 1.0], 7)] == [4, 3]
  with pytest.raises(ValueError, match="cannot keep 8 of 7"):
    prunefl.select_masks([g1, g2], [4.0, 1.0], 8)


def test_the_cost_per_weight_is_the_fitted_slope():
  kept = ((100, 75, 50, 25), (400, 300, 200, 100), (10, 8, 5, 2))
  seconds = (
      tuple(1e-3 + 2e-6 * k for k in kept[0]),
      tuple(5e-4 + 3e-7 * k for k in kept[1]),
      (2e-4, 2.1e-4, 2.2e-4, 2.3e-4),  # the fixed cost hides the size
  )
  costs = prunefl.LayerCosts(
      ("a", "b", "c"), (100, 400, 10), 32, (1.0, 0.75, 0.5, 0.25), kept, seconds
  )
  (fixed_a, slope_a), (fixed_b, slope_b), (_, slope_c) = costs.fits
  assert fixed_a == pytest.approx(1e-3) and slope_a == pytest.approx(2e-6)
  assert fixed_b == pytest.approx(5e-4) and slope_b == pytest.approx(3e-7)
  assert slope_c < 0
  assert costs.per_weight == pytest.approx((2e-6, 3e-7, 3e-7))
  again = prunefl.LayerCosts.from_json(json.loads(json.dumps(costs.to_json())))
  assert again == costs
  assert costs.to_json()["per_weight_seconds"] == pytest.approx([2e-6, 3e-7, 3e-7])


def test_measured_costs_cover_every_layer_and_density():
  keras_fn = functools.partial(
      keras_models.build_model, "mnist_cnn", (28, 28, 1), 10,
      widths={"conv1": 4, "conv2": 8, "dense1": 16},
  )
  x = np.random.default_rng(0).random((8, 28, 28, 1), np.float32)
  costs = prunefl.measure_layer_costs(keras_fn, x, repeats=3)
  assert costs.layer_names == ("conv1", "conv2", "dense1", "logits")
  assert costs.num_weights == (5 * 5 * 1 * 4, 5 * 5 * 4 * 8, 16 * 16 * 8 * 16, 16 * 10)
  assert costs.batch_size == 8
  # Density d keeps round(d * units) output units of the layer.
  assert costs.kept[0] == (100, 75, 50, 25)
  assert costs.kept[3] == (160, 128, 80, 32)  # 8 and 2 of 10 (half to even)
  for kept, num in zip(costs.kept, costs.num_weights):
    assert kept[0] == num and list(kept) == sorted(kept, reverse=True)
  assert all(s > 0 for row in costs.seconds for s in row)
  assert all(0 < t < 1 and np.isfinite(t) for t in costs.per_weight)


def _softmax_regression():
  tf.keras.utils.set_random_seed(1)
  inputs = tf.keras.Input((4,))
  model = tf.keras.Model(inputs, tf.keras.layers.Dense(3, name="dense")(inputs))
  rng = np.random.default_rng(2)
  model.set_weights([rng.normal(0, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
  return model


def _numpy_gradient(w, b, x, y):
  """d/d(W, b) of the mean softmax cross-entropy of x W + b (float64)."""
  logits = x @ w + b
  p = np.exp(logits - logits.max(axis=1, keepdims=True))
  p /= p.sum(axis=1, keepdims=True)
  d = (p - np.eye(3)[y]) / len(y)
  return x.T @ d, d.sum(axis=0)


@pytest.mark.portability
def test_a_local_round_is_the_clients_sgd_and_the_gradient_its_mean_loss():
  lr, momentum, wd = 0.1, 0.9, 0.01
  rng = np.random.default_rng(3)
  x = rng.normal(size=(5, 4)).astype(np.float32)
  y = rng.integers(0, 3, 5).astype(np.int32)
  batches = [(x[:3], y[:3]), (x[3:], y[3:]), (x[:2], y[:2])]
  dataset = [collections.OrderedDict(x=tf.constant(bx), y=tf.constant(by)) for bx, by in batches]
  model = _softmax_regression()
  w, b = (np.asarray(v, np.float64) for v in model.get_weights())
  velocity = [np.zeros_like(w), np.zeros_like(b)]
  for bx, by in batches:
    grads = _numpy_gradient(w, b, bx, by)
    for i, (param, grad) in enumerate(zip((w, b), grads)):
      velocity[i] = momentum * velocity[i] + grad + wd * param
    w, b = w - lr * velocity[0], b - lr * velocity[1]

  assert prunefl.local_round(model, optimizers.build_sgdw(lr, momentum, wd), dataset) == 3
  np.testing.assert_allclose(model.get_weights()[0], w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.get_weights()[1], b, rtol=1e-5, atol=1e-6)
  # The gradient of the mean loss over all 5 examples, at the trained weights.
  one_epoch = dataset[:2]
  got = prunefl.mean_gradient(model, one_epoch, [0])
  np.testing.assert_allclose(got[0], _numpy_gradient(w, b, x, y)[0], rtol=1e-4, atol=1e-6)


def test_the_initial_pruning_keeps_the_budget_of_one_clients_trained_model(
    fashion_mnist_available,
):
  from tff_feddst import data as data_lib  # pylint: disable=g-import-not-at-top

  fed = data_lib.load_federated_data("fashion_mnist", "pathological", total_clients=40, seed=3)
  keras_fn = functools.partial(
      keras_models.build_model, "mnist_cnn", (28, 28, 1), 10,
      widths={"conv1": 4, "conv2": 8, "dense1": 16},
  )
  layout = sparse_model.build_layout(sparse_model.wrap_prunable(keras_fn()), 0.8, "erk")
  per_weight = (1e-6, 1e-7, 1e-9, 1e-9)
  optimizer = optimizers.build_sgdw(0.01, 0.9, 0.001)
  pruning = prunefl.prune_on_one_client(
      keras_fn, 5, fed, layout, optimizer, local_rounds=2, batch_size=32,
      local_epochs=1, per_weight=per_weight,
  )
  assert pruning.client_id == prunefl.initial_client(fed, 5)
  assert pruning.client_id in fed.nonempty_train_client_ids
  assert pruning.steps == 2 * -(-fed.num_train_examples(pruning.client_id) // 32)
  assert sum(int(m.sum()) for m in pruning.masks) == layout.num_kept
  want = prunefl.select_masks(pruning.gradients, per_weight, layout.num_kept)
  for got, expected in zip(pruning.masks, want):
    np.testing.assert_array_equal(got, expected)
  # The client trained: its weights moved from the seeded initial ones.
  start = sparse_model.initial_model_weights(keras_fn, 5, None).trainable
  assert not np.allclose(pruning.trained[0], start[0])

  weights = prunefl.initial_weights(keras_fn, 5, layout, pruning)
  for slot, mask in enumerate(pruning.masks):
    kernel = weights.trainable[layout.kernel_index[slot]]
    np.testing.assert_array_equal(weights.non_trainable[layout.mask_index[slot]], mask)
    np.testing.assert_array_equal(kernel, pruning.trained[layout.kernel_index[slot]] * mask)
  # Biases are the client's, unmasked.
  np.testing.assert_array_equal(weights.trainable[1], pruning.trained[1])


# ------------------------------------------------- the process's server side


def _tiny_keras():
  inputs = tf.keras.Input((3,))
  hidden = tf.keras.layers.Dense(4, name="d1")(inputs)
  return tf.keras.Model(inputs, tf.keras.layers.Dense(2, name="d2")(hidden))


TINY_SPEC = collections.OrderedDict(
    x=tf.TensorSpec([None, 3], tf.float32), y=tf.TensorSpec([None], tf.int32)
)


def _tensor_type(structure):
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  return tff.types.tensorflow_to_type(
      tf.nest.map_structure(lambda v: tf.TensorSpec(np.shape(v), tf.float32), structure)
  )


def test_the_server_reselects_by_g2_over_t_only_in_its_rounds():
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  from tff_feddst import client_work  # pylint: disable=g-import-not-at-top

  layout = sparse_model.build_layout(sparse_model.wrap_prunable(_tiny_keras()), 0.5, "uniform")
  assert layout.budgets == (6, 4) and layout.num_kept == 10
  _, weights_type, _ = client_work.model_types(
      sparse_model.make_model_fn(_tiny_keras, TINY_SPEC, wrapped=True)
  )
  weights = sparse_model.initial_model_weights(_tiny_keras, 0, layout)
  rng = np.random.default_rng(7)
  values = [rng.normal(size=np.shape(w)).astype(np.float32) for w in weights.trainable]
  shares = [np.ones(np.shape(w), np.float32) for w in weights.trainable]
  # Distinct |g|, so that no two scores tie.
  g1 = (np.arange(1, 13) * np.where(np.arange(12) % 2, -1, 1)).reshape(3, 4)
  g1 = g1[:, rng.permutation(4)].astype(np.float32)
  g2 = (np.arange(1, 9, dtype=np.float32) / 3.0).reshape(4, 2)[rng.permutation(4)]
  update = collections.OrderedDict(values=values, masks=shares, gradients=[g1, g2])
  per_weight = (1.0, 0.25)
  process = prunefl.build_finalizer(
      weights_type, _tensor_type(update), layout, per_weight, 10, rounds_between=2, end_round=4
  )
  old_masks = [np.asarray(weights.non_trainable[i]) for i in layout.mask_index]

  state = process.initialize()
  out = process.next(state, weights, update)  # round 1: the mask stays
  assert int(out.measurements["mask_changed"]) == 0
  for slot, i in enumerate(layout.kernel_index):
    np.testing.assert_array_equal(out.result.non_trainable[layout.mask_index[slot]], old_masks[slot])
    np.testing.assert_array_equal(out.result.trainable[i], values[i] * old_masks[slot])
  np.testing.assert_array_equal(out.result.trainable[1], values[1])  # a bias, unmasked

  out = process.next(out.state, weights, update)  # round 2: re-selected
  want = prunefl.select_masks([g1, g2], per_weight, 10)
  # By hand: d1's scores are |g|^2 = 1, 4, ..., 144 and d2's (k/3)^2 / 0.25 =
  # 4k^2/9 (k = 1..8, at most 28.4); the best 10 are d1's |g| = 12..6 (144
  # down to 36), d2's k = 8 (28.4), d1's 5 (25) and d2's k = 7 (21.8).
  assert [int(m.sum()) for m in want] == [8, 2]
  assert np.sort(np.abs(g1[want[0] > 0])).tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
  assert np.sort(g2[want[1] > 0] * 3).round().tolist() == [7, 8]
  assert int(out.measurements["mask_changed"]) == 1
  for slot, i in enumerate(layout.kernel_index):
    np.testing.assert_array_equal(out.result.non_trainable[layout.mask_index[slot]], want[slot])
    np.testing.assert_array_equal(out.result.trainable[i], values[i] * want[slot])
  assert sum(int(np.sum(out.result.non_trainable[i])) for i in layout.mask_index) == 10

  out = process.next(out.state, weights, update)  # round 3: the mask stays
  assert int(out.measurements["mask_changed"]) == 0
  out = process.next(out.state, weights, update)  # round 4 = R_end: re-selected
  out = process.next(out.state, tff.learning.models.ModelWeights(
      out.result.trainable, out.result.non_trainable), update)  # round 5 > R_end
  assert int(out.measurements["mask_changed"]) == 0


@pytest.mark.portability
def test_the_aggregator_votes_the_values_and_averages_the_gradients():
  from tff_feddst import aggregation  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(8)
  mask = (rng.random((3, 4)) < 0.5).astype(np.float32)
  clients, weights = [], [2.0, 1.0, 3.0]
  for c in range(3):
    values = [rng.normal(size=(3, 4)).astype(np.float32) * mask, rng.normal(size=4).astype(np.float32)]
    clients.append(collections.OrderedDict(
        values=values, masks=[mask, np.ones([], np.float32)],
        gradients=[rng.normal(size=(3, 4)).astype(np.float32)],
    ))
  clients[1]["values"][0][0, 0] = np.nan  # rejected by both parts
  clients[1]["gradients"][0][0, 0] = np.nan
  value_type = _tensor_type(clients[0])
  import tensorflow_federated as tff  # pylint: disable=g-import-not-at-top

  weight_type = tff.TensorType(np.float32)
  process = prunefl.build_aggregator(value_type, weight_type)
  out = process.next(process.initialize(), clients, weights)
  accepted = [0, 2]
  total = sum(weights[c] for c in accepted)
  want = sum(weights[c] * clients[c]["gradients"][0].astype(np.float64) for c in accepted) / total
  np.testing.assert_allclose(out.result["gradients"][0], want, rtol=1e-6, atol=1e-7)
  assert int(out.measurements["voting"]["rejected"]) == 1
  voting = aggregation.SparseVotingFactory().create(
      _tensor_type(collections.OrderedDict(values=clients[0]["values"], masks=clients[0]["masks"])),
      weight_type,
  )
  sparse = [collections.OrderedDict(values=c["values"], masks=c["masks"]) for c in clients]
  voted = voting.next(voting.initialize(), sparse, weights)
  for key in ("values", "masks"):
    for a, b in zip(out.result[key], voted.result[key]):
      np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ a run


def _rows(path):
  import csv  # pylint: disable=g-import-not-at-top

  with open(path, newline="") as f:
    return [{k: v for k, v in r.items() if k != "round_seconds"} for r in csv.DictReader(f)]


MNIST_COSTS = prunefl.LayerCosts(
    ("conv1", "conv2", "dense1", "logits"), (250, 5000, 256000, 500), 32, (1.0, 0.5),
    ((250, 125), (5000, 2500), (256000, 128000), (500, 250)),
    ((2e-3, 1e-3), (4e-3, 2e-3), (2e-3, 1e-3), (1e-4, 5e-5)),
)


def test_a_run_counts_the_gradients_and_resumes_identically(tmp_path, small_fashion_mnist):
  """4 rounds, re-selection in rounds 2 and 4: the dense gradients are
  charged there (32 n bits a client), the mask keeps the kept total, and a
  run resumed from round 2 writes the same metrics."""
  from tff_feddst import training  # pylint: disable=g-import-not-at-top
  from tff_feddst.config import ExperimentConfig  # pylint: disable=g-import-not-at-top

  costs_path = tmp_path / "costs.json"
  costs_path.write_text(json.dumps(MNIST_COSTS.to_json()))
  config = ExperimentConfig(
      data_dir=small_fashion_mnist,  # the first Fashion-MNIST images (conftest)
      algorithm="prunefl", total_clients=40, clients_per_round=5, local_epochs=1, rounds=4,
      rounds_between_readjustments=2, readjustment_end_round=4, prunefl_initial_rounds=1,
      eval_every=4, checkpoint_every=2, prunefl_costs=str(costs_path),
      output_dir=str(tmp_path / "run"),
  )
  summary = training.run_experiment(config, log=lambda line: None)
  rows = _rows(tmp_path / "run" / "metrics.csv")
  n, biases, kept = 261750, 50 + 10 + 20 + 10, summary["num_prunable"]
  assert n == kept and summary["num_unmasked"] == biases
  num_kept = sum(summary["layer_budgets"].values())
  assert [int(r["readjusted"]) for r in rows] == [0, 1, 0, 1]
  for row in rows:
    gradients = 5 * 32 * n if int(row["readjusted"]) else 0
    assert int(row["round_upload_bits"]) == 5 * 32 * (num_kept + biases) + gradients
    assert float(row["sparsity"]) == pytest.approx(1 - num_kept / n, abs=1e-12)
    assert int(row["clients_mask_uploaded"]) == 0
  # The final mask keeps the total; which layer keeps how many is PruneFL's.
  assert sum(summary["final_layer_kept"].values()) == num_kept
  section = summary["prunefl"]
  assert sum(section["initial_layer_kept"].values()) == num_kept
  # Its mask: each layer's bits in whole bytes (250 -> 256, 500 -> 504).
  assert section["initial_upload_bits"] == 32 * (num_kept + biases) + n + 10
  assert section["per_weight_seconds"] == pytest.approx(dict(zip(
      MNIST_COSTS.layer_names, (8e-6, 8e-7, 7.8125e-9, 2e-7)
  )))
  saved = prunefl.read_costs(str(tmp_path / "run" / prunefl.COSTS_FILE))
  assert saved == MNIST_COSTS

  import os  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top

  shutil.rmtree(tmp_path / "run" / "checkpoints" / "round_4")
  os.remove(tmp_path / "run" / "summary.json")
  # The run's own costs file is used on resume, whatever --prunefl_costs says.
  costs_path.write_text("not json")
  training.run_experiment(config, log=lambda line: None)
  assert _rows(tmp_path / "run" / "metrics.csv") == rows


def test_bad_prunefl_settings_are_one_line(tmp_path):
  from tff_feddst import training  # pylint: disable=g-import-not-at-top
  from tff_feddst.config import ConfigError, ExperimentConfig  # pylint: disable=g-import-not-at-top

  with pytest.raises(ConfigError, match=r"^--prunefl_initial_rounds=0 must be >= 1$"):
    ExperimentConfig(algorithm="prunefl", prunefl_initial_rounds=0).resolve()
  bad = tmp_path / "bad.json"
  bad.write_text("{")
  with pytest.raises(ConfigError, match=r"^cannot read PruneFL costs .*bad.json: "):
    prunefl.read_costs(str(bad))
  other = prunefl.LayerCosts(("a",), (4,), 1, (1.0, 0.5), ((4, 2),), ((2.0, 1.0),))
  bad.write_text(json.dumps(other.to_json()))
  config = ExperimentConfig(
      algorithm="prunefl", total_clients=10, clients_per_round=2, rounds=1,
      prunefl_costs=str(bad), output_dir=str(tmp_path / "run"),
  )
  try:
    from conftest import require_fashion_mnist  # pylint: disable=g-import-not-at-top

    require_fashion_mnist()
  except Exception:  # pylint: disable=broad-except
    return
  with pytest.raises(ConfigError, match=r"are for layers \['a'\], the model has \['conv1'"):
    training.run_experiment(config, log=lambda line: None)
