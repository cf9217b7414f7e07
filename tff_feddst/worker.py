"""One TFF worker serving client computations on a gRPC port.

  python -m tff_feddst.worker --port=8000 [--max_concurrent_calls=K]

Starts the `worker_binary` packaged with `tensorflow_federated` (its
`data/` folder) on `--port` (all interfaces, plaintext gRPC, no
authentication: keep the port on a private network or a tunnel), forwards
SIGINT and SIGTERM to it and exits with its status. A driver reaches it with
`run.py --workers=host:port,...` (README "Several machines").

The package's environment reaches the binary: TensorFlow's oneDNN kernels
are on (`TF_ENABLE_ONEDNN_OPTS=1` unless set), which the cohort client
engine needs for the gradients of grouped convolutions. Importing
`tensorflow_federated` here would start a local worker of its own, so the
binary is found from the package's location instead.
"""

import argparse
import importlib.util
import os
import signal
import sys

import tff_feddst  # noqa: F401  (sets TF_ENABLE_ONEDNN_OPTS before the binary starts)
from tff_feddst import runtime

BINARY_NAME = "worker_binary"
_FORWARDED = (signal.SIGINT, signal.SIGTERM)


def binary_path() -> str:
  """The worker binary shipped in the installed `tensorflow_federated`."""
  spec = importlib.util.find_spec("tensorflow_federated")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("tensorflow_federated is not installed")
  package_dir = list(spec.submodule_search_locations)[0]
  path = os.path.join(package_dir, "data", BINARY_NAME)
  if not os.access(path, os.X_OK):
    raise FileNotFoundError(f"no executable {BINARY_NAME} at {path}")
  return path


def binary_args(port: int, max_concurrent_calls: int) -> list[str]:
  """The command line of the worker binary."""
  return [
      binary_path(),
      f"--port={port}",
      f"--max_concurrent_computation_calls={max_concurrent_calls}",
  ]


def _parse(argv) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m tff_feddst.worker", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--port", type=int, required=True,
                      help="gRPC port to serve on (all interfaces).")
  parser.add_argument("--max_concurrent_calls", type=int, default=-1,
                      help="Client computations run in parallel (<= 0: no limit).")
  args = parser.parse_args(argv)
  if not 1 <= args.port <= 65535:
    parser.error(f"--port={args.port} must be in [1, 65535]")
  return args


def serve(port: int, max_concurrent_calls: int = -1) -> int:
  """Runs the worker binary until it exits; returns its exit status.

  SIGINT and SIGTERM are passed on to the binary, which then ends; this
  process waits for it, so no worker outlives its launcher.
  """
  args = binary_args(port, max_concurrent_calls)
  # The kernel kills the binary if this launcher itself is killed.
  proc = runtime.popen_dying_with_parent(args)

  def forward(signum, frame):
    del frame
    if proc.poll() is None:
      proc.send_signal(signum)

  for signum in _FORWARDED:
    signal.signal(signum, forward)
  print(f"TFF worker serving on port {port} (pid {proc.pid})", flush=True)
  status = proc.wait()
  return 128 - status if status < 0 else status


def main(argv=None) -> int:
  args = _parse(sys.argv[1:] if argv is None else argv)
  try:
    return serve(args.port, args.max_concurrent_calls)
  except (FileNotFoundError, PermissionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1


if __name__ == "__main__":
  sys.exit(main())
