"""Sparse TFLite export of trained Keras models, and its evaluation.

  convert(model, sparse=True, quantization="float32", representative_data=None)
      -> .tflite bytes                               (tflite_export.convert)
  tensor_infos / sparse_tensors / count_sparse_tensors / summarize(model)
      -> which tensors are stored sparse       (tflite_export.inspect_model)
  evaluate_tflite / predict / predict_logits / batch1_latency_ms
      -> accuracy, throughput, latency with TFLite (tflite_export.evaluate)
  export_and_report(keras_model, output_dir=..., ...)
      -> model.tflite + tflite_report.json             (tflite_export.report)
Command line:
  python -m tflite_export --checkpoint=final_model.keras --output=DIR

The function `convert` shadows the submodule of the same name as an attribute
of this package: import from the submodule with
`from tflite_export.convert import ...`, not
`import tflite_export.convert as m`.

The names load their submodule (and TensorFlow) when first used, so that
`python -m tflite_export` checks its flags before importing TensorFlow.
"""

import importlib
import sys
import types

QUANTIZATION_MODES = ("float32", "float16", "int8")

# Each public name and the submodule that defines it.
_SOURCES = {
    "check_quantization": "convert",
    "convert": "convert",
    "export_model": "convert",
    "accuracy_of": "evaluate",
    "batch1_latency_ms": "evaluate",
    "evaluate_tflite": "evaluate",
    "litert_interpreter": "evaluate",
    "mean_client_accuracy": "evaluate",
    "per_client_accuracy": "evaluate",
    "predict": "evaluate",
    "predict_logits": "evaluate",
    "tf_interpreter": "evaluate",
    "TensorInfo": "inspect_model",
    "count_sparse_tensors": "inspect_model",
    "sparse_tensors": "inspect_model",
    "summarize": "inspect_model",
    "tensor_infos": "inspect_model",
    "export_and_report": "report",
    "weight_sparsity": "report",
}

__all__ = ["QUANTIZATION_MODES", *sorted(_SOURCES)]


def _load(name: str):
  return getattr(importlib.import_module(f"tflite_export.{_SOURCES[name]}"), name)


def __getattr__(name: str):
  if name in _SOURCES:
    return _load(name)
  raise AttributeError(f"module 'tflite_export' has no attribute {name!r}")


class _Package(types.ModuleType):
  """This package; its attribute `convert` stays the function even after
  the import system sets it to the submodule `tflite_export.convert`."""

  @property
  def convert(self):
    return _load("convert")

  @convert.setter
  def convert(self, value):
    del value  # the submodule stays in sys.modules["tflite_export.convert"]


sys.modules[__name__].__class__ = _Package
