"""Round cost against the pool size, locally and on loopback TFF workers.

    python -m benchmarks.workers --output_dir=runs/workers
    python -m benchmarks.workers --pools=40 --clients_per_round_list=4 \\
        --worker_counts=0,2 --rounds=2 --output_dir=runs/workers_quick   # smoke

For each pool size N (--pools), clients per round K
(--clients_per_round_list) and number of workers W (--worker_counts; 0:
the one-machine run), runs `run.py --algorithm=fedavg` with one Fashion-MNIST
training image per client (`_partition_flags`: up to 10,000 clients
`--partition=pathological --classes_per_client=1 --examples_per_class=1`,
which needs a test image of the client's class for each; 60,000 clients
`--partition=iid`, one image each of the whole training split) and,
for W > 0, W workers started with `python -m tff_feddst.worker` on loopback
ports. Records the median `round_seconds` of the rounds after the first, the
median `round_grpc_bytes`, and the peak RSS of the driver process alone
(sampled every 0.1 s; workers and the local TFF worker are not included).
Round cost should depend on K, not on N.

Writes --output_dir/workers.csv (one row per case) and prints it.
"""

import contextlib
import csv
import io
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

import grpc
import portpicker
import psutil
from absl import app
from absl import flags

from tff_feddst import files

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLUMNS = (
    "pool", "clients_per_round", "workers", "seconds_per_round",
    "round_grpc_bytes", "driver_peak_rss_mib", "wall_seconds",
)



def define_flags():
  """The command line's flags (defined when run, not on import, so that a
  test may import this module next to others that define flags)."""
  flags.DEFINE_list("pools", ["400", "6000", "60000"], "Pool sizes N.")
  flags.DEFINE_list("clients_per_round_list", ["20", "100"], "Clients per round K.")
  flags.DEFINE_list("worker_counts", ["0", "1", "2"], "Loopback workers (0: local).")
  flags.DEFINE_integer("rounds", 6, "Rounds per case (the first is not measured).")
  flags.DEFINE_string("output_dir", "runs/workers", "Where outputs go.")


@contextlib.contextmanager
def loopback_workers(count: int):
  """`count` workers on free loopback ports; stopped on the way out."""
  procs, addresses = [], []
  try:
    for _ in range(count):
      port = portpicker.pick_unused_port()
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "tff_feddst.worker", f"--port={port}"],
          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
      ))
      addresses.append(f"localhost:{port}")
      channel = grpc.insecure_channel(addresses[-1])
      grpc.channel_ready_future(channel).result(timeout=120)
      channel.close()
    yield addresses
  finally:
    for proc in procs:
      proc.terminate()
    for proc in procs:
      proc.wait(timeout=60)


# Fashion-MNIST: training images, and test images of each of its 10 classes.
TRAIN_IMAGES, TEST_IMAGES_PER_CLASS = 60000, 1000


def _partition_flags(pool: int) -> list[str]:
  """run.py flags that give each of `pool` clients one training image."""
  if pool == TRAIN_IMAGES:
    return ["--partition=iid"]
  if pool <= 10 * TEST_IMAGES_PER_CLASS:
    return ["--partition=pathological", "--classes_per_client=1", "--examples_per_class=1"]
  raise ValueError(
      f"pool {pool}: one image per client needs at most {10 * TEST_IMAGES_PER_CLASS}"
      f" clients (pathological) or exactly {TRAIN_IMAGES} (iid)"
  )


def _driver_run(pool, k, addresses, out_dir, rounds) -> float:
  """Runs the driver; returns its peak RSS in MiB."""
  cmd = [
      sys.executable, "run.py", "--algorithm=fedavg", *_partition_flags(pool),
      f"--total_clients={pool}",
      f"--clients_per_round={k}", f"--rounds={rounds}", f"--eval_every={rounds}",
      f"--checkpoint_every={rounds}", f"--workers={','.join(addresses)}",
      f"--output_dir={out_dir}",
  ]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
  driver, peak = psutil.Process(proc.pid), 0
  while proc.poll() is None:
    with contextlib.suppress(psutil.Error):
      peak = max(peak, driver.memory_info().rss)
    time.sleep(0.1)
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} exited with status {proc.returncode}")
  return peak / 2**20


def measure(pool: int, k: int, workers: int, rounds: int, output_dir: str) -> dict:
  out_dir = os.path.join(output_dir, f"n{pool}_k{k}_w{workers}")
  shutil.rmtree(out_dir, ignore_errors=True)
  started = time.time()
  with loopback_workers(workers) as addresses:
    peak = _driver_run(pool, k, addresses, out_dir, rounds)
  with open(os.path.join(out_dir, "metrics.csv"), newline="") as f:
    rows = list(csv.DictReader(f))[1:]
  grpc_bytes = [float(r["round_grpc_bytes"]) for r in rows if r.get("round_grpc_bytes")]
  return dict(
      pool=pool, clients_per_round=k, workers=workers,
      seconds_per_round=round(statistics.median(float(r["round_seconds"]) for r in rows), 3),
      round_grpc_bytes=int(statistics.median(grpc_bytes)) if grpc_bytes else "",
      driver_peak_rss_mib=round(peak, 1),
      wall_seconds=round(time.time() - started, 1),
  )


def main(argv):
  del argv
  opts = flags.FLAGS
  for pool in map(int, opts.pools):
    _partition_flags(pool)  # a pool it cannot measure fails before any run
  results = []
  for pool in map(int, opts.pools):
    for k in map(int, opts.clients_per_round_list):
      for workers in map(int, opts.worker_counts):
        if k > pool:
          continue
        results.append(measure(pool, k, workers, opts.rounds, opts.output_dir))
        print(results[-1], flush=True)
  text = io.StringIO()
  writer = csv.DictWriter(text, COLUMNS)
  writer.writeheader()
  writer.writerows(results)
  files.write_atomic(os.path.join(opts.output_dir, "workers.csv"), text.getvalue())
  print(text.getvalue())


if __name__ == "__main__":
  define_flags()
  app.run(main)
