"""The structured + block-sparse study: std-band settings over seeds, against FedAvg.

  python -m benchmarks.structured_study --seeds=0-9 --output_dir=runs/structured_blocks
  python -m benchmarks.structured_study --settings=floor0.7_k1.8_1x4 --seeds=0,1
  python -m benchmarks.structured_study --report_only    # the tables of finished runs
  python -m benchmarks.structured_study --report_only --output_dir=D --runs_dirs=E,F
  python -m benchmarks.structured_study --retime         # batch-1 latency again, quiet

Every setting (`SETTINGS`) trains `structured_feddst` on the paper's MNIST
network (paper 2's std band on the convolution filters, 20 search rounds,
FedDST at S = 0.8 with 1x4 blocks on dense kernels, float32 TFLite export)
into <output_dir>/<setting>_seed<k>, unless it says otherwise (the
`paper2_` settings train paper 2's CNN); FedAvg on the same network, the
reference, trains into <output_dir>/<network>_fedavg_seed<k> (`BASELINES`).
A directory holding a finished run of
the same settings is reused, and the tables are rewritten after every run,
so an interrupted study continues where it stopped.

The tables (study.md and study.csv in --output_dir) give, per run: the
widths the search found, non-zero parameters and forward FLOPs against
FedAvg's dense network, clients_accuracy as the mean of the evaluations in
the last 16 rounds (rounds 85-100 of 100) against FedAvg on the same seed
with its standard error from the per-round differences (FedAvg samples the
same clients each round, so the swings those clients cause cancel; a seed
below the accuracy limit by more than two of them is a clear miss; runs
evaluate every round, 16 evaluations in the window, unless --eval_every
says otherwise), and the sparse export's batch-1 median latency against
the dense network's; per setting: the mean, median and standard error of
the accuracy difference over the seeds, the clear misses, and on how many
seeds paper 2's goal holds (`GOAL`).

Latency comes from the runs' own reports (the run's sparse export against
FedAvg's dense export of the same seed, each timed at the end of its
training, maybe while other work shared the machine) unless --retime has
timed the run again: it times every finished
run's export in one sequence per network, FedAvg's dense export of the
first seed first and last as its reference, into
<output_dir>/latency_quiet/. Run it with
nothing else on the machine; the ratio then takes the faster of the two
reference timings, so the goal is judged on the worse ratio.
"""

import csv
import dataclasses
import datetime
import io
import json
import math
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from benchmarks.accuracy import finished_with  # noqa: E402
from tff_feddst import files  # noqa: E402
from tff_feddst.config import ExperimentConfig  # noqa: E402

# Paper 2's goal: at least 80% of parameters and FLOPs removed, at most 2
# points of accuracy lost against dense FedAvg, at most 0.5x dense latency.
GOAL = {"removed": 0.8, "points": 2.0, "latency": 0.5}

# What every setting shares: the README's command
#   python run.py --algorithm=structured_feddst --structured_rule=std_band \
#     --structured_search_rounds=20 --mask_block=1x4 --export_tflite ...
STUDY = {
    "algorithm": "structured_feddst",
    "model": "mnist_cnn",
    "structured_rule": "std_band",
    "structured_search_rounds": 20,
    "mask_block": "1x4",
    "export_tflite": True,
}
# Each network's reference, dense FedAvg: {model: run name prefix}.
BASELINES = {"mnist_cnn": "mnist_fedavg", "paper2_cnn": "paper2_fedavg"}
BASELINE = BASELINES["mnist_cnn"]
BASELINE_SETTINGS = {"algorithm": "fedavg", "export_tflite": True}

# {name: (row label, settings on top of STUDY)}. The names are the run
# directories' prefixes of the README's tables.
SETTINGS = {
    "sf_k1.8_1x4_s0.8": ("std_band 1.8", {"structured_std_k": 1.8}),
    "floor0.6_k1.8_1x4": (
        "std_band 1.8, min_width 0.6",
        {"structured_std_k": 1.8, "structured_min_width": 0.6},
    ),
    "dead_k1.8_1x4": (
        "std_band 1.8, remove_dead",
        {"structured_std_k": 1.8, "structured_remove_dead": True},
    ),
    "deadfloor0.6_k1.8_1x4": (
        "std_band 1.8, min_width 0.6, remove_dead",
        {"structured_std_k": 1.8, "structured_min_width": 0.6, "structured_remove_dead": True},
    ),
    # Where the accuracy goes: the same search, then dense training of the
    # smaller network (`structured`) instead of FedDST at S = 0.8.
    "dense_floor0.6_k1.8": (
        "std_band 1.8, min_width 0.6, dense phase 2",
        {"algorithm": "structured", "mask_block": "none", "structured_std_k": 1.8,
         "structured_min_width": 0.6},
    ),
    "floor0.5_k1.8_1x4": (
        "std_band 1.8, min_width 0.5",
        {"structured_std_k": 1.8, "structured_min_width": 0.5},
    ),
    "floor0.7_k1.8_1x4": (
        "std_band 1.8, min_width 0.7",
        {"structured_std_k": 1.8, "structured_min_width": 0.7},
    ),
    "floor0.6_k2.2_1x4": (
        "std_band 2.2, min_width 0.6",
        {"structured_std_k": 2.2, "structured_min_width": 0.6},
    ),
    # Paper 2's CNN: the band alone with a dense phase 2, at the k where it
    # stops being free (the README's "trade-off over three seeds").
    "paper2_k2.0": (
        "paper2_cnn: std_band 2.0, dense phase 2",
        {"model": "paper2_cnn", "algorithm": "structured", "mask_block": "none",
         "structured_std_k": 2.0},
    ),
    "paper2_k1.9": (
        "paper2_cnn: std_band 1.9, dense phase 2",
        {"model": "paper2_cnn", "algorithm": "structured", "mask_block": "none",
         "structured_std_k": 1.9},
    ),
}

LATENCY_DIR = "latency_quiet"
# The dense reference's timings before and after the runs' (--retime).
REFERENCE_TIMINGS = ("dense_reference_first", "dense_reference_last")


def run_name(setting: str, seed: int) -> str:
  return f"{setting}_seed{seed}"


def model_of(setting: str) -> str:
  """The network a setting (or a baseline) trains."""
  for model, baseline in BASELINES.items():
    if setting == baseline:
      return model
  if setting not in SETTINGS:
    raise ValueError(f"unknown setting {setting!r}; choose from {', '.join(SETTINGS)}")
  return {**STUDY, **SETTINGS[setting][1]}["model"]


def baseline_of(setting: str) -> str:
  """The FedAvg run that `setting` is compared with (on the same seed)."""
  return BASELINES[model_of(setting)]


def reference_timings(baseline: str) -> tuple[str, str]:
  """The names of the quiet timings of `baseline`'s dense export (--retime)."""
  if baseline == BASELINE:
    return REFERENCE_TIMINGS
  return tuple(f"{baseline}_{name}" for name in REFERENCE_TIMINGS)


def experiment_config(
    setting: str, seed: int, output_dir: str, rounds: int = 100, eval_every: int = 1,
    data_dir: str | None = None,
) -> ExperimentConfig:
  """The resolved run.py settings of one run of the study (a FedAvg run of
  `BASELINES` or a name in `SETTINGS`)."""
  model = model_of(setting)
  if setting == BASELINES[model]:
    settings = {**BASELINE_SETTINGS, "model": model}
  else:
    settings = {**STUDY, **SETTINGS[setting][1]}
  return ExperimentConfig(
      **settings, rounds=rounds, eval_every=eval_every, seed=seed, data_dir=data_dir,
      output_dir=os.path.join(output_dir, run_name(setting, seed)),
  ).resolve()


# ---------------------------------------------------------------- figures


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def window_evaluations(metrics_csv: str, last_rounds: int = 16) -> dict[int, float]:
  """{round: clients_accuracy} of the evaluations in the run's last
  `last_rounds` rounds (of 100 rounds, the last 16 are rounds 85-100)."""
  with open(metrics_csv, newline="") as f:
    rows = [r for r in csv.DictReader(f)]
  last = max(int(r["round"]) for r in rows)
  window = {
      int(r["round"]): float(r["clients_accuracy"]) for r in rows
      if r["clients_accuracy"] not in ("", None) and int(r["round"]) > last - last_rounds
  }
  if not window:
    raise ValueError(f"{metrics_csv}: no evaluation in the last {last_rounds} rounds")
  return window


def window_accuracy(metrics_csv: str, last_rounds: int = 16) -> float:
  """Mean clients_accuracy of the evaluations in the run's last `last_rounds`
  rounds."""
  return statistics.fmean(window_evaluations(metrics_csv, last_rounds).values())


def paired_differences(run: dict[int, float], baseline: dict[int, float]) -> tuple[float, ...]:
  """Per round that both runs evaluated, run minus baseline, in points. A
  run and FedAvg on the same seed sample the same clients every round, so
  the swings that the last rounds' clients cause are shared and cancel."""
  return tuple(100.0 * (run[r] - baseline[r]) for r in sorted(run) if r in baseline)


def nonzero_params(summary: dict) -> int:
  """The final model's non-zero parameters: kept masked weights plus the
  parameters no mask covers (biases and the like)."""
  kept = summary.get("final_layer_kept")
  if kept:
    return int(sum(kept.values())) + int(summary["num_unmasked"])
  density = 1.0 - float(summary.get("final_sparsity") or 0.0)
  return int(round(summary["num_prunable"] * density)) + int(summary["num_unmasked"])


def median_ms(report: dict, export: str = "sparse") -> float:
  """Batch-1 median latency (ms) of an export of a TFLite report; a report
  without a sparse export (a dense model) gives its dense one."""
  exports = report["exports"]
  return float(exports.get(export, exports["dense"])["batch1_latency_median_ms"])


@dataclasses.dataclass(frozen=True)
class RunFigures:
  setting: str
  seed: int
  widths: tuple[int, ...]
  params: int
  dense_params: int
  flops: float
  dense_flops: float
  accuracy: float
  baseline_accuracy: float
  latency_ms: float
  dense_ms: tuple[float, ...]  # the reference timings the ratio uses
  quiet: bool  # latency from --retime, not from the run's own report
  # Per round evaluated by both runs in the window: run minus FedAvg (points).
  differences: tuple[float, ...] = ()

  @property
  def params_removed(self) -> float:
    return 1.0 - self.params / self.dense_params

  @property
  def flops_removed(self) -> float:
    return 1.0 - self.flops / self.dense_flops

  @property
  def points(self) -> float:
    """Accuracy difference from FedAvg, in points."""
    return 100.0 * (self.accuracy - self.baseline_accuracy)

  @property
  def points_se(self) -> float:
    """Standard error of `points` from the window's paired differences
    (as if the rounds' evaluations were independent); nan under two."""
    n = len(self.differences)
    return statistics.stdev(self.differences) / math.sqrt(n) if n > 1 else math.nan

  @property
  def ratio_worse(self) -> float:
    return self.latency_ms / min(self.dense_ms)

  @property
  def ratio_better(self) -> float:
    return self.latency_ms / max(self.dense_ms)

  @property
  def within_points(self) -> bool:
    return self.points >= -GOAL["points"] - 1e-9

  @property
  def clear_miss(self) -> bool:
    """Below the accuracy limit by more than two standard errors of the
    window (a miss that the evaluations' noise does not explain)."""
    return self.points + 2.0 * self.points_se < -GOAL["points"]

  @property
  def goal_met(self) -> bool:
    # A figure exactly at a limit meets it (1e-9: rounding of the ratios).
    return (
        min(self.params_removed, self.flops_removed) >= GOAL["removed"] - 1e-9
        and self.within_points and self.ratio_worse <= GOAL["latency"] + 1e-9
    )


def run_figures(run_dir: str, baseline_dir: str, setting: str, seed: int,
                latency_dir: str | None = None) -> RunFigures:
  """The figures of one finished run against FedAvg's run on its seed
  (`baseline_of(setting)`)."""
  summary = _read_json(os.path.join(run_dir, "summary.json"))
  base = _read_json(os.path.join(baseline_dir, "summary.json"))
  structured = summary.get("structured") or {}
  widths = tuple(int(w) for w in (structured.get("found_widths") or {}).values())
  name = os.path.basename(os.path.normpath(run_dir))
  quiet_path = latency_dir and os.path.join(latency_dir, f"{name}.json")
  references = [
      os.path.join(latency_dir, f"{r}.json") for r in reference_timings(baseline_of(setting))
  ] if latency_dir else []
  references = [r for r in references if os.path.exists(r)]
  if quiet_path and os.path.exists(quiet_path) and references:
    latency = median_ms(_read_json(quiet_path))
    dense = tuple(median_ms(_read_json(r), "dense") for r in references)
    quiet = True
  else:
    # Each timed in its own run: the run's sparse export, FedAvg's dense one.
    latency = median_ms(_read_json(os.path.join(run_dir, "tflite_report.json")))
    dense = (median_ms(_read_json(os.path.join(baseline_dir, "tflite_report.json")), "dense"),)
    quiet = False
  window = window_evaluations(os.path.join(run_dir, "metrics.csv"))
  base_window = window_evaluations(os.path.join(baseline_dir, "metrics.csv"))
  return RunFigures(
      setting=setting, seed=seed, widths=widths,
      params=nonzero_params(summary),
      dense_params=int(base["num_prunable"]) + int(base["num_unmasked"]),
      flops=float(summary["forward_flops"]), dense_flops=float(base["forward_flops"]),
      accuracy=statistics.fmean(window.values()),
      baseline_accuracy=statistics.fmean(base_window.values()),
      latency_ms=latency, dense_ms=dense, quiet=quiet,
      differences=paired_differences(window, base_window),
  )


def find_run(name: str, runs_dirs) -> str | None:
  """The first of `runs_dirs` holding a finished run `name`."""
  for runs_dir in runs_dirs:
    if os.path.exists(os.path.join(runs_dir, name, "summary.json")):
      return os.path.join(runs_dir, name)
  return None


def collect(output_dir: str, settings, seeds, runs_dirs=()) -> list[RunFigures]:
  """Figures of every finished run that has its seed's FedAvg run, each
  looked for in `output_dir`, then in `runs_dirs`; quiet timings come from
  <output_dir>/latency_quiet."""
  latency_dir = os.path.join(output_dir, LATENCY_DIR)
  where = [output_dir, *runs_dirs]
  figures = []
  for setting in settings:
    for seed in seeds:
      run_dir = find_run(run_name(setting, seed), where)
      baseline_dir = find_run(run_name(baseline_of(setting), seed), where)
      if run_dir and baseline_dir:
        figures.append(run_figures(run_dir, baseline_dir, setting, seed, latency_dir))
  return figures


@dataclasses.dataclass(frozen=True)
class SettingSummary:
  setting: str
  seeds: int
  mean_points: float
  median_points: float
  stderr_points: float
  within_points: int
  clear_misses: int
  goal_met: int
  params_removed: tuple[float, float]
  flops_removed: tuple[float, float]
  ratio_worse: tuple[float, float]


def summarize(figures: list[RunFigures]) -> list[SettingSummary]:
  """Per setting (in order of appearance), over its seeds."""
  out = []
  for setting in dict.fromkeys(f.setting for f in figures):
    runs = [f for f in figures if f.setting == setting]
    points = [f.points for f in runs]
    stderr = statistics.stdev(points) / math.sqrt(len(points)) if len(points) > 1 else math.nan
    span = lambda values: (min(values), max(values))  # noqa: E731
    out.append(SettingSummary(
        setting=setting, seeds=len(runs),
        mean_points=statistics.fmean(points), median_points=statistics.median(points),
        stderr_points=stderr,
        within_points=sum(f.within_points for f in runs),
        clear_misses=sum(f.clear_miss for f in runs),
        goal_met=sum(f.goal_met for f in runs),
        params_removed=span([f.params_removed for f in runs]),
        flops_removed=span([f.flops_removed for f in runs]),
        ratio_worse=span([f.ratio_worse for f in runs]),
    ))
  return out


# ---------------------------------------------------------------- tables


def _label(setting: str) -> str:
  return SETTINGS[setting][0] if setting in SETTINGS else setting


def markdown(figures: list[RunFigures]) -> str:
  if not figures:
    return "No finished run yet.\n"
  # One network: its parameter count in the header; several: in each row.
  dense = {f.dense_params for f in figures}
  of = f" (of {dense.pop():,})" if len(dense) == 1 else ""
  lines = [
      f"| setting | seed | widths | non-zero parameters{of} | FLOPs removed | accuracy | FedAvg "
      "| difference (points, SE) | batch-1 ms (x dense) | goal |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for f in figures:
    ratio = (f"{f.ratio_better:.2f}-{f.ratio_worse:.2f}x" if len(f.dense_ms) > 1
             else f"{f.ratio_worse:.2f}x")
    se = "" if math.isnan(f.points_se) else f" ({f.points_se:.1f})"
    lines.append(
        f"| {_label(f.setting)} | {f.seed} | {', '.join(map(str, f.widths))} "
        f"| {f.params:,}{'' if of else f' of {f.dense_params:,}'} (-{100 * f.params_removed:.1f}%) "
        f"| {100 * f.flops_removed:.1f}% "
        f"| {f.accuracy:.4f} | {f.baseline_accuracy:.4f} | {f.points:+.1f}{se} "
        f"| {f.latency_ms:.3f} ({ratio}{'' if f.quiet else ', in the run'}) "
        f"| {'yes' if f.goal_met else 'no'} |"
    )
  lines += [
      "",
      f"Goal: at least {100 * GOAL['removed']:.0f}% of parameters and FLOPs removed, at most "
      f"{GOAL['points']:g} points lost, at most {GOAL['latency']:g}x the dense latency "
      "(the worse ratio).",
      "",
      "| setting | seeds | mean difference (points) | median | standard error "
      "| within 2 points | below by over 2 SE | goal met | parameters removed | FLOPs removed | latency (x dense, worse) |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for s in summarize(figures):
    lines.append(
        f"| {_label(s.setting)} | {s.seeds} | {s.mean_points:+.1f} | {s.median_points:+.1f} "
        f"| {'-' if math.isnan(s.stderr_points) else f'{s.stderr_points:.1f}'} | {s.within_points} of {s.seeds} "
        f"| {s.clear_misses} of {s.seeds} | {s.goal_met} of {s.seeds} "
        f"| {100 * s.params_removed[0]:.1f}-{100 * s.params_removed[1]:.1f}% "
        f"| {100 * s.flops_removed[0]:.1f}-{100 * s.flops_removed[1]:.1f}% "
        f"| {s.ratio_worse[0]:.2f}-{s.ratio_worse[1]:.2f}x |"
    )
  return "\n".join(lines) + "\n"


CSV_FIELDS = (
    "setting", "seed", "widths", "params", "dense_params", "params_removed", "flops",
    "dense_flops", "flops_removed", "accuracy", "baseline_accuracy", "points",
    "points_se", "evaluations", "latency_ms", "dense_ms", "ratio_worse", "quiet", "goal_met",
)


def csv_text(figures: list[RunFigures]) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(CSV_FIELDS)
  for f in figures:
    writer.writerow([
        f.setting, f.seed, " ".join(map(str, f.widths)), f.params, f.dense_params,
        f"{f.params_removed:.6f}", f"{f.flops:.0f}", f"{f.dense_flops:.0f}",
        f"{f.flops_removed:.6f}", f"{f.accuracy:.6f}", f"{f.baseline_accuracy:.6f}",
        f"{f.points:.4f}", f"{f.points_se:.4f}", len(f.differences), f"{f.latency_ms:.6f}",
        " ".join(f"{d:.6f}" for d in f.dense_ms),
        f"{f.ratio_worse:.6f}", int(f.quiet), int(f.goal_met),
    ])
  return out.getvalue()


def header(settings, seeds, runs_dirs=()) -> str:
  """What study.md holds, and the command that rebuilds it."""
  return (
      f"Generated {datetime.date.today().isoformat()} by `python -m "
      f"benchmarks.structured_study --report_only --settings={','.join(settings)} "
      f"--seeds={','.join(map(str, seeds))}"
      f"{' --runs_dirs=' + ','.join(runs_dirs) if runs_dirs else ''}`. Fashion-MNIST, "
      "pathological split, the paper's MNIST network (paper 2's CNN in the paper2_cnn settings); "
      "accuracy is clients_accuracy, the mean of the "
      "evaluations in the last 16 rounds, against FedAvg on the same seed; SE: the standard error "
      "of the difference from its per-round values in those rounds (FedAvg samples the same "
      "clients), as if the evaluations were independent. Latency: "
      "batch 1, 1 thread, median; x dense is against FedAvg's dense export (same network), timed "
      "with --retime (two timings, first and last) or else in the runs.\n\n"
  )


def write_tables(output_dir: str, settings, seeds, runs_dirs=()) -> list[RunFigures]:
  figures = collect(output_dir, settings, seeds, runs_dirs)
  files.write_atomic(
      os.path.join(output_dir, "study.md"),
      header(settings, seeds, runs_dirs) + markdown(figures))
  files.write_atomic(os.path.join(output_dir, "study.csv"), csv_text(figures))
  return figures


# ---------------------------------------------------------------- running


def reusable(config: ExperimentConfig) -> bool:
  """A finished run of `config` whose evaluations include every round that
  `config` evaluates (evaluating does not change training: only the
  window's figures)."""
  if not finished_with(config):
    return False
  saved = _read_json(os.path.join(config.output_dir, "config.json")).get("eval_every")
  return isinstance(saved, int) and saved >= 1 and config.eval_every % saved == 0


def run_study(output_dir: str, settings, seeds, rounds: int = 100, eval_every: int = 1,
              data_dir: str | None = None, log=print) -> None:
  """Trains every run not yet finished, seed by seed (the FedAvg runs
  first), and rewrites the tables after each."""
  from tff_feddst import training  # pylint: disable=g-import-not-at-top  (imports TensorFlow)

  baselines = tuple(dict.fromkeys(baseline_of(s) for s in settings))
  for seed in seeds:
    for setting in (*baselines, *settings):
      config = experiment_config(setting, seed, output_dir, rounds, eval_every, data_dir)
      name = os.path.basename(config.output_dir)
      if reusable(config):
        log(f"[study] {name}: finished run found, reused")
        continue
      log(f"[study] {name}: training {rounds} rounds into {config.output_dir}")
      training.run_experiment(config, log=lambda line, n=name: log(f"[{n}] {line}"))
      write_tables(output_dir, settings, seeds)


def retime(output_dir: str, settings, seeds, latency_examples: int = 1000,
           data_dir: str | None = None, log=print) -> None:
  """Times every finished run's TFLite exports again, one after the other,
  network by network, each network's runs between its first seed's FedAvg
  export timed first and last; reports go to
  <output_dir>/latency_quiet/<run>.json."""
  from benchmarks.retime_runs import Retimer  # pylint: disable=g-import-not-at-top  (TensorFlow)

  latency_dir = os.path.join(output_dir, LATENCY_DIR)
  os.makedirs(latency_dir, exist_ok=True)
  work = os.path.join(latency_dir, ".work")
  jobs = []
  for baseline in dict.fromkeys(baseline_of(s) for s in settings):
    reference = os.path.join(output_dir, run_name(baseline, seeds[0]))
    if not os.path.exists(os.path.join(reference, "final_model.keras")):
      raise ValueError(f"no finished FedAvg run in {reference} to time as the dense reference")
    runs = [os.path.join(output_dir, run_name(s, seed))
            for s in settings if baseline_of(s) == baseline for seed in seeds]
    runs = [r for r in runs if os.path.exists(os.path.join(r, "summary.json"))]
    first, last = reference_timings(baseline)
    jobs += [(first, reference), *((os.path.basename(r), r) for r in runs), (last, reference)]
  retimer = Retimer(work, latency_examples, data_dir)
  for name, run_dir in jobs:
    report = retimer(run_dir, os.path.join(latency_dir, f"{name}.json"))
    log(f"[retime] {name}: {median_ms(report):.3f} ms")


def parse_seeds(text: str) -> list[int]:
  """'0-9' or '0,3,5' (or both: '0-2,7')."""
  seeds = []
  for part in text.split(","):
    part = part.strip()
    if "-" in part:
      first, last = (int(p) for p in part.split("-", 1))
      if last < first:
        raise ValueError(f"seed range {part!r} runs backwards")
      seeds.extend(range(first, last + 1))
    elif part:
      seeds.append(int(part))
  if not seeds or min(seeds) < 0:
    raise ValueError(f"--seeds={text!r}: give non-negative seeds, like 0-9 or 0,1,2")
  return list(dict.fromkeys(seeds))


def main(argv) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top

  f = flags.FLAGS
  try:
    if len(argv) > 1:
      raise ValueError(f"unexpected arguments: {' '.join(argv[1:])}")
    seeds = parse_seeds(f.seeds)
    unknown = [s for s in f.settings if s not in SETTINGS]
    if unknown:
      raise ValueError(f"unknown setting(s) {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  logging.set_verbosity(logging.WARNING)
  os.makedirs(f.output_dir, exist_ok=True)
  if f.retime or not f.report_only:
    # pylint: disable=g-import-not-at-top  (TensorFlow)
    from tff_feddst import data as data_lib
    from tff_feddst import runtime

    try:
      with runtime.managed_runtime():
        if f.retime:
          retime(f.output_dir, f.settings, seeds, f.latency_examples, f.data_dir)
        else:
          run_study(f.output_dir, f.settings, seeds, f.rounds, f.eval_every, f.data_dir)
    except (data_lib.DataError, ValueError) as e:  # ConfigError is a ValueError
      print(f"error: {e}", file=sys.stderr)
      return 1
    except KeyboardInterrupt:
      print("interrupted; rerun the same command to continue", file=sys.stderr)
      return 1
  figures = write_tables(f.output_dir, f.settings, seeds, f.runs_dirs)
  print(markdown(figures), end="")
  print(f"[study] tables: {os.path.join(f.output_dir, 'study.md')}, study.csv")
  return 0


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("output_dir", "runs/structured_blocks", "Where the runs and tables are.")
  flags.DEFINE_list("settings", list(SETTINGS), f"Settings to run: {', '.join(SETTINGS)}.")
  flags.DEFINE_string("seeds", "0-9", "Seeds, like 0-9 or 0,1,2.")
  flags.DEFINE_integer("rounds", 100, "Rounds of every run.", lower_bound=1)
  flags.DEFINE_integer("eval_every", 1, "Evaluation period (rounds): every round gives the "
                       "accuracy window 16 evaluations, and costs about 0.4 s a round.",
                       lower_bound=1)
  flags.DEFINE_string("data_dir", None, "Fashion-MNIST directory (default: the Debian package's).")
  flags.DEFINE_bool("report_only", False, "Only rewrite the tables from finished runs.")
  flags.DEFINE_list("runs_dirs", [], "More directories to look for finished runs in, after "
                    "--output_dir (the tables only: e.g. earlier studies' committed runs).")
  flags.DEFINE_bool("retime", False, "Time every finished run's export again (quiet machine).")
  flags.DEFINE_integer("latency_examples", 1000, "Timed batch-1 images per export (--retime).",
                       lower_bound=1)
  app.run(lambda argv: sys.exit(main(argv)))
