"""Keras model -> TFLite flatbuffer, optionally sparse-encoded and quantised.

`convert(model, sparse=True, quantization="float32")` runs
`tf.lite.TFLiteConverter` on a plain Keras model or on one with tfmot pruning
wrappers (the wrappers' masks are applied to a copy of the kernels, then the
wrappers are stripped; the caller's model is left as it is).

Quantisation modes
  float32  no quantisation.
  float16  post-training float16 weights (Optimize.DEFAULT +
           supported_types=[float16]); the runtime dequantises them at load.
  int8     full-integer post-training quantisation (Optimize.DEFAULT, a
           representative data set, TFLITE_BUILTINS_INT8 only) with int8
           input AND int8 output tensors, as on integer-only accelerators.
           Callers quantise inputs with the input tensor's scale/zero point
           and dequantise the logits (`tflite_export.evaluate` does both).
`sparse=True` adds `Optimize.EXPERIMENTAL_SPARSITY` to the same settings.

What TF 2.14's converter does with sparsity (measured on the paper's MNIST
CNN, TF 2.14.1; see tests/test_tflite_export.py):
- A constant weight tensor is sparse-encoded when at least 30% of it is zero,
  whatever the mode: float32 (random, unstructured sparsity), float16 (the
  float16 copy is encoded) and int8 (the int8 copy is encoded). No block
  structure is needed for the encoding.
- Random sparsity is stored CSR-like (all dimensions dense but the last, which
  is sparse with uint8/uint16 indices) and the converter inserts a DENSIFY op
  before each consumer: the runtime expands the weights once at load time.
  The gain is file (download) size, not compute: kernels run dense.
- The encoding costs an index per non-zero, so it only pays off above a
  break-even sparsity: about 35% zeros for float32 and about 70% for int8
  (with uint16 indices); below that the "sparse" file is bigger than the
  dense one (the converter still encodes from 30% on). At 80% the float32
  file is about 0.3 x the dense file, the int8 file about 0.6 x dense int8.
- Block sparsity that the kernels can run directly is used only for
  FULLY_CONNECTED weights whose zeros form 1x4 blocks (float32) or 1x16
  blocks (int8) along the input dimension: then the weights are block-encoded
  and consumed without DENSIFY (a real sparse matmul). Conv2D weights are
  always densified. FedDST's random masks give no such blocks. A sparse
  export therefore rewrites a convolution that keeps few of its (input,
  output) channel pairs (`--conv_block=kernel` masks) as three dense ops
  that compute only those pairs (`tflite_export.pair_sparse`).
- Bug handled here: a float16 FULLY_CONNECTED weight with 1x4 block sparsity
  is block-encoded and fed to DEQUANTIZE without DENSIFY, and the interpreter
  then computes NaN. `convert` detects a sparse tensor feeding an op that
  cannot read sparse tensors and falls back to a dense encoding (logged).
- Runtimes: TF 2.14's interpreter, tflite-runtime 2.14.0 and ai-edge-litert
  1.4.0 and 2.0.3 run all three sparse exports with their default XNNPack
  delegate. ai-edge-litert 2.1.x to 2.3.0 fail to prepare the sparse int8
  file ("failed to delegate FULLY_CONNECTED node"; a DENSIFY'd int8 weight)
  unless XNNPack is turned off; their float32 and float16 runs are fine.
"""

import contextlib
import os
import re
import sys
import tempfile
from typing import Iterator, Optional
import warnings

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from tff_feddst import wrappers as wrappers_lib
from tflite_export import QUANTIZATION_MODES
from tflite_export import inspect_model
from tflite_export import pair_sparse

# How many representative images the int8 calibration uses at most.
MAX_REPRESENTATIVE_EXAMPLES = 500


def check_quantization(quantization: str) -> str:
  """Returns `quantization` if it is a known mode, else raises ValueError."""
  if quantization not in QUANTIZATION_MODES:
    raise ValueError(
        f"unknown quantization {quantization!r}; choose one of "
        f"{', '.join(QUANTIZATION_MODES)}"
    )
  return quantization


def _wrapper_layers(model: tf.keras.Model) -> list:
  return [layer for layer in model.layers if wrappers_lib.is_wrapper(layer)]


def export_model(model: tf.keras.Model) -> tf.keras.Model:
  """The plain Keras model to convert: masks applied, pruning wrappers gone.

  A model without (top-level) wrappers is returned unchanged. For a wrapped
  model the kernels are multiplied by their masks in a copy (the wrapper re-masks only
  on its next call, so the last optimizer step may have left values there).
  """
  wrappers = _wrapper_layers(model)
  if not wrappers:
    return model
  stripped = tfmot.sparsity.keras.strip_pruning(model)
  plain = tf.keras.models.clone_model(stripped)
  plain.set_weights(stripped.get_weights())
  for wrapper in wrappers:
    inner = wrappers_lib.unwrap(wrapper)
    target = plain.get_layer(inner.name)
    weight_ids = [id(v) for v in inner.weights]
    for weight, mask in wrappers_lib.masked_weights(wrapper):
      index = weight_ids.index(id(weight))
      target.weights[index].assign(weight * tf.cast(mask, weight.dtype))
  return plain


def _representative_dataset(model, data: Optional[np.ndarray]):
  if data is None or len(data) == 0:
    raise ValueError(
        "int8 quantization needs representative_data (input images)"
    )
  data = np.asarray(data, dtype=np.float32)
  expected = tuple(model.input_shape[1:])
  if tuple(data.shape[1:]) != expected:
    raise ValueError(
        f"representative_data has images of shape {data.shape[1:]}, "
        f"the model expects {expected}"
    )
  data = data[:MAX_REPRESENTATIVE_EXAMPLES]

  def generate() -> Iterator[list[np.ndarray]]:
    for i in range(len(data)):
      yield [data[i : i + 1]]

  return generate


def _converter(model, sparse, quantization, representative_data):
  converter = tf.lite.TFLiteConverter.from_keras_model(model)
  optimizations = []
  if quantization != "float32":
    optimizations.append(tf.lite.Optimize.DEFAULT)
  if sparse:
    optimizations.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
  converter.optimizations = optimizations
  if quantization == "float16":
    converter.target_spec.supported_types = [tf.float16]
  elif quantization == "int8":
    converter.representative_dataset = _representative_dataset(
        model, representative_data
    )
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
  return converter


def convert(
    model: tf.keras.Model,
    *,
    sparse: bool = True,
    quantization: str = "float32",
    representative_data: Optional[np.ndarray] = None,
) -> bytes:
  """Converts `model` to a TFLite flatbuffer (see the module docstring).

  Args:
    model: a Keras model, with or without tfmot pruning wrappers.
    sparse: store weight tensors with enough zeros in TFLite's sparse format,
      and run convolutions that keep few (input, output) channel pairs as
      `pair_sparse.PairSparseConv2D` (select, depthwise, mix).
    quantization: "float32", "float16" or "int8".
    representative_data: float32 NHWC images for int8 calibration (a few
      hundred; at most MAX_REPRESENTATIVE_EXAMPLES are used).

  Returns:
    The .tflite file's bytes.
  """
  check_quantization(quantization)
  plain = export_model(model)
  if sparse:
    plain, _ = pair_sparse.rewrite(plain)
  content = _run(_converter(plain, sparse, quantization, representative_data))
  if sparse and inspect_model.unreadable_sparse_inputs(content):
    logging.warning(
        "TFLite: the %s sparse export feeds a sparse tensor to an op that "
        "cannot read it; exporting with a dense encoding instead",
        quantization,
    )
    content = _run(_converter(plain, False, quantization, representative_data))
  return content


# What the calibrator's native code prints to stderr in every int8 conversion.
_CALIBRATOR_NOISE = re.compile(
    r"^fully_quantize: \d+, inference_type: \d+, input_inference_type: \w+, "
    r"output_inference_type: \w+$"
)


@contextlib.contextmanager
def _without_calibrator_noise():
  """Drops the calibrator's one native stderr line; keeps every other line.

  The line is written by C++ code to file descriptor 2, below Python's
  `sys.stderr`, so the descriptor is pointed at a temporary file for the
  conversion and what it caught is written back, less that line.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as caught:
    os.dup2(caught.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      caught.seek(0)
      lines = caught.read().decode(errors="replace").splitlines(keepends=True)
      kept = "".join(line for line in lines if not _CALIBRATOR_NOISE.match(line.strip()))
      if kept:
        sys.stderr.write(kept)
        sys.stderr.flush()


def _run(converter: tf.lite.TFLiteConverter) -> bytes:
  quiet = _without_calibrator_noise() if converter.representative_dataset else contextlib.nullcontext()
  with quiet, warnings.catch_warnings():
    # TF 2.14 says this for every int8-input model although the
    # representative data set provides the statistics.
    warnings.filterwarnings(
        "ignore", message="Statistics for quantized inputs were expected"
    )
    return converter.convert()
