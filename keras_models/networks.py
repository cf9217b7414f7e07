"""Model builders. Inputs are NHWC float32 images scaled to [0, 1]."""

from typing import Callable

import tensorflow as tf

layers = tf.keras.layers


def _mnist_cnn(input_shape, num_classes):
  # conv 5x5 1->10, maxpool 3/1, relu; conv 5x5 10->20, maxpool 3/1, relu;
  # flatten (16*16*20); dense 50 relu; dense num_classes.
  return tf.keras.Sequential(
      [
          layers.InputLayer(input_shape=input_shape, name="image"),
          layers.Conv2D(10, 5, name="conv1"),
          layers.MaxPool2D(3, strides=1, name="pool1"),
          layers.ReLU(name="relu1"),
          layers.Conv2D(20, 5, name="conv2"),
          layers.MaxPool2D(3, strides=1, name="pool2"),
          layers.ReLU(name="relu2"),
          layers.Flatten(name="flatten"),
          layers.Dense(50, activation="relu", name="dense1"),
          layers.Dense(num_classes, name="logits"),
      ],
      name="mnist_cnn",
  )


def _cifar_cnn(input_shape, num_classes, hidden, name):
  # conv 5x5 3->6, maxpool 3/1, relu; conv 5x5 6->16, maxpool 3/1, relu;
  # flatten (20*20*16); dense hidden... relu; dense num_classes.
  stack = [
      layers.InputLayer(input_shape=input_shape, name="image"),
      layers.Conv2D(6, 5, name="conv1"),
      layers.MaxPool2D(3, strides=1, name="pool1"),
      layers.ReLU(name="relu1"),
      layers.Conv2D(16, 5, name="conv2"),
      layers.MaxPool2D(3, strides=1, name="pool2"),
      layers.ReLU(name="relu2"),
      layers.Flatten(name="flatten"),
  ]
  for i, width in enumerate(hidden, start=1):
    stack.append(layers.Dense(width, activation="relu", name=f"dense{i}"))
  stack.append(layers.Dense(num_classes, name="logits"))
  return tf.keras.Sequential(stack, name=name)


def _cifar10_cnn(input_shape, num_classes):
  return _cifar_cnn(input_shape, num_classes, (120, 84), "cifar10_cnn")


def _cifar100_cnn(input_shape, num_classes):
  return _cifar_cnn(input_shape, num_classes, (120,), "cifar100_cnn")


def _leaf_cnn(input_shape, num_classes):
  # LEAF's FEMNIST CNN: conv 5x5 same 1->32, maxpool 2/2; conv 5x5 same
  # 32->64, maxpool 2/2; dense 2048 relu; dense num_classes.
  return tf.keras.Sequential(
      [
          layers.InputLayer(input_shape=input_shape, name="image"),
          layers.Conv2D(32, 5, padding="same", activation="relu", name="conv1"),
          layers.MaxPool2D(2, strides=2, name="pool1"),
          layers.Conv2D(64, 5, padding="same", activation="relu", name="conv2"),
          layers.MaxPool2D(2, strides=2, name="pool2"),
          layers.Flatten(name="flatten"),
          layers.Dense(2048, activation="relu", name="dense1"),
          layers.Dense(num_classes, name="logits"),
      ],
      name="leaf_cnn",
  )


_BUILDERS: dict[str, Callable[..., tf.keras.Model]] = {
    "mnist_cnn": _mnist_cnn,
    "cifar10_cnn": _cifar10_cnn,
    "cifar100_cnn": _cifar100_cnn,
    "leaf_cnn": _leaf_cnn,
}
MODEL_NAMES = tuple(_BUILDERS)

_DEFAULT_MODEL = {
    "fashion_mnist": "mnist_cnn",
    "mnist": "mnist_cnn",
    "cifar10": "cifar10_cnn",
    "cifar100": "cifar100_cnn",
    "emnist": "leaf_cnn",
    "femnist": "leaf_cnn",
}


def default_model_for_dataset(dataset: str) -> str:
  """The paper's network for a data set name."""
  try:
    return _DEFAULT_MODEL[dataset]
  except KeyError:
    raise ValueError(f"no default model for data set {dataset!r}") from None


def build_model(
    name: str, input_shape: tuple[int, int, int], num_classes: int
) -> tf.keras.Model:
  """Builds network `name` for images of `input_shape` (H, W, C)."""
  try:
    builder = _BUILDERS[name]
  except KeyError:
    raise ValueError(
        f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}"
    ) from None
  return builder(tuple(input_shape), int(num_classes))


def is_prunable(layer: tf.keras.layers.Layer) -> bool:
  """Conv2D and Dense kernels are masked; biases never are."""
  return isinstance(layer, (layers.Conv2D, layers.Dense))


def prunable_layers(model: tf.keras.Model) -> list[tf.keras.layers.Layer]:
  return [layer for layer in model.layers if is_prunable(layer)]
