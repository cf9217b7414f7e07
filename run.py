"""Federated training on the TFF simulation runtime.

  python run.py --algorithm=feddst --dataset=fashion_mnist --sparsity=0.8 \
      --rounds=200 --output_dir=runs/feddst

Defaults are the FedDST paper's setting: 400 clients with 2 classes x 20
examples each, 20 clients per round, 10 local epochs of SGD (batch 32, lr
0.01, momentum 0.9, weight decay 0.001). Writes config.json, metrics.csv,
TensorBoard events (tensorboard/), summary.json and final_model.keras (and,
with --export_tflite, model.tflite and tflite_report.json) into
--output_dir, and checkpoints every --checkpoint_every rounds: rerunning the
same command resumes the run. The algorithms are defined in
docs/algorithms.md.

Every flag is a field of `tff_feddst.config.ExperimentConfig`, which checks
the values and fills in the algorithm's defaults (`resolve()`).
"""

import dataclasses
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from tff_feddst import algorithms  # noqa: E402
from tff_feddst import config as config_lib  # noqa: E402
from tff_feddst import names  # noqa: E402
from tff_feddst import runtime  # noqa: E402

FLAGS = flags.FLAGS

_ALGORITHMS = "; ".join(f"{a.name}: {a.summary}" for a in algorithms.REGISTRY.values())


def _default_by_algorithm(setting: str) -> str:
  """'0.9 for fedavgm, else 0': the registry's defaults of `setting`."""
  named = [f"{a.defaults[setting]} for {a.name}" for a in algorithms.REGISTRY.values() if setting in a.defaults]
  return ", ".join(named + ["else 0"])


HELP = {
    "algorithm": f"Training algorithm ({_ALGORITHMS}).",
    "dataset": "Data set.",
    "data_dir": "Directory with the data set's files.",
    "model": "Network (default: the paper's for the data set).",
    "partition": "How examples are split among clients.",
    "classes_per_client": "Pathological split: classes per client.",
    "examples_per_class": "Pathological split: training examples per class per client.",
    "dirichlet_beta": "Dirichlet split: concentration beta (> 0).",
    "total_clients": "Clients in the pool (N).",
    "clients_per_round": "Clients sampled per round without replacement (K).",
    "rounds": "Communication rounds (R).",
    "local_epochs": "Local epochs per round (E).",
    "batch_size": "Local batch size.",
    "client_lr": "Client SGD learning rate (> 0).",
    "client_momentum": "Client SGD momentum.",
    "weight_decay": "Client L2 weight decay.",
    "server_lr": "Server learning rate (> 0).",
    "server_momentum": f"Server momentum (default: {_default_by_algorithm('server_momentum')}).",
    "prox_mu": f"FedProx strength mu (default: {_default_by_algorithm('prox_mu')}).",
    "sparsity": "Target sparsity S in [0, 1) of the sparse algorithms (dense ones train at 0).",
    "sparsity_distribution": "Layer-wise density distribution.",
    "sparse_init": "FedDST, RandomMask: initial weights under the random mask as Keras draws "
    "them (keras, the paper's), or divided by sqrt(the layer's density) (rescaled: each "
    "layer's output variance at initialisation is the dense layer's).",
    "readjustment_ratio": "Readjustment ratio alpha.",
    "rounds_between_readjustments": "Delta_R.",
    "readjustment_end_round": "R_end (default: half the rounds of the process that readjusts).",
    "readjustment_schedule": "How alpha_r moves up to R_end: cosine decay from alpha, or "
    "constant alpha.",
    "final_sparsity": "Gradual sparsification: the budgets move linearly from --sparsity to "
    "this by R_end, in [--sparsity, 1) (default: --sparsity, no change).",
    "remember_old": "Sparse algorithms: a position of the global mask that no client voted "
    "for keeps its previous value instead of 0.",
    "mask_block": "Sparse algorithms: mask the dense kernels in blocks of 1 output x 4 (or 16) "
    "inputs, the blocks TFLite's sparse fully-connected kernel runs (float32: 1x4, int8: "
    "1x16); convolutions and dense kernels whose inputs do not divide stay element-wise.",
    "conv_block": "Sparse algorithms: mask the convolutions in whole k x k filters of one "
    "(input channel, output filter) pair (kernel); a sparse TFLite export then computes only "
    "the kept pairs, with 1x1, depthwise and 1x1 convolutions.",
    "min_votes": "Clients that must keep a weight for it to survive aggregation.",
    "upload_dtype": "Precision of uploaded weights (float16: "
    + ", ".join(a.name for a in algorithms.REGISTRY.values() if a.float16_upload)
    + "; structured_feddst in its second phase).",
    "eval_every": "Evaluate every this many rounds (and on the last).",
    "seed": "Seed of every random choice.",
    "output_dir": "Where outputs are written.",
    "export_tflite": "Export the final model to sparse TFLite and evaluate it.",
    "tflite_quantization": "TFLite weight format.",
    "checkpoint_every": "Save a checkpoint every this many rounds (and after the last); "
    "rerunning with the same --output_dir resumes.",
    "client_failure_rate": "Probability that a sampled client fails before uploading, in [0, 1).",
    "structured_search_rounds": "structured*: rounds of the architecture search (phase 1); "
    "the rest retrain the smaller network.",
    "structured_boundary": "structured*: after each search round, remove units whose L1 "
    "importance is below this fraction of the reference (--structured_relative_to).",
    "structured_relative_to": "structured*: reference importance: mean over the layer's "
    "original units (removed ones count 0), mean or max over its alive units.",
    "structured_rule": "structured*: boundary: remove units under --structured_boundary x "
    "the reference; std_band (paper 2): remove units whose L1 importance lies outside "
    "mean +- k x std of the layer's alive units; std_band_low: only those below mean - k x std.",
    "structured_std_k": "structured*: k of --structured_rule=std_band[_low] (paper 2: 2.2).",
    "structured_prune_dense": "structured*: the search also removes dense neurons "
    "(default: yes for boundary, no for std_band[_low]: convolution filters only).",
    "structured_patience": "structured*: the search stops removing after this many "
    "rounds in a row removed nothing (0: never).",
    "structured_max_prune_rounds": "structured*: the search stops removing after this "
    "many pruning rounds.",
    "structured_min_width": "structured*: the search leaves every layer at least "
    "ceil(this x its original units), keeping the most important of the units it "
    "would remove (0: only never empty).",
    "structured_remove_dead": "structured*: each search step first removes the units "
    "that can never fire (behind a ReLU, no input in range makes their pre-activation "
    "> 0; removing them leaves the network's function unchanged), then applies the rule "
    "to the others.",
    "client_execution": "cohort: train each round's clients (in cohorts of --cohort_size) as one "
    "TensorFlow computation (the default where the algorithm has it: "
    + ", ".join(a.name for a in algorithms.REGISTRY.values() if any(p.cohort for p in a.phases))
    + "); per_client: one computation per client, the reference.",
    "cohort_size": "Clients per cohort with --client_execution=cohort (0: all of a round's "
    f"clients, in the fewest even cohorts of at most {names.MAX_DEFAULT_COHORT}; with --workers, "
    "one cohort per worker).",
    "workers": "host:port,... of TFF workers (`python -m tff_feddst.worker --port=PORT`) that "
    "run the clients, split across them; empty: on this machine. May change on resume.",
    "structured_reinit": "structured*: phase 2 starts from fresh weights instead of the "
    "surviving ones.",
    "prunefl_initial_rounds": "prunefl: local rounds (of --local_epochs) the seeded first "
    "client trains the dense model before it picks the initial mask.",
    "client_sparsity_tiers": "feddst, randommask: clients of different sparsity, "
    "SPARSITY:SHARE,... (e.g. 0.5:0.2,0.8:0.5,0.95:0.3; shares of the client pool, assigned "
    "by a seeded draw for the whole run); the global model keeps the lowest sparsity, "
    "which replaces --sparsity. Per-client execution. Empty: every client at --sparsity.",
    "lotteryfl_accuracy_threshold": "lotteryfl: a sampled client prunes when the global model "
    "under its mask reaches this accuracy on its local test set, in [0, 1].",
    "lotteryfl_prune_rate": "lotteryfl: the share of its kept weights a client prunes in each "
    "layer (down to the layer's budget at --sparsity), in (0, 1).",
    "prunefl_costs": "prunefl: the per-layer time costs (prunefl_costs.json of an earlier "
    "run) to use instead of measuring them on this machine; resuming uses the run's own.",
}


def define_flags() -> None:
  """One flag per ExperimentConfig field, with its default and type."""
  defaults = config_lib.ExperimentConfig()
  for field in dataclasses.fields(config_lib.ExperimentConfig):
    name, default = field.name, getattr(defaults, field.name)
    kind = config_lib.field_type(name)
    if name in config_lib.CHOICES:
      flags.DEFINE_enum(name, default, config_lib.CHOICES[name], HELP[name])
    elif kind is bool:
      flags.DEFINE_bool(name, default, HELP[name])
    elif kind is int:
      flags.DEFINE_integer(name, default, HELP[name])
    elif kind is float:
      flags.DEFINE_float(name, default, HELP[name])
    else:
      flags.DEFINE_string(name, default, HELP[name])


define_flags()


def config_from_flags() -> config_lib.ExperimentConfig:
  """The settings given on the command line (not yet resolved)."""
  return config_lib.ExperimentConfig(
      **{f.name: FLAGS[f.name].value for f in dataclasses.fields(config_lib.ExperimentConfig)}
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  config = config_from_flags()
  try:
    config = config.resolve()  # no TensorFlow yet: a flag error answers at once
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  # pylint: disable=g-import-not-at-top
  from tff_feddst import checkpoint
  from tff_feddst import data as data_lib
  from tff_feddst import remote
  from tff_feddst import training

  try:
    with runtime.managed_runtime():
      training.run_experiment(config)
  except (
      data_lib.DataError, config_lib.ConfigError, checkpoint.CheckpointError, remote.WorkerError
  ) as e:
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:
    sys.exit(f"interrupted; rerun the same command to resume from the last checkpoint in {config.output_dir}")
  except SystemExit as e:
    if e.code == 128 + signal.SIGTERM:
      print(f"terminated; rerun the same command to resume from the last checkpoint in {config.output_dir}", file=sys.stderr)
    raise


if __name__ == "__main__":
  # Before flags are parsed: a run that stops at any point must release
  # TFF's executor (started only once training begins) cleanly at exit.
  runtime.install_shutdown_handlers()
  app.run(main)
