"""Command line: export a saved Keras model to sparse TFLite and report on it.

  python -m tflite_export --checkpoint=RUN/final_model.keras \
      --output=RUN/tflite [--quantization=float32|float16|int8] \
      [--dataset=fashion_mnist] [--data_dir=DIR]

--checkpoint is a Keras model file written by `model.save(path)` (a plain,
unwrapped model), or a directory holding final_model.keras. A config.json
beside it (keys "dataset", "data_dir") gives the defaults for --dataset and
--data_dir. Writes model.tflite and tflite_report.json into --output.
Bad input (missing or unreadable checkpoint, a data set that does not fit the
model, an unknown quantisation mode, missing data) ends with one line
"error: ..." on stderr and exit status 1.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app
from absl import flags
from absl import logging
import numpy as np

from tflite_export import QUANTIZATION_MODES

CHECKPOINT_FILE = "final_model.keras"
REPORT_FILE = "tflite_report.json"
CONFIG_FILE = "config.json"

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint",
    None,
    f"Saved Keras model file, or a directory with {CHECKPOINT_FILE}.",
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "Directory for model.tflite and the report."
)
_QUANTIZATION = flags.DEFINE_string(
    "quantization", "float32", f"One of {', '.join(QUANTIZATION_MODES)}."
)
_DATASET = flags.DEFINE_string(
    "dataset",
    None,
    "Evaluation data set (default: config.json beside the checkpoint).",
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    None,
    "Where the data set's files are (default: config.json, then the loader's).",
)
_LATENCY_EXAMPLES = flags.DEFINE_integer(
    "latency_examples", 1000,
    "Timed batch-1 examples per exported file (one per test image while "
    "there are enough).",
)
_REPRESENTATIVE_EXAMPLES = flags.DEFINE_integer(
    "representative_examples", 300, "Training images used to calibrate int8."
)
_TEST_EXAMPLES = flags.DEFINE_integer(
    "test_examples", 0, "Evaluate on the first N test images only (0: all)."
)
_NUM_THREADS = flags.DEFINE_integer(
    "num_threads", 1, "TFLite interpreter threads."
)


# The smallest value each integer flag takes.
_LEAST = {
    "latency_examples": 0,
    "representative_examples": 1,
    "test_examples": 0,
    "num_threads": 1,
}


class CliError(Exception):
  """A problem with the command line's input, reported as one line."""


def _one_line(error: BaseException) -> str:
  text = " ".join(str(error).split())
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def resolve_checkpoint(path: str) -> str:
  if os.path.isdir(path):
    path = os.path.join(path, CHECKPOINT_FILE)
  if not os.path.isfile(path):
    raise CliError(f"checkpoint not found: {path}")
  return path


def read_config(checkpoint: str) -> dict:
  """config.json beside the checkpoint, or {} if there is none."""
  path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), CONFIG_FILE)
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise CliError(f"cannot read {path}: {_one_line(e)}") from None
  if not isinstance(config, dict):
    raise CliError(f"{path} does not hold a JSON object")
  return config


def load_checkpoint(path: str):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  try:
    model = tf.keras.models.load_model(path, compile=False)
  except Exception as e:  # Keras raises many types for a bad file.
    raise CliError(f"cannot load checkpoint {path}: {_one_line(e)}") from None
  if not isinstance(model, tf.keras.Model):
    raise CliError(f"checkpoint {path} does not hold a Keras model")
  return model


def load_data(dataset: str, data_dir):
  try:
    # pylint: disable-next=g-import-not-at-top
    from tff_feddst.data import DataError, load_arrays
  except ImportError as e:
    raise CliError(
        f"the data package tff_feddst.data is unavailable: {_one_line(e)}"
    ) from None
  try:
    return load_arrays(dataset, data_dir=data_dir)
  except (DataError, ValueError, OSError) as e:
    raise CliError(f"cannot load data set {dataset!r}: {e}") from None


def check_fits(model, data, dataset: str) -> None:
  """Raises CliError unless the model fits the data set's images and classes."""
  model_shape = tuple(int(d) for d in model.input_shape[1:])
  model_classes = int(model.output_shape[-1])
  data_shape = tuple(int(d) for d in data.input_shape)
  if model_shape != data_shape or model_classes != int(data.num_classes):
    raise CliError(
        f"the model takes images of shape {model_shape} and has "
        f"{model_classes} classes; data set {dataset!r} has images of "
        f"shape {data_shape} and {data.num_classes} classes"
    )


def _representative(x_train: np.ndarray, count: int) -> np.ndarray:
  rng = np.random.default_rng(0)
  count = min(count, len(x_train))
  return x_train[np.sort(rng.choice(len(x_train), size=count, replace=False))]


def run(argv_flags) -> dict:
  """Does the export for parsed flags; returns the report. Raises CliError."""
  if argv_flags["quantization"] not in QUANTIZATION_MODES:
    raise CliError(
        f"unknown quantization {argv_flags['quantization']!r}; choose one of "
        f"{', '.join(QUANTIZATION_MODES)}"
    )
  for name in ("checkpoint", "output"):
    if not argv_flags[name]:
      raise CliError(f"--{name} is required")
  checkpoint = resolve_checkpoint(argv_flags["checkpoint"])
  config = read_config(checkpoint)
  dataset = argv_flags["dataset"] or config.get("dataset")
  if not dataset:
    raise CliError(
        f"no --dataset given and no {CONFIG_FILE} with a dataset name "
        "beside the checkpoint"
    )
  data_dir = argv_flags["data_dir"] or config.get("data_dir")
  _quiet_logs()  # imports TensorFlow: every check above answers without it
  model = load_checkpoint(checkpoint)
  data = load_data(dataset, data_dir)
  check_fits(model, data, dataset)
  x_test, y_test = data.x_test, data.y_test
  if argv_flags["test_examples"] > 0:
    x_test, y_test = (
        x_test[: argv_flags["test_examples"]],
        y_test[: argv_flags["test_examples"]],
    )
  # pylint: disable-next=g-import-not-at-top
  from tflite_export.report import export_and_report

  try:
    return export_and_report(
        model,
        output_dir=argv_flags["output"],
        x_test=x_test,
        y_test=y_test,
        client_test_indices=None,
        representative_data=_representative(
            data.x_train, argv_flags["representative_examples"]
        ),
        quantization=argv_flags["quantization"],
        latency_examples=argv_flags["latency_examples"],
        num_threads=argv_flags["num_threads"],
    )
  except OSError as e:
    raise CliError(
        f"cannot write to {argv_flags['output']}: {_one_line(e)}"
    ) from None


def _summary(report: dict, output: str) -> str:
  sparse, dense = report["exports"]["sparse"], report["exports"]["dense"]
  model_path = os.path.join(output, report["model_file"])
  report_path = os.path.join(output, REPORT_FILE)
  latency = _ms(sparse["batch1_latency_median_ms"])
  return "\n".join(
      [
          f"wrote {model_path} ({sparse['size_bytes']} bytes, "
          f"{sparse['num_sparse_tensors']} sparse tensors, "
          f"{report['quantization']}) and {report_path}",
          f"weight sparsity {report['weight_sparsity']:.3f}; size sparse/dense "
          f"{report['size_ratio_sparse_dense']:.3f} "
          f"({dense['size_bytes']} bytes dense)",
          f"accuracy keras {report['keras']['accuracy']:.4f}, "
          f"tflite {sparse['accuracy']:.4f}; batch-1 latency median {latency}",
      ]
  )


def _ms(value) -> str:
  return "not measured" if value is None else f"{value:.3f} ms"


def _quiet_logs() -> None:
  """Warnings and errors only, unless --verbosity was given."""
  if flags.FLAGS["verbosity"].present:
    return
  logging.set_verbosity(logging.WARNING)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.get_logger().setLevel("WARNING")


def main(argv) -> None:
  if len(argv) > 1:
    raise CliError(f"unexpected arguments: {' '.join(argv[1:])}")
  names = (
      "checkpoint",
      "output",
      "quantization",
      "dataset",
      "data_dir",
      "latency_examples",
      "representative_examples",
      "test_examples",
      "num_threads",
  )
  values = {name: flags.FLAGS[name].value for name in names}
  for name, least in _LEAST.items():
    if values[name] < least:
      raise CliError(f"--{name} must be >= {least}, got {values[name]}")
  report = run(values)
  print(_summary(report, values["output"]))


def _main_or_exit(argv) -> None:
  try:
    main(argv)
  except CliError as e:
    sys.stdout.flush()
    sys.stderr.write(f"error: {e}\n")
    sys.stderr.flush()
    sys.exit(1)


if __name__ == "__main__":
  from tff_feddst import runtime  # pylint: disable=g-import-not-at-top

  runtime.install_shutdown_handlers()
  app.run(_main_or_exit)
