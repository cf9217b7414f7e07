"""Tests of tff_feddst.data: loaders on real-format files, partitions."""

import collections
import gzip
import os
import pickle
import tarfile

import h5py
import numpy as np
import pytest
import tensorflow as tf

from tff_feddst import data
from tff_feddst.data import loaders

from conftest import fashion_mnist_missing

IDX_NAMES = loaders.IDX_FILES


# ---------------------------------------------------------------- writers


def _write_mnist_like(directory, *, gz=True, n_train=30, n_test=10, seed=0):
  """Writes the four IDX files; returns the raw uint8 images and labels."""
  rng = np.random.default_rng(seed)
  raw = dict(
      x_train=rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
      y_train=(np.arange(n_train) % 10).astype(np.uint8),
      x_test=rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
      y_test=(np.arange(n_test)[::-1] % 10).astype(np.uint8),
  )
  raw["x_train"][0, 0, 0], raw["x_train"][0, 0, 1] = 0, 255
  os.makedirs(directory, exist_ok=True)
  suffix = ".gz" if gz else ""
  for key, base in IDX_NAMES.items():
    data.write_idx(os.path.join(directory, base + suffix), raw[key])
  return raw


def _cifar_batch(rng, n, label_key, num_classes):
  return {
      b"batch_label": b"test batch",
      b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
      label_key: [int(v) for v in rng.integers(0, num_classes, n)],
  }


def _write_pickle(path, obj):
  with open(path, "wb") as f:
    pickle.dump(obj, f)


def _write_cifar10(directory, *, n=4, seed=0):
  """cifar-10-batches-py/ under `directory`; returns {file name: batch}."""
  rng = np.random.default_rng(seed)
  folder = os.path.join(directory, "cifar-10-batches-py")
  os.makedirs(folder)
  batches = {}
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    batches[name] = _cifar_batch(rng, n, b"labels", 10)
    _write_pickle(os.path.join(folder, name), batches[name])
  return batches


def _write_cifar100(directory, *, seed=0):
  rng = np.random.default_rng(seed)
  folder = os.path.join(directory, "cifar-100-python")
  os.makedirs(folder)
  batches = {}
  for name, n in (("train", 12), ("test", 5)):
    batch = _cifar_batch(rng, n, b"fine_labels", 100)
    batch[b"coarse_labels"] = [v // 5 for v in batch[b"fine_labels"]]
    batches[name] = batch
    _write_pickle(os.path.join(folder, name), batch)
  return batches


def _tar_gz(directory, folder_name, archive_name):
  archive = os.path.join(directory, archive_name)
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(os.path.join(directory, folder_name), arcname=folder_name)
  return archive


def _write_emnist_h5(path, writers):
  """TFF's layout: examples/<writer>/{pixels (N,28,28) float32, label (N,)}."""
  with h5py.File(path, "w") as f:
    for writer, (pixels, labels) in writers.items():
      group = f.create_group(f"examples/{writer}")
      group.create_dataset("pixels", data=pixels)
      group.create_dataset("label", data=labels)


def _emnist_writers(rng, num_classes, sizes):
  return {
      writer: (
          rng.random((n, 28, 28), dtype=np.float32),
          rng.integers(0, num_classes, n).astype(np.int32),
      )
      for writer, n in sizes.items()
  }


@pytest.fixture(scope="module")
def debian_fashion_mnist():
  """The real Fashion-MNIST from the Debian package, or None if absent."""
  if not os.path.isdir(loaders.DEBIAN_FASHION_MNIST_DIR):
    return None
  return data.load_arrays("fashion_mnist")


@pytest.fixture
def no_fashion_mnist(monkeypatch, tmp_path):
  """No Debian directory, no Keras cache, and a Keras download that fails."""
  monkeypatch.setattr(
      loaders, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "no-debian")
  )
  monkeypatch.setattr(loaders, "KERAS_DATASETS_DIR", str(tmp_path / "no-keras"))

  def offline():
    raise OSError("network is unreachable")

  monkeypatch.setattr(loaders, "_download_fashion_mnist", offline)


@pytest.fixture(autouse=True)
def _no_keras_cache(monkeypatch, tmp_path_factory):
  """Loaders never see the user's real ~/.keras/datasets in these tests."""
  empty = tmp_path_factory.mktemp("keras-datasets")
  monkeypatch.setattr(loaders, "KERAS_DATASETS_DIR", str(empty))


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]
)
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, suffix):
  array = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
  path = str(tmp_path / f"a-idx3-ubyte{suffix}")
  data.write_idx(path, array)
  with open(path, "rb") as f:
    assert (f.read(2) == b"\x1f\x8b") == bool(suffix)
  back = data.read_idx(path)
  assert back.dtype == np.dtype(dtype) and back.shape == (2, 3, 4)
  np.testing.assert_array_equal(back, array)


def test_idx_header_is_the_standard_one(tmp_path):
  path = str(tmp_path / "labels")
  data.write_idx(path, np.array([7, 1, 2], np.uint8))
  with open(path, "rb") as f:
    assert f.read() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 1, 2])


# ---------------------------------------------------------------- loaders


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_like_loaders_read_idx_files(tmp_path, name, gz):
  raw = _write_mnist_like(tmp_path, gz=gz)
  split = data.load_arrays(name, str(tmp_path))
  assert split.name == name and split.num_classes == 10
  assert split.x_train.shape == (30, 28, 28, 1) and split.x_test.shape == (
      10,
      28,
      28,
      1,
  )
  assert split.input_shape == (28, 28, 1)
  assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int32
  assert split.x_train[0, 0, 0, 0] == 0.0 and split.x_train[0, 0, 1, 0] == 1.0
  np.testing.assert_allclose(
      split.x_train[..., 0], raw["x_train"] / 255.0, rtol=1e-6
  )
  np.testing.assert_allclose(
      split.x_test[..., 0], raw["x_test"] / 255.0, rtol=1e-6
  )
  np.testing.assert_array_equal(split.y_train, raw["y_train"])
  np.testing.assert_array_equal(split.y_test, raw["y_test"])
  assert split.train_client_ids is None and split.test_client_ids is None


def test_idx_arrays_are_read_once_while_the_files_are_unchanged(tmp_path):
  """A second load of the same files gives the arrays of the first, read-only
  (no caller can change what the next run reads); a rewritten file is read
  again."""
  raw = _write_mnist_like(tmp_path)
  first = data.load_arrays("mnist", str(tmp_path))
  again = data.load_arrays("mnist", str(tmp_path))
  assert again.x_train is first.x_train and again.y_test is first.y_test
  for array in (first.x_train, first.y_train, first.x_test, first.y_test):
    assert not array.flags.writeable
  with pytest.raises(ValueError, match="read-only"):
    first.x_train[0, 0, 0, 0] = 0.5
  raw["y_test"][0] = (raw["y_test"][0] + 1) % 10
  data.write_idx(os.path.join(tmp_path, IDX_NAMES["y_test"] + ".gz"), raw["y_test"])
  changed = data.load_arrays("mnist", str(tmp_path))
  assert changed.y_test is not first.y_test
  np.testing.assert_array_equal(changed.y_test, raw["y_test"])
  np.testing.assert_array_equal(changed.x_train, first.x_train)


def test_mnist_needs_data_dir(tmp_path):
  with pytest.raises(data.DataError, match="--data_dir"):
    data.load_arrays("mnist")
  with pytest.raises(data.DataError, match=str(tmp_path)):
    data.load_arrays("mnist", str(tmp_path))


def test_unknown_data_set():
  with pytest.raises(data.DataError, match="unknown data set 'svhn'"):
    data.load_arrays("svhn")


def test_fashion_mnist_from_debian_directory(debian_fashion_mnist):
  if debian_fashion_mnist is None:
    fashion_mnist_missing("the directory is absent")
  split = debian_fashion_mnist
  assert split.x_train.shape == (60000, 28, 28, 1)
  assert split.x_test.shape == (10000, 28, 28, 1)
  assert split.x_train.dtype == np.float32
  assert split.x_train.min() == 0.0 and split.x_train.max() == 1.0
  np.testing.assert_array_equal(np.bincount(split.y_train), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(split.y_test), [1000] * 10)
  # The first training image of Fashion-MNIST is an ankle boot (class 9).
  assert split.y_train[0] == 9 and split.y_test[0] == 9


def test_fashion_mnist_prefers_data_dir_over_debian(tmp_path, monkeypatch):
  debian = tmp_path / "debian"
  _write_mnist_like(debian, n_train=20, seed=1)
  mine = _write_mnist_like(tmp_path / "mine", n_train=30, seed=2)
  monkeypatch.setattr(loaders, "DEBIAN_FASHION_MNIST_DIR", str(debian))
  split = data.load_arrays("fashion_mnist", str(tmp_path / "mine"))
  np.testing.assert_array_equal(
      np.round(split.x_train[..., 0] * 255), mine["x_train"]
  )
  # Without data_dir the Debian copy is used.
  assert len(data.load_arrays("fashion_mnist").y_train) == 20
  # A data_dir without the files, or that does not exist, is an error: a
  # wrong path never trains on other data.
  (tmp_path / "empty").mkdir()
  with pytest.raises(data.DataError, match=f"^{tmp_path / 'empty'} has none of the Fashion-MNIST"):
    data.load_arrays("fashion_mnist", str(tmp_path / "empty"))
  with pytest.raises(data.DataError, match=f"^{tmp_path / 'nope'} is not a directory with"):
    data.load_arrays("fashion_mnist", str(tmp_path / "nope"))


def test_fashion_mnist_keras_cache_then_download(
    tmp_path, monkeypatch, no_fashion_mnist
):
  del no_fashion_mnist
  keras_dir = tmp_path / "keras"
  _write_mnist_like(keras_dir / "fashion-mnist", n_train=12)
  monkeypatch.setattr(loaders, "KERAS_DATASETS_DIR", str(keras_dir))
  assert len(data.load_arrays("fashion_mnist").y_train) == 12

  monkeypatch.setattr(loaders, "KERAS_DATASETS_DIR", str(tmp_path / "nothing"))
  x = np.full((3, 28, 28), 51, np.uint8)
  y = np.array([1, 2, 3], np.uint8)
  monkeypatch.setattr(
      loaders, "_download_fashion_mnist", lambda: ((x, y), (x[:1], y[:1]))
  )
  split = data.load_arrays("fashion_mnist")
  assert split.x_train.shape == (3, 28, 28, 1) and split.x_test.shape == (
      1,
      28,
      28,
      1,
  )
  np.testing.assert_allclose(split.x_train, 0.2, rtol=1e-6)
  np.testing.assert_array_equal(split.y_train, [1, 2, 3])


def test_fashion_mnist_missing_everywhere_is_one_clear_line(
    tmp_path, no_fashion_mnist
):
  del no_fashion_mnist
  with pytest.raises(data.DataError) as info:
    data.load_arrays("fashion_mnist")
  message = str(info.value)
  assert "\n" not in message
  assert "--data_dir" in message
  assert "apt-get install dataset-fashion-mnist" in message
  assert "Keras" in message and "network is unreachable" in message
  assert str(tmp_path / "no-debian") in message


def _check_cifar_split(
    split, batches, train_names, test_names, label_key, num_classes
):
  data_train = np.concatenate([batches[n][b"data"] for n in train_names])
  labels_train = np.concatenate([batches[n][label_key] for n in train_names])
  data_test = np.concatenate([batches[n][b"data"] for n in test_names])
  assert split.num_classes == num_classes
  assert split.x_train.shape == (len(data_train), 32, 32, 3)
  assert split.x_test.shape == (len(data_test), 32, 32, 3)
  assert split.input_shape == (32, 32, 3)
  assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int32
  # Channel-major rows: data[i, c * 1024 + h * 32 + w] is pixel (h, w, c).
  i, h, w, c = 1, 3, 17, 2
  assert split.x_train[i, h, w, c] == np.float32(
      data_train[i, c * 1024 + h * 32 + w] / 255.0
  )
  expected = data_train.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1) / 255.0
  np.testing.assert_allclose(split.x_train, expected, rtol=1e-6)
  np.testing.assert_array_equal(split.y_train, labels_train)
  np.testing.assert_array_equal(
      split.y_test, np.concatenate([batches[n][label_key] for n in test_names])
  )


CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]


@pytest.mark.parametrize("layout", ["folder", "files", "archive"])
def test_cifar10_loader(tmp_path, layout):
  batches = _write_cifar10(tmp_path)
  data_dir = tmp_path
  if layout == "files":
    data_dir = tmp_path / "cifar-10-batches-py"
  elif layout == "archive":
    archive = _tar_gz(tmp_path, "cifar-10-batches-py", "cifar-10-python.tar.gz")
    data_dir = tmp_path / "only-archive"
    data_dir.mkdir()
    os.rename(archive, data_dir / "cifar-10-python.tar.gz")
  split = data.load_arrays("cifar10", str(data_dir))
  assert split.name == "cifar10"
  assert len(split.y_train) == 20 and len(split.y_test) == 4
  _check_cifar_split(
      split, batches, CIFAR10_TRAIN, ["test_batch"], b"labels", 10
  )


@pytest.mark.parametrize("layout", ["folder", "archive"])
def test_cifar100_loader(tmp_path, layout):
  batches = _write_cifar100(tmp_path)
  data_dir = tmp_path
  if layout == "archive":
    archive = _tar_gz(tmp_path, "cifar-100-python", "cifar-100-python.tar.gz")
    data_dir = tmp_path / "only-archive"
    data_dir.mkdir()
    os.rename(archive, data_dir / "cifar-100-python.tar.gz")
  split = data.load_arrays("cifar100", str(data_dir))
  _check_cifar_split(split, batches, ["train"], ["test"], b"fine_labels", 100)


def test_cifar_missing(tmp_path, monkeypatch):
  with pytest.raises(data.DataError, match="cifar-10-python.tar.gz"):
    data.load_arrays("cifar10", str(tmp_path))
  # A given data_dir is the only place looked in, even with the cache full.
  cache = tmp_path / "cache"
  _write_cifar10(cache)
  monkeypatch.setattr(loaders, "KERAS_DATASETS_DIR", str(cache))
  assert data.load_arrays("cifar10").num_classes == 10
  with pytest.raises(data.DataError, match=f"not found in {tmp_path}:"):
    data.load_arrays("cifar10", str(tmp_path))
  _write_cifar10(tmp_path)
  os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
  with pytest.raises(data.DataError, match="missing data_batch_3"):
    data.load_arrays("cifar10", str(tmp_path))


@pytest.mark.parametrize(
    "name,files,num_classes",
    [
        (
            "emnist",
            ("fed_emnist_digitsonly_train.h5", "fed_emnist_digitsonly_test.h5"),
            10,
        ),
        ("femnist", ("fed_emnist_train.h5", "fed_emnist_test.h5"), 62),
    ],
)
def test_emnist_h5_loaders(tmp_path, name, files, num_classes):
  rng = np.random.default_rng(3)
  train = _emnist_writers(
      rng, num_classes, {"f0002_07": 3, "f0000_14": 5, "f0001_41": 2}
  )
  test = _emnist_writers(
      rng, num_classes, {"f0001_41": 1, "f0000_14": 2, "f0002_07": 1}
  )
  _write_emnist_h5(tmp_path / files[0], train)
  _write_emnist_h5(tmp_path / files[1], test)
  split = data.load_arrays(name, str(tmp_path))
  assert split.num_classes == num_classes
  assert split.x_train.shape == (10, 28, 28, 1) and split.x_test.shape == (
      4,
      28,
      28,
      1,
  )
  assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int32
  order = sorted(train)
  np.testing.assert_array_equal(
      split.train_client_ids,
      np.repeat(order, [len(train[w][1]) for w in order]),
  )
  np.testing.assert_array_equal(
      split.test_client_ids, ["f0000_14"] * 2 + ["f0001_41", "f0002_07"]
  )
  np.testing.assert_array_equal(
      split.x_train[..., 0], np.concatenate([train[w][0] for w in order])
  )
  np.testing.assert_array_equal(
      split.y_train, np.concatenate([train[w][1] for w in order])
  )
  np.testing.assert_array_equal(
      split.y_test, np.concatenate([test[w][1] for w in sorted(test)])
  )

  part = data.natural_partition(split.train_client_ids, split.test_client_ids)
  assert (
      data.natural_client_ids(split.train_client_ids, split.test_client_ids)
      == order
  )
  assert [len(p) for p in part.train] == [5, 2, 3]
  assert [len(p) for p in part.test] == [2, 1, 1]
  for writer, tr, te in zip(order, part.train, part.test):
    assert tr.dtype == np.int64 and np.all(np.diff(tr) > 0)
    assert set(split.train_client_ids[tr]) == {writer}
    assert set(split.test_client_ids[te]) == {writer}


def test_emnist_looks_in_keras_cache_and_reports_missing(tmp_path, monkeypatch):
  with pytest.raises(data.DataError, match="fed_emnist_digitsonly_train.h5"):
    data.load_arrays("emnist", str(tmp_path))
  rng = np.random.default_rng(0)
  _write_emnist_h5(
      tmp_path / "fed_emnist_train.h5", _emnist_writers(rng, 62, {"w": 2})
  )
  with pytest.raises(data.DataError, match="fed_emnist_test.h5: missing"):
    data.load_arrays("femnist", str(tmp_path))
  _write_emnist_h5(
      tmp_path / "fed_emnist_test.h5", _emnist_writers(rng, 62, {"w": 1})
  )
  monkeypatch.setattr(loaders, "KERAS_DATASETS_DIR", str(tmp_path))
  assert len(data.load_arrays("femnist").y_train) == 2
  # A given data_dir is the only place looked in, even with the cache full.
  (tmp_path / "empty").mkdir()
  with pytest.raises(data.DataError, match=f"not in {tmp_path / 'empty'};"):
    data.load_arrays("femnist", str(tmp_path / "empty"))


# ---------------------------------------------------------------- corrupt files


def _corrupt_idx_bad_magic(directory):
  path = os.path.join(directory, IDX_NAMES["y_train"] + ".gz")
  with gzip.open(path, "wb") as f:
    f.write(b"\x12\x34\x08\x01\x00\x00\x00\x1e" + bytes(30))
  return path


def _corrupt_idx_truncated_raw(directory):
  path = os.path.join(directory, IDX_NAMES["x_test"] + ".gz")
  os.remove(path)
  path = path[:-3]
  data.write_idx(path, np.zeros((10, 28, 28), np.uint8))
  with open(path, "r+b") as f:
    f.truncate(16 + 5 * 784)
  return path


def _corrupt_idx_truncated_gz(directory):
  path = os.path.join(directory, IDX_NAMES["x_train"] + ".gz")
  with open(path, "rb") as f:
    content = gzip.decompress(f.read())
  with open(path, "wb") as f:  # valid gzip, IDX content 100 bytes short
    f.write(gzip.compress(content[:-100]))
  return path


def _corrupt_bad_gzip(directory):
  path = os.path.join(directory, IDX_NAMES["y_test"] + ".gz")
  with open(path, "wb") as f:
    f.write(b"this is not gzip data at all")
  return path


def _corrupt_cut_gzip_stream(directory):
  path = os.path.join(directory, IDX_NAMES["x_train"] + ".gz")
  with open(path, "rb") as f:
    blob = f.read()
  with open(path, "wb") as f:
    f.write(blob[: len(blob) // 2])
  return path


def _corrupt_label_count(directory):
  path = os.path.join(directory, IDX_NAMES["y_train"] + ".gz")
  data.write_idx(path, np.zeros(29, np.uint8))
  return path


@pytest.mark.parametrize(
    "corrupt",
    [
        _corrupt_idx_bad_magic,
        _corrupt_idx_truncated_raw,
        _corrupt_idx_truncated_gz,
        _corrupt_bad_gzip,
        _corrupt_cut_gzip_stream,
        _corrupt_label_count,
    ],
)
def test_corrupt_idx_is_data_error_naming_file(tmp_path, corrupt):
  _write_mnist_like(tmp_path)
  path = corrupt(str(tmp_path))
  with pytest.raises(data.DataError) as info:
    data.load_arrays("mnist", str(tmp_path))
  assert os.path.basename(path) in str(info.value) and "\n" not in str(
      info.value
  )


def test_corrupt_idx_messages_say_what_is_wrong(tmp_path):
  _write_mnist_like(tmp_path)
  _corrupt_idx_bad_magic(str(tmp_path))
  with pytest.raises(data.DataError, match="bad IDX magic"):
    data.load_arrays("mnist", str(tmp_path))
  _write_mnist_like(tmp_path)
  _corrupt_idx_truncated_raw(str(tmp_path))
  with pytest.raises(data.DataError, match="truncated"):
    data.load_arrays("mnist", str(tmp_path))
  os.remove(tmp_path / IDX_NAMES["x_test"])
  with pytest.raises(data.DataError, match=f"missing {IDX_NAMES['x_test']}"):
    data.load_arrays("mnist", str(tmp_path))


def _cifar_truncated_pickle(directory):
  path = os.path.join(directory, "cifar-10-batches-py", "data_batch_2")
  with open(path, "rb") as f:
    blob = f.read()
  with open(path, "wb") as f:
    f.write(blob[: len(blob) // 3])
  return path


def _cifar_wrong_keys(directory):
  path = os.path.join(directory, "cifar-10-batches-py", "test_batch")
  _write_pickle(path, {b"pixels": np.zeros((2, 3072), np.uint8)})
  return path


def _cifar_wrong_shape(directory):
  path = os.path.join(directory, "cifar-10-batches-py", "data_batch_1")
  _write_pickle(
      path, {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
  )
  return path


def _cifar_bad_label(directory):
  path = os.path.join(directory, "cifar-10-batches-py", "data_batch_5")
  _write_pickle(
      path, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}
  )
  return path


def _cifar_bad_archive(directory):
  folder = os.path.join(directory, "cifar-10-batches-py")
  for name in os.listdir(folder):
    os.remove(os.path.join(folder, name))
  os.rmdir(folder)
  path = os.path.join(directory, "cifar-10-python.tar.gz")
  with open(path, "wb") as f:
    f.write(gzip.compress(b"not a tar archive" * 100)[:-20])
  return path


@pytest.mark.parametrize(
    "corrupt",
    [
        _cifar_truncated_pickle,
        _cifar_wrong_keys,
        _cifar_wrong_shape,
        _cifar_bad_label,
        _cifar_bad_archive,
    ],
)
def test_corrupt_cifar_is_data_error_naming_file(tmp_path, corrupt):
  _write_cifar10(tmp_path)
  path = corrupt(str(tmp_path))
  with pytest.raises(data.DataError) as info:
    data.load_arrays("cifar10", str(tmp_path))
  assert path in str(info.value) and "\n" not in str(info.value)


def _h5_without_examples(path):
  with h5py.File(path, "w") as f:
    f.create_group("snippets/f0000_14").create_dataset(
        "pixels", data=np.zeros((1, 28, 28))
    )


def _h5_not_h5(path):
  with open(path, "wb") as f:
    f.write(b"\x89HDF but not really" * 10)


def _h5_label_count(path):
  _write_emnist_h5(
      path, {"w": (np.zeros((3, 28, 28), np.float32), np.zeros(2, np.int32))}
  )


def _h5_missing_label(path):
  with h5py.File(path, "w") as f:
    f.create_group("examples/w").create_dataset(
        "pixels", data=np.zeros((1, 28, 28))
    )


def _h5_pixels_out_of_range(path):
  _write_emnist_h5(
      path,
      {"w": (np.full((1, 28, 28), 255.0, np.float32), np.zeros(1, np.int32))},
  )


@pytest.mark.parametrize(
    "corrupt,what",
    [
        (_h5_without_examples, "no 'examples' group"),
        (_h5_not_h5, "not a readable h5 file"),
        (_h5_label_count, "2 labels for 3 images"),
        (_h5_missing_label, "lacks the 'pixels' and 'label'"),
        (_h5_pixels_out_of_range, r"outside \[0, 1\]"),
    ],
)
def test_corrupt_h5_is_data_error_naming_file(tmp_path, corrupt, what):
  rng = np.random.default_rng(0)
  _write_emnist_h5(
      tmp_path / "fed_emnist_digitsonly_train.h5",
      _emnist_writers(rng, 10, {"w": 2}),
  )
  path = str(tmp_path / "fed_emnist_digitsonly_test.h5")
  corrupt(path)
  with pytest.raises(data.DataError, match=what) as info:
    data.load_arrays("emnist", str(tmp_path))
  assert path in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- partitions


@pytest.fixture(scope="module")
def fashion_labels(debian_fashion_mnist):
  """Real Fashion-MNIST labels if installed, else shuffled 6000/1000 a class."""
  if debian_fashion_mnist is not None:
    return debian_fashion_mnist.y_train, debian_fashion_mnist.y_test
  rng = np.random.default_rng(123)
  return (
      rng.permutation(np.repeat(np.arange(10), 6000)).astype(np.int32),
      rng.permutation(np.repeat(np.arange(10), 1000)).astype(np.int32),
  )


def _assert_disjoint(parts, size=None):
  joined = np.concatenate(parts)
  assert len(np.unique(joined)) == len(joined)
  if size is not None:
    np.testing.assert_array_equal(np.sort(joined), np.arange(size))


def test_pathological_partition_is_the_papers_split(fashion_labels):
  y_train, y_test = fashion_labels
  part = data.pathological_partition(
      y_train,
      y_test,
      num_clients=400,
      classes_per_client=2,
      examples_per_class=20,
      seed=0,
      num_classes=10,
  )
  assert part.num_clients == 400 and len(part.test) == 400
  holders = np.zeros(10, int)
  test_per_class = np.bincount(y_test, minlength=10)
  for train_idx, test_idx in zip(part.train, part.test):
    assert train_idx.dtype == np.int64 and test_idx.dtype == np.int64
    assert np.all(np.diff(train_idx) > 0) and np.all(np.diff(test_idx) > 0)
    classes, counts = np.unique(y_train[train_idx], return_counts=True)
    assert (
        len(classes) == 2 and list(counts) == [20, 20] and len(train_idx) == 40
    )
    holders[classes] += 1
    test_classes, test_counts = np.unique(y_test[test_idx], return_counts=True)
    np.testing.assert_array_equal(test_classes, classes)
    # Each class's test examples are split evenly among its 80 holders.
    np.testing.assert_array_equal(test_counts, test_per_class[classes] // 80)
  np.testing.assert_array_equal(holders, [80] * 10)
  _assert_disjoint(part.train)
  _assert_disjoint(part.test)

  again = data.pathological_partition(y_train, y_test, 400, 2, 20, 0, 10)
  for a, b in zip(part.train + part.test, again.train + again.test):
    np.testing.assert_array_equal(a, b)
  other = data.pathological_partition(y_train, y_test, 400, 2, 20, 1, 10)
  assert any(not np.array_equal(a, b) for a, b in zip(part.train, other.train))


@pytest.mark.parametrize(
    "num_clients,classes_per_client,num_classes",
    [
        (5, 3, 3),
        (4, 4, 4),
        (6, 3, 4),
        (7, 2, 10),
        (9, 4, 5),
        (10, 9, 10),
        (31, 5, 7),
    ],
)
def test_pathological_classes_distinct_and_balanced(
    num_clients, classes_per_client, num_classes
):
  y_train = np.repeat(np.arange(num_classes), 200)
  y_test = np.repeat(np.arange(num_classes), 50)
  for seed in range(10):
    part = data.pathological_partition(
        y_train, y_test, num_clients, classes_per_client, 3, seed, num_classes
    )
    holders = np.zeros(num_classes, int)
    for idx in part.train:
      classes = np.unique(y_train[idx])
      assert (
          len(classes) == classes_per_client
          and len(idx) == 3 * classes_per_client
      )
      holders[classes] += 1
    assert holders.sum() == num_clients * classes_per_client
    assert holders.max() - holders.min() <= 1
    _assert_disjoint(part.train)


def test_pathological_impossible_is_data_error():
  y_train = np.repeat(np.arange(10), 100)
  y_train[:5] = 1  # class 0 keeps 95 examples
  y_test = np.repeat(np.arange(10), 20)
  # 20 clients x 2 classes: each class has 4 holders x 25 examples = 100 > 95.
  with pytest.raises(data.DataError, match="class 0 has 95 training examples"):
    data.pathological_partition(y_train, y_test, 20, 2, 25, 0, 10)
  data.pathological_partition(y_train, y_test, 20, 2, 23, 0, 10)
  with pytest.raises(data.DataError, match="3 classes per client"):
    data.pathological_partition(y_train, y_test, 20, 3, 1, 0, 2)
  with pytest.raises(data.DataError, match="test examples"):
    data.pathological_partition(y_train, y_test[:30], 20, 2, 5, 0, 10)


def test_dirichlet_partition(fashion_labels):
  y_train, y_test = fashion_labels
  part = data.dirichlet_partition(
      y_train, y_test, num_clients=20, beta=0.1, seed=0, num_classes=10
  )
  assert part.num_clients == 20
  _assert_disjoint(part.train, len(y_train))
  _assert_disjoint(part.test, len(y_test))
  n_train = np.bincount(y_train, minlength=10)
  n_test = np.bincount(y_test, minlength=10)
  classes_held = []
  for train_idx, test_idx in zip(part.train, part.test):
    assert train_idx.dtype == np.int64 and np.all(np.diff(train_idx) > 0)
    share_train = np.bincount(y_train[train_idx], minlength=10) / n_train
    share_test = np.bincount(y_test[test_idx], minlength=10) / n_test
    # The same proportions cut train and test (each count is off by < 1).
    assert np.all(np.abs(share_train - share_test) < 1 / n_train + 1 / n_test)
    classes_held.append(np.count_nonzero(share_train > 0.01))
  # beta = 0.1 is strongly label-skewed: clients see few classes in earnest.
  assert np.mean(classes_held) < 5

  again = data.dirichlet_partition(y_train, y_test, 20, 0.1, 0, 10)
  for a, b in zip(part.train + part.test, again.train + again.test):
    np.testing.assert_array_equal(a, b)
  other = data.dirichlet_partition(y_train, y_test, 20, 0.1, 1, 10)
  assert any(not np.array_equal(a, b) for a, b in zip(part.train, other.train))
  iid_like = data.dirichlet_partition(y_train, y_test, 20, 1000.0, 0, 10)
  assert all(len(np.unique(y_train[idx])) == 10 for idx in iid_like.train)


def test_dirichlet_allows_empty_clients():
  y = np.repeat(np.arange(2), 3)
  part = data.dirichlet_partition(
      y, y, num_clients=50, beta=0.1, seed=0, num_classes=2
  )
  assert sum(len(p) == 0 for p in part.train) >= 44
  _assert_disjoint(part.train, 6)
  with pytest.raises(data.DataError, match="beta"):
    data.dirichlet_partition(y, y, 5, 0.0, 0, 2)


def test_iid_partition():
  part = data.iid_partition(1003, 101, num_clients=10, seed=0)
  sizes = [len(p) for p in part.train]
  assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1003
  test_sizes = [len(p) for p in part.test]
  assert max(test_sizes) - min(test_sizes) <= 1
  _assert_disjoint(part.train, 1003)
  _assert_disjoint(part.test, 101)
  assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in part.train)
  # Shuffled, not contiguous blocks.
  assert part.train[0].max() - part.train[0].min() > 200
  again = data.iid_partition(1003, 101, 10, 0)
  assert all(np.array_equal(a, b) for a, b in zip(part.train, again.train))
  other = data.iid_partition(1003, 101, 10, 1)
  assert not all(np.array_equal(a, b) for a, b in zip(part.train, other.train))


def test_natural_partition_includes_writers_of_either_split():
  train_ids = np.array(["b", "a", "b", "c", "a"])
  test_ids = np.array(["d", "a"])
  assert data.natural_client_ids(train_ids, test_ids) == ["a", "b", "c", "d"]
  part = data.natural_partition(train_ids, test_ids)
  assert [p.tolist() for p in part.train] == [[1, 4], [0, 2], [3], []]
  assert [p.tolist() for p in part.test] == [[1], [], [], [0]]
  with pytest.raises(data.DataError, match="emnist and femnist"):
    data.natural_partition(None, None)


# ---------------------------------------------------------------- FederatedData


def _small_split(n_train=50, n_test=20, shape=(4, 4, 3), num_classes=5):
  rng = np.random.default_rng(0)
  return data.ArraySplit(
      name="tiny",
      x_train=rng.random((n_train,) + shape, dtype=np.float32),
      y_train=(np.arange(n_train) % num_classes).astype(np.int32),
      x_test=rng.random((n_test,) + shape, dtype=np.float32),
      y_test=(np.arange(n_test) % num_classes).astype(np.int32),
      num_classes=num_classes,
  )


def _elements(dataset):
  items = list(dataset.as_numpy_iterator())
  xs = np.stack([e["x"] for e in items]) if items else np.zeros((0,))
  return xs, np.array([e["y"] for e in items])


def test_federated_data_client_datasets_match_arrays():
  arrays = _small_split()
  part = data.Partition(
      train=[
          np.array([0, 3, 7], np.int64),
          np.zeros(0, np.int64),
          np.array([1, 2, 49], np.int64),
      ],
      test=[
          np.array([5], np.int64),
          np.array([0, 19], np.int64),
          np.zeros(0, np.int64),
      ],
  )
  fed = data.FederatedData(arrays, part)
  assert fed.client_ids == ["client_0000", "client_0001", "client_0002"]
  assert fed.nonempty_train_client_ids == ["client_0000", "client_0002"]
  assert fed.nonempty_test_client_ids == ["client_0000", "client_0001"]
  assert (
      fed.name == "tiny"
      and fed.num_classes == 5
      and fed.input_shape == (4, 4, 3)
  )
  spec = collections.OrderedDict(
      x=tf.TensorSpec([4, 4, 3], tf.float32), y=tf.TensorSpec([], tf.int32)
  )
  assert fed.element_spec == spec
  assert fed.train_client_data.element_type_structure == spec
  assert fed.test_client_data.element_type_structure == spec
  assert fed.train_client_data.client_ids == fed.client_ids
  assert (
      fed.num_train_examples("client_0002") == 3
      and fed.num_test_examples("client_0001") == 2
  )
  np.testing.assert_array_equal(fed.train_indices("client_0002"), [1, 2, 49])
  np.testing.assert_array_equal(fed.test_indices("client_0000"), [5])
  for cid, train_idx, test_idx in zip(fed.client_ids, part.train, part.test):
    ds = fed.train_client_data.create_tf_dataset_for_client(cid)
    assert ds.element_spec == spec
    x, y = _elements(ds)
    assert len(y) == len(train_idx)
    if len(train_idx):
      np.testing.assert_array_equal(x, arrays.x_train[train_idx])
      np.testing.assert_array_equal(y, arrays.y_train[train_idx])
    x, y = _elements(fed.test_client_data.create_tf_dataset_for_client(cid))
    assert len(y) == len(test_idx)
    if len(test_idx):
      np.testing.assert_array_equal(x, arrays.x_test[test_idx])
      np.testing.assert_array_equal(y, arrays.y_test[test_idx])
  with pytest.raises(data.DataError, match="unknown client id"):
    fed.num_train_examples("client_9999")
  with pytest.raises(tf.errors.InvalidArgumentError):
    fed.train_client_data.serializable_dataset_fn("client_9999")


def test_federated_data_dataset_fn_is_traceable():
  arrays = _small_split()
  part = data.iid_partition(50, 20, num_clients=7, seed=0)
  fed = data.FederatedData(arrays, part)
  traced = tf.function(fed.train_client_data.serializable_dataset_fn)
  x, y = _elements(traced(tf.constant("client_0004")))
  np.testing.assert_array_equal(x, arrays.x_train[part.train[4]])
  np.testing.assert_array_equal(y, arrays.y_train[part.train[4]])
  # flat_map traces the function inside tf.data.
  _, y_all = _elements(
      fed.test_client_data.create_tf_dataset_from_all_clients(seed=0)
  )
  np.testing.assert_array_equal(np.sort(y_all), np.sort(arrays.y_test))


def test_client_datasets_gather_from_arrays_converted_once():
  """The arrays become tensors once, when `FederatedData` is built; a
  client's data set only gathers its rows from them (no copy of the whole
  set per client): it reads what the arrays held then."""
  rng = np.random.default_rng(0)
  x = rng.random((200, 28, 28, 1), dtype=np.float32)
  y = rng.integers(0, 10, 200).astype(np.int32)
  arrays = data.ArraySplit("once", x, y, x[:20].copy(), y[:20].copy(), 10)
  fed = data.FederatedData(arrays, data.iid_partition(200, 20, 10, 0))
  expected = x.copy()
  x[:] = -1.0  # changed after the build: no client data set sees it
  for cid, idx in zip(fed.client_ids, fed.partition.train):
    batch = next(iter(fed.train_client_data.create_tf_dataset_for_client(cid).batch(1000)))
    np.testing.assert_array_equal(batch["x"].numpy(), expected[idx])


def test_federated_data_rejects_bad_partitions():
  arrays = _small_split()
  with pytest.raises(data.DataError, match="index outside"):
    data.FederatedData(
        arrays, data.Partition([np.array([50])], [np.array([0])])
    )
  with pytest.raises(data.DataError, match="distinct client ids"):
    data.FederatedData(
        arrays, data.iid_partition(50, 20, 2, 0), client_ids=["a", "a"]
    )


def test_load_federated_data_end_to_end(tmp_path):
  raw = _write_mnist_like(tmp_path, n_train=200, n_test=50)
  fed = data.load_federated_data(
      "mnist",
      "pathological",
      data_dir=str(tmp_path),
      total_clients=10,
      classes_per_client=2,
      examples_per_class=5,
      seed=3,
  )
  assert fed.client_ids == [f"client_{i:04d}" for i in range(10)]
  assert fed.partition_name == "pathological"
  for cid in fed.client_ids:
    assert fed.num_train_examples(cid) == 10
    x, y = _elements(fed.train_client_data.create_tf_dataset_for_client(cid))
    idx = fed.train_indices(cid)
    np.testing.assert_allclose(
        x[..., 0], raw["x_train"][idx] / 255.0, rtol=1e-6
    )
    assert len(np.unique(y)) == 2
  iid = data.load_federated_data(
      "mnist", "iid", data_dir=str(tmp_path), total_clients=1000
  )
  assert len(iid.client_ids) == 1000 and iid.client_ids[-1] == "client_0999"
  assert len(iid.nonempty_train_client_ids) == 200
  with pytest.raises(data.DataError, match="emnist and femnist only"):
    data.load_federated_data("mnist", "natural", data_dir=str(tmp_path))
  with pytest.raises(data.DataError, match="unknown partition"):
    data.load_federated_data("mnist", "shards", data_dir=str(tmp_path))
  with pytest.raises(data.DataError, match="unknown data set"):
    data.load_federated_data("svhn", "iid")


def test_load_federated_data_emnist_natural_and_pooled(tmp_path):
  rng = np.random.default_rng(5)
  train = _emnist_writers(rng, 10, {"f3": 4, "f1": 6, "f2": 5})
  test = _emnist_writers(rng, 10, {"f1": 2, "f2": 1, "f3": 3})
  _write_emnist_h5(tmp_path / "fed_emnist_digitsonly_train.h5", train)
  _write_emnist_h5(tmp_path / "fed_emnist_digitsonly_test.h5", test)
  fed = data.load_federated_data(
      "emnist", "natural", data_dir=str(tmp_path), total_clients=99
  )
  assert fed.client_ids == ["f1", "f2", "f3"]
  assert fed.input_shape == (28, 28, 1) and fed.num_classes == 10
  for writer in fed.client_ids:
    x, y = _elements(fed.train_client_data.create_tf_dataset_for_client(writer))
    np.testing.assert_array_equal(x[..., 0], train[writer][0])
    np.testing.assert_array_equal(y, train[writer][1])
    assert fed.num_test_examples(writer) == len(test[writer][1])
  pooled = data.load_federated_data(
      "emnist", "iid", data_dir=str(tmp_path), total_clients=3
  )
  assert pooled.client_ids == ["client_0000", "client_0001", "client_0002"]
  assert sorted(pooled.num_train_examples(c) for c in pooled.client_ids) == [
      5,
      5,
      5,
  ]
