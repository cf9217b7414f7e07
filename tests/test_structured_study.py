"""The structured study's runs and tables (benchmarks/structured_study.py),
from hand-made run directories and the study's committed configs."""

import csv
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import structured_study as study

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
TEN_SEEDS = REPO_ROOT / "docs/benchmarks/structured_blocks/ten_seeds_2026-12-07"
STD_BAND = REPO_ROOT / "docs/benchmarks/structured_std_band"
# The settings of the MNIST network (the committed studies' tables).
MNIST_SETTINGS = [s for s in study.SETTINGS if study.model_of(s) == "mnist_cnn"]


@pytest.mark.parametrize("runs, run, setting", [
    (TEN_SEEDS, "mnist_fedavg_seed5", study.BASELINE),
    (TEN_SEEDS, "sf_k1.8_1x4_s0.8_seed5", "sf_k1.8_1x4_s0.8"),
    (TEN_SEEDS, "floor0.6_k1.8_1x4_seed3", "floor0.6_k1.8_1x4"),
    (TEN_SEEDS, "dead_k1.8_1x4_seed3", "dead_k1.8_1x4"),
    (TEN_SEEDS, "deadfloor0.6_k1.8_1x4_seed3", "deadfloor0.6_k1.8_1x4"),
    # Paper 2's CNN: the README's trade-off runs.
    (STD_BAND, "paper2_fedavg_seed1", "paper2_fedavg"),
    (STD_BAND, "paper2_k2.0_seed1", "paper2_k2.0"),
    (STD_BAND, "paper2_k1.9_seed1", "paper2_k1.9"),
])
def test_the_study_reruns_the_committed_runs_exactly(runs, run, setting):
  """Each setting is the run.py command of the README's table: the config
  that command saved differs from the study's in nothing."""
  with open(runs / run / "config.json") as f:
    saved = json.load(f)
  config = study.experiment_config(setting, saved["seed"], "runs/structured_blocks")
  assert config.differences_from(saved) == []
  assert os.path.basename(config.output_dir) == run
  # And another setting is another experiment.
  other = "floor0.7_k1.8_1x4" if setting != study.BASELINE else "floor0.6_k2.2_1x4"
  assert study.experiment_config(other, saved["seed"], "x").differences_from(saved)


def test_each_setting_is_compared_with_fedavg_on_its_own_network():
  assert study.baseline_of("floor0.7_k1.8_1x4") == "mnist_fedavg"
  assert study.baseline_of("paper2_k2.0") == "paper2_fedavg"
  assert study.model_of("paper2_fedavg") == "paper2_cnn"
  for setting in study.SETTINGS:
    config = study.experiment_config(study.baseline_of(setting), 0, "out")
    assert (config.algorithm, config.model, config.sparsity) == (
        "fedavg", study.model_of(setting), 0.0)
    assert config.model == study.experiment_config(setting, 0, "out").model
  assert study.reference_timings("mnist_fedavg") == study.REFERENCE_TIMINGS
  assert study.reference_timings("paper2_fedavg") == (
      "paper2_fedavg_dense_reference_first", "paper2_fedavg_dense_reference_last")
  with pytest.raises(ValueError, match="unknown setting"):
    study.baseline_of("paper2_k9")


def test_settings_and_errors():
  config = study.experiment_config("floor0.6_k2.2_1x4", 4, "out", rounds=30)
  assert (config.algorithm, config.structured_rule, config.structured_std_k) == (
      "structured_feddst", "std_band", 2.2)
  assert (config.structured_min_width, config.mask_block, config.seed, config.rounds) == (
      0.6, "1x4", 4, 30)
  assert config.export_tflite and config.output_dir == os.path.join("out", "floor0.6_k2.2_1x4_seed4")
  # The comparison without FedDST: the same search, a dense phase 2.
  dense = study.experiment_config("dense_floor0.6_k1.8", 4, "out", rounds=30)
  assert (dense.algorithm, dense.mask_block, dense.sparsity, dense.structured_min_width) == (
      "structured", "none", 0.0, 0.6)
  assert dense.differences_from(dataclasses.asdict(config))
  with pytest.raises(ValueError, match="unknown setting"):
    study.experiment_config("nope", 0, "out")


def test_parse_seeds():
  assert study.parse_seeds("0-2,7") == [0, 1, 2, 7]
  assert study.parse_seeds("3") == [3]
  assert study.parse_seeds("1,1,0-1") == [1, 0]
  for bad in ("", "5-2", "-1", "a"):
    with pytest.raises(ValueError):
      study.parse_seeds(bad)


def _write_run(run_dir, *, accuracies, summary, sparse_ms, dense_ms, config=None):
  """A finished run: metrics.csv evaluated every 5 rounds (`accuracies` at
  rounds 5, 10, ...), summary.json, tflite_report.json and config.json."""
  os.makedirs(run_dir, exist_ok=True)
  lines = ["round,clients_accuracy,test_accuracy"]
  for r in range(1, 5 * len(accuracies) + 1):
    acc = f"{accuracies[r // 5 - 1]}" if r % 5 == 0 else ""
    lines.append(f"{r},{acc},")
  with open(os.path.join(run_dir, "metrics.csv"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(run_dir, "summary.json"), "w") as f:
    json.dump(summary, f)
  exports = {"dense": {"batch1_latency_median_ms": dense_ms}}
  if sparse_ms is not None:
    exports["sparse"] = {"batch1_latency_median_ms": sparse_ms}
  with open(os.path.join(run_dir, "tflite_report.json"), "w") as f:
    json.dump({"exports": exports}, f)
  with open(os.path.join(run_dir, "config.json"), "w") as f:
    json.dump(config or {}, f)


BASE_SUMMARY = {"num_prunable": 1000, "num_unmasked": 24, "forward_flops": 10000.0,
                "final_layer_kept": None, "final_sparsity": 0.0}


def _structured_summary(kept, unmasked, flops, widths):
  return {"num_prunable": 500, "num_unmasked": unmasked, "forward_flops": flops,
          "final_layer_kept": kept, "final_sparsity": 0.8,
          "structured": {"found_widths": widths}}


def test_window_accuracy_is_the_mean_of_the_last_16_rounds(tmp_path):
  accuracies = [0.1 * (i % 7) for i in range(20)]  # rounds 5..100
  _write_run(str(tmp_path), accuracies=accuracies, summary={}, sparse_ms=1, dense_ms=1)
  # Rounds 85, 90, 95, 100: the last 4 evaluations.
  assert study.window_accuracy(str(tmp_path / "metrics.csv")) == pytest.approx(
      np.mean(accuracies[-4:]))
  assert study.window_accuracy(str(tmp_path / "metrics.csv"), last_rounds=5) == pytest.approx(
      accuracies[-1])


def test_paired_differences_and_their_standard_error(tmp_path):
  # FedAvg evaluated every 5 rounds, the run every round: the pairs are the
  # rounds both evaluated within the last 16 (85, 90, 95, 100).
  base = [0.70 + 0.01 * (i % 3) for i in range(20)]
  _write_run(str(tmp_path / "base"), accuracies=base, summary={}, sparse_ms=1, dense_ms=1)
  rows = ["round,clients_accuracy"] + [f"{r},{0.6 + 0.001 * r}" for r in range(1, 101)]
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "metrics.csv").write_text("\n".join(rows) + "\n")
  run = study.window_evaluations(str(tmp_path / "run" / "metrics.csv"))
  assert sorted(run) == list(range(85, 101)) and run[85] == pytest.approx(0.685)
  base_window = study.window_evaluations(str(tmp_path / "base" / "metrics.csv"))
  assert sorted(base_window) == [85, 90, 95, 100]
  differences = study.paired_differences(run, base_window)
  expected = [100 * (0.6 + 0.001 * r - base[r // 5 - 1]) for r in (85, 90, 95, 100)]
  assert differences == pytest.approx(expected)
  figures = study.RunFigures(
      setting="s", seed=0, widths=(), params=10, dense_params=100, flops=10.0,
      dense_flops=100.0, accuracy=0.7, baseline_accuracy=0.72, latency_ms=0.04,
      dense_ms=(0.1,), quiet=True, differences=differences)
  assert figures.points_se == pytest.approx(np.std(expected, ddof=1) / 2)
  # A clear miss: below -2 points by more than two standard errors.
  at = lambda points, se: dataclasses.replace(  # noqa: E731
      figures, accuracy=0.72 + points / 100, differences=(points - se, points + se))
  assert at(-3.0, 0.5 * 0.999).clear_miss  # two values at +-d: a standard error of d
  assert not at(-3.0, 0.5 * 1.001).clear_miss
  assert not at(-1.0, 0.0).clear_miss


def test_nonzero_params():
  assert study.nonzero_params({"final_layer_kept": {"a": 10, "b": 5}, "num_unmasked": 3}) == 18
  # A dense run: every prunable weight and the rest.
  assert study.nonzero_params(BASE_SUMMARY) == 1024
  assert study.nonzero_params({"num_prunable": 100, "num_unmasked": 4,
                               "final_sparsity": 0.75, "final_layer_kept": None}) == 29


def _study_dir(tmp_path, quiet=False):
  """Two seeds of one setting and FedAvg, by hand."""
  out = tmp_path / "study"
  setting = "floor0.6_k1.8_1x4"
  # Seed 0: 104 of 1024 parameters (-89.8%), 1500 of 10000 FLOPs, 0.5 points
  # below FedAvg, 0.04 / 0.1 ms: meets the goal.
  _write_run(str(out / "mnist_fedavg_seed0"), accuracies=[0.5] * 16 + [0.70, 0.72, 0.74, 0.76],
             summary=BASE_SUMMARY, sparse_ms=None, dense_ms=0.1)
  _write_run(str(out / f"{setting}_seed0"), accuracies=[0.2] * 16 + [0.725] * 4,
             summary=_structured_summary({"c": 40, "d": 60}, 4, 1500.0,
                                         {"conv1": 6, "conv2": 12, "dense1": 50}),
             sparse_ms=0.04, dense_ms=0.09)
  # Seed 1: 3.5 points below FedAvg; 0.06 / 0.1 ms.
  _write_run(str(out / "mnist_fedavg_seed1"), accuracies=[0.8] * 20,
             summary=BASE_SUMMARY, sparse_ms=None, dense_ms=0.1)
  _write_run(str(out / f"{setting}_seed1"), accuracies=[0.765] * 20,
             summary=_structured_summary({"c": 100}, 4, 2500.0, {"conv1": 7, "conv2": 13}),
             sparse_ms=0.06, dense_ms=0.09)
  if quiet:
    lat = out / study.LATENCY_DIR
    os.makedirs(lat)
    for name, report in {
        "dense_reference_first": {"exports": {"dense": {"batch1_latency_median_ms": 0.12}}},
        "dense_reference_last": {"exports": {"dense": {"batch1_latency_median_ms": 0.10}}},
        f"{setting}_seed0": {"exports": {"sparse": {"batch1_latency_median_ms": 0.055},
                                         "dense": {"batch1_latency_median_ms": 0.07}}},
    }.items():
      with open(lat / f"{name}.json", "w") as f:
        json.dump(report, f)
  return out, setting


def test_run_figures_by_hand(tmp_path):
  out, setting = _study_dir(tmp_path)
  figures = study.collect(str(out), [setting, "dead_k1.8_1x4"], [0, 1, 2])
  assert [(f.setting, f.seed) for f in figures] == [(setting, 0), (setting, 1)]
  f0, f1 = figures
  assert f0.widths == (6, 12, 50)
  assert (f0.params, f0.dense_params) == (104, 1024)
  assert f0.params_removed == pytest.approx(1 - 104 / 1024)
  assert f0.flops_removed == pytest.approx(0.85)
  assert f0.accuracy == pytest.approx(0.725)
  assert f0.baseline_accuracy == pytest.approx(0.73)
  assert f0.points == pytest.approx(-0.5)
  # In the runs' own reports: the sparse export against FedAvg's dense one.
  assert (f0.latency_ms, f0.dense_ms, f0.quiet) == (0.04, (0.1,), False)
  assert f0.ratio_worse == pytest.approx(0.4)
  assert f0.goal_met
  assert f1.points == pytest.approx(-3.5)
  assert f1.flops_removed == pytest.approx(0.75)
  assert not f1.within_points and not f1.goal_met


def test_quiet_timings_replace_the_runs_own(tmp_path):
  out, setting = _study_dir(tmp_path, quiet=True)
  f0, f1 = study.collect(str(out), [setting], [0, 1])
  # Seed 0 was timed again: against both reference timings; the goal takes
  # the faster reference (0.10 ms), so 0.55x misses it.
  assert f0.quiet and f0.latency_ms == 0.055 and f0.dense_ms == (0.12, 0.10)
  assert f0.ratio_better == pytest.approx(0.055 / 0.12)
  assert f0.ratio_worse == pytest.approx(0.55)
  assert f0.within_points and not f0.goal_met
  # Seed 1 was not: its runs' own timings.
  assert not f1.quiet and f1.dense_ms == (0.1,)


def test_paper2_runs_pair_with_paper2_fedavg_and_its_timings(tmp_path):
  out, setting = _study_dir(tmp_path, quiet=True)
  # Paper 2's CNN on seed 0: its own FedAvg (0.60 over the window) and its
  # own dense reference timings; the MNIST network's are not used.
  _write_run(str(out / "paper2_fedavg_seed0"), accuracies=[0.6] * 20,
             summary={**BASE_SUMMARY, "num_prunable": 2000}, sparse_ms=None, dense_ms=0.2)
  _write_run(str(out / "paper2_k2.0_seed0"), accuracies=[0.59] * 20,
             summary=_structured_summary(None, 24, 2000.0, {"conv1": 14, "conv2": 27}),
             sparse_ms=0.05, dense_ms=0.05)
  f_mnist, f_paper2 = study.collect(str(out), [setting, "paper2_k2.0"], [0])
  assert f_mnist.baseline_accuracy == pytest.approx(0.73)
  assert f_paper2.baseline_accuracy == pytest.approx(0.6) and f_paper2.points == pytest.approx(-1.0)
  assert f_paper2.dense_params == 2024
  # No quiet timing of paper 2's reference yet: the runs' own reports.
  assert (f_paper2.quiet, f_paper2.dense_ms) == (False, (0.2,))
  lat = out / study.LATENCY_DIR
  for name, ms in (("paper2_fedavg_dense_reference_first", 0.21),
                   ("paper2_fedavg_dense_reference_last", 0.19),
                   ("paper2_k2.0_seed0", 0.06)):
    with open(lat / f"{name}.json", "w") as f:
      json.dump({"exports": {"dense": {"batch1_latency_median_ms": ms}}}, f)
  figures = study.collect(str(out), [setting, "paper2_k2.0"], [0])
  f_paper2 = figures[1]
  assert (f_paper2.quiet, f_paper2.latency_ms, f_paper2.dense_ms) == (True, 0.06, (0.21, 0.19))
  assert f_paper2.ratio_worse == pytest.approx(0.06 / 0.19)
  # Two networks in one table: each row names its own network's count.
  table = study.markdown(figures)
  assert "| non-zero parameters | " in table
  assert "| 104 of 1,024 (-89.8%) |" in table and " of 2,024 (-" in table
  assert "| non-zero parameters (of 1,024) |" in study.markdown(figures[:1])


def test_goal_boundaries():
  base = study.RunFigures(
      setting="s", seed=0, widths=(), params=20, dense_params=100, flops=20.0,
      dense_flops=100.0, accuracy=0.70, baseline_accuracy=0.72, latency_ms=0.05,
      dense_ms=(0.1,), quiet=True)
  assert base.points == pytest.approx(-2.0) and base.goal_met  # every limit exactly met
  assert not dataclasses.replace(base, params=21).goal_met
  assert not dataclasses.replace(base, flops=20.5).goal_met
  assert not dataclasses.replace(base, accuracy=0.6999).goal_met
  assert not dataclasses.replace(base, latency_ms=0.0501).goal_met


def test_summary_over_seeds():
  points = [-3.0, 0.5, -1.0, -2.5]
  figures = [
      study.RunFigures(setting="s", seed=i, widths=(), params=10, dense_params=100,
                       flops=10.0 + i, dense_flops=100.0, accuracy=0.7 + p / 100,
                       baseline_accuracy=0.7, latency_ms=0.04 + 0.01 * i, dense_ms=(0.1,),
                       quiet=True)
      for i, p in enumerate(points)
  ]
  (s,) = study.summarize(figures)
  assert s.seeds == 4
  assert s.mean_points == pytest.approx(np.mean(points))
  assert s.median_points == pytest.approx(-1.75)
  assert s.stderr_points == pytest.approx(np.std(points, ddof=1) / 2)
  assert s.within_points == 2  # 0.5 and -1.0
  # The goal needs 0.5x as well: seed 1 runs at 0.5x, seed 2 at 0.6x.
  assert s.goal_met == 1
  assert s.ratio_worse == pytest.approx((0.4, 0.7))
  assert s.flops_removed == pytest.approx((0.87, 0.9))


def test_finished_with(tmp_path):
  config = study.experiment_config("dead_k1.8_1x4", 2, str(tmp_path), rounds=25)
  os.makedirs(config.output_dir)
  saved = dataclasses.asdict(config)
  with open(os.path.join(config.output_dir, "config.json"), "w") as f:
    json.dump(saved, f)
  assert not study.finished_with(config)  # no summary: it did not finish
  with open(os.path.join(config.output_dir, "summary.json"), "w") as f:
    f.write("{}")
  assert study.finished_with(config)
  assert not study.finished_with(dataclasses.replace(config, rounds=26))
  assert not study.finished_with(dataclasses.replace(config, structured_std_k=2.0))
  # The study evaluates every round by default; a run that evaluated every
  # 5 rounds is the same training, but its window holds 4 evaluations, so
  # the study trains it again unless asked for every 5 (or 10) rounds.
  assert config.eval_every == 1 and study.reusable(config)
  every_5 = dataclasses.replace(config, eval_every=5)
  with open(os.path.join(config.output_dir, "config.json"), "w") as f:
    json.dump(dataclasses.asdict(every_5), f)
  assert study.finished_with(config) and not study.reusable(config)
  assert study.reusable(every_5) and study.reusable(dataclasses.replace(config, eval_every=10))
  assert not study.reusable(dataclasses.replace(config, eval_every=4))


def _cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "benchmarks.structured_study", *args],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
  )


def test_report_only_writes_the_tables(tmp_path):
  out, setting = _study_dir(tmp_path, quiet=True)
  # Runs may lie in other directories too (earlier studies' committed runs).
  other = tmp_path / "other"
  os.makedirs(other)
  os.rename(out / "mnist_fedavg_seed1", other / "mnist_fedavg_seed1")
  assert [f.seed for f in study.collect(str(out), [setting], [0, 1])] == [0]
  result = _cli("--report_only", f"--output_dir={out}", f"--settings={setting}", "--seeds=0-1",
                f"--runs_dirs={tmp_path / 'nothing'},{other}")
  assert result.returncode == 0, result.stderr
  table = (out / "study.md").read_text()
  assert table.startswith("Generated ") and f"--settings={setting} --seeds=0,1 --runs_dirs=" in table
  assert table.split("\n\n", 1)[1] in result.stdout
  assert "| std_band 1.8, min_width 0.6 | 0 | 6, 12, 50 | 104 (-89.8%) | 85.0% | 0.7250 " \
         "| 0.7300 | -0.5 (1.3) | 0.055 (0.46-0.55x) | no |" in table
  assert "| 0.060 (0.60x, in the run) | no |" in table
  # Seed 1 is 3.5 points below in every evaluation: a clear miss.
  assert "| std_band 1.8, min_width 0.6 | 2 | -2.0 | -2.0 | 1.5 | 1 of 2 | 1 of 2 | 0 of 2 " in table
  rows = (out / "study.csv").read_text().splitlines()
  assert rows[0].split(",") == list(study.CSV_FIELDS) and len(rows) == 3
  assert rows[1].startswith(f"{setting},0,6 12 50,104,1024,")


def test_cli_rejects_bad_input_in_one_line(tmp_path):
  for args, mention in ((["--settings=nope"], "unknown setting"), (["--seeds=4-1"], "backwards")):
    result = _cli("--report_only", f"--output_dir={tmp_path}", *args)
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error:") and mention in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
  assert not os.listdir(tmp_path)
  # Re-timing needs FedAvg's model of the first seed as the dense reference.
  result = _cli("--retime", f"--output_dir={tmp_path}", "--seeds=3")
  assert result.returncode == 1
  assert "error: no finished FedAvg run in" in result.stderr and "mnist_fedavg_seed3" in result.stderr


def test_one_seed_has_no_standard_error():
  one = study.RunFigures(
      setting="dead_k1.8_1x4", seed=3, widths=(4, 9), params=20, dense_params=100, flops=20.0,
      dense_flops=100.0, accuracy=0.70, baseline_accuracy=0.71, latency_ms=0.05,
      dense_ms=(0.1,), quiet=False)
  (s,) = study.summarize([one])
  assert np.isnan(s.stderr_points)
  assert "| std_band 1.8, remove_dead | 1 | -1.0 | -1.0 | - | 1 of 1 | 0 of 1 | 1 of 1 |" in \
      study.markdown([one])
  # Without the window's per-round differences, no standard error either.
  assert np.isnan(one.points_se) and not one.clear_miss
  assert study.markdown([]) == "No finished run yet.\n"


STUDY_DOCS = REPO_ROOT / "docs/benchmarks/structured_blocks/study_2026-12-07"


def test_the_committed_study_table_comes_from_the_committed_runs():
  """docs/.../study_2026-12-07/study.md is what the study makes of the
  committed runs (its own, the ten-seed study's and the rerun's) and of the
  committed quiet timings."""
  figures = study.collect(
      str(STUDY_DOCS), MNIST_SETTINGS, range(10),
      runs_dirs=[str(TEN_SEEDS), str(TEN_SEEDS.parent / "rerun_2026-12-07")])
  assert len(figures) == 10 * len(MNIST_SETTINGS) and all(f.quiet for f in figures)
  header, body = (STUDY_DOCS / "study.md").read_text().split("\n\n", 1)
  assert "--report_only" in header
  assert body == study.markdown(figures)


EVERY_ROUND_DOCS = REPO_ROOT / "docs/benchmarks/structured_blocks/every_round_2026-12-07"
EVERY_ROUND_SETTINGS = ["floor0.7_k1.8_1x4", "dense_floor0.6_k1.8"]


def test_the_committed_every_round_table_comes_from_its_runs():
  """docs/.../every_round_2026-12-07: runs that evaluated every round, 16
  evaluations in each window, and the table made of them."""
  figures = study.collect(str(EVERY_ROUND_DOCS), EVERY_ROUND_SETTINGS, range(10))
  assert len(figures) == 20 and all(f.quiet for f in figures)
  assert all(len(f.differences) == 16 for f in figures)
  header, body = (EVERY_ROUND_DOCS / "study.md").read_text().split("\n\n", 1)
  assert "--report_only" in header
  assert body == study.markdown(figures)


@pytest.mark.parametrize("setting", ["mnist_fedavg", *EVERY_ROUND_SETTINGS])
def test_evaluating_every_round_trains_the_same_runs(setting):
  """The every-round runs are the earlier studies' runs evaluated more
  often: the same losses every round and the same evaluation wherever both
  evaluated (so their exports' committed quiet timings hold for them)."""
  earlier = [STUDY_DOCS, TEN_SEEDS, TEN_SEEDS.parent / "rerun_2026-12-07"]
  for seed in range(10):
    name = study.run_name(setting, seed)
    old_dir = study.find_run(name, [str(d) for d in earlier])
    with open(os.path.join(old_dir, "metrics.csv")) as f:
      old = {r["round"]: r for r in csv.DictReader(f)}
    with open(EVERY_ROUND_DOCS / name / "metrics.csv") as f:
      new = {r["round"]: r for r in csv.DictReader(f)}
    assert sorted(old) == sorted(new)
    for r, row in old.items():
      assert new[r]["train_loss"] == row["train_loss"], (name, r)
      if row["clients_accuracy"]:
        assert new[r]["clients_accuracy"] == row["clients_accuracy"], (name, r)
    assert all(new[str(r)]["clients_accuracy"] for r in range(85, 101))


PAPER2_DOCS = STD_BAND / "every_round_2026-12-07"


def test_the_committed_paper2_table_comes_from_its_runs():
  """docs/.../structured_std_band/every_round_2026-12-07: paper 2's CNN at
  k = 2.0 and 1.9 and FedAvg on it, every round evaluated, timed quietly."""
  figures = study.collect(str(PAPER2_DOCS), ["paper2_k2.0", "paper2_k1.9"], range(10))
  assert len(figures) == 20 and all(f.quiet for f in figures)
  assert all(len(f.differences) == 16 for f in figures)
  # Against FedAvg on paper 2's CNN (52,746 parameters), not the MNIST network's.
  assert {f.dense_params for f in figures} == {52746}
  header, body = (PAPER2_DOCS / "study.md").read_text().split("\n\n", 1)
  assert "--report_only" in header and "--settings=paper2_k2.0,paper2_k1.9" in header
  assert body == study.markdown(figures)


@pytest.mark.parametrize("old, new", [
    ("paper2_fedavg_seed3", "paper2_fedavg_seed3"),
    ("paper2_k2.0_seed3", "paper2_k2.0_seed3"),
    ("paper2_fedavg_seed4", "paper2_fedavg_seed4"),
    ("paper2_k2.0_seed4", "paper2_k2.0_seed4"),
    ("paper2_k2.0_seed1_xeon", "paper2_k2.0_seed1"),
    *((f"paper2_k1.9_seed{k}", f"paper2_k1.9_seed{k}") for k in range(5)),
])
def test_the_paper2_study_trains_the_earlier_runs_on_this_machine(old, new):
  """The runs that the earlier trade-off made on the same processor with
  today's code: the same loss every round and the same evaluations."""
  with open(STD_BAND / old / "metrics.csv") as f:
    earlier = {r["round"]: r for r in csv.DictReader(f)}
  with open(PAPER2_DOCS / new / "metrics.csv") as f:
    rows = {r["round"]: r for r in csv.DictReader(f)}
  assert sorted(earlier) == sorted(rows)
  for r, row in earlier.items():
    assert rows[r]["train_loss"] == row["train_loss"], r
    if row["clients_accuracy"]:
      assert rows[r]["clients_accuracy"] == row["clients_accuracy"], r
