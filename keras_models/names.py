"""The networks' names and each data set's default network.

Kept apart from `networks` so that a command line can check `--model` (and
fill in its default) without importing TensorFlow.
"""

MODEL_NAMES = ("mnist_cnn", "cifar10_cnn", "cifar100_cnn", "leaf_cnn", "paper2_cnn")

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
