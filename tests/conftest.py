"""Shared test set-up: quiet TensorFlow, and no TFF worker left behind."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from tff_feddst import runtime  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _stop_tff_worker_at_end():
  runtime.install_shutdown_handlers()
  yield
  runtime.stop_tff_workers()
