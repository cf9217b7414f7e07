"""FedDST and its baselines on TensorFlow Federated.

TensorFlow's oneDNN kernels are switched on (unless the environment says
otherwise) before TensorFlow is imported: the cohort client engine
(`cohort.py`) needs their gradients of grouped convolutions, which
TensorFlow's default CPU kernels lack, and the TFF worker process inherits
the setting. Import this package before TensorFlow for it to take effect.

`TF2_BEHAVIOR=1` is what TensorFlow's own `__init__` sets; set before the
import, it also holds where the command lines import TensorFlow, inside
absl's `app.run` (after their flags are checked): there, without it, Keras
builds a Sequential model's layers on TF1 graph tensors and fails
("Output tensors of a Sequential model must be the output of a TensorFlow
`Layer`"; TensorFlow 2.14, Keras 2.14).
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF2_BEHAVIOR", "1")
