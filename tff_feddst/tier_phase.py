"""A run's phase with client sparsity tiers (`--client_sparsity_tiers`).

The phase assigns every client of the pool to a tier once (`tiers.assign`,
seeded by --seed); each round's client data carries the client's tier and
budgets (`tier_work.client_data`). Per tier t, metrics.csv adds
- `tier{t}_upload_bits`: the bits the tier's clients uploaded in the round,
  measured on their messages (`tier_work`);
- `tier{t}_download_bits`: the bits sent to them (every tier downloads the
  global model's compact message, and the mask when it holds none: measured
  by the clients that ran, and the formula of section 6.1 for those drawn
  to fail);
- `tier{t}_clients_accuracy` (evaluation rounds): the mean over the tier's
  clients with local test data of the accuracy, on it, of the global model
  cut to the tier's budgets (`tiers.client_mask_np`: the model such a
  client starts its round from).
summary.json's `tiers` section holds each tier's sparsity, share, clients,
budgets and cumulative bits; `final_tier{t}_clients_accuracy` are the last
evaluation's.
"""

import fractions

import numpy as np

from tff_feddst import phases
from tff_feddst import rounds
from tff_feddst import tiers as tiers_lib
from tff_feddst import tier_work


class TierEvaluator:
  """The global model's figures (`phases.Evaluator`) and, per tier, its
  clients' accuracy under the tier's cut of the global masks."""

  def __init__(self, base, fed_data, layout, tier_budgets, assignment, weights_fn):
    self.base = base
    self.layout = layout
    self.tier_budgets = tier_budgets
    self.weights_fn = weights_fn
    self.clients = [[] for _ in tier_budgets]
    for cid in fed_data.client_ids:
      if cid in assignment and fed_data.num_test_examples(cid) > 0:
        self.clients[assignment[cid]].append(fed_data.test_indices(cid))

  def cut(self, trainable, masks, budgets):
    """The trainable weights with each kernel under the tier's mask."""
    out = [np.asarray(w) for w in trainable]
    for slot, i in enumerate(self.layout.kernel_index):
      mask = tiers_lib.client_mask_np(out[i], masks[slot], budgets[slot], self.layout.rows(slot))
      out[i] = out[i] * mask
    return out

  def evaluate(self, trainable_weights) -> dict[str, float]:
    out = self.base.evaluate(trainable_weights)
    masks = self.weights_fn()
    if masks is None:  # before any round's statistics: the kernels' support
      masks = [np.asarray(trainable_weights[i]) != 0 for i in self.layout.kernel_index]
    for t, (budgets, clients) in enumerate(zip(self.tier_budgets, self.clients)):
      weights = self.cut(trainable_weights, masks, budgets)
      per_client = [
          fractions.Fraction(int(self.base.correct_on(weights, idx).sum()), len(idx))
          for idx in clients
      ]
      out[f"tier{t}_clients_accuracy"] = (
          float(sum(per_client) / len(per_client)) if per_client else float("nan")
      )
    return out


class TierStep(rounds.RoundStep):
  """A round whose clients' data carry their tiers; per-tier bits."""

  def client_inputs(self, survivors) -> list:
    phase = self.phase
    values = [
        tier_work.client_data(dataset, phase.tier_budgets[phase.assignment[cid]],
                              phase.assignment[cid])
        for cid, dataset, _ in survivors
    ]
    if not phase.built.compact_download:
      return values
    return self._compact_download_inputs(
        [(cid, value["train"], s) for (cid, _, s), value in zip(survivors, values)],
        [{"client": value["client"]} for value in values],
    )

  def charge_download(self, client_ids, state) -> int:
    built, phase = self.phase.built, self.phase
    kept = built.kept_in_round(rounds.process_round(state))
    self._download = [0] * len(phase.tier_budgets)
    for t in range(len(phase.tier_budgets)):
      ids = [c for c in client_ids if phase.assignment[c] == t]
      if ids:
        self._download[t] = self.ledger.download(ids, kept)
    phase.cumulative[1] += np.asarray(self._download, np.int64)
    return int(sum(self._download))

  def round_extra(self) -> dict:
    count = len(self.phase.tier_budgets)
    upload = [0] * count
    if self.last_metrics is not None:
      upload = [int(b) for b in self.last_metrics["client_work"]["clients"]["tier_upload_bits"]]
    self.phase.cumulative[0] += np.asarray(upload, np.int64)
    if self.last_metrics is not None and self.phase.built.compact_download:
      # The clients that ran, as they measured (the failed ones were
      # charged by `charge_download`).
      measured = self.last_metrics["client_work"]["clients"]["tier_download_bits"]
      for t, bits in enumerate(measured):
        self._download[t] += int(bits)
        self.phase.cumulative[1, t] += int(bits)
    out = {}
    for t in range(count):
      out[f"tier{t}_upload_bits"] = upload[t]
      out[f"tier{t}_download_bits"] = self._download[t]
    return out


class TierPhase(phases.Phase):
  """FedDST or RandomMask with clients of different sparsity tiers."""

  def __init__(self, number, spec, config, context, **kwargs):
    super().__init__(number, spec, config, context, **kwargs)
    self.tiers, self.tier_budgets = self.built.tiers
    fed_data = context.fed_data
    self.assignment = tiers_lib.assign(fed_data.client_ids, self.tiers, config.seed)
    count = len(self.tier_budgets)
    # Cumulative [upload, download] bits per tier (checkpointed).
    self.cumulative = np.zeros((2, count), np.int64)
    self.extra_columns = tuple(
        f"tier{t}_{name}" for name in ("upload_bits", "download_bits", "clients_accuracy")
        for t in range(count)
    )
    self._masks = None
    self.evaluator = TierEvaluator(
        self.evaluator, fed_data, self.built.layout, self.tier_budgets, self.assignment,
        lambda: self._masks,
    )

  def make_step(self, config, fed_data, sampler, ledger, state):
    return TierStep(config, self, fed_data, sampler, ledger, state)

  def stats(self, weights, ledger):
    sparsity, flops, masks = super().stats(weights, ledger)
    self._masks = masks  # the global masks, for the tiers' evaluation
    return sparsity, flops, masks

  def driver_arrays(self) -> list:
    return [self.cumulative]

  def load_driver_arrays(self, arrays) -> None:
    self.cumulative = np.asarray(arrays[0], np.int64).copy()

  def summary(self) -> dict:
    out = super().summary()
    layout = self.built.layout
    counts = np.bincount(list(self.assignment.values()), minlength=len(self.tier_budgets))
    out["tiers"] = [
        {
            "sparsity": s,
            "share": p,
            "clients": int(counts[t]),
            "layer_budgets": dict(zip(layout.layer_names, map(int, self.tier_budgets[t]))),
            "cumulative_upload_bits": int(self.cumulative[0, t]),
            "cumulative_download_bits": int(self.cumulative[1, t]),
        }
        for t, (s, p) in enumerate(zip(self.tiers.sparsities, self.tiers.shares))
    ]
    return out
