"""A phase of a run: one learning process and what the driver needs around it.

Single-phase algorithms have one phase. Two-phase algorithms
(`algorithms.Algorithm.two_phase`) train the structured search first
(`structured.SearchPhase`, a subclass) and then another algorithm on the
smaller network it found, handed over as `structured.Found`.
"""

import collections
import dataclasses
import fractions
import functools
import os
import time

import numpy as np
import tensorflow as tf

import keras_models
from tff_feddst import costs
from tff_feddst import masks as masks_lib
from tff_feddst import rounds
from tff_feddst import sparse_model


class Evaluator:
  """Evaluates global weights outside TFF, on the whole test split once.

  Every client's local test set is a subset of the test split, so one pass
  gives both the test accuracy and each client's accuracy (the paper's
  measure: the mean over clients of the accuracy on their local test sets).
  """

  def __init__(self, model, fed_data, client_test_indices, batch_size: int = 1000):
    self.model = model
    self.x = fed_data.arrays.x_test
    self.y = fed_data.arrays.y_test
    self.client_indices = client_test_indices
    self.batch_size = batch_size
    self._logits = tf.function(lambda x: self.model(x, training=False))

  def correct(self, trainable_weights) -> np.ndarray:
    self.model.set_weights([np.asarray(w) for w in trainable_weights])
    hits = []
    for start in range(0, len(self.x), self.batch_size):
      logits = self._logits(self.x[start : start + self.batch_size])
      hits.append(np.argmax(logits.numpy(), axis=1) == self.y[start : start + self.batch_size])
    return np.concatenate(hits)

  def correct_on(self, trainable_weights, indices) -> np.ndarray:
    """Which of the test examples at `indices` the weights classify right
    (one batch: a client's local test set)."""
    self.model.set_weights([np.asarray(w) for w in trainable_weights])
    logits = self._logits(self.x[indices]).numpy()
    return np.argmax(logits, axis=1) == self.y[indices]

  def evaluate(self, trainable_weights) -> dict[str, float]:
    return self.figures(self.correct(trainable_weights))

  def figures(self, hits: np.ndarray) -> dict[str, float]:
    """test_accuracy and clients_accuracy of `correct`'s hits."""
    # The mean of the clients' accuracies, exact and then rounded once
    # (equal local test sets give k / m exactly, not 0.10390000000000002).
    per_client = [fractions.Fraction(int(hits[idx].sum()), len(idx)) for idx in self.client_indices]
    return {
        "test_accuracy": float(hits.mean()),
        "clients_accuracy": float(sum(per_client) / len(per_client)) if per_client else float("nan"),
    }


def client_test_indices(fed_data) -> list[np.ndarray]:
  """Each client's local test examples (indices into the test split)."""
  return [
      fed_data.test_indices(cid)
      for cid in fed_data.client_ids
      if fed_data.num_test_examples(cid) > 0
  ]


def mask_stats(built, weights, dense_flops):
  """(sparsity, forward FLOPs, masks) of a global model, as metrics.csv has them.

  Sparse algorithms: the global mask's sparsity and FLOPs at the layers'
  densities; dense ones: 0, the dense FLOPs and no masks.
  """
  if built.layout is None:
    return 0.0, costs.forward_flops(dense_flops), None
  _, masks = sparse_model.kernels_and_masks(weights, built.layout)
  densities = costs.densities_from_masks(built.layout.layer_names, masks)
  return masks_lib.sparsity_of(masks), costs.forward_flops(dense_flops, densities), masks


# Built learning processes of this Python process, by everything their build
# reads (`_build_key`), the most recently used last. A run that resumes, or
# runs again with the same settings, in the same process (the tests; a sweep
# that repeats a setting) reuses the traced computations instead of tracing
# them again (3 to 6 s a build here). A built process holds computations,
# not data: the Keras function is a partial over plain values.
_BUILT = collections.OrderedDict()
BUILT_CACHE_SIZE = 4


def _build_key(spec, algorithm_config, keras_fn: functools.partial, input_spec, extra=()):
  """What `spec.build(algorithm_config, keras_fn, input_spec, **extra)` depends on."""
  widths = keras_fn.keywords.get("widths")
  return (
      spec.builder, algorithm_config, keras_fn.func, keras_fn.args,
      None if widths is None else tuple(sorted(widths.items())),
      repr(input_spec), tuple(sorted(dict(extra).items())),
  )


def build_algorithm(spec, algorithm_config, keras_fn: functools.partial, input_spec, **extra):
  """`spec.build(...)`, or a copy of the same build made earlier in this process.

  `extra`: further (hashable) arguments of the builder, part of the key.
  The copy is shallow: the caller may replace its `initial_weights`.
  """
  key = _build_key(spec, algorithm_config, keras_fn, input_spec, extra)
  built = _BUILT.pop(key, None)
  if built is None:
    built = spec.build(algorithm_config, keras_fn, input_spec, **extra)
  _BUILT[key] = built
  while len(_BUILT) > BUILT_CACHE_SIZE:
    _BUILT.popitem(last=False)
  return dataclasses.replace(built)


def clear_built_cache() -> None:
  """Forgets the processes built so far (the next run traces its own)."""
  _BUILT.clear()


class Phase:
  """One learning process of a run, up to round `last_round`."""

  # Its key in summary.json["structured"]["phases"] (two-phase runs).
  report_name = "retrain"
  # Its own figures (of the round, `RoundStep.round_extra`, or of its
  # evaluator), as metrics.csv columns after the others.
  extra_columns: tuple[str, ...] = ()

  def __init__(self, number, spec, config, context, widths=None, found=None):
    """Builds the process of `spec` (an `algorithms.Algorithm`).

    `context`: the run's `RunContext` (data, input spec, test indices).
    `widths`: the network's hidden widths (None: the original network).
    `found`: what the previous phase handed over (its weights start this
    phase unless `config.structured_reinit`).
    """
    self.number = number
    self.spec = spec
    self.config = config
    self.last_round = config.phase_rounds()[number - 1]
    self.widths = widths
    fed_data = context.fed_data
    self.input_shape, self.num_classes = fed_data.input_shape, fed_data.num_classes
    self.keras_fn = functools.partial(
        keras_models.build_model, config.model_name, fed_data.input_shape,
        fed_data.num_classes, widths=widths,
    )
    self.built = self.build_process(spec, config.algorithm_config(spec.name), context)
    # Built after the process: TFF traces Keras models inside graphs, which
    # invalidates models made earlier.
    model = self.keras_fn()
    self.dense_flops = costs.layer_forward_flops(model)
    self.params = int(model.count_params())
    self.evaluator = Evaluator(model, fed_data, context.test_indices)
    if found is not None and found.weights is not None and not config.structured_reinit:
      self.built.initial_weights = found.initial_weights(self.built)

  def build_process(self, spec, algorithm_config, context):
    """The phase's `BuiltAlgorithm` (built once per setting in this process)."""
    return build_algorithm(spec, algorithm_config, self.keras_fn, context.input_spec)

  def describe(self) -> str:
    if not self.config.spec.two_phase:
      return self.config.algorithm
    return f"{self.config.algorithm} phase {self.number} ({self.spec.name} on widths {self.widths})"

  def initial_state(self):
    process = self.built.process
    return process.set_model_weights(process.initialize(), self.built.initial_weights)

  def make_step(self, config, fed_data, sampler, ledger, state) -> rounds.RoundStep:
    """The driver's round step of this phase."""
    return rounds.RoundStep(config, self, fed_data, sampler, ledger, state)

  def driver_arrays(self) -> list:
    """What the driver holds of this phase beyond the process's state and
    the ledger (LotteryFL: the clients' masks), saved with each checkpoint."""
    return []

  def load_driver_arrays(self, arrays) -> None:
    """Restores `driver_arrays` from a checkpoint."""
    del arrays

  def new_ledger(self, previous: costs.CommunicationLedger | None):
    """The phase's ledger; cumulative totals run on across phases."""
    ledger = costs.CommunicationLedger(
        self.built.model_size,
        sparse=self.built.sparse,
        upload_value_bits=self.built.upload_value_bits,
    )
    if previous is not None:
      ledger.cumulative_upload_bits = previous.cumulative_upload_bits
      ledger.cumulative_download_bits = previous.cumulative_download_bits
    return ledger

  def stats(self, weights, ledger):
    """(sparsity, forward FLOPs, masks) of the global model."""
    del ledger  # the search phase resizes it
    return mask_stats(self.built, weights, self.dense_flops)

  def console_note(self) -> str:
    """Extra text for the console line of a round."""
    return ""

  def hand_over(self, weights, output_dir):
    """What the next phase starts from (None: nothing)."""
    del weights, output_dir
    return None

  def report(self, weights, evaluation, ledger) -> dict:
    """Per-phase figures for summary.json (two-phase runs)."""
    _, flops, _ = self.stats(weights, ledger)
    per_client = costs.dense_message_bits(costs.ModelSize(self.params, 0))
    if self.built.sparse:
      per_client = costs.sparse_message_bits(
          self.built.model_size, self.built.layout.num_kept, False
      )
    return {
        "last_round": self.last_round,
        "widths": keras_models.resolve_widths(self.config.model_name, self.widths),
        "params": self.params,
        "forward_flops": flops,
        "upload_bits_per_client_round": per_client,
        "clients_accuracy": evaluation.get("clients_accuracy"),
        "test_accuracy": evaluation.get("test_accuracy"),
        "cumulative_upload_bits": ledger.cumulative_upload_bits,
    }

  def summary(self) -> dict:
    """This phase's entries of summary.json."""
    built = self.built
    return {
        "dense_forward_flops": costs.forward_flops(self.dense_flops),
        "num_prunable": built.model_size.num_prunable,
        "num_unmasked": built.model_size.num_unmasked,
        "layer_budgets": (
            dict(zip(built.layout.layer_names, built.layout.budgets))
            if built.sparse else None
        ),
    }


def build_phase(number, config, context, log, found=None) -> Phase:
  """Builds phase `number` of `config.algorithm` and logs what it is."""
  start = time.time()
  spec = config.spec.phases[number - 1]
  make = spec.make_phase or Phase
  if config.client_sparsity_tiers and spec.sparse and spec.make_phase is None:
    from tff_feddst import tier_phase  # pylint: disable=g-import-not-at-top

    make = tier_phase.TierPhase
  widths = found.widths if found is not None else None
  phase = make(number, spec, config, context, widths=widths, found=found)
  log(
      f"{phase.describe()} on {config.dataset} ({config.partition}, "
      f"{config.clients_per_round} clients per round), model {config.model_name}: "
      f"built in {time.time() - start:.1f} s"
  )
  return phase


def save_final_model(phase: Phase, weights, output_dir: str):
  """Writes final_model.keras (plain Keras, no wrappers); returns the model."""
  from tff_feddst import files  # pylint: disable=g-import-not-at-top

  model = phase.keras_fn()
  model.set_weights([np.asarray(w) for w in weights.trainable])
  with files.atomic_output(os.path.join(output_dir, "final_model.keras")) as temp:
    model.save(temp)
  return model
