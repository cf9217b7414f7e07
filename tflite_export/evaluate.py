"""Runs a .tflite model on images: predictions, accuracy, latency, throughput.

Inputs are float32 NHWC images in [0, 1]; labels are ints. A model with
integer input/output tensors (the int8 export) is fed quantised images
(q = round(x / scale) + zero_point, clipped to the type's range) and its
outputs are dequantised ((q - zero_point) * scale), so callers always see
float logits.

The interpreter comes from
`interpreter_factory(model_content=..., num_threads=...)`:
`tf_interpreter` (TensorFlow's `tf.lite.Interpreter`, the default) or
`litert_interpreter` (the standalone `ai_edge_litert` runtime). Both use the
XNNPack delegate by default. This module imports neither runtime until a
factory is called, so it runs where only the standalone runtime is installed.
"""

import fractions
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from tff_feddst.files import ModelSource, read_bytes

InterpreterFactory = Callable[..., Any]

DEFAULT_BATCH_SIZE = 256
DEFAULT_WARMUP = 10
# Timed batch-1 runs per model: one per test image, as many as this.
DEFAULT_LATENCY_EXAMPLES = 1000


def _resolver_kwargs(module, use_xnnpack: bool) -> dict:
  if use_xnnpack:
    return {}
  resolver = module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
  return {"experimental_op_resolver_type": resolver}


def tf_interpreter(
    model_content: bytes,
    num_threads: Optional[int] = None,
    use_xnnpack: bool = True,
):
  """TensorFlow's own TFLite interpreter (XNNPack unless use_xnnpack=False)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  return tf.lite.Interpreter(
      model_content=model_content,
      num_threads=num_threads,
      **_resolver_kwargs(tf.lite.experimental, use_xnnpack),
  )


def litert_interpreter(
    model_content: bytes,
    num_threads: Optional[int] = None,
    use_xnnpack: bool = True,
):
  """The standalone LiteRT runtime (package ai-edge-litert), without TensorFlow.

  ai-edge-litert 2.1 to 2.3 cannot prepare the sparse int8 export with their
  XNNPack delegate ("failed to delegate FULLY_CONNECTED node"); 1.4.0 can,
  and so can any version with use_xnnpack=False (functools.partial).
  """
  from ai_edge_litert import interpreter  # pylint: disable=g-import-not-at-top

  return interpreter.Interpreter(
      model_content=model_content,
      num_threads=num_threads,
      **_resolver_kwargs(interpreter, use_xnnpack),
  )


def _quantize(x: np.ndarray, details: dict) -> np.ndarray:
  dtype = np.dtype(details["dtype"])
  if np.issubdtype(dtype, np.floating):
    return x.astype(dtype, copy=False)
  scale, zero_point = details["quantization"]
  if not scale:
    raise ValueError(f"input tensor of type {dtype} has no quantization scale")
  info = np.iinfo(dtype)
  q = np.round(x / scale) + zero_point
  return np.clip(q, info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, details: dict) -> np.ndarray:
  if np.issubdtype(np.dtype(details["dtype"]), np.floating):
    return y.astype(np.float32, copy=False)
  scale, zero_point = details["quantization"]
  return ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)


class Runner:
  """One interpreter whose input is resized to a fixed batch size.

  Calling it with up to `batch_size` float images returns their float logits.
  """

  def __init__(
      self,
      model: ModelSource,
      batch_size: int,
      *,
      interpreter_factory: Optional[InterpreterFactory] = None,
      num_threads: Optional[int] = 1,
  ):
    factory = interpreter_factory or tf_interpreter
    self.batch_size = int(batch_size)
    self._interpreter = factory(
        model_content=read_bytes(model), num_threads=num_threads
    )
    details = self._interpreter.get_input_details()[0]
    shape = [self.batch_size] + [int(d) for d in details["shape"][1:]]
    self._interpreter.resize_tensor_input(details["index"], shape)
    self._interpreter.allocate_tensors()
    self.input_details = self._interpreter.get_input_details()[0]
    self.output_details = self._interpreter.get_output_details()[0]
    self.input_shape = tuple(shape[1:])

  def __call__(self, x: np.ndarray) -> np.ndarray:
    n = len(x)
    if n > self.batch_size:
      raise ValueError(f"{n} images for a batch of {self.batch_size}")
    if n < self.batch_size:
      pad = np.zeros((self.batch_size - n,) + x.shape[1:], dtype=x.dtype)
      x = np.concatenate([x, pad])
    self._interpreter.set_tensor(
        self.input_details["index"], _quantize(x, self.input_details)
    )
    self._interpreter.invoke()
    y = self._interpreter.get_tensor(self.output_details["index"])
    return _dequantize(y, self.output_details)[:n]


def _check_images(runner: Runner, x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, dtype=np.float32)
  if tuple(x.shape[1:]) != runner.input_shape:
    raise ValueError(
        f"images of shape {tuple(x.shape[1:])}; the model expects "
        f"{runner.input_shape}"
    )
  return x


def _logits(runner: Runner, x: np.ndarray) -> np.ndarray:
  x = _check_images(runner, x)
  chunks = [
      runner(x[i : i + runner.batch_size])
      for i in range(0, len(x), runner.batch_size)
  ]
  if not chunks:
    return np.zeros(
        (0,) + tuple(runner.output_details["shape"][1:]), np.float32
    )
  return np.concatenate(chunks)


def predict_logits(
    model: ModelSource,
    x: np.ndarray,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    interpreter_factory: Optional[InterpreterFactory] = None,
    num_threads: Optional[int] = 1,
) -> np.ndarray:
  """Float logits [N, classes] of `model` on images `x`."""
  runner = Runner(
      model,
      batch_size,
      interpreter_factory=interpreter_factory,
      num_threads=num_threads,
  )
  return _logits(runner, x)


def predict(model: ModelSource, x: np.ndarray, **kwargs) -> np.ndarray:
  """Predicted class per image (int64 [N]); keyword args as `predict_logits`."""
  return np.argmax(predict_logits(model, x, **kwargs), axis=-1)


def accuracy_of(predictions: np.ndarray, labels: np.ndarray) -> float:
  """The fraction of predictions equal to the labels (nan if there are none)."""
  labels = np.asarray(labels).reshape(-1)
  if labels.size == 0:
    return float("nan")
  return float(np.mean(np.asarray(predictions).reshape(-1) == labels))


def per_client_accuracy(
    predictions: np.ndarray,
    labels: np.ndarray,
    client_indices: Sequence[np.ndarray],
) -> np.ndarray:
  """Accuracy on each client's test indices (nan for a client without any)."""
  predictions = np.asarray(predictions)
  labels = np.asarray(labels)
  return np.array(
      [
          accuracy_of(
              predictions[np.asarray(idx, dtype=np.int64)],
              labels[np.asarray(idx, dtype=np.int64)],
          )
          for idx in client_indices
      ],
      dtype=np.float64,
  )


def mean_client_accuracy(
    predictions: np.ndarray,
    labels: np.ndarray,
    client_indices: Sequence[np.ndarray],
) -> Optional[float]:
  """Mean over clients (with at least one test example) of their accuracy,
  computed exactly and rounded once, as the training run's clients_accuracy."""
  per_client = [
      fractions.Fraction(int(np.sum(predictions[idx] == labels[idx])), len(idx))
      for idx in (np.asarray(i, dtype=np.int64) for i in client_indices)
      if len(idx)
  ]
  return float(sum(per_client) / len(per_client)) if per_client else None


def batch1_latency_ms(
    model: ModelSource,
    x: np.ndarray,
    *,
    num_examples: int = DEFAULT_LATENCY_EXAMPLES,
    warmup: int = DEFAULT_WARMUP,
    interpreter_factory: Optional[InterpreterFactory] = None,
    num_threads: Optional[int] = 1,
) -> dict:
  """Per-example latency at batch 1 (input resized to [1, H, W, C]).

  As on a phone: one image per invoke.

  Runs `warmup` untimed examples, then times `num_examples` single-image
  runs (cycling through `x`; `distinct_images` of them differ): quantise,
  set input, invoke, read output. Returns median/p90/mean in milliseconds.
  """
  runner = Runner(
      model, 1, interpreter_factory=interpreter_factory, num_threads=num_threads
  )
  x = _check_images(runner, x)
  if len(x) == 0 or num_examples <= 0:
    return {
        "median_ms": None,
        "p90_ms": None,
        "mean_ms": None,
        "num_examples": 0,
        "distinct_images": 0,
    }
  for i in range(warmup):
    runner(x[i % len(x)][None])
  times = np.empty(num_examples)
  for i in range(num_examples):
    example = x[i % len(x)][None]
    start = time.perf_counter()
    runner(example)
    times[i] = time.perf_counter() - start
  times *= 1e3
  return {
      "median_ms": float(np.median(times)),
      "p90_ms": float(np.percentile(times, 90)),
      "mean_ms": float(np.mean(times)),
      "num_examples": int(num_examples),
      "distinct_images": int(min(num_examples, len(x))),
  }


def evaluate_tflite(
    model: ModelSource,
    x: np.ndarray,
    y: np.ndarray,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    latency_examples: int = DEFAULT_LATENCY_EXAMPLES,
    client_indices: Optional[Sequence[np.ndarray]] = None,
    interpreter_factory: Optional[InterpreterFactory] = None,
    num_threads: Optional[int] = 1,
) -> dict:
  """Accuracy, batched throughput and batch-1 latency of `model` on (x, y).

  The accuracy pass runs at `batch_size` after one warm-up batch and its
  duration gives the throughput. With `client_indices` (one index array per
  client into x), "clients_accuracy" is the mean of the clients' accuracies.
  """
  runner = Runner(
      model,
      batch_size,
      interpreter_factory=interpreter_factory,
      num_threads=num_threads,
  )
  x = _check_images(runner, x)
  if len(x):
    runner(x[:batch_size])
  start = time.perf_counter()
  predictions = np.argmax(_logits(runner, x), axis=-1)
  seconds = time.perf_counter() - start
  result = {
      "accuracy": accuracy_of(predictions, y),
      "num_examples": int(len(x)),
      "batch_size": int(batch_size),
      "batched_examples_per_s": float(len(x) / seconds) if len(x) else None,
      "batched_ms_per_example": (
          float(1e3 * seconds / len(x)) if len(x) else None
      ),
  }
  if client_indices is not None:
    result["clients_accuracy"] = mean_client_accuracy(
        predictions, y, client_indices
    )
    result["num_clients"] = len(client_indices)
  latency = batch1_latency_ms(
      model,
      x,
      num_examples=latency_examples,
      interpreter_factory=interpreter_factory,
      num_threads=num_threads,
  )
  result.update({f"batch1_latency_{k}": v for k, v in latency.items()})
  return result
