"""Times finished runs' TFLite exports again, one after the other, and
tabulates them.

    python -m benchmarks.retime_runs --runs_dir=runs/kernel_blocks \
        --output_dir=runs/kernel_blocks/latency_quiet

A run's own `tflite_report.json` is timed while it trains the next run or
shares the machine with other work. This exports every run's
`final_model.keras` again (`tflite_export.export_and_report`: its sparse
and dense exports, in the run's quantisation, 1 thread, batch 1,
--latency_examples test images), in one sequence on a quiet machine, and
writes each report to <output_dir>/<run>.json and a table (retimed.md) of
every run: clients_accuracy at its last evaluation and the mean of its last
--last_evals evaluations, the sparse file's bytes, the sparse and dense
medians and their ratio, and which convolutions the export runs over their
kept (input, output) channel pairs only (`tflite_export.pair_sparse`).
A run whose report is already in --output_dir is not timed again.
"""

import csv
import json
import os
import shutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
# TensorFlow is imported here, not inside main: imported after absl has
# parsed the command line, Keras cannot load a saved Sequential model
# ("Output tensors of a Sequential model must be the output of a
# TensorFlow `Layer`"; TF 2.14).
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tff_feddst import files  # noqa: E402
from tff_feddst.data import load_arrays  # noqa: E402
from tflite_export.report import export_and_report  # noqa: E402


def define_flags() -> None:
  flags.DEFINE_string("runs_dir", None, "A folder of run.py output folders (each with summary.json).")
  flags.DEFINE_string("output_dir", None, "Where the reports and retimed.md go (default <runs_dir>/latency_quiet).")
  flags.DEFINE_integer("latency_examples", 1000, "Timed single-image invokes per export.", lower_bound=1)
  flags.DEFINE_integer("last_evals", 4, "Evaluations averaged at the end of each run.", lower_bound=1)
  flags.DEFINE_string("data_dir", None, "Fashion-MNIST folder (default: the run's).")
  flags.mark_flag_as_required("runs_dir")


class Retimer:
  """Exports and times runs' final models one at a time: `retimer(run_dir,
  path)` writes `export_and_report`'s report of <run_dir>/final_model.keras
  (the run's quantisation, 1 thread, `latency_examples` test images) to
  `path` and returns it. The test data (and 300 training images for int8
  calibration, as `python -m tflite_export` takes) are read once, from
  `data_dir` or the first run's."""

  def __init__(self, work_dir: str, latency_examples: int = 1000, data_dir: str | None = None):
    self._work, self._latency_examples, self._data_dir = work_dir, latency_examples, data_dir
    self._data = self._representative = None

  def __call__(self, run_dir: str, path: str) -> dict:
    with open(os.path.join(run_dir, "config.json")) as f:
      config = json.load(f)
    if self._data is None:
      self._data = load_arrays(
          config.get("dataset", "fashion_mnist"), data_dir=self._data_dir or config.get("data_dir")
      )
      rng = np.random.default_rng(0)
      x_train = self._data.x_train
      self._representative = x_train[np.sort(rng.choice(len(x_train), 300, replace=False))]
    model = tf.keras.models.load_model(os.path.join(run_dir, "final_model.keras"), compile=False)
    shutil.rmtree(self._work, ignore_errors=True)
    try:
      report = export_and_report(
          model, output_dir=self._work, x_test=self._data.x_test, y_test=self._data.y_test,
          representative_data=self._representative,
          quantization=config.get("tflite_quantization", "float32"),
          latency_examples=self._latency_examples, num_threads=1,
      )
    finally:
      shutil.rmtree(self._work, ignore_errors=True)
    files.write_atomic(path, files.json_text(report))
    return report


def finished_runs(runs_dir: str) -> list[str]:
  """The sub-folders of `runs_dir` with a summary.json and a final model, sorted."""
  return sorted(
      name for name in os.listdir(runs_dir)
      if os.path.exists(os.path.join(runs_dir, name, "summary.json"))
      and os.path.exists(os.path.join(runs_dir, name, "final_model.keras"))
  )


def accuracies(run_dir: str, last: int) -> tuple[float, float]:
  """(clients_accuracy at the last evaluation, mean over the last `last`)."""
  with open(os.path.join(run_dir, "metrics.csv")) as f:
    values = [float(r["clients_accuracy"]) for r in csv.DictReader(f) if r["clients_accuracy"]]
  tail = values[-last:]
  return values[-1], sum(tail) / len(tail)


def row(name: str, run_dir: str, report: dict, last: int) -> dict:
  """A run's line of the table: `accuracies` and its quiet `report`'s figures."""
  last_accuracy, mean_last = accuracies(run_dir, last)
  sparse, dense = report["exports"]["sparse"], report["exports"]["dense"]
  return {
      "run": name, "last": last_accuracy, "mean_last": mean_last, "bytes": sparse["size_bytes"],
      "sparse_ms": sparse["batch1_latency_median_ms"], "dense_ms": dense["batch1_latency_median_ms"],
      "ratio": report["latency_ratio_sparse_dense"],
      "pairs": [c["layer"] for c in report.get("pair_sparse_convs", []) if c["rewritten"]],
  }


def table(rows: list[dict], last: int) -> str:
  lines = [
      f"| run | clients_accuracy, last (mean of last {last}) | sparse file bytes | sparse ms | dense ms | x dense | convolutions over kept pairs |",
      "|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    lines.append(
        f"| {r['run']} | {r['last']:.4f} ({r['mean_last']:.4f}) | {r['bytes']:,} | "
        f"{r['sparse_ms']:.4f} | {r['dense_ms']:.4f} | {r['ratio']:.2f}x | {', '.join(r['pairs']) or 'none'} |"
    )
  return "\n".join(lines)


def main(argv) -> int:
  del argv
  f = flags.FLAGS
  output_dir = f.output_dir or os.path.join(f.runs_dir, "latency_quiet")
  os.makedirs(output_dir, exist_ok=True)
  retimer = Retimer(os.path.join(output_dir, ".work"), f.latency_examples, f.data_dir)
  rows = []
  for name in finished_runs(f.runs_dir):
    run_dir = os.path.join(f.runs_dir, name)
    path = os.path.join(output_dir, f"{name}.json")
    if not os.path.exists(path):
      retimer(run_dir, path)
    with open(path) as fh:
      rows.append(row(name, run_dir, json.load(fh), f.last_evals))
    print(f"{name}: {rows[-1]['sparse_ms']:.4f} ms ({rows[-1]['ratio']:.2f}x dense)", flush=True)
  text = table(rows, f.last_evals)
  print(text)
  files.write_atomic(os.path.join(output_dir, "retimed.md"), text + "\n")
  return 0


if __name__ == "__main__":
  define_flags()
  sys.exit(app.run(main))
