"""Data set names, the error type and the array container of this package."""

import dataclasses
from typing import Optional

import numpy as np

from tff_feddst.names import DATASETS, NATURAL_DATASETS, PARTITIONS  # noqa: F401


class DataError(Exception):
  """A data set missing or unreadable, or a partition that cannot be made.

  The message is always a single line naming the file or directory concerned.
  """

  def __init__(self, message: str):
    super().__init__(" ".join(str(message).split()))


@dataclasses.dataclass
class ArraySplit:
  """A data set's train and test split as arrays.

  Images are float32 NHWC with values in [0, 1]; labels are int32. For the
  EMNIST/FEMNIST data sets `train_client_ids`/`test_client_ids` hold each
  example's writer id (strings); for the other data sets they are None.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  train_client_ids: Optional[np.ndarray] = None
  test_client_ids: Optional[np.ndarray] = None

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of one image."""
    return tuple(int(d) for d in self.x_train.shape[1:])
