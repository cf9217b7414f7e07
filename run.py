"""Federated training on the TFF simulation runtime.

  python run.py --algorithm=feddst --dataset=fashion_mnist --sparsity=0.8 \
      --rounds=200 --output_dir=runs/feddst

Defaults are the FedDST paper's setting: 400 clients with 2 classes x 20
examples each, 20 clients per round, 10 local epochs of SGD (batch 32, lr
0.01, momentum 0.9, weight decay 0.001). Writes config.json, metrics.csv,
summary.json and final_model.keras (and, with --export_tflite, model.tflite
and tflite_report.json) into --output_dir, and checkpoints every
--checkpoint_every rounds: rerunning the same command resumes the run.
"""

import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

import keras_models  # noqa: E402
from tff_feddst import algorithms  # noqa: E402
from tff_feddst import data as data_lib  # noqa: E402
from tff_feddst import masks as masks_lib  # noqa: E402
from tff_feddst import runtime  # noqa: E402

FLAGS = flags.FLAGS

_ALGORITHM = flags.DEFINE_enum("algorithm", "feddst", algorithms.ALGORITHMS, "Training algorithm.")
_DATASET = flags.DEFINE_enum("dataset", "fashion_mnist", data_lib.DATASETS, "Data set.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Directory with the data set's files.")
_MODEL = flags.DEFINE_enum("model", None, keras_models.MODEL_NAMES, "Network (default: the paper's for the data set).")
_PARTITION = flags.DEFINE_enum("partition", "pathological", data_lib.PARTITIONS, "How examples are split among clients.")
_CLASSES_PER_CLIENT = flags.DEFINE_integer("classes_per_client", 2, "Pathological split: classes per client.", lower_bound=1)
_EXAMPLES_PER_CLASS = flags.DEFINE_integer("examples_per_class", 20, "Pathological split: training examples per class per client.", lower_bound=1)
_DIRICHLET_BETA = flags.DEFINE_float("dirichlet_beta", 0.1, "Dirichlet split: concentration beta (> 0).")
_TOTAL_CLIENTS = flags.DEFINE_integer("total_clients", 400, "Clients in the pool (N).", lower_bound=1)
_CLIENTS_PER_ROUND = flags.DEFINE_integer("clients_per_round", 20, "Clients sampled per round without replacement (K).", lower_bound=1)
_ROUNDS = flags.DEFINE_integer("rounds", 200, "Communication rounds (R).", lower_bound=1)
_LOCAL_EPOCHS = flags.DEFINE_integer("local_epochs", 10, "Local epochs per round (E).", lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Local batch size.", lower_bound=1)
_CLIENT_LR = flags.DEFINE_float("client_lr", 0.01, "Client SGD learning rate (> 0).")
_CLIENT_MOMENTUM = flags.DEFINE_float("client_momentum", 0.9, "Client SGD momentum.", lower_bound=0.0, upper_bound=1.0)
_WEIGHT_DECAY = flags.DEFINE_float("weight_decay", 0.001, "Client L2 weight decay.", lower_bound=0.0)
_SERVER_LR = flags.DEFINE_float("server_lr", 1.0, "Server learning rate (> 0).")
_SERVER_MOMENTUM = flags.DEFINE_float("server_momentum", None, "Server momentum (default 0.9 for fedavgm, else 0).", lower_bound=0.0, upper_bound=1.0)
_PROX_MU = flags.DEFINE_float("prox_mu", None, "FedProx strength mu (default 0.01 for fedprox, else 0).", lower_bound=0.0)
_SPARSITY = flags.DEFINE_float("sparsity", 0.8, "Target sparsity S in [0, 1) (feddst, randommask).")
_SPARSITY_DISTRIBUTION = flags.DEFINE_enum("sparsity_distribution", "erk", masks_lib.DISTRIBUTIONS, "Layer-wise density distribution.")
_READJUSTMENT_RATIO = flags.DEFINE_float("readjustment_ratio", 0.05, "Readjustment ratio alpha.", lower_bound=0.0, upper_bound=1.0)
_ROUNDS_BETWEEN = flags.DEFINE_integer("rounds_between_readjustments", 10, "Delta_R.", lower_bound=1)
_READJUSTMENT_END = flags.DEFINE_integer("readjustment_end_round", None, "R_end (default rounds/2).", lower_bound=0)
_MIN_VOTES = flags.DEFINE_integer("min_votes", 1, "Clients that must keep a weight for it to survive aggregation.", lower_bound=1)
_UPLOAD_DTYPE = flags.DEFINE_enum("upload_dtype", "float32", ["float32", "float16"], "Precision of uploaded weights (feddst, randommask).")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 10, "Evaluate every this many rounds (and on the last).", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every random choice.", lower_bound=0)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "runs/default", "Where outputs are written.")
_EXPORT_TFLITE = flags.DEFINE_bool("export_tflite", False, "Export the final model to sparse TFLite and evaluate it.")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 10, "Save a checkpoint every this many rounds (and after the last); rerunning with the same --output_dir resumes.", lower_bound=1)
_CLIENT_FAILURE_RATE = flags.DEFINE_float("client_failure_rate", 0.0, "Probability that a sampled client fails before uploading, in [0, 1).")
_STRUCTURED_SEARCH_ROUNDS = flags.DEFINE_integer("structured_search_rounds", 20, "structured*: rounds of the architecture search (phase 1); the rest retrain the smaller network.", lower_bound=1)
_STRUCTURED_BOUNDARY = flags.DEFINE_float("structured_boundary", 0.95, "structured*: after each search round, remove units whose L1 importance is below this fraction of the reference (--structured_relative_to).", lower_bound=0.0)
_STRUCTURED_RELATIVE_TO = flags.DEFINE_enum("structured_relative_to", "original_mean", ["original_mean", "mean", "max"], "structured*: reference importance: mean over the layer's original units (removed ones count 0), mean or max over its alive units.")
_STRUCTURED_REINIT = flags.DEFINE_bool("structured_reinit", False, "structured*: phase 2 starts from fresh weights instead of the surviving ones.")
_TFLITE_QUANTIZATION = flags.DEFINE_enum("tflite_quantization", "float32", ["float32", "float16", "int8"], "TFLite weight format.")

flags.register_validator("dirichlet_beta", lambda v: v > 0, "--dirichlet_beta must be > 0")
flags.register_validator("client_lr", lambda v: v > 0, "--client_lr must be > 0")
flags.register_validator("server_lr", lambda v: v > 0, "--server_lr must be > 0")
flags.register_validator("sparsity", lambda v: 0.0 <= v < 1.0, "--sparsity must be in [0, 1)")
flags.register_validator("output_dir", bool, "--output_dir must not be empty")
flags.register_validator("client_failure_rate", lambda v: 0.0 <= v < 1.0, "--client_failure_rate must be in [0, 1)")


@flags.multi_flags_validator(
    ["clients_per_round", "total_clients"],
    message="--clients_per_round must not exceed --total_clients",
)
def _check_clients(values):
  return values["clients_per_round"] <= values["total_clients"]


@flags.multi_flags_validator(
    ["upload_dtype", "algorithm"],
    message="--upload_dtype=float16 is implemented for feddst and randommask only",
)
def _check_upload_dtype(values):
  return values["upload_dtype"] == "float32" or values["algorithm"] in (*algorithms.SPARSE_ALGORITHMS, "structured_feddst")


@flags.multi_flags_validator(
    ["structured_search_rounds", "rounds", "algorithm"],
    message="--structured_search_rounds must be below --rounds (phase 2 needs at least one round)",
)
def _check_structured_rounds(values):
  return not values["algorithm"].startswith("structured") or values["structured_search_rounds"] < values["rounds"]


@flags.multi_flags_validator(
    ["partition", "dataset"], message="--partition=natural needs --dataset=emnist or femnist"
)
def _check_partition(values):
  return values["partition"] != "natural" or values["dataset"] in ("emnist", "femnist")


def config_from_flags():
  """The run's settings, with algorithm-dependent defaults resolved."""
  from tff_feddst.training import ExperimentConfig  # pylint: disable=g-import-not-at-top

  server_momentum = _SERVER_MOMENTUM.value
  if server_momentum is None:
    server_momentum = 0.9 if _ALGORITHM.value == "fedavgm" else 0.0
  prox_mu = _PROX_MU.value
  if prox_mu is None:
    prox_mu = 0.01 if _ALGORITHM.value == "fedprox" else 0.0
  return ExperimentConfig(
      algorithm=_ALGORITHM.value,
      dataset=_DATASET.value,
      data_dir=_DATA_DIR.value,
      model=_MODEL.value,
      partition=_PARTITION.value,
      classes_per_client=_CLASSES_PER_CLIENT.value,
      examples_per_class=_EXAMPLES_PER_CLASS.value,
      dirichlet_beta=_DIRICHLET_BETA.value,
      total_clients=_TOTAL_CLIENTS.value,
      clients_per_round=_CLIENTS_PER_ROUND.value,
      rounds=_ROUNDS.value,
      local_epochs=_LOCAL_EPOCHS.value,
      batch_size=_BATCH_SIZE.value,
      client_lr=_CLIENT_LR.value,
      client_momentum=_CLIENT_MOMENTUM.value,
      weight_decay=_WEIGHT_DECAY.value,
      server_lr=_SERVER_LR.value,
      server_momentum=server_momentum,
      prox_mu=prox_mu,
      sparsity=_SPARSITY.value if _ALGORITHM.value in (*algorithms.SPARSE_ALGORITHMS, "structured_feddst") else 0.0,
      sparsity_distribution=_SPARSITY_DISTRIBUTION.value,
      readjustment_ratio=_READJUSTMENT_RATIO.value,
      rounds_between_readjustments=_ROUNDS_BETWEEN.value,
      readjustment_end_round=_READJUSTMENT_END.value,
      min_votes=_MIN_VOTES.value,
      upload_dtype=_UPLOAD_DTYPE.value,
      eval_every=_EVAL_EVERY.value,
      seed=_SEED.value,
      output_dir=_OUTPUT_DIR.value,
      export_tflite=_EXPORT_TFLITE.value,
      tflite_quantization=_TFLITE_QUANTIZATION.value,
      checkpoint_every=_CHECKPOINT_EVERY.value,
      client_failure_rate=_CLIENT_FAILURE_RATE.value,
      structured_search_rounds=_STRUCTURED_SEARCH_ROUNDS.value,
      structured_boundary=_STRUCTURED_BOUNDARY.value,
      structured_relative_to=_STRUCTURED_RELATIVE_TO.value,
      structured_reinit=_STRUCTURED_REINIT.value,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  # pylint: disable=g-import-not-at-top
  from tff_feddst import checkpoint
  from tff_feddst import training

  config = config_from_flags()
  try:
    with runtime.managed_runtime():
      training.run_experiment(config)
  except (data_lib.DataError, training.ConfigError, checkpoint.CheckpointError) as e:
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:
    sys.exit(f"interrupted; rerun the same command to resume from the last checkpoint in {config.output_dir}")
  except SystemExit as e:
    if e.code == 128 + signal.SIGTERM:
      print(f"terminated; rerun the same command to resume from the last checkpoint in {config.output_dir}", file=sys.stderr)
    raise


if __name__ == "__main__":
  # Before flags are parsed: TFF is imported above, and even a run that stops
  # at a flag error must release TFF's executor cleanly at exit.
  runtime.install_shutdown_handlers()
  app.run(main)
