"""Export a trained model to sparse TFLite and report what that buys.

`export_and_report` converts the model twice with the same weights (sparse
encoding and plain dense encoding, in the chosen quantisation; for float16
and int8 also both float32 variants), evaluates every file with the TFLite
interpreter (and times it on the standalone runtime where installed), says
of every sparse tensor whether the runtime keeps it sparse, and writes,
into `output_dir`:
  model.tflite        the sparse export in the chosen quantisation;
  tflite_report.json  the figures below (see `export_and_report`).
Both files are written atomically (`tff_feddst.files.write_atomic`), model
first and report last: after a failure neither is half-written, and the
report's model_sha256 names the model it describes.
"""

import hashlib
import importlib.util
import os
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from keras_models import networks
from tff_feddst import files
from tflite_export import inspect_model
from tflite_export import pair_sparse
from tflite_export.convert import check_quantization, convert, export_model
from tflite_export.evaluate import DEFAULT_LATENCY_EXAMPLES
from tflite_export.evaluate import accuracy_of
from tflite_export.evaluate import batch1_latency_ms
from tflite_export.evaluate import evaluate_tflite
from tflite_export.evaluate import litert_interpreter
from tflite_export.evaluate import mean_client_accuracy

MODEL_FILE = "model.tflite"
REPORT_FILE = "tflite_report.json"


def weight_sparsity(model: tf.keras.Model) -> tuple[float, dict[str, float]]:
  """Zeros / all over the Conv2D and Dense kernels: global, and per layer."""
  zeros = total = 0
  per_layer = {}
  for layer in networks.prunable_layers(model):
    kernel = layer.kernel.numpy()
    layer_zeros = int(np.count_nonzero(kernel == 0))
    per_layer[layer.name] = layer_zeros / kernel.size
    zeros += layer_zeros
    total += kernel.size
  return (zeros / total if total else 0.0), per_layer


def keras_metrics(
    model: tf.keras.Model,
    x: np.ndarray,
    y: np.ndarray,
    client_indices: Optional[Sequence[np.ndarray]],
    batch_size: int,
) -> dict:
  """The Keras model's own test accuracy (and mean client accuracy)."""
  logits = model.predict(x, batch_size=batch_size, verbose=0)
  predictions = np.argmax(logits, axis=-1)
  result = {"accuracy": accuracy_of(predictions, y)}
  if client_indices is not None:
    result["clients_accuracy"] = mean_client_accuracy(
        predictions, y, client_indices
    )
  return result


def _variants(quantization: str) -> list[tuple[str, bool, str]]:
  variants = [("sparse", True, quantization), ("dense", False, quantization)]
  if quantization != "float32":
    variants += [
        ("sparse_float32", True, "float32"),
        ("dense_float32", False, "float32"),
    ]
  return variants


def _write_outputs(output_dir: str, model_content: bytes, report: dict) -> None:
  os.makedirs(output_dir, exist_ok=True)
  files.write_atomic(os.path.join(output_dir, MODEL_FILE), model_content)
  files.write_atomic(
      os.path.join(output_dir, REPORT_FILE), files.json_text(report, strict=True)
  )


def _checked_test_split(x_test, y_test) -> tuple[np.ndarray, np.ndarray]:
  """The test split as float32 images and flat labels, checked non-empty."""
  x_test = np.asarray(x_test, dtype=np.float32)
  y_test = np.asarray(y_test).reshape(-1)
  if len(x_test) == 0 or len(x_test) != len(y_test):
    raise ValueError(
        f"need a non-empty test split with one label per image; got "
        f"{len(x_test)} images and {len(y_test)} labels"
    )
  return x_test, y_test


def _check_input_shape(plain: tf.keras.Model, x_test: np.ndarray) -> None:
  expected = tuple(plain.input_shape[1:])
  if tuple(x_test.shape[1:]) != expected:
    raise ValueError(
        f"test images of shape {tuple(x_test.shape[1:])}; the model "
        f"expects {expected}"
    )


def has_standalone_runtime() -> bool:
  """The standalone LiteRT runtime (ai-edge-litert) is installed."""
  return importlib.util.find_spec("ai_edge_litert") is not None


def _standalone_latency(content, x_test, latency_examples, num_threads) -> dict:
  """Batch-1 latency on the standalone runtime (None where it is missing)."""
  if not has_standalone_runtime():
    return {"standalone_batch1_latency_median_ms": None}
  latency = batch1_latency_ms(
      content, x_test, num_examples=latency_examples,
      interpreter_factory=litert_interpreter, num_threads=num_threads,
  )
  return {f"standalone_batch1_latency_{k}": v for k, v in latency.items()}


def _export_variants(
    plain: tf.keras.Model,
    quantization: str,
    representative_data: Optional[np.ndarray],
    x_test: np.ndarray,
    y_test: np.ndarray,
    client_test_indices: Optional[Sequence[np.ndarray]],
    batch_size: int,
    latency_examples: int,
    num_threads: Optional[int],
    standalone: bool,
) -> tuple[dict, dict]:
  """Converts and evaluates every variant: ({key: figures}, {key: bytes})."""
  exports, contents = {}, {}
  for key, sparse, mode in _variants(quantization):
    content = convert(
        plain,
        sparse=sparse,
        quantization=mode,
        representative_data=representative_data,
    )
    contents[key] = content
    summary = inspect_model.summarize(content)
    exports[key] = {
        "quantization": mode,
        "sparse_encoding": sparse,
        "size_bytes": len(content),
        "num_sparse_tensors": summary["num_sparse_tensors"],
        "num_kept_sparse_tensors": summary["num_kept_sparse_tensors"],
        "sparse_tensors": summary["sparse_tensors"],
        "operators": summary["operators"],
        **evaluate_tflite(
            content,
            x_test,
            y_test,
            batch_size=batch_size,
            latency_examples=latency_examples,
            client_indices=client_test_indices,
            num_threads=num_threads,
        ),
    }
    if standalone:
      exports[key].update(
          _standalone_latency(content, x_test, latency_examples, num_threads)
      )
  return exports, contents


def _ratio(exports: dict, key: str) -> Optional[float]:
  """sparse / dense of a figure of the two exports (None if one is missing)."""
  sparse, dense = exports["sparse"].get(key), exports["dense"].get(key)
  return sparse / dense if sparse is not None and dense else None


def export_and_report(
    keras_model: tf.keras.Model,
    *,
    output_dir: str,
    x_test: np.ndarray,
    y_test: np.ndarray,
    client_test_indices: Optional[Sequence[np.ndarray]] = None,
    representative_data: Optional[np.ndarray] = None,
    quantization: str = "float32",
    latency_examples: int = DEFAULT_LATENCY_EXAMPLES,
    batch_size: int = 256,
    num_threads: Optional[int] = 1,
    standalone_runtime: bool = True,
) -> dict:
  """Writes model.tflite and tflite_report.json to `output_dir`.

  Returns the report, the dict written to tflite_report.json. Its keys: quantization, model_file, model_sha256; keras (accuracy,
  clients_accuracy); weight_sparsity (global zeros / all over Conv2D and
  Dense kernels) and layer_sparsity; size_ratio_sparse_dense (sparse /
  dense file size, chosen quantisation); exports: for "sparse", "dense" (and
  "sparse_float32", "dense_float32" when quantising) the file's size_bytes,
  num_sparse_tensors, num_kept_sparse_tensors and sparse_tensors (each with
  `kept_sparse`: no DENSIFY op reads it, so the runtime computes with the
  sparse tensor instead of expanding it at load), operators, accuracy,
  clients_accuracy (mean over clients of their accuracy; only with
  client_test_indices), batched throughput and batch-1 latency
  median/p90/mean in ms per example (`latency_examples` single-image
  invokes, one per test image while there are enough, `num_threads`
  threads), and with `standalone_runtime` the same batch-1 figures on the
  standalone LiteRT runtime (None where it is not installed);
  latency_ratio_sparse_dense (sparse / dense median batch-1 latency, the
  TensorFlow interpreter, chosen quantisation); pair_sparse_convs: per
  Conv2D, its kept (input, output) channel pairs, the multiply-adds of the
  dense and of the pair-sparse form, and whether the sparse exports run it
  pair-sparse (`tflite_export.pair_sparse`).
  """
  check_quantization(quantization)
  x_test, y_test = _checked_test_split(x_test, y_test)
  plain = export_model(keras_model)
  _check_input_shape(plain, x_test)
  sparsity, layer_sparsity = weight_sparsity(plain)
  exports, contents = _export_variants(
      plain,
      quantization,
      representative_data,
      x_test,
      y_test,
      client_test_indices,
      batch_size,
      latency_examples,
      num_threads,
      standalone_runtime,
  )
  report = {
      "quantization": quantization,
      "model_file": MODEL_FILE,
      "model_sha256": hashlib.sha256(contents["sparse"]).hexdigest(),
      "tensorflow_version": tf.__version__,
      "num_test_examples": int(len(x_test)),
      "num_clients": (
          None if client_test_indices is None else len(client_test_indices)
      ),
      "num_threads": num_threads,
      "keras": keras_metrics(
          plain, x_test, y_test, client_test_indices, batch_size
      ),
      "weight_sparsity": sparsity,
      "layer_sparsity": layer_sparsity,
      "pair_sparse_convs": pair_sparse.report(plain),
      "size_ratio_sparse_dense": (
          exports["sparse"]["size_bytes"] / exports["dense"]["size_bytes"]
      ),
      "latency_ratio_sparse_dense": _ratio(exports, "batch1_latency_median_ms"),
      "standalone_latency_ratio_sparse_dense": _ratio(
          exports, "standalone_batch1_latency_median_ms"
      ),
      "exports": exports,
  }
  _write_outputs(output_dir, contents["sparse"], report)
  return report
