"""Model builders. Inputs are NHWC float32 images scaled to [0, 1]."""

from typing import Callable, Mapping

import numpy as np
import tensorflow as tf

from keras_models.names import MODEL_NAMES

layers = tf.keras.layers


def _mnist_cnn(input_shape, num_classes, widths):
  # conv 5x5 1->10, maxpool 3/1, relu; conv 5x5 10->20, maxpool 3/1, relu;
  # flatten (16*16*20); dense 50 relu; dense num_classes.
  return tf.keras.Sequential(
      [
          layers.InputLayer(input_shape=input_shape, name="image"),
          layers.Conv2D(widths["conv1"], 5, name="conv1"),
          layers.MaxPool2D(3, strides=1, name="pool1"),
          layers.ReLU(name="relu1"),
          layers.Conv2D(widths["conv2"], 5, name="conv2"),
          layers.MaxPool2D(3, strides=1, name="pool2"),
          layers.ReLU(name="relu2"),
          layers.Flatten(name="flatten"),
          layers.Dense(widths["dense1"], activation="relu", name="dense1"),
          layers.Dense(num_classes, name="logits"),
      ],
      name="mnist_cnn",
  )


def _cifar_cnn(input_shape, num_classes, widths, name):
  # conv 5x5 3->6, maxpool 3/1, relu; conv 5x5 6->16, maxpool 3/1, relu;
  # flatten (20*20*16); dense hidden... relu; dense num_classes.
  stack = [
      layers.InputLayer(input_shape=input_shape, name="image"),
      layers.Conv2D(widths["conv1"], 5, name="conv1"),
      layers.MaxPool2D(3, strides=1, name="pool1"),
      layers.ReLU(name="relu1"),
      layers.Conv2D(widths["conv2"], 5, name="conv2"),
      layers.MaxPool2D(3, strides=1, name="pool2"),
      layers.ReLU(name="relu2"),
      layers.Flatten(name="flatten"),
  ]
  # `widths` lists the layers in model order (see `resolve_widths`).
  for layer_name in [k for k in widths if k.startswith("dense")]:
    stack.append(
        layers.Dense(widths[layer_name], activation="relu", name=layer_name)
    )
  stack.append(layers.Dense(num_classes, name="logits"))
  return tf.keras.Sequential(stack, name=name)


def _cifar10_cnn(input_shape, num_classes, widths):
  return _cifar_cnn(input_shape, num_classes, widths, "cifar10_cnn")


def _cifar100_cnn(input_shape, num_classes, widths):
  return _cifar_cnn(input_shape, num_classes, widths, "cifar100_cnn")


def _leaf_cnn(input_shape, num_classes, widths):
  # LEAF's FEMNIST CNN: conv 5x5 same 1->32, maxpool 2/2; conv 5x5 same
  # 32->64, maxpool 2/2; dense 2048 relu; dense num_classes.
  return tf.keras.Sequential(
      [
          layers.InputLayer(input_shape=input_shape, name="image"),
          layers.Conv2D(
              widths["conv1"], 5, padding="same", activation="relu", name="conv1"
          ),
          layers.MaxPool2D(2, strides=2, name="pool1"),
          layers.Conv2D(
              widths["conv2"], 5, padding="same", activation="relu", name="conv2"
          ),
          layers.MaxPool2D(2, strides=2, name="pool2"),
          layers.Flatten(name="flatten"),
          layers.Dense(widths["dense1"], activation="relu", name="dense1"),
          layers.Dense(num_classes, name="logits"),
      ],
      name="leaf_cnn",
  )


def _paper2_cnn(input_shape, num_classes, widths):
  # Paper 2's plain CNN: conv 5x5 1->32, relu, maxpool 2/2; conv 5x5
  # 32->64, relu, maxpool 2/2; global average pooling; dense num_classes.
  return tf.keras.Sequential(
      [
          layers.InputLayer(input_shape=input_shape, name="image"),
          layers.Conv2D(widths["conv1"], 5, name="conv1"),
          layers.ReLU(name="relu1"),
          layers.MaxPool2D(2, strides=2, name="pool1"),
          layers.Conv2D(widths["conv2"], 5, name="conv2"),
          layers.ReLU(name="relu2"),
          layers.MaxPool2D(2, strides=2, name="pool2"),
          layers.GlobalAveragePooling2D(name="global_pool"),
          layers.Dense(num_classes, name="logits"),
      ],
      name="paper2_cnn",
  )


_BUILDERS: dict[str, Callable[..., tf.keras.Model]] = {
    "mnist_cnn": _mnist_cnn,
    "cifar10_cnn": _cifar10_cnn,
    "cifar100_cnn": _cifar100_cnn,
    "leaf_cnn": _leaf_cnn,
    "paper2_cnn": _paper2_cnn,
}

# The paper's widths (output filters / units) of each network's hidden
# prunable layers, in model order. The last layer (`logits`) is not listed:
# its width is the number of classes.
_DEFAULT_WIDTHS: dict[str, dict[str, int]] = {
    "mnist_cnn": {"conv1": 10, "conv2": 20, "dense1": 50},
    "cifar10_cnn": {"conv1": 6, "conv2": 16, "dense1": 120, "dense2": 84},
    "cifar100_cnn": {"conv1": 6, "conv2": 16, "dense1": 120},
    "leaf_cnn": {"conv1": 32, "conv2": 64, "dense1": 2048},
    "paper2_cnn": {"conv1": 32, "conv2": 64},
}


def _check_name(name: str) -> None:
  if name not in _BUILDERS:
    raise ValueError(
        f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}"
    )


def default_widths(name: str) -> dict[str, int]:
  """The paper's widths of network `name`'s hidden prunable layers, in order.

  A new dict {layer name: output filters / units}, e.g. for "mnist_cnn"
  {"conv1": 10, "conv2": 20, "dense1": 50}. `logits` is never included.
  """
  _check_name(name)
  return dict(_DEFAULT_WIDTHS[name])


def resolve_widths(name: str, widths: Mapping[str, int] | None) -> dict[str, int]:
  """`default_widths(name)` updated with `widths`, validated.

  Raises ValueError for an unknown layer name (including `logits`, whose
  width is the number of classes) or a width that is not an integer >= 1.
  """
  resolved = default_widths(name)
  if widths is None:
    return resolved
  if not isinstance(widths, Mapping):
    raise ValueError(
        f"widths must be a dict of layer name -> width, got {type(widths).__name__}"
    )
  for layer_name, width in widths.items():
    if layer_name not in resolved:
      raise ValueError(
          f"model {name!r} has no prunable hidden layer {layer_name!r}; "
          f"widths can set {', '.join(resolved)}"
      )
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)):
      raise ValueError(
          f"width of {layer_name!r} must be an integer, got {width!r}"
      )
    if width < 1:
      raise ValueError(f"width of {layer_name!r} must be >= 1, got {width}")
    resolved[layer_name] = int(width)
  return resolved


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    widths: Mapping[str, int] | None = None,
) -> tf.keras.Model:
  """Builds network `name` for images of `input_shape` (H, W, C).

  `widths` optionally sets the output filters / units of hidden prunable
  layers ({"conv1": 4, "dense1": 20}, see `default_widths`); layers not
  named keep the paper's width. Layer names and order do not depend on it.
  """
  _check_name(name)
  resolved = resolve_widths(name, widths)
  return _BUILDERS[name](tuple(input_shape), int(num_classes), resolved)


def is_prunable(layer: tf.keras.layers.Layer) -> bool:
  """Conv2D and Dense kernels are masked; biases never are."""
  return isinstance(layer, (layers.Conv2D, layers.Dense))


def prunable_layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
  return [layer for layer in model.layers if is_prunable(layer)]
