"""FedDST and its baselines on TensorFlow Federated.

TensorFlow's oneDNN kernels are switched on (unless the environment says
otherwise) before TensorFlow is imported: the cohort client engine
(`cohort.py`) needs their gradients of grouped convolutions, which
TensorFlow's default CPU kernels lack, and the TFF worker process inherits
the setting. Import this package before TensorFlow for it to take effect.
"""

import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
