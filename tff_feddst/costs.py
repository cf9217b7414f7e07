"""Communication and compute cost accounting (docs/algorithms.md section 6).

Bits are counted from what each message holds, not only from the formula:
- a sparse model message holds the values at the active mask positions, the
  unmasked parameters (biases) and, when the receiver lacks it, the mask
  (one bit per prunable weight, or per block of a block-masked layer);
- a dense message holds every parameter.
Download: the server knows which mask version each client last received, so
the mask is charged only when it changed since then (a client new to
training always receives it). Upload: the mask is charged for each client
whose mask changed during its local work (readjustment rounds).
"""

import dataclasses
from typing import Sequence

import numpy as np
import tensorflow as tf

MASK_BITS_PER_WEIGHT = 1


@dataclasses.dataclass(frozen=True)
class ModelSize:
  """n prunable weights (kernels) and b unmasked parameters (biases)."""

  num_prunable: int
  num_unmasked: int
  # Bits of a mask message (None: one per prunable weight). Block masks
  # (`--mask_block`) send one bit per block of a blocked layer.
  mask_bits: int | None = None

  @property
  def num_params(self) -> int:
    return self.num_prunable + self.num_unmasked

  @property
  def mask_message_bits(self) -> int:
    if self.mask_bits is None:
      return MASK_BITS_PER_WEIGHT * self.num_prunable
    return self.mask_bits


def sparse_message_bits(
    size: ModelSize, active: int, with_mask: bool, value_bits: int = 32
) -> int:
  bits = value_bits * (active + size.num_unmasked)
  if with_mask:
    bits += size.mask_message_bits
  return bits


def format_bits(bits: float) -> str:
  """Bits as bytes with a decimal unit, e.g. "1.2 MB"."""
  value = bits / 8
  for unit in ("B", "KB", "MB", "GB"):
    if value < 1000:
      return f"{value:.1f} {unit}"
    value /= 1000
  return f"{value:.1f} TB"


def dense_message_bits(size: ModelSize, value_bits: int = 32) -> int:
  return value_bits * size.num_params


class CommunicationLedger:
  """Counts per-round and cumulative bits, and per-client download state.

  The state (cumulative counters, the mask version each client holds) is a
  plain dict, so it can be checkpointed with the rest of the run.
  """

  def __init__(self, size: ModelSize, sparse: bool, upload_value_bits: int = 32):
    self.size = size
    self.sparse = sparse
    self.upload_value_bits = upload_value_bits
    self.mask_version = 0
    self.client_mask_version: dict[str, int] = {}
    self.cumulative_upload_bits = 0
    self.cumulative_download_bits = 0

  def global_mask_changed(self) -> None:
    self.mask_version += 1

  def download(self, client_ids, active: int | None) -> int:
    """Bits sent to the sampled clients at the start of a round."""
    total = 0
    for cid in client_ids:
      if self.sparse:
        total += sparse_message_bits(self.size, active, self.needs_mask(cid))
        self.client_mask_version[cid] = self.mask_version
      else:
        total += dense_message_bits(self.size)
    self.cumulative_download_bits += total
    return total

  def needs_mask(self, client_id) -> bool:
    """Whether the client holds no copy of the current global mask."""
    return self.client_mask_version.get(client_id) != self.mask_version

  def download_measured(self, client_ids, bits: int) -> int:
    """Bits the clients `client_ids` measured receiving (compact
    downloads); they now hold the current global mask."""
    for cid in client_ids:
      self.client_mask_version[cid] = self.mask_version
    self.cumulative_download_bits += int(bits)
    return int(bits)

  def download_kept(self, kept: Sequence[int]) -> int:
    """Bits sent to clients that each hold a mask of their own (LotteryFL):
    the values at a client's `kept[c]` positions and the biases, no mask."""
    total = sum(sparse_message_bits(self.size, int(k), False) for k in kept)
    self.cumulative_download_bits += total
    return total

  def upload(
      self,
      num_clients: int,
      uploaded_values: int | None = None,
      masks_sent: int = 0,
      gradients_sent: int = 0,
  ) -> int:
    """Bits received from the clients of a round.

    `uploaded_values` is the total number of active kernel positions over the
    clients (sparse only); `masks_sent` the number of clients whose mask
    changed; `gradients_sent` the number of clients that also sent the dense
    gradient of every kernel weight (PruneFL: 32 n bits each).
    """
    if self.sparse:
      total = self.upload_value_bits * (
          uploaded_values + num_clients * self.size.num_unmasked
      ) + masks_sent * self.size.mask_message_bits
      total += gradients_sent * 32 * self.size.num_prunable
    else:
      total = num_clients * dense_message_bits(self.size, self.upload_value_bits)
    self.cumulative_upload_bits += total
    return total

  def upload_measured(self, bits: int) -> int:
    """Bits received from the clients of a round, as measured on the
    messages they sent (compact uploads)."""
    self.cumulative_upload_bits += int(bits)
    return int(bits)

  def state(self) -> dict:
    return {
        "mask_version": self.mask_version,
        "client_mask_version": dict(self.client_mask_version),
        "cumulative_upload_bits": self.cumulative_upload_bits,
        "cumulative_download_bits": self.cumulative_download_bits,
    }

  def load_state(self, state: dict) -> None:
    self.mask_version = int(state["mask_version"])
    self.client_mask_version = {
        k: int(v) for k, v in state["client_mask_version"].items()
    }
    self.cumulative_upload_bits = int(state["cumulative_upload_bits"])
    self.cumulative_download_bits = int(state["cumulative_download_bits"])


def layer_forward_flops(model: tf.keras.Model) -> dict[str, int]:
  """Dense forward FLOPs (2 x multiply-accumulates) of each Conv2D / Dense layer."""
  flops = {}
  for layer in model.layers:
    if isinstance(layer, tf.keras.layers.Conv2D):
      k_h, k_w, c_in, c_out = layer.kernel.shape
      _, h_out, w_out, _ = layer.output_shape
      flops[layer.name] = 2 * k_h * k_w * c_in * c_out * h_out * w_out
    elif isinstance(layer, tf.keras.layers.Dense):
      n_in, n_out = layer.kernel.shape
      flops[layer.name] = 2 * n_in * n_out
  return {k: int(v) for k, v in flops.items()}


def forward_flops(
    dense_flops: dict[str, int], densities: dict[str, float] | None = None
) -> float:
  """Forward FLOPs: sum over layers of dense FLOPs x layer density."""
  densities = densities or {}
  return float(
      sum(f * densities.get(name, 1.0) for name, f in dense_flops.items())
  )


def densities_from_masks(names, masks) -> dict[str, float]:
  return {n: float(np.count_nonzero(m)) / m.size for n, m in zip(names, masks)}
