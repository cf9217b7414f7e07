"""A partitioned data set as TFF `ClientData`, plus per-client bookkeeping.

The arrays are turned into CPU tensors once. A client's dataset is made by
looking its id up in a `tf.lookup.StaticHashTable`, slicing its indices out
of one flat index tensor and gathering those rows, so making a dataset costs
a few small ops and the dataset function is traceable by `tf.function`
(the `ClientData` contract).
"""

import collections
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf
import tensorflow_federated as tff

from tff_feddst.data import partitions as partitions_lib
from tff_feddst.data.common import DATASETS, NATURAL_DATASETS, PARTITIONS, ArraySplit, DataError
from tff_feddst.data.loaders import load_arrays


def default_client_ids(num_clients: int) -> list[str]:
  """Ids client_0000, client_0001, ... (at least four digits)."""
  width = max(4, len(str(num_clients - 1)))
  return [f"client_{i:0{width}d}" for i in range(num_clients)]


def _make_dataset_fn(client_ids, index_arrays, x, y):
  """A traceable client id -> dataset of OrderedDict(x=..., y=...) function."""
  lengths = np.array([len(a) for a in index_arrays], np.int64)
  row_splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
  flat = (
      np.concatenate(index_arrays).astype(np.int64)
      if len(index_arrays)
      else np.zeros((0,), np.int64)
  )
  with tf.device("/CPU:0"):
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(client_ids, tf.string),
            tf.range(len(client_ids), dtype=tf.int64),
        ),
        default_value=-1,
    )
    splits_t = tf.constant(row_splits)
    flat_t = tf.constant(flat)
    x_t = tf.constant(x, tf.float32)
    y_t = tf.constant(y, tf.int32)

  def dataset_fn(client_id):
    with tf.device("/CPU:0"):
      row = table.lookup(tf.convert_to_tensor(client_id, tf.string))
      # An unknown id (row -1) is an out-of-range gather: an error, not data.
      bounds = tf.gather(splits_t, tf.stack([row, row + 1]))
      indices = flat_t[bounds[0] : bounds[1]]
      elements = collections.OrderedDict(
          x=tf.gather(x_t, indices), y=tf.gather(y_t, indices)
      )
      return tf.data.Dataset.from_tensor_slices(elements)

  return dataset_fn


class FederatedData:
  """A data set split among clients, with TFF `ClientData` views.

  Attributes:
    arrays: the `ArraySplit` the indices point into.
    partition: the `Partition` (per-client train and test index arrays).
    client_ids: one id per client, in partition order.
    partition_name: how the data was partitioned (informative only).
    train_client_data, test_client_data: `tff.simulation.datasets.ClientData`
      over `client_ids`; each client's dataset is unbatched
      OrderedDict(x=float32[H, W, C], y=int32[]).
    nonempty_train_client_ids, nonempty_test_client_ids: the clients with at
      least one train (test) example.
  """

  def __init__(
      self,
      arrays: ArraySplit,
      partition: partitions_lib.Partition,
      client_ids: Optional[Sequence[str]] = None,
      partition_name: str = "",
  ):
    num_clients = len(partition.train)
    if len(partition.test) != num_clients:
      raise DataError(
          f"partition has {num_clients} train and {len(partition.test)} test"
          " index lists"
      )
    if num_clients == 0:
      raise DataError("partition has no clients")
    client_ids = (
        default_client_ids(num_clients)
        if client_ids is None
        else list(client_ids)
    )
    if len(client_ids) != num_clients or len(set(client_ids)) != num_clients:
      raise DataError(
          f"need {num_clients} distinct client ids, got {len(set(client_ids))}"
      )
    for split, parts, size in (
        ("train", partition.train, len(arrays.y_train)),
        ("test", partition.test, len(arrays.y_test)),
    ):
      for cid, part in zip(client_ids, parts):
        if len(part) and (part.min() < 0 or part.max() >= size):
          raise DataError(f"client {cid}: {split} index outside [0, {size})")
    self.arrays = arrays
    self.partition = partition
    self.partition_name = partition_name
    self.client_ids = client_ids
    self._row = {cid: i for i, cid in enumerate(client_ids)}
    self.nonempty_train_client_ids = [
        cid for cid, part in zip(client_ids, partition.train) if len(part)
    ]
    self.nonempty_test_client_ids = [
        cid for cid, part in zip(client_ids, partition.test) if len(part)
    ]
    self.train_client_data = (
        tff.simulation.datasets.ClientData.from_clients_and_tf_fn(
            client_ids,
            _make_dataset_fn(
                client_ids, partition.train, arrays.x_train, arrays.y_train
            ),
        )
    )
    self.test_client_data = (
        tff.simulation.datasets.ClientData.from_clients_and_tf_fn(
            client_ids,
            _make_dataset_fn(
                client_ids, partition.test, arrays.x_test, arrays.y_test
            ),
        )
    )

  @property
  def name(self) -> str:
    return self.arrays.name

  @property
  def num_classes(self) -> int:
    return self.arrays.num_classes

  @property
  def input_shape(self) -> tuple[int, int, int]:
    return self.arrays.input_shape

  @property
  def num_clients(self) -> int:
    return len(self.client_ids)

  @property
  def element_spec(self) -> collections.OrderedDict:
    return collections.OrderedDict(
        x=tf.TensorSpec(self.input_shape, tf.float32),
        y=tf.TensorSpec([], tf.int32),
    )

  def _index(self, client_id: str) -> int:
    try:
      return self._row[client_id]
    except KeyError:
      raise DataError(f"unknown client id {client_id!r}") from None

  def train_indices(self, client_id: str) -> np.ndarray:
    return self.partition.train[self._index(client_id)]

  def test_indices(self, client_id: str) -> np.ndarray:
    return self.partition.test[self._index(client_id)]

  def num_train_examples(self, client_id: str) -> int:
    return len(self.train_indices(client_id))

  def num_test_examples(self, client_id: str) -> int:
    return len(self.test_indices(client_id))


def load_federated_data(
    dataset: str,
    partition: str,
    *,
    data_dir: Optional[str] = None,
    total_clients: int = 400,
    classes_per_client: int = 2,
    examples_per_class: int = 20,
    dirichlet_beta: float = 0.1,
    seed: int = 0,
) -> FederatedData:
  """Loads `dataset` and partitions it among clients.

  `partition` is one of PARTITIONS; "natural" (one client per writer) exists
  for emnist and femnist only and ignores `total_clients`.

  Raises:
    DataError: unknown names, data set not found or unreadable, or an
      impossible partition.
  """
  if dataset not in DATASETS:
    raise DataError(
        f"unknown data set {dataset!r}; choose one of {', '.join(DATASETS)}"
    )
  if partition not in PARTITIONS:
    raise DataError(
        f"unknown partition {partition!r}; choose one of"
        f" {', '.join(PARTITIONS)}"
    )
  if partition == "natural" and dataset not in NATURAL_DATASETS:
    raise DataError(
        f"the natural (per-writer) partition exists for {' and '.join(NATURAL_DATASETS)}"
        f" only, not {dataset}"
    )
  arrays = load_arrays(dataset, data_dir)
  client_ids = None
  if partition == "natural":
    parts = partitions_lib.natural_partition(
        arrays.train_client_ids, arrays.test_client_ids
    )
    client_ids = partitions_lib.natural_client_ids(
        arrays.train_client_ids, arrays.test_client_ids
    )
  elif partition == "pathological":
    parts = partitions_lib.pathological_partition(
        arrays.y_train,
        arrays.y_test,
        num_clients=total_clients,
        classes_per_client=classes_per_client,
        examples_per_class=examples_per_class,
        seed=seed,
        num_classes=arrays.num_classes,
    )
  elif partition == "dirichlet":
    parts = partitions_lib.dirichlet_partition(
        arrays.y_train,
        arrays.y_test,
        num_clients=total_clients,
        beta=dirichlet_beta,
        seed=seed,
        num_classes=arrays.num_classes,
    )
  else:
    parts = partitions_lib.iid_partition(
        len(arrays.y_train),
        len(arrays.y_test),
        num_clients=total_clients,
        seed=seed,
    )
  return FederatedData(
      arrays, parts, client_ids=client_ids, partition_name=partition
  )
