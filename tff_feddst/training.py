"""The simulation driver: `run_experiment(config)`, what `run.py` and the benchmarks call.

It writes into `config.output_dir`:
- config.json   every (resolved) setting of the run;
- metrics.csv   one row per round, and TensorBoard events under
                tensorboard/ (`outputs.MetricsReleaser`);
- summary.json  final figures and total wall time (written last);
- final_model.keras  the final global model (plain Keras, no wrappers);
- checkpoints/  the run's state every `checkpoint_every` rounds and at the
                end (`checkpoint.RunCheckpoints`); rerunning the same settings
                with the same output directory resumes from the latest.
A round is a `rounds.RoundStep`; a run is one phase (two for the
structured algorithms, `phases.Phase`); `_train` is the loop.
"""

import collections
import dataclasses
import json
import os
import sys
import time
from typing import Callable

import numpy as np
import tensorflow as tf

from tff_feddst import checkpoint as checkpoint_lib
from tff_feddst import costs
from tff_feddst import data as data_lib
from tff_feddst import files
from tff_feddst import outputs
from tff_feddst import phases
from tff_feddst import remote
from tff_feddst import rounds as rounds_lib
from tff_feddst import sparse_model
from tff_feddst.config import ConfigError, ExperimentConfig


@dataclasses.dataclass(frozen=True)
class RunContext:
  """What every phase of a run shares: settings, data, where outputs go."""

  config: ExperimentConfig
  fed_data: data_lib.FederatedData
  input_spec: collections.OrderedDict
  test_indices: list
  log: Callable[[str], None]

  def path(self, name: str) -> str:
    return os.path.join(self.config.output_dir, name)


@dataclasses.dataclass
class Run:
  """The mutable state of a run between rounds."""

  phase: phases.Phase
  state: object
  step: rounds_lib.RoundStep
  first_round: int
  resume_round: int | None
  evaluation: dict
  phase_results: dict
  # The phase's own figures of the last round trained (`RoundResult.extra`).
  last_extra: dict = dataclasses.field(default_factory=dict)


def load_context(config: ExperimentConfig, log) -> RunContext:
  fed_data = data_lib.load_federated_data(
      config.dataset,
      config.partition,
      data_dir=config.data_dir,
      total_clients=config.total_clients,
      classes_per_client=config.classes_per_client,
      examples_per_class=config.examples_per_class,
      dirichlet_beta=config.dirichlet_beta,
      seed=config.seed,
  )
  population = len(fed_data.nonempty_train_client_ids)
  if config.clients_per_round > population:
    raise ConfigError(
        f"--clients_per_round={config.clients_per_round} exceeds the "
        f"{population} clients that have training data"
    )
  input_spec = collections.OrderedDict(
      x=tf.TensorSpec([None, *fed_data.input_shape], tf.float32),
      y=tf.TensorSpec([None], tf.int32),
  )
  return RunContext(config, fed_data, input_spec, phases.client_test_indices(fed_data), log)


def _read_json(path: str, what: str) -> dict:
  try:
    with open(path) as f:
      value = json.load(f)
    if not isinstance(value, dict):
      raise ValueError("not a JSON object")
    return value
  except (OSError, ValueError) as e:
    raise ConfigError(
        f"cannot resume: {path} is missing or corrupt ({e}); {what}"
    ) from None


def _with_saved_schedule(requested: ExperimentConfig, config: ExperimentConfig) -> ExperimentConfig:
  """`config`, resuming with the R_end it started with.

  Without --readjustment_end_round, R_end is half the rounds, so it would
  move when a run is resumed with more --rounds. A run that resumes from a
  checkpoint keeps the R_end recorded in its config.json instead (whatever
  else differs is refused by `_check_resumable`).
  """
  if requested.readjustment_end_round is not None:
    return config
  checkpoints = os.path.join(config.output_dir, "checkpoints")
  if not os.path.isdir(checkpoints) or checkpoint_lib.RunCheckpoints(checkpoints).latest_round() is None:
    return config
  try:
    with open(os.path.join(config.output_dir, "config.json")) as f:
      was = json.load(f).get("readjustment_end_round")
  except (OSError, ValueError, AttributeError):
    return config  # reported by _check_resumable
  if not isinstance(was, int) or was == config.readjustment_end_round:
    return config
  return dataclasses.replace(requested, readjustment_end_round=was).resolve()


def _check_resumable(context: RunContext, resume_round: int) -> None:
  """Raises ConfigError when the checkpoint is of another experiment."""
  config = context.config
  saved = _read_json(context.path("config.json"), "delete the output directory to start over")
  differing = config.differences_from(saved)
  if differing:
    raise ConfigError(
        f"{config.output_dir} holds a checkpoint of a different experiment: "
        + ", ".join(differing)
        + "; use another --output_dir, or delete this one to start over"
    )
  if resume_round > config.rounds:
    raise ConfigError(
        f"{config.output_dir} holds a checkpoint at round {resume_round}, "
        f"past --rounds={config.rounds}"
    )


def _start(context: RunContext, checkpoints) -> Run:
  """The run at its first round, or restored from the latest checkpoint.

  Nothing in the output directory changes before the checkpoint and the
  metrics proved readable.
  """
  config, log = context.config, context.log
  resume_round = checkpoints.latest_round()
  number, found = 1, None
  if resume_round is not None:
    _check_resumable(context, resume_round)
    # Damaged files answer before the process is built (seconds, not minutes).
    checkpoints.check_readable(resume_round)
    outputs.check_metrics(config.output_dir, resume_round)
    number += sum(resume_round > last for last in config.phase_rounds()[:-1])
    if number > 1:
      from tff_feddst import structured  # pylint: disable=g-import-not-at-top

      found = structured.read_found(config.output_dir)
  phase = phases.build_phase(number, config, context, log, found)
  state = phase.initial_state()
  sampler = np.random.default_rng(rounds_lib.seed(config.seed, 2))
  ledger = phase.new_ledger(None)
  extras = {}
  if resume_round is not None:
    restored = checkpoints.restore(resume_round, state, phase.driver_arrays())
    state, extras = restored.state, restored.extras
    phase.load_driver_arrays(restored.arrays)
    ledger.load_state(extras["ledger"])
    sampler.bit_generator.state = extras["sampler"]
    log(f"resumed from {checkpoints.root_dir} at round {resume_round}")
  step = phase.make_step(config, context.fed_data, sampler, ledger, state)
  return Run(
      phase, state, step,
      first_round=(resume_round or 0) + 1,
      resume_round=resume_round,
      evaluation=extras.get("evaluation", {}),
      phase_results=extras.get("phases", {}),
  )


def _next_phase(run: Run, context: RunContext) -> None:
  """Hands the finished phase's result over to a newly built next phase."""
  phase = run.phase
  weights = rounds_lib.model_weights(phase.built.process, run.state)
  run.phase_results[phase.report_name] = phase.report(weights, run.evaluation, run.step.ledger)
  found = phase.hand_over(weights, context.config.output_dir)
  run.phase = phases.build_phase(phase.number + 1, context.config, context, context.log, found)
  run.state = run.phase.initial_state()
  ledger = run.phase.new_ledger(run.step.ledger)
  run.step = run.phase.make_step(
      context.config, context.fed_data, run.step.sampler, ledger, run.state
  )


def _train(run: Run, context: RunContext, releaser, checkpoints) -> None:
  """The round loop: step, evaluate, release the metrics, checkpoint."""
  config = context.config
  for round_num in range(run.first_round, config.rounds + 1):
    if round_num > run.phase.last_round:
      _next_phase(run, context)
    try:
      run.state, result = run.step(run.state, round_num)
    except remote.WorkerError as e:
      raise remote.WorkerError(
          f"{e} in round {round_num}; the last checkpoint in {config.output_dir} "
          "is intact: rerun to resume (--workers may list other workers)"
      ) from None
    evaluation = {}
    if (
        round_num % config.eval_every == 0
        or round_num == config.rounds
        or round_num == run.phase.last_round
    ):
      weights = rounds_lib.model_weights(run.phase.built.process, run.state)
      evaluation = run.phase.evaluator.evaluate(weights.trainable)
      run.evaluation = evaluation
    run.last_extra = result.extra
    releaser.release(result.row(evaluation, run.phase.extra_columns))
    if round_num % config.checkpoint_every == 0 or round_num == config.rounds:
      checkpoints.save(
          round_num,
          run.state,
          {
              "ledger": run.step.ledger.state(),
              "sampler": run.step.sampler.bit_generator.state,
              "evaluation": evaluation,
              "phases": run.phase_results,
          },
          run.phase.driver_arrays(),
      )


def _layer_kept(phase, weights) -> dict | None:
  """The final global mask's kept weights per layer (sparse algorithms;
  PruneFL's differ from `layer_budgets`, which fix only their total)."""
  if not phase.built.sparse:
    return None
  _, masks = sparse_model.kernels_and_masks(weights, phase.built.layout)
  return dict(zip(phase.built.layout.layer_names, (int(np.sum(m)) for m in masks)))


def _summary(run: Run, context: RunContext, started: float) -> dict:
  """summary.json: final figures (and a TFLite export's report)."""
  config, phase, ledger = context.config, run.phase, run.step.ledger
  weights = rounds_lib.model_weights(phase.built.process, run.state)
  summary = {
      "algorithm": config.algorithm,
      "dataset": config.dataset,
      "model": config.model_name,
      "rounds": config.rounds,
      "resumed_from_round": run.resume_round,
      "final_clients_accuracy": run.evaluation.get("clients_accuracy"),
      "final_test_accuracy": run.evaluation.get("test_accuracy"),
      **{
          f"final_{c}": run.last_extra.get(c, run.evaluation.get(c))
          for c in phase.extra_columns
      },
      "final_sparsity": run.step.sparsity,
      "forward_flops": run.step.flops,
      **phase.summary(),
      "final_layer_kept": _layer_kept(phase, weights),
      "cumulative_upload_bits": ledger.cumulative_upload_bits,
      "cumulative_download_bits": ledger.cumulative_download_bits,
  }
  if config.spec.two_phase:
    from tff_feddst import structured  # pylint: disable=g-import-not-at-top

    run.phase_results[phase.report_name] = phase.report(weights, run.evaluation, ledger)
    summary["structured"] = structured.summary_section(config, phase.widths, run.phase_results)
  final_model = phases.save_final_model(phase, weights, config.output_dir)
  if config.export_tflite:
    summary["tflite"] = _export_tflite(final_model, context)
  summary["wall_seconds"] = round(time.time() - started, 2)
  return summary


def run_experiment(
    config: ExperimentConfig,
    log: Callable[[str], None] | None = None,
) -> dict:
  """Trains `config.rounds` rounds and writes the outputs; returns the summary.

  If `config.output_dir` holds a checkpoint of the same experiment, the run
  resumes from it (and ends at once if it is complete). With
  `config.workers`, the clients run on those TFF workers (`remote.py`).
  Raises ConfigError, `data.DataError`, `checkpoint.CheckpointError` or
  `remote.WorkerError` (one line each).
  """
  log = log or (lambda line: print(line, flush=True))
  started = time.time()
  requested, config = config, config.resolve()
  with outputs.RunLock(config.output_dir), remote.execution(config.worker_addresses):
    config = _with_saved_schedule(requested, config)
    context = load_context(config, log)
    summary_path = context.path("summary.json")
    checkpoints = checkpoint_lib.RunCheckpoints(context.path("checkpoints"))
    if checkpoints.latest_round() == config.rounds and os.path.exists(summary_path):
      _check_resumable(context, config.rounds)
      log(f"{config.output_dir}: the run is complete ({config.rounds} rounds); nothing to do")
      return _read_json(summary_path, "delete it to finish the run again")
    run = _start(context, checkpoints)
    if os.path.exists(summary_path):
      os.remove(summary_path)
    files.write_atomic(context.path("config.json"), files.json_text(dataclasses.asdict(config)))
    releaser = outputs.MetricsReleaser(
        config.output_dir, log, config.rounds, run.resume_round,
        lambda: run.phase.console_note(),
        rounds_lib.metric_columns(bool(config.worker_addresses), run.phase.extra_columns),
    )
    _train(run, context, releaser, checkpoints)
    summary = _summary(run, context, started)
    files.write_atomic(summary_path, files.json_text(summary, sort_keys=False))
  log(
      f"done in {summary['wall_seconds']:.1f} s: clients_accuracy "
      f"{summary['final_clients_accuracy']:.4f}, test_accuracy "
      f"{summary['final_test_accuracy']:.4f}, uploaded "
      f"{costs.format_bits(summary['cumulative_upload_bits'])}; outputs in {config.output_dir}"
  )
  sys.stdout.flush()
  return summary


def _export_tflite(model, context: RunContext) -> dict:
  """Sparse TFLite export of the final model, evaluated with the TFLite runtime."""
  import tflite_export  # pylint: disable=g-import-not-at-top

  config, fed_data = context.config, context.fed_data
  rng = np.random.default_rng(rounds_lib.seed(config.seed, 4))
  x_train = fed_data.arrays.x_train
  representative = x_train[rng.choice(len(x_train), min(256, len(x_train)), replace=False)]
  report = tflite_export.export_and_report(
      model,
      output_dir=config.output_dir,
      x_test=fed_data.arrays.x_test,
      y_test=fed_data.arrays.y_test,
      client_test_indices=context.test_indices,
      representative_data=representative,
      quantization=config.tflite_quantization,
  )
  context.log(f"TFLite export written to {context.path('model.tflite')}")
  return report
