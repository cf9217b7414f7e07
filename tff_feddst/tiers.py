"""Client sparsity tiers (`--client_sparsity_tiers`, issue #15, part 3): the
arithmetic, without TensorFlow.

`S1:p1,S2:p2,...` gives tiers of clients by device capability: a client of
tier t trains, readjusts and uploads a sub-network at sparsity S_t, and
p_t is the tier's share of the client pool. The global model keeps the
lowest sparsity of any tier. This module parses the setting, assigns the
pool's clients to tiers by a seeded draw (exact counts, kept for the whole
run), gives each tier's per-layer budgets, and derives a client's mask from
the global one (numpy reference: the positions of the global mask with the
largest |w|, at the tier's budgets).
"""

import dataclasses
from typing import Sequence

import numpy as np

from tff_feddst import masks as masks_lib


class TierError(ValueError):
  """A tier setting that does not parse or is out of range (one line)."""


@dataclasses.dataclass(frozen=True)
class Tiers:
  """Tiers in the order given: sparsity and share of the client pool."""

  sparsities: tuple[float, ...]
  shares: tuple[float, ...]

  @property
  def global_sparsity(self) -> float:
    """The global model's sparsity: the lowest of any tier."""
    return min(self.sparsities)

  def __str__(self) -> str:
    return ",".join(f"{s:g}:{p:g}" for s, p in zip(self.sparsities, self.shares))


SHARE_TOLERANCE = 1e-6


def parse(text: str) -> Tiers:
  """Tiers from `S1:p1,S2:p2,...`; TierError (one line) when it does not
  parse, a sparsity is outside [0, 1), a share is not in (0, 1], a
  sparsity repeats, or the shares do not sum to 1 (within 1e-6)."""
  sparsities, shares = [], []
  for part in text.split(","):
    fields = part.strip().split(":")
    try:
      if len(fields) != 2:
        raise ValueError
      sparsity, share = float(fields[0]), float(fields[1])
    except ValueError:
      raise TierError(
          f"--client_sparsity_tiers: {part.strip()!r} is not SPARSITY:SHARE "
          "(e.g. 0.5:0.2,0.8:0.5,0.95:0.3)"
      ) from None
    if not 0 <= sparsity < 1:
      raise TierError(f"--client_sparsity_tiers: sparsity {sparsity:g} is not in [0, 1)")
    if not 0 < share <= 1:
      raise TierError(f"--client_sparsity_tiers: share {share:g} is not in (0, 1]")
    if sparsity in sparsities:
      raise TierError(f"--client_sparsity_tiers: sparsity {sparsity:g} is given twice")
    sparsities.append(sparsity)
    shares.append(share)
  total = sum(shares)
  if abs(total - 1) > SHARE_TOLERANCE:
    raise TierError(f"--client_sparsity_tiers: the shares sum to {total:g}, not 1")
  return Tiers(tuple(sparsities), tuple(shares))


def tier_counts(num_clients: int, tiers: Tiers) -> list[int]:
  """Clients per tier: floor(p_t N), the remaining clients to the tiers
  with the largest remainders (ties to the earlier tier); they sum to N."""
  exact = [p * num_clients for p in tiers.shares]
  counts = [int(np.floor(e + 1e-9)) for e in exact]
  left = num_clients - sum(counts)
  order = sorted(range(len(exact)), key=lambda t: (-(exact[t] - counts[t]), t))
  for t in order[:left]:
    counts[t] += 1
  return counts


def assign(client_ids: Sequence[str], tiers: Tiers, seed: int) -> dict[str, int]:
  """{client id: tier index}: the pool in a seeded random order, cut into
  `tier_counts` consecutive groups. The same ids, tiers and seed give the
  same assignment, whatever order the ids come in."""
  ids = sorted(client_ids)
  order = np.random.default_rng(seed).permutation(len(ids))
  out, start = {}, 0
  for t, count in enumerate(tier_counts(len(ids), tiers)):
    for i in order[start:start + count]:
      out[ids[i]] = t
    start += count
  return out


def budgets(shapes, tiers: Tiers, distribution: str, rows=None) -> list[list[int]]:
  """Per tier, the layers' budgets at its sparsity (`masks.layer_budgets`).
  TierError if a tier's budget of some layer exceeds the global model's
  (its lowest-sparsity tier's), whose mask it is cut from."""
  per_tier = [masks_lib.layer_budgets(shapes, s, distribution, rows) for s in tiers.sparsities]
  top = per_tier[tiers.sparsities.index(tiers.global_sparsity)]
  for s, row in zip(tiers.sparsities, per_tier):
    if any(b > g for b, g in zip(row, top)):
      raise TierError(
          f"--client_sparsity_tiers: at sparsity {s:g} a layer keeps more weights "
          f"than at the global sparsity {tiers.global_sparsity:g} ({distribution})"
      )
  return per_tier


def client_mask_np(kernel: np.ndarray, global_mask: np.ndarray, budget: int,
                   rows: int = 1) -> np.ndarray:
  """The mask of a tier's client: the `budget` positions of the global mask
  with the largest |w| (ties to the lower flat position), all of them if
  it keeps fewer (as `masks.keep_top_k`); with block masks (`rows` > 1,
  an [in, out] kernel) whole blocks by their summed |w|."""
  kernel, global_mask = np.asarray(kernel, np.float32), np.asarray(global_mask, np.float32)
  if rows > 1:
    grid_shape = tuple(masks_lib.block_view(kernel.shape, rows))
    score = np.abs(kernel).reshape(grid_shape).sum(axis=1).ravel()
    on = global_mask.reshape(grid_shape)[:, 0, :].ravel() > 0
    k = budget // rows
  else:
    score, on, k = np.abs(kernel).ravel(), global_mask.ravel() > 0, budget
  candidates = np.flatnonzero(on)
  # Stable sort on -|w|: equal scores keep their increasing position.
  chosen = candidates[np.argsort(-score[candidates], kind="stable")[:k]]
  flat = np.zeros(score.size, np.float32)
  flat[chosen] = 1.0
  if rows > 1:
    grid = flat.reshape(grid_shape[0], 1, grid_shape[2])
    return np.broadcast_to(grid, grid_shape).reshape(kernel.shape).copy()
  return flat.reshape(kernel.shape)
