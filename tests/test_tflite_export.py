"""Sparse TFLite export: the real converter and interpreters on a trained model.

The module trains the paper's MNIST CNN briefly on real Fashion-MNIST images,
prunes it to 80% with tfmot, and checks the exported files: accuracy equal to
Keras, sparse tensors really present in the flatbuffer and a smaller file,
quantised variants, the report, the command line and the standalone runtime.
"""

import functools
import gzip
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from keras_models import networks
import tflite_export
from tflite_export import evaluate as tfl_eval
from tflite_export import inspect_model
from tflite_export import report as report_lib

from conftest import require_fashion_mnist_dir
import run_server

convert_lib = sys.modules["tflite_export.convert"]  # the function `convert` shadows the module

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN, NUM_TEST = 4000, 2000
SPARSITY = 0.8
HAS_LITERT = importlib.util.find_spec("ai_edge_litert") is not None
LITERT_SKIP = (
    "ai-edge-litert is not installed in this environment "
    "(add ai-edge-litert==1.4.0 and backports.strenum==1.2.8 to "
    "requirements.lock)"
)
# TensorFlow's C++ log lines ("2026-01-01 12:00:00.000000: E tensorflow/...").
TF_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWEF] ")


def _read_idx(path: str, count: int) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  shape = np.frombuffer(data, ">u4", count=ndim, offset=4).astype(int)
  array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)
  return array[:count]


@pytest.fixture(scope="module")
def fmnist():
  """The first NUM_TRAIN / NUM_TEST Fashion-MNIST images, NHWC in [0, 1]."""
  require_fashion_mnist_dir(FMNIST_DIR)

  def images(name, count):
    raw = _read_idx(
        os.path.join(FMNIST_DIR, f"{name}-images-idx3-ubyte.gz"), count
    )
    return (raw[..., None] / 255.0).astype(np.float32)

  def labels(name, count):
    raw = _read_idx(
        os.path.join(FMNIST_DIR, f"{name}-labels-idx1-ubyte.gz"), count
    )
    return raw.astype(np.int32)

  return {
      "x_train": images("train", NUM_TRAIN),
      "y_train": labels("train", NUM_TRAIN),
      "x_test": images("t10k", NUM_TEST),
      "y_test": labels("t10k", NUM_TEST),
  }


def _prune_prunable(layer):
  if networks.is_prunable(layer):
    schedule = tfmot.sparsity.keras.ConstantSparsity(
        SPARSITY, begin_step=0, frequency=1
    )
    return tfmot.sparsity.keras.prune_low_magnitude(
        layer, pruning_schedule=schedule
    )
  return layer


def _compile(model):
  model.compile(
      optimizer=tf.keras.optimizers.Adam(1e-3),
      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
  )


@pytest.fixture(scope="module")
def wrapped_model(fmnist):
  """mnist_cnn: a dense epoch, then an epoch pruned to 80% (still wrapped)."""
  tf.keras.utils.set_random_seed(0)
  model = networks.build_model("mnist_cnn", (28, 28, 1), 10)
  _compile(model)
  model.fit(
      fmnist["x_train"], fmnist["y_train"], batch_size=32, epochs=1, verbose=0
  )
  # The clone wraps the trained layers themselves, so it keeps their weights.
  pruned = tf.keras.models.clone_model(model, clone_function=_prune_prunable)
  _compile(pruned)
  pruned.fit(
      fmnist["x_train"],
      fmnist["y_train"],
      batch_size=32,
      epochs=1,
      verbose=0,
      callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
  )
  return pruned


@pytest.fixture(scope="module")
def plain_model(wrapped_model):
  return tflite_export.export_model(wrapped_model)


@pytest.fixture(scope="module")
def keras_logits(plain_model, fmnist):
  return plain_model.predict(fmnist["x_test"], batch_size=256, verbose=0)


@pytest.fixture(scope="module")
def exports(plain_model, fmnist):
  """Every exported variant of the same weights, by name."""
  rep = fmnist["x_train"][:300]
  settings = {
      "dense": dict(sparse=False),
      "sparse": dict(sparse=True),
      "sparse_float16": dict(sparse=True, quantization="float16"),
      "dense_int8": dict(
          sparse=False, quantization="int8", representative_data=rep
      ),
      "sparse_int8": dict(
          sparse=True, quantization="int8", representative_data=rep
      ),
  }
  return {
      name: tflite_export.convert(plain_model, **kwargs)
      for name, kwargs in settings.items()
  }


def _accuracy(logits, labels):
  return float(np.mean(np.argmax(logits, -1) == labels))


def test_model_is_80_percent_sparse(plain_model):
  sparsity, per_layer = tflite_export.weight_sparsity(plain_model)
  assert sparsity == pytest.approx(SPARSITY, abs=0.01)
  assert set(per_layer) == {"conv1", "conv2", "dense1", "logits"}


def test_float32_tflite_accuracy_equals_keras(exports, keras_logits, fmnist):
  keras_acc = _accuracy(keras_logits, fmnist["y_test"])
  assert keras_acc > 0.6  # It did learn something.
  for name in ("dense", "sparse"):
    logits = tflite_export.predict_logits(exports[name], fmnist["x_test"])
    np.testing.assert_allclose(logits, keras_logits, atol=1e-3)
    assert abs(_accuracy(logits, fmnist["y_test"]) - keras_acc) <= 0.001


def test_sparse_file_is_small_and_really_sparse_encoded(exports):
  sparse, dense = exports["sparse"], exports["dense"]
  assert len(sparse) <= 0.35 * len(dense)
  sparse_infos = tflite_export.sparse_tensors(sparse)
  # All four kernels (2 conv, 2 dense) carry TFLite's sparsity table.
  assert sorted(info.shape for info in sparse_infos) == [
      (10, 5, 5, 1),
      (10, 50),
      (20, 5, 5, 10),
      (50, 5120),
  ]
  assert all(
      info.dtype == "FLOAT32" and "SPARSE_CSR" in info.dim_formats
      for info in sparse_infos
  )
  assert tflite_export.count_sparse_tensors(dense) == 0
  assert "DENSIFY" in inspect_model.summarize(sparse)["operators"]
  assert "DENSIFY" not in inspect_model.summarize(dense)["operators"]


def test_interpreter_sees_the_same_sparse_tensors(exports):
  interpreter = tf.lite.Interpreter(model_content=exports["sparse"])
  with_sparsity = [
      d["name"]
      for d in interpreter.get_tensor_details()
      if d.get("sparsity_parameters")
  ]
  assert len(with_sparsity) == tflite_export.count_sparse_tensors(
      exports["sparse"]
  )


def test_wrapped_model_is_exported_with_masks_applied(
    wrapped_model, exports, fmnist
):
  wrapper = next(l for l in wrapped_model.layers if hasattr(l, "pruning_vars"))
  kernel, mask, _ = wrapper.pruning_vars[0]
  before = kernel.numpy()
  # Values under the mask, as left by an optimizer step not yet re-masked.
  kernel.assign(before + 0.01 * (1 - mask.numpy()))
  try:
    plain = tflite_export.export_model(wrapped_model)
    assert tflite_export.weight_sparsity(plain)[0] == pytest.approx(
        SPARSITY, abs=0.01
    )
    np.testing.assert_array_equal(
        kernel.numpy(), before + 0.01 * (1 - mask.numpy())
    )
    content = tflite_export.convert(wrapped_model)
  finally:
    kernel.assign(before)
  assert abs(len(content) - len(exports["sparse"])) < 1024
  np.testing.assert_array_equal(
      tflite_export.predict(content, fmnist["x_test"][:200]),
      tflite_export.predict(exports["sparse"], fmnist["x_test"][:200]),
  )


def test_float16_and_int8_exports_run(exports, keras_logits, fmnist):
  keras_acc = _accuracy(keras_logits, fmnist["y_test"])
  f16 = tflite_export.predict(exports["sparse_float16"], fmnist["x_test"])
  assert abs(np.mean(f16 == fmnist["y_test"]) - keras_acc) <= 0.005
  for name in ("dense_int8", "sparse_int8"):
    int8 = tflite_export.predict(exports[name], fmnist["x_test"])
    assert abs(np.mean(int8 == fmnist["y_test"]) - keras_acc) <= 0.03
  details = tf.lite.Interpreter(
      model_content=exports["sparse_int8"]
  ).get_input_details()
  assert details[0]["dtype"] == np.int8


def test_sparsity_survives_quantization(exports):
  f16 = tflite_export.sparse_tensors(exports["sparse_float16"])
  int8 = tflite_export.sparse_tensors(exports["sparse_int8"])
  assert len(f16) == 4 and {info.dtype for info in f16} == {"FLOAT16"}
  assert len(int8) == 4 and {info.dtype for info in int8} == {"INT8"}
  assert tflite_export.count_sparse_tensors(exports["dense_int8"]) == 0
  assert len(exports["sparse_int8"]) < len(exports["dense_int8"])
  # float16 values, same indices: about 2/3 of the float32 sparse file.
  assert len(exports["sparse_float16"]) < 0.75 * len(exports["sparse"])


def test_float16_block_sparse_kernel_falls_back_to_dense_encoding(fmnist):
  # TF 2.14 block-encodes a float16 Dense kernel whose zeros form 1x4 blocks
  # and feeds it to DEQUANTIZE without DENSIFY; the interpreter then gives NaN.
  tf.keras.utils.set_random_seed(1)
  model = networks.build_model("mnist_cnn", (28, 28, 1), 10)
  dense1 = model.get_layer("dense1")
  blocks = dense1.kernel.numpy().reshape(-1, 4, 50)
  keep = np.abs(blocks).sum(1) >= np.quantile(np.abs(blocks).sum(1), SPARSITY)
  dense1.kernel.assign((blocks * keep[:, None, :]).reshape(-1, 50))
  content = tflite_export.convert(model, quantization="float16")
  assert inspect_model.unreadable_sparse_inputs(content) == []
  logits = tflite_export.predict_logits(content, fmnist["x_test"][:100])
  np.testing.assert_allclose(
      logits, model(fmnist["x_test"][:100]).numpy(), atol=1e-2
  )


def _block_sparse_mnist_cnn(seed):
  """mnist_cnn whose dense1 kernel keeps 20% of its 1x4 blocks (4
  consecutive input rows of one neuron: TFLite's 1x4 blocks once the kernel
  is transposed to [out, in]); the other kernels stay dense."""
  tf.keras.utils.set_random_seed(seed)
  model = networks.build_model("mnist_cnn", (28, 28, 1), 10)
  dense1 = model.get_layer("dense1")
  blocks = dense1.kernel.numpy().reshape(-1, 4, 50)
  norms = np.abs(blocks).sum(1)
  keep = norms >= np.quantile(norms, SPARSITY)
  dense1.kernel.assign((blocks * keep[:, None, :]).reshape(-1, 50))
  return model


def test_kept_sparse_means_no_densify_reads_the_tensor():
  def info(sparse, consumers):
    return inspect_model.TensorInfo(
        0, 0, "w", (4, 4), "FLOAT32", 1, 16, sparse, consumers=consumers
    )

  assert info(True, ("FULLY_CONNECTED",)).kept_sparse
  assert not info(True, ("DENSIFY",)).kept_sparse
  assert not info(False, ("FULLY_CONNECTED",)).kept_sparse


def test_densify_detection_on_real_converted_models(exports, fmnist):
  # Random (FedDST-like) sparsity: every sparse kernel goes through DENSIFY.
  random = inspect_model.summarize(exports["sparse"])
  assert random["num_sparse_tensors"] == 4
  assert random["num_kept_sparse_tensors"] == 0
  assert all(t["consumers"] == ["DENSIFY"] for t in random["sparse_tensors"])
  assert not any(t["kept_sparse"] for t in random["sparse_tensors"])
  # 1x4 blocks in dense1 (float32): FULLY_CONNECTED reads the sparse tensor.
  model = _block_sparse_mnist_cnn(seed=1)
  content = tflite_export.convert(model)
  (dense1,) = tflite_export.sparse_tensors(content)
  assert dense1.shape == (50, 5120) and dense1.block_map
  assert dense1.consumers == ("FULLY_CONNECTED",) and dense1.kept_sparse
  assert "DENSIFY" not in inspect_model.summarize(content)["operators"]
  x = fmnist["x_test"][:100]
  np.testing.assert_allclose(
      tflite_export.predict_logits(content, x), model(x).numpy(), atol=1e-5
  )


def test_bad_quantization_settings(plain_model):
  with pytest.raises(ValueError, match="float32, float16, int8"):
    tflite_export.convert(plain_model, quantization="int4")
  with pytest.raises(ValueError, match="representative_data"):
    tflite_export.convert(plain_model, quantization="int8")


def test_int8_conversion_prints_no_calibrator_line_and_keeps_other_stderr(capfd):
  """The calibrator's native `fully_quantize: 0, ...` line is dropped; other
  native stderr written while it is caught still reaches stderr."""
  model = tf.keras.Sequential([tf.keras.Input((6,)), tf.keras.layers.Dense(3)])
  data = np.random.default_rng(0).random((8, 6), dtype=np.float32)
  content = tflite_export.convert(model, quantization="int8", representative_data=data)
  assert tflite_export.predict(content, data).shape == (8,)
  err = capfd.readouterr().err
  assert "fully_quantize" not in err and "inference_type" not in err, err
  with convert_lib._without_calibrator_noise():  # pylint: disable=protected-access
    os.write(2, b"fully_quantize: 0, inference_type: 6, input_inference_type: INT8, "
             b"output_inference_type: INT8\nnative note\n")
  assert capfd.readouterr().err == "native note\n"


def test_batch1_equals_batched_and_latency(exports, fmnist):
  x = fmnist["x_test"][:64]
  for name in ("sparse", "sparse_int8"):
    np.testing.assert_array_equal(
        tflite_export.predict(exports[name], x, batch_size=1),
        tflite_export.predict(exports[name], x, batch_size=256),
    )
  latency = tflite_export.batch1_latency_ms(
      exports["sparse"], x, num_examples=30
  )
  assert latency["num_examples"] == 30
  assert 0 < latency["median_ms"] <= latency["p90_ms"]


def test_builtin_kernels_without_xnnpack_agree(exports, fmnist):
  x = fmnist["x_test"][:200]
  builtin = functools.partial(tflite_export.tf_interpreter, use_xnnpack=False)
  np.testing.assert_allclose(
      tflite_export.predict_logits(
          exports["sparse"], x, interpreter_factory=builtin
      ),
      tflite_export.predict_logits(exports["sparse"], x),
      atol=1e-4,
  )


def test_client_accuracy_from_index_lists(exports, fmnist):
  y = fmnist["y_test"]
  predictions = tflite_export.predict(exports["sparse"], fmnist["x_test"])
  clients = [
      np.arange(0, 10),
      np.arange(10, 100),
      np.array([], dtype=int),
      np.array([5, 7]),
  ]
  per_client = tflite_export.per_client_accuracy(predictions, y, clients)
  assert per_client[0] == np.mean(predictions[:10] == y[:10])
  assert np.isnan(per_client[2])
  expected = np.mean([per_client[0], per_client[1], per_client[3]])
  assert tflite_export.mean_client_accuracy(
      predictions, y, clients
  ) == pytest.approx(expected)


def test_export_and_report(plain_model, keras_logits, fmnist, tmp_path):
  clients = np.array_split(np.arange(NUM_TEST), 20)
  report = tflite_export.export_and_report(
      plain_model,
      output_dir=str(tmp_path),
      x_test=fmnist["x_test"],
      y_test=fmnist["y_test"],
      client_test_indices=clients,
      representative_data=fmnist["x_train"][:300],
      latency_examples=20,
  )
  assert sorted(os.listdir(tmp_path)) == ["model.tflite", "tflite_report.json"]
  with open(tmp_path / "tflite_report.json") as f:
    assert json.load(f) == report
  model_bytes = (tmp_path / "model.tflite").read_bytes()
  sparse, dense = report["exports"]["sparse"], report["exports"]["dense"]
  assert sparse["size_bytes"] == os.path.getsize(tmp_path / "model.tflite")
  assert report["model_sha256"] == hashlib.sha256(model_bytes).hexdigest()
  assert (
      report["size_ratio_sparse_dense"]
      == sparse["size_bytes"] / dense["size_bytes"]
      <= 0.35
  )
  assert sparse["num_sparse_tensors"] == 4 and dense["num_sparse_tensors"] == 0
  # Random sparsity: the runtime expands every sparse tensor at load.
  assert sparse["num_kept_sparse_tensors"] == 0
  assert [t["kept_sparse"] for t in sparse["sparse_tensors"]] == [False] * 4
  assert report["latency_ratio_sparse_dense"] == pytest.approx(
      sparse["batch1_latency_median_ms"] / dense["batch1_latency_median_ms"]
  )
  assert sparse["batch1_latency_num_examples"] == 20
  assert sparse["batch1_latency_distinct_images"] == 20
  if HAS_LITERT:
    assert 0 < sparse["standalone_batch1_latency_median_ms"]
    assert report["standalone_latency_ratio_sparse_dense"] > 0
  assert report["weight_sparsity"] == pytest.approx(SPARSITY, abs=0.01)
  keras_acc = _accuracy(keras_logits, fmnist["y_test"])
  assert report["keras"]["accuracy"] == pytest.approx(keras_acc)
  for entry in (sparse, dense):
    assert abs(entry["accuracy"] - keras_acc) <= 0.001
    assert (
        abs(entry["clients_accuracy"] - report["keras"]["clients_accuracy"])
        <= 0.005
    )
    assert (
        0 < entry["batch1_latency_median_ms"] <= entry["batch1_latency_p90_ms"]
    )
    assert entry["batched_examples_per_s"] > 0


def test_failed_export_leaves_old_files_and_no_temp_files(
    plain_model, fmnist, tmp_path, monkeypatch
):
  (tmp_path / "model.tflite").write_bytes(b"old model")
  (tmp_path / "tflite_report.json").write_text("{}")
  kwargs = dict(
      output_dir=str(tmp_path), y_test=fmnist["y_test"][:50], latency_examples=0
  )
  with pytest.raises(ValueError, match="shape"):
    tflite_export.export_and_report(
        plain_model, x_test=np.zeros((50, 32, 32, 3)), **kwargs
    )

  def failing_replace(src, dst):
    raise OSError("disk full")

  monkeypatch.setattr(report_lib.os, "replace", failing_replace)
  with pytest.raises(OSError, match="disk full"):
    tflite_export.export_and_report(
        plain_model, x_test=fmnist["x_test"][:50], **kwargs
    )
  assert sorted(os.listdir(tmp_path)) == ["model.tflite", "tflite_report.json"]
  assert (tmp_path / "model.tflite").read_bytes() == b"old model"


# --- The command line ---------------------------------------------------------


def _cli(*args):
  """`python -m tflite_export ARGS`, forked from the run server."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return run_server.start(args, env=env, cwd=REPO, module="tflite_export")


def _own_stderr_lines(stderr: str) -> list[str]:
  return [
      l for l in stderr.splitlines() if l.strip() and not TF_LOG_LINE.match(l)
  ]


@pytest.fixture(scope="module")
def run_dir(plain_model, tmp_path_factory):
  """A run directory as run.py leaves it: final_model.keras and config.json."""
  path = tmp_path_factory.mktemp("run")
  plain_model.save(str(path / "final_model.keras"))
  (path / "config.json").write_text(
      json.dumps({"dataset": "fashion_mnist", "data_dir": FMNIST_DIR})
  )
  return path


def test_cli_exports_a_saved_model(run_dir, plain_model, tmp_path):
  proc = _cli(
      f"--checkpoint={run_dir / 'final_model.keras'}",
      f"--output={tmp_path / 'out'}",
      "--test_examples=500",
      "--latency_examples=10",
  )
  stdout, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr
  assert "Traceback" not in stderr
  assert "wrote" in stdout
  assert sorted(os.listdir(tmp_path / "out")) == [
      "model.tflite",
      "tflite_report.json",
  ]
  with open(tmp_path / "out" / "tflite_report.json") as f:
    report = json.load(f)
  assert report["num_test_examples"] == 500
  assert report["exports"]["sparse"]["num_sparse_tensors"] == 4
  assert report["exports"]["sparse"]["size_bytes"] == os.path.getsize(
      tmp_path / "out" / "model.tflite"
  )
  assert (
      abs(report["exports"]["sparse"]["accuracy"] - report["keras"]["accuracy"])
      <= 0.001
  )


def test_cli_bad_inputs_give_one_line(run_dir, tmp_path):
  good = run_dir / "final_model.keras"
  truncated = tmp_path / "truncated.keras"  # As after an interrupted copy.
  truncated.write_bytes(good.read_bytes()[:3000])
  cifar = tmp_path / "cifar" / "final_model.keras"
  cifar.parent.mkdir()
  networks.build_model("cifar10_cnn", (32, 32, 3), 10).save(str(cifar))
  out = f"--output={tmp_path / 'out'}"
  cases = {
      "checkpoint not found": [
          f"--checkpoint={tmp_path / 'missing.keras'}",
          out,
      ],
      "cannot load checkpoint": [
          f"--checkpoint={truncated}",
          out,
          "--dataset=fashion_mnist",
      ],
      "data set 'fashion_mnist' has images of shape (28, 28, 1)": [
          f"--checkpoint={cifar}",
          out,
          "--dataset=fashion_mnist",
          f"--data_dir={FMNIST_DIR}",
      ],
      "unknown quantization 'int4'": [
          f"--checkpoint={good}",
          out,
          "--quantization=int4",
      ],
      "--test_examples must be >= 0, got -5": [f"--checkpoint={good}", out, "--test_examples=-5"],
      "--num_threads must be >= 1, got 0": [f"--checkpoint={good}", out, "--num_threads=0"],
  }
  procs = {expected: _cli(*args) for expected, args in cases.items()}
  for expected, proc in procs.items():
    _, stderr = proc.communicate(timeout=300)
    lines = _own_stderr_lines(stderr)
    assert proc.returncode != 0, expected
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert expected in lines[0]
  assert not (tmp_path / "out").exists()


# --- The standalone runtime ---------------------------------------------------

_STANDALONE = """
import sys
import numpy as np
from ai_edge_litert.interpreter import Interpreter
model, images, out = sys.argv[1:]
x = np.load(images)
interpreter = Interpreter(model_path=model, num_threads=1)
inp = interpreter.get_input_details()[0]
interpreter.resize_tensor_input(inp["index"], list(x.shape))
interpreter.allocate_tensors()
interpreter.set_tensor(inp["index"], x)
interpreter.invoke()
logits = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
assert "tensorflow" not in sys.modules
np.save(out, logits)
"""


@pytest.mark.skipif(not HAS_LITERT, reason=LITERT_SKIP)
def test_standalone_runtime_runs_the_sparse_file(exports, fmnist, tmp_path):
  model = tmp_path / "model.tflite"
  model.write_bytes(exports["sparse"])
  x = fmnist["x_test"][:300]
  np.save(tmp_path / "x.npy", x)
  subprocess.run(
      [
          sys.executable,
          "-c",
          _STANDALONE,
          str(model),
          str(tmp_path / "x.npy"),
          str(tmp_path / "y.npy"),
      ],
      check=True,
      timeout=120,
  )
  reference = tflite_export.predict_logits(exports["sparse"], x)
  standalone = np.load(tmp_path / "y.npy")
  np.testing.assert_array_equal(
      np.argmax(standalone, -1), np.argmax(reference, -1)
  )
  np.testing.assert_allclose(standalone, reference, atol=1e-4)


@pytest.mark.skipif(not HAS_LITERT, reason=LITERT_SKIP)
def test_same_evaluation_code_on_the_standalone_runtime(exports, fmnist):
  x, y = fmnist["x_test"][:500], fmnist["y_test"][:500]
  for name in ("sparse", "sparse_int8"):
    on_tf = tfl_eval.evaluate_tflite(exports[name], x, y, latency_examples=5)
    on_litert = tfl_eval.evaluate_tflite(
        exports[name],
        x,
        y,
        latency_examples=5,
        interpreter_factory=tflite_export.litert_interpreter,
    )
    assert on_litert["accuracy"] == on_tf["accuracy"]


# --- benchmarks.sparse_conv: a convolution as patches x block-sparse FC ---


def test_im2col_conv_equals_conv2d():
  """The patch matrix (slices or gather), padded to whole 1x4 blocks, times
  the reshaped HWIO kernel is TF's valid stride-1 convolution."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from benchmarks import sparse_conv  # pylint: disable=g-import-not-at-top

  # Importing it defines no absl flags (run.py, imported beside it, owns
  # names such as --sparsity).
  assert not flags.FLAGS.flags_by_module_dict().get("benchmarks.sparse_conv")

  rng = np.random.default_rng(3)
  x = tf.constant(rng.standard_normal((2, 9, 8, 3)).astype(np.float32))
  kernel = rng.standard_normal((3, 2, 3, 5)).astype(np.float32)  # HWI = 18 -> 20
  bias = rng.standard_normal(5).astype(np.float32)
  expected = tf.nn.conv2d(x, kernel, 1, "VALID") + bias
  assert sparse_conv.patch_axis(kernel.shape) == (18, 20)
  for how in ("slices", "gather"):
    got = sparse_conv.im2col_conv(x, kernel, bias, how)
    assert got.shape == (2, 7, 7, 5)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-5)
  # Patch (row 1, column 2) of image 0: rows 1..3, columns 2..3, HWI order.
  patches = sparse_conv.patches_by_gather(x, 3, 2, 20).numpy()
  by_hand = np.concatenate([x.numpy()[0, 1 + a, 2 + b] for a in range(3) for b in range(2)])
  np.testing.assert_array_equal(patches[1 * 7 + 2, :18], by_hand)
  np.testing.assert_array_equal(patches[:, 18:], 0.0)


def test_im2col_export_runs_conv2_sparse_and_equals_the_conv_network():
  """The MNIST network's conv2 as patches x a 1x4-block-sparse FC: TFLite
  keeps that weight sparse (no DENSIFY), while the CONV_2D export densifies
  it; both compute the dense export's logits."""
  from benchmarks import sparse_conv  # pylint: disable=g-import-not-at-top
  from tff_feddst import masks  # pylint: disable=g-import-not-at-top

  weights = sparse_conv.masked_weights(0.8, seed=0)
  kernel = weights["conv2"][0]
  # ERK's conv2 budget at S = 0.8, whole 1x4 blocks of the padded HWI axis.
  budget = masks.layer_budgets(
      [(5, 5, 1, 10), (5, 5, 10, 20), (5120, 50), (50, 10)], 0.8, "erk", [1, 1, 4, 1]
  )[1]
  assert np.count_nonzero(kernel) == budget == 396
  padded = np.zeros((252, 20), np.float32)
  padded[:250] = kernel.reshape(250, 20)
  blocks = padded.reshape(63, 4, 20)
  assert (np.count_nonzero(blocks, axis=1) % 4 == 0).all()  # random values: no zero inside a block
  contents = {v: sparse_conv.export(v, weights) for v in ("dense", "dense1_blocks", "im2col_slices", "im2col_gather")}
  images = np.random.default_rng(1).random((8, 28, 28, 1)).astype(np.float32)
  differences = sparse_conv.check_outputs(contents, images)
  assert set(differences) == {"dense1_blocks", "im2col_slices", "im2col_gather"}
  assert sparse_conv.conv2_weight_kept_sparse(contents["im2col_slices"])
  assert sparse_conv.conv2_weight_kept_sparse(contents["im2col_gather"])
  assert not sparse_conv.conv2_weight_kept_sparse(contents["dense1_blocks"])
  assert "DENSIFY" not in inspect_model.operators(contents["im2col_slices"])


def test_pair_sparse_variant_keeps_whole_kernels_and_equals_its_dense_export():
  """The benchmark's pair_sparse conv2 keeps its ERK budget's 396 // 25 =
  15 whole 5x5 filters; its sparse export computes only those and the
  logits of the same weights' dense export."""
  from benchmarks import sparse_conv  # pylint: disable=g-import-not-at-top

  weights = sparse_conv.kernel_block_weights(sparse_conv.masked_weights(0.8, seed=0), seed=0)
  kernel = weights["conv2"][0]
  per_pair = np.count_nonzero(kernel, axis=(0, 1))
  assert sorted(set(per_pair.ravel())) == [0, 25] and np.count_nonzero(per_pair) == 15
  contents = {v: sparse_conv.export(v, weights) for v in ("dense", "pair_sparse")}
  images = np.random.default_rng(1).random((8, 28, 28, 1)).astype(np.float32)
  differences = sparse_conv.check_outputs(contents, images, pair_reference=contents["dense"])
  assert set(differences) == {"pair_sparse"}
  assert sparse_conv.conv2_computed_sparse(contents["pair_sparse"])
  assert not sparse_conv.conv2_computed_sparse(contents["dense"])
