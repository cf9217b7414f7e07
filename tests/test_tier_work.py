"""Clients of two sparsity tiers in one FedDST process (`tier_work`),
through the real TFF runtime: each client uploads exactly its tier's
budget, its mask is cut from the global one as the numpy reference cuts
it, the merge equals a numpy voting average of the decoded uploads, and
the bits each tier measures equal the formula."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from tff_feddst import compact_voting
from tff_feddst import feddst
from tff_feddst import messages
from tff_feddst import optimizers
from tff_feddst import sparse_model
from tff_feddst import tier_work
from tff_feddst import tiers

TIERS = tiers.parse("0.5:0.5,0.8:0.5")
CLIENT_TIERS = [0, 1, 1, 0]


def _keras():
  layers = tf.keras.layers
  return tf.keras.Sequential([
      layers.InputLayer(input_shape=(8, 8, 1)),
      layers.Conv2D(4, 3, activation="relu", name="conv"),
      layers.Flatten(),
      layers.Dense(6, activation="relu", name="dense"),
      layers.Dense(3, name="logits"),
  ])


SPEC = collections.OrderedDict(
    x=tf.TensorSpec([None, 8, 8, 1], tf.float32), y=tf.TensorSpec([None], tf.int32)
)


@pytest.fixture(scope="module")
def setup():
  layout = sparse_model.build_layout(
      sparse_model.wrap_prunable(_keras()), TIERS.global_sparsity, "erk"
  )
  per_tier = tiers.budgets(layout.kernel_shapes, TIERS, "erk")
  assert per_tier[0] == list(layout.budgets)
  initial = sparse_model.initial_model_weights(_keras, 5, layout)
  return layout, per_tier, initial


def _data(round_num, per_tier):
  rng = np.random.default_rng(round_num)
  out = []
  for c, tier in enumerate(CLIENT_TIERS):
    n = 16 + 4 * c
    x = rng.random((n, 8, 8, 1), dtype=np.float32)
    y = rng.integers(0, 3, n).astype(np.int32)
    ds = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y)).batch(8)
    out.append(tier_work.client_data(ds, per_tier[tier], tier))
  return out


def _work(layout, ratio):
  return tier_work.build_client_work(
      sparse_model.make_model_fn(_keras, SPEC, True), layout, optimizers.build_sgdw(0.05),
      len(TIERS.sparsities), local_epochs=1, readjustment_ratio=ratio,
      rounds_between_readjustments=1, readjustment_end_round=10,
  )


def test_each_client_uploads_its_tiers_budget_and_the_merge_is_a_voting_average(setup):
  layout, per_tier, initial = setup
  work = _work(layout, ratio=0.0)  # no readjustment: masks as cut from the global one
  out = work.next(work.initialize(), [initial] * len(CLIENT_TIERS), _data(1, per_tier))
  uploads = [r.update for r in out.result]
  weights = [float(r.update_weight) for r in out.result]
  global_kernels, global_masks = sparse_model.kernels_and_masks(initial, layout)
  decoded = []
  for upload, tier in zip(uploads, CLIENT_TIERS):
    assert [np.asarray(l["values"]).size for l in upload["layers"]] == per_tier[tier]
    kernels, masks = [], []
    for slot, layer in enumerate(upload["layers"]):
      bits = np.asarray(layer["mask_bits"])
      if tier == 0:
        assert bits.size == 0  # its mask is the global one: no bits
        mask = global_masks[slot]
      else:
        mask = messages.unpack_bits_np(bits, layout.kernel_shapes[slot])
        want = tiers.client_mask_np(global_kernels[slot], global_masks[slot], per_tier[1][slot])
        np.testing.assert_array_equal(mask, want)
      kernel, _ = messages.decode_layer_np(
          collections.OrderedDict(values=layer["values"]), layout.kernel_shapes[slot],
          mask=mask,
      )
      kernels.append(kernel)
      masks.append(mask)
    decoded.append((kernels, masks, [np.asarray(b) for b in upload["other"]]))
  stats = out.measurements["clients"]
  assert list(stats["tier_clients"]) == [2, 2]
  assert int(stats["mask_changed"]) == 2
  value_bits = [32 * (sum(b) + layout.num_unmasked) for b in per_tier]
  assert list(stats["tier_upload_bits"]) == [2 * value_bits[0], 2 * (value_bits[1] + layout.num_mask_bits)]
  assert int(stats["upload_bits"]) == sum(stats["tier_upload_bits"])

  factory = compact_voting.CompactVotingFactory(layout)
  process = factory.create(work.next.type_signature.result.result.member.update,
                           work.next.type_signature.result.result.member.update_weight)
  summed = process.next(process.initialize(), uploads, weights)
  result, _ = compact_voting.finish_with_global_masks(
      summed.result, [tf.constant(m) for m in global_masks], layout, min_votes=1
  )
  w = np.asarray(weights)
  for slot, i in enumerate(layout.kernel_index):
    masks = np.stack([d[1][slot] for d in decoded])
    kernels = np.stack([d[0][slot] for d in decoded])
    shape = (-1,) + (1,) * kernels[0].ndim
    votes = (w.reshape(shape) * masks).sum(0)
    want = np.where(votes > 0, (w.reshape(shape) * kernels).sum(0) / np.where(votes > 0, votes, 1), 0)
    np.testing.assert_allclose(result["values"][i], want, rtol=1e-5, atol=1e-7)
  biases = [i for i in range(len(initial.trainable)) if i not in layout.kernel_index]
  for j, i in enumerate(biases):
    want = np.average(np.stack([d[2][j] for d in decoded]), axis=0, weights=w)
    np.testing.assert_allclose(result["values"][i], want, rtol=1e-5, atol=1e-7)


def test_a_tiered_run_keeps_the_global_budgets_and_counts_bits_per_tier(setup):
  layout, per_tier, initial = setup
  process = feddst.build_feddst(
      sparse_model.make_model_fn(_keras, SPEC, True), layout, initial,
      optimizers.build_sgdw(0.05), local_epochs=1, readjustment_ratio=0.3,
      rounds_between_readjustments=2, readjustment_end_round=4, num_tiers=2,
  )
  state = process.initialize()
  for r in (1, 2, 3):
    clients = _data(r, per_tier)
    if r == 3:  # tier 1 only: the global mask keeps its budgets all the same
      clients = [c for c, t in zip(clients, CLIENT_TIERS) if t == 1]
    output = process.next(state, clients)
    state = output.state
    _, masks = sparse_model.kernels_and_masks(process.get_model_weights(state), layout)
    assert [int(m.sum()) for m in masks] == list(layout.budgets)
    stats = output.metrics["client_work"]["clients"]
    # Tier 0 sends its mask only after readjusting (round 1); tier 1 always.
    tier0_clients, tier0_masks = (2, 2 if r == 1 else 0) if r < 3 else (0, 0)
    assert list(stats["tier_upload_bits"]) == [
        tier0_clients * 32 * (sum(per_tier[0]) + layout.num_unmasked)
        + tier0_masks * layout.num_mask_bits,
        2 * (32 * (sum(per_tier[1]) + layout.num_unmasked) + layout.num_mask_bits),
    ]
    assert int(output.metrics["aggregator"]["rejected"]) == 0


# ------------------------------------------------------ the command line


def test_tier_settings_resolve_and_bad_ones_are_one_line_errors():
  from tff_feddst.config import ConfigError, ExperimentConfig  # pylint: disable=g-import-not-at-top

  resolved = ExperimentConfig(client_sparsity_tiers="0.95:0.3,0.5:0.2,0.8:0.5").resolve()
  assert resolved.sparsity == 0.5 and resolved.final_sparsity == 0.5
  assert resolved.client_execution == "per_client"
  assert resolved.client_sparsity_tiers == "0.95:0.3,0.5:0.2,0.8:0.5"
  for settings, message in [
      (dict(client_sparsity_tiers="0.5:0.2,0.8:0.5"), "the shares sum to 0.7, not 1"),
      (dict(client_sparsity_tiers="0.5-1"), "is not SPARSITY:SHARE"),
      (dict(client_sparsity_tiers="1.5:1"), "sparsity 1.5 is not in [0, 1)"),
      (dict(client_sparsity_tiers="0.5:1", algorithm="fedavg"), "implemented for feddst, randommask"),
      (dict(client_sparsity_tiers="0.5:1", client_execution="cohort"), "needs --client_execution=per_client"),
      (dict(client_sparsity_tiers="0.5:1", final_sparsity=0.9), "does not combine with --final_sparsity"),
  ]:
    with pytest.raises(ConfigError) as raised:
      ExperimentConfig(**settings).resolve()
    assert message in str(raised.value) and "\n" not in str(raised.value)


def _csv_rows(path):
  import csv  # pylint: disable=g-import-not-at-top

  with open(path, newline="") as f:
    return [{k: v for k, v in r.items() if k != "round_seconds"} for r in csv.DictReader(f)]


def test_a_tiered_run_reports_each_tiers_bits_and_accuracy_and_resumes(
    tmp_path, small_fashion_mnist
):
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top

  from tff_feddst import training  # pylint: disable=g-import-not-at-top
  from tff_feddst.config import ExperimentConfig  # pylint: disable=g-import-not-at-top

  config = ExperimentConfig(
      data_dir=small_fashion_mnist,  # the first Fashion-MNIST images (conftest)
      algorithm="feddst", client_sparsity_tiers="0.5:0.5,0.8:0.5", total_clients=20,
      clients_per_round=4, rounds=2, local_epochs=1, eval_every=1,
      rounds_between_readjustments=1, readjustment_end_round=2, checkpoint_every=1,
      output_dir=str(tmp_path / "run"),
  ).resolve()
  training.run_experiment(config, log=lambda line: None)
  rows = _csv_rows(tmp_path / "run" / "metrics.csv")
  with open(tmp_path / "run" / "summary.json") as f:
    summary = json.load(f)
  section = summary["tiers"]
  assert [t["sparsity"] for t in section] == [0.5, 0.8]
  assert [t["clients"] for t in section] == [10, 10]
  budgets = [sum(t["layer_budgets"].values()) for t in section]
  assert budgets[0] == sum(summary["layer_budgets"].values())
  b, m = summary["num_unmasked"], 256 + 5000 + 256000 + 504
  for row in rows:
    up = [int(row["tier0_upload_bits"]), int(row["tier1_upload_bits"])]
    assert sum(up) == int(row["round_upload_bits"])
    assert int(row["tier0_download_bits"]) + int(row["tier1_download_bits"]) == int(
        row["round_download_bits"])
    # Tier 1 clients always send their masks (theirs is not the global one);
    # in round 1 tier 0's readjust too (R_end = 2: no readjustment in round 2).
    tier1_clients = round(up[1] / (32 * (budgets[1] + b) + m))
    assert up[1] == tier1_clients * (32 * (budgets[1] + b) + m)
    tier0_clients = 4 - tier1_clients
    tier0_masks = tier0_clients if row["round"] == "1" else 0
    assert up[0] == tier0_clients * 32 * (budgets[0] + b) + tier0_masks * m
    assert int(row["clients_mask_uploaded"]) == tier1_clients + tier0_masks
    # Downloads, measured by the clients: the global model's compact message
    # (at tier 0's budgets, the global ones) and the mask, which every client
    # needs (round 1: none held; round 2: round 1 changed the global mask).
    for t, count in ((0, tier0_clients), (1, tier1_clients)):
      assert int(row[f"tier{t}_download_bits"]) == count * (32 * (budgets[0] + b) + m)
    for t in (0, 1):
      assert 0 <= float(row[f"tier{t}_clients_accuracy"]) <= 1
  for kind in ("upload", "download"):
    assert [t[f"cumulative_{kind}_bits"] for t in section] == [
        sum(int(r[f"tier{t}_{kind}_bits"]) for r in rows) for t in (0, 1)
    ]
  assert summary["final_tier1_clients_accuracy"] == float(rows[-1]["tier1_clients_accuracy"])

  # Resumed from round 1's checkpoint: the same rows and per-tier totals.
  shutil.rmtree(tmp_path / "run" / "checkpoints" / "round_2")
  os.remove(tmp_path / "run" / "summary.json")
  training.run_experiment(config, log=lambda line: None)
  assert _csv_rows(tmp_path / "run" / "metrics.csv") == rows
  with open(tmp_path / "run" / "summary.json") as f:
    assert json.load(f)["tiers"] == section
