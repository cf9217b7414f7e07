"""Loaders that read each data set's standard files into an `ArraySplit`.

Nothing here downloads, except the last resort for Fashion-MNIST (Keras'
own loader). Every failure to find or read a data set is a `DataError` with
a one-line message naming the file or directory and what is wrong.

Where the files are looked for: in `data_dir` only, when it is given (a
wrong path is an error, never a reason to train on other data); otherwise
  fashion_mnist  IDX files in DEBIAN_FASHION_MNIST_DIR (the Debian package
                 dataset-fashion-mnist), then the Keras cache
                 KERAS_DATASETS_DIR/fashion-mnist, then a Keras download.
  mnist          nowhere: `data_dir` is required (IDX files, same names as
                 Fashion-MNIST).
  cifar10/100    KERAS_DATASETS_DIR: the extracted folder of the python
                 pickles, the files themselves, or the .tar.gz.
  emnist/femnist TFF's h5 files in KERAS_DATASETS_DIR.
"""

import os
import pickle
import tarfile
import zlib
from typing import Callable, Optional

import h5py
import numpy as np

from tff_feddst.data.common import DATASETS, ArraySplit, DataError
from tff_feddst.data.idx import read_idx

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
KERAS_DATASETS_DIR = os.path.join(
    os.environ.get("KERAS_HOME")
    or os.path.join(os.path.expanduser("~"), ".keras"),
    "datasets",
)

# Array name -> the IDX file's base name (".gz" optional; the original MNIST
# distribution's "train-images.idx3-ubyte" spelling is accepted too).
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

_CIFAR = {
    "cifar10": dict(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        train=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test=("test_batch",),
        label_key="labels",
        num_classes=10,
    ),
    "cifar100": dict(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        train=("train",),
        test=("test",),
        label_key="fine_labels",
        num_classes=100,
    ),
}

# name -> (train file, test file, number of classes), as in TFF's old cache.
_EMNIST = {
    "emnist": (
        "fed_emnist_digitsonly_train.h5",
        "fed_emnist_digitsonly_test.h5",
        10,
    ),
    "femnist": ("fed_emnist_train.h5", "fed_emnist_test.h5", 62),
}


def _to_unit_float(images: np.ndarray) -> np.ndarray:
  """uint8 images -> float32 in [0, 1]."""
  out = images.astype(np.float32)
  out /= 255.0
  return out


def _check_labels(labels, num_classes: int, source: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
    raise DataError(
        f"{source}: labels must be a 1-D integer array, got shape"
        f" {labels.shape} dtype {labels.dtype}"
    )
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise DataError(
        f"{source}: labels outside [0, {num_classes - 1}] (found"
        f" {labels.min()}..{labels.max()})"
    )
  return labels.astype(np.int32)


# ---------------------------------------------------------------- IDX (MNIST)


def _idx_path(directory: str, base: str) -> Optional[str]:
  dotted = base.replace("-idx", ".idx")
  for name in (base + ".gz", base, dotted + ".gz", dotted):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  return None


def _find_idx_files(directory: str) -> Optional[dict[str, str]]:
  """The four IDX paths in `directory`; None if none is there.

  Raises:
    DataError: some but not all of the four files are there.
  """
  if not os.path.isdir(directory):
    return None
  paths = {key: _idx_path(directory, base) for key, base in IDX_FILES.items()}
  missing = [IDX_FILES[k] for k, p in paths.items() if p is None]
  if len(missing) == len(paths):
    return None
  if missing:
    raise DataError(
        f"{directory}: incomplete IDX data set, missing {', '.join(missing)}"
        " (.gz or uncompressed)"
    )
  return paths


def _mnist_like_split(name, x_train, y_train, x_test, y_test, sources):
  """Checks 28x28 uint8 images and their labels; builds the ArraySplit."""
  arrays = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  for key in ("x_train", "x_test"):
    images = np.asarray(arrays[key])
    if (
        images.ndim != 3
        or images.shape[1:] != (28, 28)
        or images.dtype != np.uint8
    ):
      raise DataError(
          f"{sources[key]}: expected uint8 images of shape (N, 28, 28), got"
          f" {images.dtype} {images.shape}"
      )
  for split in ("train", "test"):
    n_images, n_labels = len(arrays["x_" + split]), len(arrays["y_" + split])
    if n_images != n_labels:
      raise DataError(
          f"{sources['y_' + split]}: {n_labels} labels for {n_images} images"
          f" in {sources['x_' + split]}"
      )
  return ArraySplit(
      name=name,
      x_train=_to_unit_float(arrays["x_train"])[..., None],
      y_train=_check_labels(arrays["y_train"], 10, sources["y_train"]),
      x_test=_to_unit_float(arrays["x_test"])[..., None],
      y_test=_check_labels(arrays["y_test"], 10, sources["y_test"]),
      num_classes=10,
  )


# IDX data sets read in this process: (name, each file's path, inode, size,
# modification and change times) -> the ArraySplit, its arrays read-only. A run reads
# Fashion-MNIST (0.3 to 1 s: gunzip and conversion to float32); a second run
# in the same process (a sweep, the tests, a resume) or forked from it (the
# tests' run server) reuses the arrays while the files are unchanged.
_IDX_SPLITS: dict = {}


def _file_signature(path: str) -> tuple:
  stat = os.stat(path)
  return (os.path.abspath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


def _load_idx_files(name: str, paths: dict[str, str]) -> ArraySplit:
  try:
    key = (name, tuple(_file_signature(paths[k]) for k in sorted(paths)))
  except OSError:
    key = None  # read_idx names the file and what is wrong
  split = _IDX_SPLITS.get(key) if key is not None else None
  if split is None:
    arrays = {k: read_idx(path) for k, path in paths.items()}
    split = _mnist_like_split(name, sources=paths, **arrays)
    for array in (split.x_train, split.y_train, split.x_test, split.y_test):
      array.flags.writeable = False
    if key is not None:
      _IDX_SPLITS.clear()  # one data set at a time: 220 MB for Fashion-MNIST
      _IDX_SPLITS[key] = split
  return split


def _download_fashion_mnist():
  """Keras' loader: reads its cache or downloads (needs the network)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf.keras.datasets.fashion_mnist.load_data()


def _search_dirs(data_dir: Optional[str]) -> tuple[str, ...]:
  """`data_dir` alone when given, else the Keras cache."""
  return (data_dir,) if data_dir is not None else (KERAS_DATASETS_DIR,)


def _idx_dir_problem(directory: str) -> str:
  return "has none of" if os.path.isdir(directory) else "is not a directory with"


def _load_fashion_mnist(data_dir: Optional[str]) -> ArraySplit:
  keras_dir = os.path.join(KERAS_DATASETS_DIR, "fashion-mnist")
  if data_dir is not None:
    paths = _find_idx_files(data_dir)
    if paths is None:
      raise DataError(
          f"{data_dir} {_idx_dir_problem(data_dir)} the Fashion-MNIST IDX files"
          f" ({', '.join(f'{base}[.gz]' for base in IDX_FILES.values())});"
          " leave --data_dir out to use"
          f" {DEBIAN_FASHION_MNIST_DIR} or the Keras cache"
      )
    return _load_idx_files("fashion_mnist", paths)
  searched = []
  for directory in (DEBIAN_FASHION_MNIST_DIR, keras_dir):
    searched.append(directory)
    paths = _find_idx_files(directory)
    if paths is not None:
      return _load_idx_files("fashion_mnist", paths)
  try:
    (x_train, y_train), (x_test, y_test) = _download_fashion_mnist()
  except Exception as e:  # pylint: disable=broad-except
    reason = f"{type(e).__name__}: {e}"
  else:
    source = "Keras fashion_mnist.load_data()"
    sources = dict.fromkeys(IDX_FILES, source)
    return _mnist_like_split(
        "fashion_mnist", x_train, y_train, x_test, y_test, sources
    )
  raise DataError(
      f"Fashion-MNIST not found (looked in {', '.join(searched)}): pass"
      " --data_dir=DIR with the IDX files (train-images-idx3-ubyte.gz,"
      " train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz,"
      " t10k-labels-idx1-ubyte.gz), or run `apt-get install"
      f" dataset-fashion-mnist` (installs {DEBIAN_FASHION_MNIST_DIR}), or let"
      f" Keras download it into {keras_dir} (that failed: {reason})"
  )


def _load_mnist(data_dir: Optional[str]) -> ArraySplit:
  files = ", ".join(f"{base}[.gz]" for base in IDX_FILES.values())
  if data_dir is None:
    raise DataError(
        "MNIST is not available offline: pass --data_dir=DIR with the IDX"
        f" files ({files})"
    )
  paths = _find_idx_files(data_dir)
  if paths is None:
    what = _idx_dir_problem(data_dir)
    raise DataError(f"{data_dir} {what} the MNIST IDX files ({files})")
  return _load_idx_files("mnist", paths)


# ---------------------------------------------------------------- CIFAR


def _unpickle(blob: bytes, source: str) -> dict:
  try:
    batch = pickle.loads(blob, encoding="bytes")
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
        f"{source}: not a readable CIFAR pickle ({type(e).__name__}: {e})"
    ) from None
  if not isinstance(batch, dict):
    raise DataError(
        f"{source}: CIFAR pickle holds {type(batch).__name__}, not a dict"
    )
  return batch


def _decode_cifar_batch(
    blob: bytes, source: str, label_key: str, num_classes: int
):
  batch = _unpickle(blob, source)

  def get(key):
    for k in (key.encode(), key):
      if k in batch:
        return batch[k]
    raise DataError(f"{source}: CIFAR pickle has no {key!r} entry")

  data = np.asarray(get("data"))
  if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
    raise DataError(
        f"{source}: 'data' must be uint8 of shape (N, 3072), got {data.dtype}"
        f" {data.shape}"
    )
  labels = _check_labels(get(label_key), num_classes, source)
  if len(labels) != len(data):
    raise DataError(f"{source}: {len(labels)} labels for {len(data)} images")
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return images, labels


def _cifar_blobs_from_dir(
    directory: str, names
) -> dict[str, tuple[bytes, str]]:
  out = {}
  for name in names:
    path = os.path.join(directory, name)
    try:
      with open(path, "rb") as f:
        out[name] = (f.read(), path)
    except OSError as e:
      raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
  return out


def _cifar_blobs_from_archive(archive: str, folder: str, names):
  out = {}
  try:
    with tarfile.open(archive, "r:*") as tar:
      members = {}
      for member in tar.getmembers():
        if member.isfile():
          members.setdefault(os.path.normpath(member.name), member)
      for name in names:
        member = members.get(os.path.join(folder, name)) or members.get(name)
        if member is None:
          raise DataError(f"{archive}: archive has no {folder}/{name}")
        out[name] = (tar.extractfile(member).read(), f"{archive}:{member.name}")
  except DataError:
    raise
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    raise DataError(
        f"{archive}: corrupt or unreadable archive ({type(e).__name__}: {e})"
    ) from None
  return out


def _find_cifar(directory: str, spec: dict):
  """The pickled batches in `directory`; None if they are not there.

  `directory` may hold the extracted folder, the batch files themselves, or
  the .tar.gz archive.
  """
  names = spec["train"] + spec["test"]
  folder = os.path.join(directory, spec["folder"])
  if os.path.isdir(folder):
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
      raise DataError(
          f"{folder}: incomplete CIFAR data, missing {', '.join(missing)}"
      )
    return _cifar_blobs_from_dir(folder, names)
  present = [n for n in names if os.path.isfile(os.path.join(directory, n))]
  if len(present) == len(names):
    return _cifar_blobs_from_dir(directory, names)
  archive = os.path.join(directory, spec["archive"])
  if os.path.isfile(archive):
    return _cifar_blobs_from_archive(archive, spec["folder"], names)
  if present:
    missing = [n for n in names if n not in present]
    raise DataError(
        f"{directory}: incomplete CIFAR data, missing {', '.join(missing)}"
    )
  return None


def _load_cifar(name: str, data_dir: Optional[str]) -> ArraySplit:
  spec = _CIFAR[name]
  blobs = None
  searched = []
  for directory in _search_dirs(data_dir):
    if directory is None:
      continue
    searched.append(directory)
    if os.path.isdir(directory):
      blobs = _find_cifar(directory, spec)
      if blobs is not None:
        break
  if blobs is None:
    raise DataError(
        f"{name} not found in {' or '.join(searched)}: pass --data_dir=DIR"
        f" holding {spec['folder']}/ (the python version), its files, or"
        f" {spec['archive']}"
    )
  splits = {}
  for split in ("train", "test"):
    images, labels = [], []
    for batch_name in spec[split]:
      blob, source = blobs[batch_name]
      x, y = _decode_cifar_batch(
          blob, source, spec["label_key"], spec["num_classes"]
      )
      images.append(x)
      labels.append(y)
    splits[split] = (
        _to_unit_float(np.concatenate(images)),
        np.concatenate(labels),
    )
  return ArraySplit(
      name=name,
      x_train=splits["train"][0],
      y_train=splits["train"][1],
      x_test=splits["test"][0],
      y_test=splits["test"][1],
      num_classes=spec["num_classes"],
  )


# ---------------------------------------------------------------- EMNIST


def _read_emnist_h5(path: str, num_classes: int):
  """(pixels (N, 28, 28, 1) float32, int32 labels, writer ids) of one file."""
  xs, ys, writers, counts = [], [], [], []
  try:
    with h5py.File(path, "r") as f:
      examples = f.get("examples")
      if not isinstance(examples, h5py.Group):
        raise DataError(
            f"{path}: no 'examples' group (expected TFF's EMNIST layout"
            " examples/<client_id>/{pixels,label})"
        )
      for writer in sorted(examples.keys()):
        group = examples[writer]
        where = f"{path}: examples/{writer}"
        if not isinstance(group, h5py.Group):
          raise DataError(f"{where} is not a group")
        pixels, label = group.get("pixels"), group.get("label")
        if not isinstance(pixels, h5py.Dataset) or not isinstance(
            label, h5py.Dataset
        ):
          raise DataError(f"{where} lacks the 'pixels' and 'label' datasets")
        pixels, label = pixels[()], label[()]
        if (
            pixels.ndim != 3
            or pixels.shape[1:] != (28, 28)
            or pixels.dtype.kind != "f"
        ):
          raise DataError(
              f"{where}/pixels: expected float (N, 28, 28), got {pixels.dtype}"
              f" {pixels.shape}"
          )
        label = np.asarray(label).reshape(-1) if np.ndim(label) == 2 else label
        label = _check_labels(label, num_classes, f"{where}/label")
        if len(label) != len(pixels):
          raise DataError(
              f"{where}: {len(label)} labels for {len(pixels)} images"
          )
        xs.append(pixels.astype(np.float32))
        ys.append(label)
        writers.append(writer)
        counts.append(len(label))
  except DataError:
    raise
  except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
    raise DataError(
        f"{path}: not a readable h5 file ({type(e).__name__}: {e})"
    ) from None
  if not writers or sum(counts) == 0:
    raise DataError(f"{path}: the 'examples' group holds no examples")
  x = np.concatenate(xs)
  if x.min() < 0.0 or x.max() > 1.0:
    raise DataError(
        f"{path}: pixel values outside [0, 1] ({x.min()}..{x.max()})"
    )
  ids = np.repeat(np.array(writers, dtype=str), counts)
  return x[..., None], np.concatenate(ys), ids


def _load_emnist(name: str, data_dir: Optional[str]) -> ArraySplit:
  train_name, test_name, num_classes = _EMNIST[name]
  searched = []
  for directory in _search_dirs(data_dir):
    if directory is None:
      continue
    searched.append(directory)
    train_path = os.path.join(directory, train_name)
    test_path = os.path.join(directory, test_name)
    have_train, have_test = os.path.isfile(train_path), os.path.isfile(
        test_path
    )
    if have_train != have_test:
      missing = test_path if have_train else train_path
      raise DataError(
          f"{missing}: missing (the {name} train and test h5 files go together)"
      )
    if have_train:
      x_train, y_train, train_ids = _read_emnist_h5(train_path, num_classes)
      x_test, y_test, test_ids = _read_emnist_h5(test_path, num_classes)
      return ArraySplit(
          name=name,
          x_train=x_train,
          y_train=y_train,
          x_test=x_test,
          y_test=y_test,
          num_classes=num_classes,
          train_client_ids=train_ids,
          test_client_ids=test_ids,
      )
  raise DataError(
      f"{name} not found: {train_name} and {test_name} are not in"
      f" {' or '.join(searched)}; pass --data_dir=DIR holding TFF's EMNIST h5"
      " files"
  )


_LOADERS: dict[str, Callable[[Optional[str]], ArraySplit]] = {
    "fashion_mnist": _load_fashion_mnist,
    "mnist": _load_mnist,
    "cifar10": lambda d: _load_cifar("cifar10", d),
    "cifar100": lambda d: _load_cifar("cifar100", d),
    "emnist": lambda d: _load_emnist("emnist", d),
    "femnist": lambda d: _load_emnist("femnist", d),
}
assert tuple(_LOADERS) == DATASETS


def load_arrays(name: str, data_dir: Optional[str] = None) -> ArraySplit:
  """Loads data set `name` (one of DATASETS) as float32 NHWC arrays in [0, 1].

  Raises:
    DataError: unknown name, files missing, or files unreadable.
  """
  if name not in _LOADERS:
    raise DataError(
        f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}"
    )
  if data_dir is not None:
    data_dir = os.path.expanduser(os.fspath(data_dir))
  return _LOADERS[name](data_dir)
