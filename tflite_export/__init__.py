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
"""

from tflite_export.convert import QUANTIZATION_MODES
from tflite_export.convert import check_quantization
from tflite_export.convert import convert
from tflite_export.convert import export_model
from tflite_export.evaluate import accuracy_of
from tflite_export.evaluate import batch1_latency_ms
from tflite_export.evaluate import evaluate_tflite
from tflite_export.evaluate import litert_interpreter
from tflite_export.evaluate import mean_client_accuracy
from tflite_export.evaluate import per_client_accuracy
from tflite_export.evaluate import predict
from tflite_export.evaluate import predict_logits
from tflite_export.evaluate import tf_interpreter
from tflite_export.inspect_model import TensorInfo
from tflite_export.inspect_model import count_sparse_tensors
from tflite_export.inspect_model import sparse_tensors
from tflite_export.inspect_model import summarize
from tflite_export.inspect_model import tensor_infos
from tflite_export.report import export_and_report
from tflite_export.report import weight_sparsity

__all__ = [
    "QUANTIZATION_MODES",
    "TensorInfo",
    "accuracy_of",
    "batch1_latency_ms",
    "check_quantization",
    "convert",
    "count_sparse_tensors",
    "evaluate_tflite",
    "export_and_report",
    "export_model",
    "litert_interpreter",
    "mean_client_accuracy",
    "per_client_accuracy",
    "predict",
    "predict_logits",
    "sparse_tensors",
    "summarize",
    "tensor_infos",
    "tf_interpreter",
    "weight_sparsity",
]
