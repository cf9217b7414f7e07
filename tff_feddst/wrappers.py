"""The one place that touches tfmot's private pruning wrapper.

`tfmot.sparsity.keras.prune_low_magnitude` wraps a layer in a
`PruneLowMagnitude`, a class of tfmot's private `pruning_wrapper` module,
whose mask and step variables have no public accessor. Everything the
project needs of a wrapper goes through the functions below, so that a
tfmot upgrade that moves or changes the class has one module to fix.

Imports only TensorFlow and tfmot (no TFF): `tflite_export` uses it too.
"""

import tensorflow as tf
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper


def is_wrapper(layer: tf.keras.layers.Layer) -> bool:
  """True for a layer wrapped by `prune_low_magnitude`."""
  return isinstance(layer, pruning_wrapper.PruneLowMagnitude)


def unwrap(layer: tf.keras.layers.Layer) -> tf.keras.layers.Layer:
  """The wrapped layer of a pruning wrapper; any other layer unchanged."""
  return layer.layer if is_wrapper(layer) else layer


def masked_weights(wrapper) -> list[tuple[tf.Variable, tf.Variable]]:
  """(weight, mask) variable pairs of every weight the wrapper masks."""
  return [(weight, mask) for weight, mask, _ in wrapper.pruning_vars]


def mask_variable(wrapper) -> tf.Variable:
  """The mask variable of the wrapped layer's kernel."""
  kernel = unwrap(wrapper).kernel
  for weight, mask in masked_weights(wrapper):
    if weight is kernel:
      return mask
  raise ValueError(f"the pruning wrapper {wrapper.name!r} does not mask a kernel")


def step_variable(wrapper) -> tf.Variable:
  """The wrapper's `pruning_step` variable (a non-trainable int64 scalar)."""
  return wrapper.pruning_step
