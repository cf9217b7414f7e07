"""The paper's networks (docs/algorithms.md section 7.1) as Keras models,
and paper 2's plain CNN (`paper2_cnn`).

Every network returns logits (train with a from-logits cross-entropy). The
prunable layers are the Conv2D and Dense layers; `prunable_layers` lists them
in model order, which is also the order of their kernels in
`model.trainable_weights`. `build_model(..., widths=...)` builds a network
with narrower hidden layers (structured pruning, docs/algorithms.md section 5).
"""

from keras_models.networks import (
    MODEL_NAMES,
    build_model,
    default_model_for_dataset,
    default_widths,
    is_prunable,
    prunable_layers,
    resolve_widths,
)

__all__ = [
    "MODEL_NAMES",
    "build_model",
    "default_model_for_dataset",
    "default_widths",
    "is_prunable",
    "prunable_layers",
    "resolve_widths",
]
