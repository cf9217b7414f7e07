"""Keras models with tfmot pruning wrappers whose masks FedDST owns.

Every Conv2D and Dense layer is wrapped by `prune_low_magnitude` with a
schedule that never prunes, so tfmot applies the mask (kernel <- kernel *
mask on every forward pass) while our code decides what the mask is. In TFF
the wrapper's variables (`mask`, `threshold`, `pruning_step`) travel in
`ModelWeights.non_trainable`. `SparseLayout` records where each kernel and
mask sits in those lists, and each layer's budget.
"""

import dataclasses
import warnings
from typing import Callable

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff
import tensorflow_model_optimization as tfmot

import keras_models
from tff_feddst import masks as masks_lib
from tff_feddst import wrappers

_prune = tfmot.sparsity.keras

# Library code that autograph need not convert when our traced functions call
# it: it has no Python control flow on tensors (tfmot's pruning code builds
# `tf.cond` / `smart_cond` itself and runs in TF1 graphs; TFF's Keras model
# adapter, metric finalizers and optimizers branch on Python values only;
# not all of TFF: `model_delta_client_work` branches on a tensor). TensorFlow's
# own list (autograph/core/config.py) does the same for Keras and TensorFlow
# Probability. Their functions are then traced as written: the same ops,
# without a source-to-source conversion per function and process (a fresh
# `run.py` FedDST build, 4.0 s, takes 2.8 s; docs/testing.md). Functions
# they decorate with `tf.function` are still converted, as those ask for it.
GRAPH_SAFE_MODULES = (
    "tensorflow_model_optimization",
    "tensorflow_federated.python.learning.models.keras_utils",
    "tensorflow_federated.python.learning.metrics.keras_finalizer",
    "tensorflow_federated.python.learning.optimizers",
    "tensorflow_federated.python.common_libs",
)


def skip_autograph_for_graph_safe_libraries() -> None:
  """Adds `GRAPH_SAFE_MODULES` to autograph's do-not-convert rules (once)."""
  # pylint: disable=g-import-not-at-top
  from tensorflow.python.autograph.core import config as autograph_config

  present = {getattr(r, "_prefix", None) for r in autograph_config.CONVERSION_RULES}
  autograph_config.CONVERSION_RULES = autograph_config.CONVERSION_RULES + tuple(
      autograph_config.DoNotConvert(m) for m in GRAPH_SAFE_MODULES if m not in present
  )


skip_autograph_for_graph_safe_libraries()


class KeepMaskSchedule(_prune.PruningSchedule):
  """A pruning schedule under which tfmot never changes the mask itself."""

  def __call__(self, step):
    del step
    return tf.constant(False), tf.constant(0.0, tf.float32)

  def get_config(self):
    return {"class_name": self.__class__.__name__, "config": {}}


@tf.autograph.experimental.do_not_convert
def wrap_prunable(model: tf.keras.Model) -> tf.keras.Model:
  """Wraps the Conv2D and Dense layers (only those) in pruning wrappers.

  Cloning builds the new model by calling each wrapper once on symbolic
  inputs. Called with `training` undecided, a wrapper traces both branches
  of its step increment and of its mask update (`smart_cond` becomes a
  `tf.cond`): in a TFF trace, 0.85 s of the 1 s a clone of the MNIST
  network took, for ops that never run. So the clone is built with Keras's
  learning phase held at 0: the wrappers take their no-update branch once.
  Keras does not record a phase it passed itself in the model, so a later
  call still passes its own `training` (tests/test_models.py checks that a
  training call steps and masks as before). Without autograph (the
  branches are `smart_cond` / `tf.cond` already) a build is 1 s shorter.
  """

  def clone(layer):
    if keras_models.is_prunable(layer):
      return _prune.prune_low_magnitude(layer, pruning_schedule=KeepMaskSchedule())
    return layer

  with warnings.catch_warnings():
    # Deprecated in favour of passing `training`, which cloning cannot.
    warnings.filterwarnings("ignore", "`tf.keras.backend.learning_phase_scope` is deprecated")
    with tf.keras.backend.learning_phase_scope(0):
      return tf.keras.models.clone_model(model, clone_function=clone)


@dataclasses.dataclass(frozen=True)
class SparseLayout:
  """Where the prunable kernels and their masks are, and their budgets."""

  layer_names: tuple[str, ...]
  kernel_shapes: tuple[tuple[int, ...], ...]
  kernel_index: tuple[int, ...]  # into ModelWeights.trainable
  mask_index: tuple[int, ...]  # into ModelWeights.non_trainable
  step_index: tuple[int, ...]  # pruning_step variables, non_trainable
  budgets: tuple[int, ...]
  trainable_sizes: tuple[int, ...]
  # Rows per mask block of each layer (`masks.block_rows`; empty: all 1,
  # element-wise masks).
  block_rows: tuple[int, ...] = ()

  def rows(self, slot: int) -> int:
    """Rows per mask block of layer `slot` (1: element-wise)."""
    return self.block_rows[slot] if self.block_rows else 1

  @property
  def all_rows(self) -> tuple[int, ...]:
    return tuple(self.rows(slot) for slot in range(len(self.layer_names)))

  @property
  def num_prunable(self) -> int:
    """n: prunable weights (all kernels)."""
    return int(sum(np.prod(s) for s in self.kernel_shapes))

  @property
  def num_unmasked(self) -> int:
    """b: parameters that are never masked (biases)."""
    return int(sum(self.trainable_sizes)) - self.num_prunable

  @property
  def num_mask_bits(self) -> int:
    """Bits of a mask message: one per weight, or per block of a blocked
    layer, each layer's packed into whole bytes (`messages.pack_bits`)."""
    units = [int(np.prod(s)) // r for s, r in zip(self.kernel_shapes, self.all_rows)]
    return int(sum(8 * -(-u // 8) for u in units))

  @property
  def num_kept(self) -> int:
    return int(sum(self.budgets))

  @property
  def sparsity(self) -> float:
    return 1.0 - self.num_kept / self.num_prunable

  def mask_slot(self) -> dict[int, int]:
    """Trainable index -> position in the layer lists, for kernels."""
    return {t: i for i, t in enumerate(self.kernel_index)}


def build_layout(
    wrapped: tf.keras.Model, sparsity: float, distribution: str = "erk", mask_block: int = 1,
    conv_kernels: bool = False,
) -> SparseLayout:
  """Reads variable positions off a wrapped model and computes budgets.

  `mask_block`: inputs per mask block of the dense kernels (`--mask_block`;
  1: element-wise masks everywhere); `conv_kernels`: convolutions masked in
  whole filters (`--conv_block=kernel`).
  """
  trainable = wrapped.trainable_weights
  non_trainable = wrapped.non_trainable_weights
  t_pos = {id(v): i for i, v in enumerate(trainable)}
  n_pos = {id(v): i for i, v in enumerate(non_trainable)}
  names, shapes, k_idx, m_idx, s_idx = [], [], [], [], []
  for layer in wrapped.layers:
    if not wrappers.is_wrapper(layer):
      continue
    inner = wrappers.unwrap(layer)
    names.append(inner.name)
    shapes.append(tuple(int(d) for d in inner.kernel.shape))
    k_idx.append(t_pos[id(inner.kernel)])
    m_idx.append(n_pos[id(wrappers.mask_variable(layer))])
    s_idx.append(n_pos[id(wrappers.step_variable(layer))])
  rows = masks_lib.layer_rows(shapes, mask_block, conv_kernels)
  budgets = masks_lib.layer_budgets(shapes, sparsity, distribution, rows)
  return SparseLayout(
      layer_names=tuple(names),
      kernel_shapes=tuple(shapes),
      kernel_index=tuple(k_idx),
      mask_index=tuple(m_idx),
      step_index=tuple(s_idx),
      budgets=tuple(budgets),
      trainable_sizes=tuple(int(np.prod(v.shape)) for v in trainable),
      block_rows=tuple(rows) if any(r > 1 for r in rows) else (),
  )


def keras_loss():
  return tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def summed_loss():
  """The training loss summed over a batch (not averaged): what the
  gradient sums of readjustment and of PruneFL's mask selection add up."""
  return tf.keras.losses.SparseCategoricalCrossentropy(
      from_logits=True, reduction=tf.keras.losses.Reduction.SUM
  )


def make_model_fn(
    keras_fn: Callable[[], tf.keras.Model], input_spec, wrapped: bool
) -> Callable[[], tff.learning.models.VariableModel]:
  """A TFF `model_fn` building a fresh (optionally wrapped) Keras model."""

  def model_fn():
    model = keras_fn()
    if wrapped:
      model = wrap_prunable(model)
    return tff.learning.models.from_keras_model(
        model,
        loss=keras_loss(),
        input_spec=input_spec,
        metrics=[tf.keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )

  return model_fn


def initial_model_weights(
    keras_fn: Callable[[], tf.keras.Model],
    seed: int,
    layout: SparseLayout | None,
    masks_fn: Callable[[tf.keras.Model], list[np.ndarray]] | None = None,
    rescaled: bool = False,
) -> tff.learning.models.ModelWeights:
  """Seeded Keras initialisation; with a layout, a seeded ERK random mask.

  `masks_fn(model)` replaces the random mask: it gets the plain Keras model
  at its initial (dense) weights and returns one mask per layout layer.
  `rescaled` (`--sparse_init=rescaled`): each masked kernel's kept weights
  are divided by sqrt(its density), kept / size (a dense kernel is left as
  it is).

  Returns numpy ModelWeights: for a layout, the wrapped model's trainable
  weights (kernels zero outside the mask) and non-trainable variables
  (masks, thresholds, pruning_step = 1 so the wrapper's training-mode
  assertion holds inside TFF, where no Keras callback sets it).
  """
  tf.keras.utils.set_random_seed(seed)
  model = keras_fn()
  if layout is None:
    return tff.learning.models.ModelWeights(
        trainable=[w.numpy() for w in model.trainable_weights], non_trainable=[]
    )
  wrapped = wrap_prunable(model)
  trainable = [w.numpy() for w in wrapped.trainable_weights]
  non_trainable = [w.numpy() for w in wrapped.non_trainable_weights]
  if masks_fn is None:
    # The mask draw has its own stream, independent of the Keras initialisers.
    mask_seed = np.random.SeedSequence([seed, 1]).generate_state(1)[0]
    initial_masks = masks_lib.random_masks(
        layout.kernel_shapes, layout.budgets, int(mask_seed), layout.all_rows
    )
  else:
    initial_masks = [np.asarray(m, np.float32) for m in masks_fn(model)]
  for slot, mask in enumerate(initial_masks):
    trainable[layout.kernel_index[slot]] *= mask
    if rescaled and mask.any():
      trainable[layout.kernel_index[slot]] /= np.float32(np.sqrt(mask.mean()))
    non_trainable[layout.mask_index[slot]] = mask
  for i in layout.step_index:
    non_trainable[i] = np.ones_like(non_trainable[i])
  return tff.learning.models.ModelWeights(trainable, non_trainable)


def kernels_and_masks(
    weights: tff.learning.models.ModelWeights, layout: SparseLayout
) -> tuple[list[np.ndarray], list[np.ndarray]]:
  kernels = [np.asarray(weights.trainable[i]) for i in layout.kernel_index]
  masks = [np.asarray(weights.non_trainable[i]) for i in layout.mask_index]
  return kernels, masks
