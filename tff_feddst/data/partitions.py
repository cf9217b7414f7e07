"""Splitting a data set's examples among clients (pure numpy, seeded).

Every function returns a `Partition`: for each client, the sorted int64
indices of its examples in the train arrays and in the test arrays. No
example is given to two clients. An impossible partition is a `DataError`.
"""

import dataclasses

import numpy as np

from tff_feddst.data.common import DataError


@dataclasses.dataclass(frozen=True)
class Partition:
  """Per-client index arrays into the train and the test arrays."""

  train: list[np.ndarray]
  test: list[np.ndarray]

  @property
  def num_clients(self) -> int:
    return len(self.train)


def _finish(parts: list[list[np.ndarray]]) -> list[np.ndarray]:
  """Concatenated, sorted int64 index array per client."""
  out = []
  for pieces in parts:
    if pieces:
      out.append(np.sort(np.concatenate(pieces)).astype(np.int64))
    else:
      out.append(np.zeros((0,), np.int64))
  return out


def _check_positive(**values):
  for name, value in values.items():
    if int(value) != value or value < 1:
      raise DataError(
          f"impossible partition: {name} must be a positive integer, got"
          f" {value!r}"
      )


def _check_labels(labels, num_classes: int, what: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise DataError(
        f"impossible partition: {what} labels must be 1-D, got shape"
        f" {labels.shape}"
    )
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(
        f"impossible partition: {what} labels outside [0, {num_classes - 1}]"
    )
  return labels


def _has_repeat(row: np.ndarray) -> bool:
  return np.unique(row).size < row.size


def _assign_classes(rng, num_clients, classes_per_client, num_classes):
  """(num_clients, classes_per_client) class table; each row distinct classes.

  Each class fills floor or ceil of num_clients * classes_per_client /
  num_classes slots. A shuffled list of slots is cut into rows; then each
  repeated class in a row is swapped with a class from another row that is
  not in this row. A swap into a row that lacks the repeated class removes a
  repeat; only when no such row exists is the repeat passed on to another
  row (a random walk that ends quickly; it is capped all the same).
  """
  total = num_clients * classes_per_client
  counts = np.full(num_classes, total // num_classes)
  counts[rng.choice(num_classes, total % num_classes, replace=False)] += 1
  slots = np.repeat(np.arange(num_classes), counts)
  rng.shuffle(slots)
  table = slots.reshape(num_clients, classes_per_client)
  pending = [i for i in range(num_clients) if _has_repeat(table[i])]
  moves_left = 100 * total
  while pending:
    i = pending.pop()
    while _has_repeat(table[i]):
      row = table[i]
      _, first_seen = np.unique(row, return_index=True)
      repeat = np.setdiff1d(np.arange(classes_per_client), first_seen)[0]
      c = row[repeat]
      outside = ~np.isin(table, row)
      outside[i] = False
      candidates = np.argwhere(
          outside & ~(table == c).any(axis=1, keepdims=True)
      )
      if not len(candidates):
        candidates = np.argwhere(outside)
        moves_left -= 1
        if not len(candidates) or moves_left < 0:
          raise DataError(
              f"impossible partition: cannot give {num_clients} clients"
              f" {classes_per_client} distinct classes each out of"
              f" {num_classes}"
          )
      j, q = candidates[rng.integers(len(candidates))]
      table[i, repeat], table[j, q] = table[j, q], c
      if j not in pending and _has_repeat(table[j]):
        pending.append(j)
  return table


def pathological_partition(
    y_train,
    y_test,
    num_clients: int,
    classes_per_client: int,
    examples_per_class: int,
    seed: int,
    num_classes: int,
) -> Partition:
  """The paper's non-IID split: few classes per client, a fixed count of each.

  Each client gets `classes_per_client` distinct classes, each class being
  held by as equal a number of clients as possible, and exactly
  `examples_per_class` training examples of each of its classes. Each
  class's test examples are split evenly and disjointly among the clients
  holding it (the remainder is left unused), so a client's local test set
  holds its own classes only.

  Raises:
    DataError: a class has too few train examples (or fewer test examples
      than clients holding it), or the arguments admit no such split.
  """
  _check_positive(
      num_clients=num_clients,
      classes_per_client=classes_per_client,
      examples_per_class=examples_per_class,
      num_classes=num_classes,
  )
  if classes_per_client > num_classes:
    raise DataError(
        f"impossible partition: {classes_per_client} classes per client but"
        f" the data set has {num_classes}"
    )
  y_train = _check_labels(y_train, num_classes, "train")
  y_test = _check_labels(y_test, num_classes, "test")
  rng = np.random.default_rng(seed)
  table = _assign_classes(rng, num_clients, classes_per_client, num_classes)
  train = [[] for _ in range(num_clients)]
  test = [[] for _ in range(num_clients)]
  for c in range(num_classes):
    holders = np.flatnonzero((table == c).any(axis=1))
    if not holders.size:
      continue
    needed = holders.size * examples_per_class
    pool = np.flatnonzero(y_train == c)
    if pool.size < needed:
      raise DataError(
          f"impossible pathological partition: class {c} has {pool.size}"
          f" training examples, but {holders.size} clients x"
          f" {examples_per_class} examples need {needed}"
      )
    chosen = rng.permutation(pool)[:needed].reshape(
        holders.size, examples_per_class
    )
    test_pool = rng.permutation(np.flatnonzero(y_test == c))
    per_client = test_pool.size // holders.size
    if per_client == 0:
      raise DataError(
          f"impossible pathological partition: class {c} has {test_pool.size}"
          f" test examples for {holders.size} clients holding it"
      )
    for k, client in enumerate(holders):
      train[client].append(chosen[k])
      test[client].append(test_pool[k * per_client : (k + 1) * per_client])
  return Partition(train=_finish(train), test=_finish(test))


def dirichlet_partition(
    y_train,
    y_test,
    num_clients: int,
    beta: float,
    seed: int,
    num_classes: int,
) -> Partition:
  """Label-skewed split: per class, client shares drawn from Dir(beta).

  For each class one proportion vector is drawn from Dir(beta * ones) and
  both the class's (shuffled) train examples and its test examples are cut
  at the rounded cumulative proportions. Every example goes to exactly one
  client; clients may be empty.
  """
  _check_positive(num_clients=num_clients, num_classes=num_classes)
  if not beta > 0:
    raise DataError(
        f"impossible partition: dirichlet beta must be > 0, got {beta!r}"
    )
  y_train = _check_labels(y_train, num_classes, "train")
  y_test = _check_labels(y_test, num_classes, "test")
  rng = np.random.default_rng(seed)
  train = [[] for _ in range(num_clients)]
  test = [[] for _ in range(num_clients)]
  for c in range(num_classes):
    shares = rng.dirichlet(np.full(num_clients, float(beta)))
    if not np.all(np.isfinite(shares)):
      raise DataError(
          f"impossible partition: Dir({beta}) draw underflowed; use a"
          " larger beta"
      )
    cumulative = np.cumsum(shares)[:-1]
    for labels, out in ((y_train, train), (y_test, test)):
      pool = rng.permutation(np.flatnonzero(labels == c))
      cuts = np.clip(np.round(cumulative * pool.size), 0, pool.size).astype(
          np.int64
      )
      for client, piece in enumerate(np.split(pool, cuts)):
        out[client].append(piece)
  return Partition(train=_finish(train), test=_finish(test))


def iid_partition(
    num_train: int, num_test: int, num_clients: int, seed: int
) -> Partition:
  """Shuffles the examples and splits them evenly (sizes differ by <= 1)."""
  _check_positive(num_clients=num_clients)
  rng = np.random.default_rng(seed)
  train = np.array_split(rng.permutation(int(num_train)), num_clients)
  test = np.array_split(rng.permutation(int(num_test)), num_clients)
  return Partition(
      train=_finish([[part] for part in train]),
      test=_finish([[part] for part in test]),
  )


def natural_client_ids(train_client_ids, test_client_ids) -> list[str]:
  """The sorted writer ids found in either split (one client each)."""
  writers = np.union1d(
      np.asarray(train_client_ids, str), np.asarray(test_client_ids, str)
  )
  return [str(w) for w in writers]


def natural_partition(train_client_ids, test_client_ids) -> Partition:
  """One client per writer (EMNIST/FEMNIST), in `natural_client_ids` order."""
  if train_client_ids is None or test_client_ids is None:
    raise DataError(
        "impossible partition: the natural partition needs per-example writer"
        " ids (emnist and femnist only)"
    )
  writers = np.asarray(
      natural_client_ids(train_client_ids, test_client_ids), str
  )

  def split(ids):
    client = np.searchsorted(writers, np.asarray(ids, str))
    order = np.argsort(client, kind="stable")
    bounds = np.cumsum(np.bincount(client, minlength=writers.size))[:-1]
    return [part.astype(np.int64) for part in np.split(order, bounds)]

  return Partition(train=split(train_client_ids), test=split(test_client_ids))
