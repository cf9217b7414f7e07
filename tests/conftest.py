"""Shared test set-up: quiet TensorFlow, no TFF worker left behind, and the
Fashion-MNIST check used by every test that needs the real data set.

Where Fashion-MNIST is missing, those tests are skipped, except under CI
(environment variable CI=true), where a missing data set is a failure: CI
installs it (`make data`), so its absence there is a broken set-up, not a
reason to pass quietly.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

import tff_feddst  # noqa: E402,F401  (its settings for TensorFlow, before any test imports it)

import run_server  # noqa: E402

# TensorFlow is imported by the test modules, not here: pytest-xdist's
# controller loads this file too, and runs no test. Importing TensorFlow
# there (`tff_feddst.data` does) held both passes of `make test` back by
# 5 s each before their test processes started.

FASHION_MNIST_IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@pytest.fixture(scope="session", autouse=True)
def _stop_tff_worker_at_end():
  # TensorFlow sets TF2_BEHAVIOR=1 in os.environ when imported (here, while
  # the tests were collected); the commands the tests start must see the
  # environment of a fresh shell, where `tff_feddst` sets it (its __init__).
  os.environ.pop("TF2_BEHAVIOR", None)
  from tff_feddst import runtime  # pylint: disable=g-import-not-at-top

  runtime.install_shutdown_handlers()
  runtime.install_local_context()  # what runs use (runtime.managed_runtime)
  runtime.tie_workers_to_this_process()
  yield
  run_server.close()  # and the runs it forked, if any is still going
  runtime.stop_tff_workers()


def _debian_fashion_mnist_dir() -> str:
  from tff_feddst.data import loaders  # pylint: disable=g-import-not-at-top

  return loaders.DEBIAN_FASHION_MNIST_DIR


def fashion_mnist_missing(detail: str, directory: str | None = None):
  """Skips the calling test, or fails it when CI=true. Never returns."""
  directory = directory or _debian_fashion_mnist_dir()
  reason = f"Fashion-MNIST unavailable ({directory}; run `make data`): {detail}"
  if os.environ.get("CI", "").lower() == "true":
    pytest.fail(f"CI=true: {reason}", pytrace=False)
  pytest.skip(reason)


def require_fashion_mnist_dir(directory: str | None = None) -> str:
  """The directory holding Fashion-MNIST's four IDX .gz files.

  `directory` defaults to the Debian package's (loaders.DEBIAN_FASHION_MNIST_DIR);
  if a file is missing, see `fashion_mnist_missing`.
  """
  directory = directory or _debian_fashion_mnist_dir()
  missing = [
      f for f in FASHION_MNIST_IDX_FILES
      if not os.path.exists(os.path.join(directory, f))
  ]
  if missing:
    fashion_mnist_missing(f"missing {', '.join(missing)}", directory)
  return directory


def require_fashion_mnist():
  """Loads Fashion-MNIST as run.py does (`data.load_arrays`): the Debian
  directory, then the Keras cache, then a Keras download. Returns the
  `ArraySplit`; if none works, see `fashion_mnist_missing`."""
  from tff_feddst import data  # pylint: disable=g-import-not-at-top

  try:
    return data.load_arrays("fashion_mnist")
  except data.DataError as e:
    detail = str(e)
  fashion_mnist_missing(detail)  # outside `except`: no chained traceback


@pytest.fixture(scope="session")
def fashion_mnist_available():
  """For tests that need Fashion-MNIST: where it does not load, they are
  skipped (CI=true: they fail). The arrays are not kept; call
  `require_fashion_mnist()` for them."""
  require_fashion_mnist()


# The first images of Fashion-MNIST's splits, for runs whose checks do not
# depend on the data set's size (a resumed run against an uninterrupted one,
# remote workers against local, outputs, faults): each evaluation of a run
# classifies the whole test split, 10,000 images in about 1 s of the suite's
# time, and these runs evaluate often. 12,000 training images hold at least
# 1,100 of each class, enough for every pathological split the tests make
# (40 clients of 2 classes and 20 examples each take 160 of a class).
SMALL_FASHION_MNIST_SIZES = {"train": 12_000, "t10k": 2_000}


@pytest.fixture(scope="session")
def small_fashion_mnist(tmp_path_factory, fashion_mnist_available):
  """A directory for `--data_dir` (dataset fashion_mnist) holding the first
  SMALL_FASHION_MNIST_SIZES images and labels of the real files, in their
  IDX format."""
  from tff_feddst.data import idx  # pylint: disable=g-import-not-at-top

  source = require_fashion_mnist_dir()
  directory = tmp_path_factory.mktemp("small_fashion_mnist")
  for name in FASHION_MNIST_IDX_FILES:
    array = idx.read_idx(os.path.join(source, name))
    idx.write_idx(str(directory / name), array[: SMALL_FASHION_MNIST_SIZES[name.split("-")[0]]])
  return str(directory)


# Seconds each test module took in one pass of the suite (2-core machine,
# 2026-12-06, both passes' largest, with the run server). `make test` runs
# modules whole on two processes (`--dist loadfile --no-loadscope-reorder`)
# in this order, the longest first, so that the last module to start is a
# short one and both processes finish together (xdist's default order,
# most tests first, left the slowest modules, which have few tests, for
# last). A module missing here counts as MODULE_SECONDS_DEFAULT.
MODULE_SECONDS = {
    "test_cohort": 130, "test_workers": 100, "test_resilience": 83, "test_golden": 70,
    "test_compact_messages": 60, "test_outputs": 40, "test_run_e2e": 35, "test_tflite_export": 34,
    "test_lotteryfl": 32, "test_structured_run": 29, "test_benchmarks_speed": 27,
    "test_structured": 25, "test_tier_work": 21, "test_prunefl": 21, "test_pruning_init": 21,
    "test_cli": 18, "test_feddst_process": 14, "test_config": 10, "test_block_masks": 35,
    "test_schedules": 10, "test_op_profile": 9, "test_benchmarks_report": 4, "test_messages": 3,
    "test_models": 3, "test_masks": 2, "test_data": 2, "test_tiers": 1,
}
MODULE_SECONDS_DEFAULT = 10


def pytest_collection_modifyitems(config, items):
  del config
  def weight(item):
    return MODULE_SECONDS.get(item.module.__name__.rsplit(".", 1)[-1], MODULE_SECONDS_DEFAULT)

  order = {id(item): i for i, item in enumerate(items)}
  items.sort(key=lambda item: (-weight(item), order[id(item)]))
