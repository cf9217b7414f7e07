"""Can TFLite run the MNIST network's sparse conv2 faster than dense?

    python -m benchmarks.sparse_conv --output_dir=runs/sparse_conv

TFLite densifies a sparse CONV_2D weight at load; only FULLY_CONNECTED
runs block-sparse weights (1x4 blocks along the input for float32). A
convolution is a FULLY_CONNECTED layer over its input patches (im2col), so
conv2 could run sparse if the patches were cheap to build. This benchmark
measures whether that pays on the paper's MNIST network at FedDST's ERK
budgets for S = --sparsity (conv2 keeps 396 of its 5,000 weights at 0.8).

The weights are seeded random values (Keras' initialisers), masked at
those budgets: dense1 in 1x4 blocks (as `--mask_block=1x4` trains it) and,
for the im2col variants, conv2 in 1x4 blocks of its patch axis (the HWI
axis of its kernel, 250 entries padded to 252; blocks drawn among the 62
whole ones); latency depends on the
shapes and the sparsity pattern, not on trained values. Variants, each a
float32 TFLite file:

  dense          the masked network stored dense (no sparse encoding);
  dense1_blocks  what a `--mask_block=1x4` FedDST export is: dense1 kept
                 sparse, conv2 densified at load;
  im2col_slices  conv2 as 25 STRIDED_SLICEs + CONCATENATION + PAD, then a
                 block-sparse FULLY_CONNECTED (kept sparse);
  im2col_gather  the same with one GATHER of conv2's input rows instead of
                 the slices;
  no_conv2       conv2 replaced by a slice and a tile (no arithmetic): what
                 the rest of the network costs, a floor for any conv2;
  pair_sparse    dense1 in 1x4 blocks and conv2 masked in whole 5x5
                 kernels (`--conv_block=kernel`: its budget's 15 of its 200
                 (input, output) channel pairs, drawn at random), which the
                 sparse export runs as select, depthwise and mix
                 (`tflite_export.pair_sparse`).

Each variant's batch-1 latency (1 thread, TensorFlow's interpreter with its
default XNNPack delegate) is the median of --latency_examples single-image
invokes on Fashion-MNIST-sized random images, timed in --sweeps sweeps, in
turn and in reverse order on alternate sweeps. Prints a table and writes
it (sparse_conv.md) with every timing (sparse_conv.json) to --output_dir.
The im2col variants' outputs are checked against the CONV_2D network's
(atol 1e-5) before timing, pair_sparse's against the same weights' dense
export.
"""

import json
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402


def define_flags() -> None:
  """The command line's flags. Only `python -m benchmarks.sparse_conv`
  defines them, so that importing the module (the tests do) leaves absl's
  global flag names to run.py and the other tools."""
  flags.DEFINE_string("output_dir", "runs/sparse_conv", "Where the table and timings go.")
  flags.DEFINE_float("sparsity", 0.8, "FedDST's sparsity S; ERK budgets per layer.", lower_bound=0.0, upper_bound=0.99)
  flags.DEFINE_integer("latency_examples", 1000, "Timed single-image invokes per variant and sweep.", lower_bound=1)
  flags.DEFINE_integer("sweeps", 3, "Sweeps over the variants.", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "Seed of the weights, masks and images.")


VARIANTS = ("dense", "dense1_blocks", "im2col_slices", "im2col_gather", "no_conv2", "pair_sparse")
BLOCK = 4  # float32 FULLY_CONNECTED block: 1x4 along the input.
INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 10


def patch_axis(kernel_shape) -> tuple[int, int]:
  """(entries, entries padded to whole blocks) of a conv kernel's HWI axis."""
  k_h, k_w, c_in, _ = kernel_shape
  size = k_h * k_w * c_in
  return size, -(-size // BLOCK) * BLOCK


def patches_by_slices(x, k_h: int, k_w: int, padded: int):
  """[N, H, W, C] -> [N * H' * W', padded]: each output position's valid
  k_h x k_w patch in (row, column, channel) order, as a conv kernel's HWI
  axis is laid out, zero-padded to `padded` entries."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  out_h, out_w = x.shape[1] - k_h + 1, x.shape[2] - k_w + 1
  parts = [x[:, i:i + out_h, j:j + out_w, :] for i in range(k_h) for j in range(k_w)]
  patches = tf.concat(parts, axis=-1)
  size = patches.shape[-1]
  if padded > size:
    patches = tf.pad(patches, [[0, 0], [0, 0], [0, 0], [0, padded - size]])
  return tf.reshape(patches, [-1, padded])


def gather_indices(height: int, width: int, k_h: int, k_w: int) -> np.ndarray:
  """Row indices into a [height * width, C] input, output position-major,
  then (row, column) of the patch: gathering them and reshaping gives the
  patches in HWI order."""
  out_h, out_w = height - k_h + 1, width - k_w + 1
  return np.array(
      [(i + a) * width + (j + b)
       for i in range(out_h) for j in range(out_w)
       for a in range(k_h) for b in range(k_w)],
      dtype=np.int32,
  )


def patches_by_gather(x, k_h: int, k_w: int, padded: int):
  """`patches_by_slices` with one GATHER of the input's pixel rows."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  height, width, channels = x.shape[1:]
  rows = tf.reshape(x, [-1, height * width, channels])
  picked = tf.gather(rows, gather_indices(height, width, k_h, k_w), axis=1)
  patches = tf.reshape(picked, [-1, k_h * k_w * channels])
  size = k_h * k_w * channels
  if padded > size:
    patches = tf.pad(patches, [[0, 0], [0, padded - size]])
  return patches


def im2col_conv(x, kernel: np.ndarray, bias: np.ndarray, how: str):
  """A valid, stride-1 convolution as patches times the [padded, C_out]
  matrix of `kernel` (HWIO), plus `bias`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  k_h, k_w, _, c_out = kernel.shape
  size, padded = patch_axis(kernel.shape)
  matrix = np.zeros((padded, c_out), np.float32)
  matrix[:size] = kernel.reshape(size, c_out)
  build = patches_by_slices if how == "slices" else patches_by_gather
  out_h, out_w = x.shape[1] - k_h + 1, x.shape[2] - k_w + 1
  y = tf.matmul(build(x, k_h, k_w, padded), tf.constant(matrix)) + bias
  return tf.reshape(y, [-1, out_h, out_w, c_out])


def masked_weights(sparsity: float, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{layer: (kernel, bias)} of the MNIST network, Keras-initialised with
  `seed`, the kernels masked at FedDST's ERK budgets for `sparsity`: dense1
  in 1x4 blocks, conv2 in whole 1x4 blocks of its patch axis, the others
  element-wise."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from keras_models import networks  # pylint: disable=g-import-not-at-top
  from tff_feddst import masks  # pylint: disable=g-import-not-at-top

  tf.keras.utils.set_random_seed(seed)
  model = networks.build_model("mnist_cnn", INPUT_SHAPE, NUM_CLASSES)
  layers = networks.prunable_layers(model)
  shapes = [tuple(layer.kernel.shape) for layer in layers]
  rows = masks.layer_rows(shapes, BLOCK)
  budgets = masks.layer_budgets(shapes, sparsity, "erk", rows)
  layer_masks = masks.random_masks(shapes, budgets, seed, rows)
  rng = np.random.default_rng(seed)
  weights = {}
  for layer, shape, budget, mask in zip(layers, shapes, budgets, layer_masks):
    kernel = layer.kernel.numpy()
    if layer.name == "conv2":
      # Blocks are drawn among the whole ones (the last, half padding,
      # never), so conv2 keeps exactly its budget.
      size, padded = patch_axis(shape)
      grid = np.zeros((size // BLOCK) * shape[-1], np.float32)
      grid[rng.permutation(grid.size)[:budget // BLOCK]] = 1.0
      block_mask = np.zeros((padded, shape[-1]), np.float32)
      block_mask[: (size // BLOCK) * BLOCK] = np.repeat(grid.reshape(size // BLOCK, shape[-1]), BLOCK, axis=0)
      mask = block_mask[:size].reshape(shape)
    weights[layer.name] = (kernel * mask, layer.bias.numpy())
  return weights


def kernel_block_weights(weights, seed: int):
  """`weights` with conv2 masked in whole k_h x k_w kernels instead: its
  budget (the count of non-zeros in `weights`' conv2) // (k_h k_w) of its
  (input, output) channel pairs, drawn with `seed`."""
  kernel, bias = weights["conv2"]
  k_h, k_w, c_in, c_out = kernel.shape
  pairs = np.count_nonzero(kernel) // (k_h * k_w)
  keep = np.zeros(c_in * c_out, np.float32)
  keep[np.random.default_rng(seed).permutation(keep.size)[:pairs]] = 1.0
  from keras_models import networks  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.keras.utils.set_random_seed(seed)
  full = networks.build_model("mnist_cnn", INPUT_SHAPE, NUM_CLASSES).get_layer("conv2").kernel.numpy()
  return {**weights, "conv2": (full * keep.reshape(1, 1, c_in, c_out), bias)}


def build(variant: str, weights):
  """The MNIST network of `variant` (module docstring) with `weights`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  layers = tf.keras.layers
  inputs = tf.keras.Input(INPUT_SHAPE)
  conv1 = layers.Conv2D(10, 5, name="conv1")
  x = layers.ReLU()(layers.MaxPool2D(3, strides=1)(conv1(inputs)))
  kernel, bias = weights["conv2"]
  if variant in ("dense", "dense1_blocks", "pair_sparse"):
    x = layers.Conv2D(20, 5, name="conv2")(x)
  elif variant == "im2col_slices":
    x = layers.Lambda(lambda t: im2col_conv(t, kernel, bias, "slices"))(x)
  elif variant == "im2col_gather":
    x = layers.Lambda(lambda t: im2col_conv(t, kernel, bias, "gather"))(x)
  elif variant == "no_conv2":
    x = layers.Lambda(lambda t: tf.tile(t[:, 2:20, 2:20, :], [1, 1, 1, 2]))(x)
  else:
    raise ValueError(f"unknown variant {variant!r}")
  x = layers.ReLU()(layers.MaxPool2D(3, strides=1)(x))
  x = layers.Flatten()(x)
  dense1 = layers.Dense(50, activation="relu", name="dense1")
  logits = layers.Dense(NUM_CLASSES, name="logits")
  outputs = logits(dense1(x))
  model = tf.keras.Model(inputs, outputs)
  for name in ("conv1", "dense1", "logits") + (("conv2",) if variant in ("dense", "dense1_blocks", "pair_sparse") else ()):
    model.get_layer(name).set_weights(list(weights[name]))
  return model


def export(variant: str, weights) -> bytes:
  """`variant`'s float32 file; pair_sparse's `weights` are
  `kernel_block_weights`."""
  from tflite_export import convert  # pylint: disable=g-import-not-at-top

  return convert(build(variant, weights), sparse=variant != "dense")


def check_outputs(
    contents: dict[str, bytes], images: np.ndarray, atol: float = 1e-5, pair_reference: bytes | None = None
) -> dict[str, float]:
  """Largest |difference| of each im2col variant's logits from `dense`'s
  (and of pair_sparse's from `pair_reference`, the dense export of its
  weights, where both are given); raises AssertionError above `atol`."""
  from tflite_export import evaluate  # pylint: disable=g-import-not-at-top

  references = {"dense": evaluate.predict_logits(contents["dense"], images)}
  checked = [(v, "dense") for v in ("dense1_blocks", "im2col_slices", "im2col_gather") if v in contents]
  if pair_reference is not None and "pair_sparse" in contents:
    references["pair"] = evaluate.predict_logits(pair_reference, images)
    checked.append(("pair_sparse", "pair"))
  differences = {}
  for variant, reference in checked:
    reference = references[reference]
    difference = float(np.abs(evaluate.predict_logits(contents[variant], images) - reference).max())
    if difference > atol:
      raise AssertionError(f"{variant}: logits differ from the dense export's by {difference}")
    differences[variant] = difference
  return differences


def conv2_weight_kept_sparse(content: bytes) -> bool:
  """Whether the file's conv2 weight is stored sparse and read without DENSIFY."""
  from tflite_export import inspect_model  # pylint: disable=g-import-not-at-top

  tensors = [t for t in inspect_model.sparse_tensors(content) if "dense1" not in t.name and "logits" not in t.name]
  return bool(tensors) and all(t.kept_sparse for t in tensors)


def conv2_computed_sparse(content: bytes) -> bool:
  """Whether the file computes conv2 from its non-zeros only: its weight
  kept sparse (im2col), or only its kept channel pairs (a
  DEPTHWISE_CONV_2D: `tflite_export.pair_sparse`)."""
  from tflite_export import inspect_model  # pylint: disable=g-import-not-at-top

  return conv2_weight_kept_sparse(content) or "DEPTHWISE_CONV_2D" in inspect_model.operators(content)


def _table(medians: dict[str, list[float]], p90s: dict[str, list[float]], kept: dict[str, bool], sizes: dict[str, int]) -> str:
  dense = statistics.median(medians["dense"])
  lines = [
      "| variant | file bytes | conv2 computed from its non-zeros only | median ms per sweep | p90 ms (median of sweeps) | x dense |",
      "|---|---|---|---|---|---|",
  ]
  for variant in medians:
    median = statistics.median(medians[variant])
    lines.append(
        f"| {variant} | {sizes[variant]:,} | {'yes' if kept[variant] else 'no'} | "
        f"{', '.join(f'{m:.4f}' for m in medians[variant])} | {statistics.median(p90s[variant]):.4f} | "
        f"{median / dense:.2f}x |"
    )
  return "\n".join(lines)


def main(argv):
  del argv
  from tflite_export import evaluate  # pylint: disable=g-import-not-at-top

  output_dir, seed = flags.FLAGS.output_dir, flags.FLAGS.seed
  sweeps, latency_examples = flags.FLAGS.sweeps, flags.FLAGS.latency_examples

  weights = masked_weights(flags.FLAGS.sparsity, seed)
  images = np.random.default_rng(seed).random((1000,) + INPUT_SHAPE).astype(np.float32)
  pair_weights = kernel_block_weights(weights, seed)
  contents = {
      variant: export(variant, pair_weights if variant == "pair_sparse" else weights)
      for variant in VARIANTS
  }
  differences = check_outputs(contents, images[:64], pair_reference=export("dense", pair_weights))
  kept = {variant: conv2_computed_sparse(content) for variant, content in contents.items()}
  medians = {variant: [] for variant in VARIANTS}
  p90s = {variant: [] for variant in VARIANTS}
  for sweep in range(sweeps):
    order = VARIANTS if sweep % 2 == 0 else tuple(reversed(VARIANTS))
    for variant in order:
      timing = evaluate.batch1_latency_ms(
          contents[variant], images, num_examples=latency_examples, num_threads=1
      )
      medians[variant].append(timing["median_ms"])
      p90s[variant].append(timing["p90_ms"])
      print(f"sweep {sweep + 1}/{sweeps}  {variant:14s} median {timing['median_ms']:.4f} ms", flush=True)
  sizes = {variant: len(content) for variant, content in contents.items()}
  table = _table(medians, p90s, kept, sizes)
  print(table)
  os.makedirs(output_dir, exist_ok=True)
  with open(os.path.join(output_dir, "sparse_conv.md"), "w") as f:
    f.write(table + "\n")
  with open(os.path.join(output_dir, "sparse_conv.json"), "w") as f:
    json.dump(
        {
            "sparsity": flags.FLAGS.sparsity,
            "seed": seed,
            "latency_examples": latency_examples,
            "median_ms": medians,
            "p90_ms": p90s,
            "conv2_computed_sparse": kept,
            "file_bytes": sizes,
            "max_logit_difference_from_dense": differences,
        },
        f,
        indent=1,
    )
  return 0


if __name__ == "__main__":
  define_flags()
  sys.exit(app.run(main))
