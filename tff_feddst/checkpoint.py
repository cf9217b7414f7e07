"""Checkpoints of a run, with TFF's program tooling.

A checkpoint is a `tff.program.FileProgramStateManager` version named after
its round, under `<output_dir>/checkpoints/round_<N>`. It holds:
- the learning process's whole server state (`LearningAlgorithmState`:
  global weights and masks, and the distributor's, client work's,
  aggregator's and finalizer's states, e.g. the round counter of the
  readjustment schedule and the server optimizer's momentum), as a flat list
  of arrays in `tf.nest` order;
- the round number;
- the driver's own state as JSON: the communication ledger (cumulative bits,
  the mask version each client holds), the client sampler's RNG state and
  the last evaluation.

TFF writes each version to a temporary directory and renames it into place,
so a checkpoint is either complete or absent; temporary directories left by
a crash are removed and never loaded.
"""

import dataclasses
import json
import os
import shutil

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_feddst import runtime

PREFIX = "round_"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be read (reported as one line)."""


@dataclasses.dataclass
class Restored:
  round_num: int
  state: object
  extras: dict
  # The driver's own arrays (`phases.Phase.driver_arrays`).
  arrays: list = dataclasses.field(default_factory=list)


class RunCheckpoints:
  """Saves and restores a run's state every few rounds."""

  def __init__(self, root_dir: str, keep: int = 2):
    self.root_dir = root_dir
    os.makedirs(root_dir, exist_ok=True)
    self._manager = tff.program.FileProgramStateManager(
        root_dir, prefix=PREFIX, keep_total=keep, keep_first=False
    )
    self._remove_partial_writes()

  def _remove_partial_writes(self) -> None:
    for entry in os.listdir(self.root_dir):
      if entry.startswith(PREFIX) and not entry[len(PREFIX):].isdigit():
        shutil.rmtree(os.path.join(self.root_dir, entry), ignore_errors=True)

  def latest_round(self) -> int | None:
    versions = runtime.run_coroutine(self._manager.get_versions())
    return versions[-1] if versions else None

  def save(self, round_num: int, state, extras: dict, arrays=()) -> None:
    """`arrays`: the driver's own arrays (`phases.Phase.driver_arrays`)."""
    leaves = [np.asarray(x) for x in tf.nest.flatten(state)]
    program_state = {
        "round": np.int64(round_num),
        "state": leaves,
        "extras": json.dumps(extras, sort_keys=True),
    }
    if arrays:
      program_state["driver"] = [np.asarray(a) for a in arrays]
    runtime.run_coroutine(self._manager.save(program_state, round_num))

  def _unreadable(self, path: str, e: Exception) -> CheckpointError:
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return CheckpointError(
        f"checkpoint {path} cannot be read ({type(e).__name__}: {first_line}); "
        "delete it to resume from an earlier one, or delete the output "
        "directory to start over"
    )

  def check_readable(self, round_num: int) -> None:
    """Reads every saved array of version `round_num` (CheckpointError if
    one cannot be read), before the process it restores is built: a
    damaged checkpoint answers in seconds. `restore` checks the rest
    (structure, shapes, the round)."""
    path = os.path.join(self.root_dir, f"{PREFIX}{round_num}")
    try:
      reader = tf.train.load_checkpoint(os.path.join(path, "variables", "variables"))
      for name in reader.get_variable_to_shape_map():
        reader.get_tensor(name)
    except Exception as e:  # pylint: disable=broad-except
      raise self._unreadable(path, e) from None

  def restore(self, round_num: int, template_state, template_arrays=()) -> Restored:
    """Loads version `round_num` into the structure of `template_state`
    (and the driver's arrays into `template_arrays`' shapes: `Restored.arrays`)."""
    template = [np.asarray(x) for x in tf.nest.flatten(template_state)]
    structure = {"round": np.int64(0), "state": template, "extras": ""}
    driver_template = [np.asarray(a) for a in template_arrays]
    if driver_template:
      structure["driver"] = driver_template
    path = os.path.join(self.root_dir, f"{PREFIX}{round_num}")
    try:
      loaded = runtime.run_coroutine(self._manager.load(round_num, structure))
      leaves = loaded["state"]
      if len(leaves) != len(template):
        raise ValueError(f"{len(leaves)} arrays, expected {len(template)}")
      arrays = _like(leaves, template)
      driver = _like(loaded["driver"], driver_template) if driver_template else []
      extras = loaded["extras"]
      if isinstance(extras, bytes):
        extras = extras.decode()
      extras = json.loads(extras)
      saved_round = int(loaded["round"])
    except Exception as e:  # pylint: disable=broad-except
      raise self._unreadable(path, e) from None
    if saved_round != round_num:
      raise CheckpointError(f"checkpoint {path} holds round {saved_round}")
    state = tf.nest.pack_sequence_as(template_state, arrays)
    return Restored(round_num, state, extras, driver)


def _like(values, template) -> list[np.ndarray]:
  """`values` as arrays of `template`'s dtypes (ValueError on another shape)."""
  arrays = []
  for value, like in zip(values, template):
    value = np.asarray(value)
    if value.shape != like.shape:
      raise ValueError(f"an array of shape {value.shape}, expected {like.shape}")
    arrays.append(value.astype(like.dtype))
  return arrays
