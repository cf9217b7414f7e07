"""The paper's networks (docs/algorithms.md section 7.1) as Keras models,
and paper 2's plain CNN (`paper2_cnn`).

Every network returns logits (train with a from-logits cross-entropy). The
prunable layers are the Conv2D and Dense layers; `prunable_layers` lists them
in model order, which is also the order of their kernels in
`model.trainable_weights`. `build_model(..., widths=...)` builds a network
with narrower hidden layers (structured pruning, docs/algorithms.md section 5).

The names (`MODEL_NAMES`, `default_model_for_dataset`) come without
TensorFlow; the rest imports `keras_models.networks` (and TensorFlow) when
first used.
"""

import importlib

from keras_models.names import MODEL_NAMES, default_model_for_dataset

_FROM_NETWORKS = (
    "build_model",
    "default_widths",
    "is_prunable",
    "prunable_layers",
    "resolve_widths",
)

__all__ = ["MODEL_NAMES", "default_model_for_dataset", *_FROM_NETWORKS]


def __getattr__(name: str):
  if name in _FROM_NETWORKS:
    return getattr(importlib.import_module("keras_models.networks"), name)
  raise AttributeError(f"module 'keras_models' has no attribute {name!r}")
