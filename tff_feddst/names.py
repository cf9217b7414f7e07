"""The choices of the run's string settings, without TensorFlow.

`config.ExperimentConfig` checks every flag against these, so a command line
answers a typo before TensorFlow is imported. The modules that use them
(`data`, `masks`, `unit_graph`, `remote`) import them from here.
"""

import re

DATASETS = (
    "fashion_mnist",
    "mnist",
    "cifar10",
    "cifar100",
    "emnist",
    "femnist",
)
PARTITIONS = ("pathological", "dirichlet", "iid", "natural")
# Data sets with a natural (per-writer) partition.
NATURAL_DATASETS = ("emnist", "femnist")

# Layer-wise density distributions (masks.layer_densities).
DISTRIBUTIONS = ("uniform", "er", "erk")
# Initial weights of a sparse network: the Keras initialisers' values under
# the mask ("keras", the paper's), or those divided by sqrt(density) layer by
# layer ("rescaled"), so that each layer's output variance at initialisation
# is the dense layer's.
SPARSE_INITS = ("keras", "rescaled")
# How the readjustment ratio alpha_r moves over the rounds (section 3.3).
SCHEDULES = ("cosine", "constant")

# Block masks (`--mask_block`): the block on TFLite's [out, in] weight, and
# the inputs per block of a dense kernel it means (Keras' [in, out] kernel:
# a block is `rows` consecutive inputs of one output). 1x4 is what TFLite's
# float32 sparse fully-connected kernel runs, 1x16 its int8 one.
MASK_BLOCKS = ("none", "1x4", "1x16")
MASK_BLOCK_ROWS = {"none": 1, "1x4": 4, "1x16": 16}
# Convolution masks (`--conv_block`): element-wise, or whole k_h x k_w
# filters of one (input channel, output filter) pair, which a sparse TFLite
# export runs as 1x1, depthwise and 1x1 convolutions over the kept pairs
# only (`tflite_export.pair_sparse`).
CONV_BLOCKS = ("none", "kernel")

# Structured search (unit_graph): what a layer's importances are compared
# with; the first is the default (`algorithms.AlgorithmConfig.structured_relative_to`).
RELATIVE_TO = ("original_mean", "mean", "max")
# How the units that stay are chosen; the first is the default
# (`algorithms.AlgorithmConfig.structured_rule`).
RULES = ("boundary", "std_band", "std_band_low")
# Paper 2's k for the std band (its FEMNIST configuration).
DEFAULT_STD_K = 2.2
# Whether a rule removes hidden dense neurons unless told otherwise: paper
# 2's code applies the std band to convolution filters only.
PRUNES_DENSE = {"boundary": True, "std_band": False, "std_band_low": False}

_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})$")


def parse_workers(text: str) -> tuple[str, ...]:
  """`host:port,host:port` as a tuple of addresses; ValueError naming a bad one."""
  if not text.strip():
    return ()
  addresses = tuple(part.strip() for part in text.split(","))
  for address in addresses:
    match = _ADDRESS.match(address)
    if match is None or not 1 <= int(match.group(2)) <= 65535:
      raise ValueError(f"{address!r} is not host:port (port in 1..65535)")
  duplicates = sorted({a for a in addresses if addresses.count(a) > 1})
  if duplicates:
    raise ValueError(f"{', '.join(duplicates)} listed twice")
  return addresses

# The most clients that `--cohort_size=0` puts in one cohort
# (`rounds.default_cohort_size`).
MAX_DEFAULT_COHORT = 10
