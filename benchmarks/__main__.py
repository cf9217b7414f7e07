"""python -m benchmarks: the paper's comparison, accuracy against upload.

  python -m benchmarks --rounds=100 --seeds=0,1,2 --output_dir=runs/benchmark
  python -m benchmarks --quick          # a few rounds of each, as a smoke test
  python -m benchmarks --rounds=100 --seeds=0,1,2 --algorithms=fedavg,feddst \
      --ablations=alpha --output_dir=runs/ablations/alpha   # the paper's ablations

Trains FedAvg, FedAvgM, FedProx, RandomMask, SNIP, GraSP, PruneFL, LotteryFL
(S=0.8) and FedDST (S=0.8, alpha 0.05, Delta_R 10) on Fashion-MNIST with the
paper's pathological split, on each seed (each seed its own partition and
client sampling; every algorithm of a seed the same), evaluating every
round by default; --ablations adds FedDST variants with one setting changed
(`accuracy.ABLATIONS`: alpha, Delta_R, S, uniform vs ERK, float16 uploads,
server momentum; and init, --sparse_init=rescaled). Then it writes into --output_dir:
  runs.csv                 every round of every run, with its seed;
  results.md               per algorithm and upload cap, over the seeds: the
                           mean and [min, max] of the best evaluation and of
                           the mean of the last 5 evaluations within the cap;
                           and at equal rounds (--round_figures) the
                           evaluation and the mean of the last 5 up to it;
  accuracy_vs_upload.png, accuracy_vs_round.png: the mean over seeds, with a
                           band from min to max.
`--report_only --runs_dir=D` writes the table and plots of the finished runs
in D (e.g. one ablation's) into --output_dir; with `--runs_csv=F,...` runs
not in D come from earlier reports' runs.csv files (a new checkout has no
runs/, but docs/benchmarks/ keeps every report's runs.csv). Finished runs in
--output_dir/seed<k>/<algorithm> are reused (and, with
checkpoints, interrupted ones resume), so rerunning continues where it
stopped; seeds run one after the other, all algorithms of one seed first.
"""

import dataclasses
import datetime
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402

from benchmarks import accuracy  # noqa: E402
from benchmarks import report  # noqa: E402
from tff_feddst import files  # noqa: E402
from tff_feddst import runtime  # noqa: E402

_OUTPUT_DIR = flags.DEFINE_string("output_dir", "runs/benchmark", "Where runs, table and plots go.")
_ROUNDS = flags.DEFINE_integer("rounds", 200, "Rounds of every algorithm.", lower_bound=1)
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 1, "Evaluation period (rounds).", lower_bound=1)
_ALGORITHMS = flags.DEFINE_list("algorithms", list(accuracy.ALGORITHMS), "Algorithms (or FedDST ablation variants) to compare.")
_ABLATIONS = flags.DEFINE_list("ablations", [], f"FedDST ablations whose variants join --algorithms: {', '.join(accuracy.ABLATIONS)}.")
_ROUND_FIGURES = flags.DEFINE_list("round_figures", ["40", "100"], "Rounds at which the table also compares the algorithms (those the runs reach).")
_CAPS = flags.DEFINE_list("upload_caps_gib", ["0.1", "0.2", "0.4", "0.8"], "Total upload caps (GiB) of the table (FedDST at S=0.8 uploads about 0.4 GiB in 100 rounds).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds: every algorithm runs on each.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Fashion-MNIST directory (default: the Debian package's).")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke test: 4 rounds, 40 clients, 5 per round, 1 epoch, FedDST readjusting every round.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rebuild table and plots from finished runs.")
_PAIRED_BASE = flags.DEFINE_string("paired_base", "feddst", "The table also gives every other algorithm's seed-by-seed difference from this one (when it ran).")
_RUNS_DIR = flags.DEFINE_string("runs_dir", None, "With --report_only: where the finished runs are (<runs_dir>/seed<k>/<algorithm>; default --output_dir).")
_RUNS_CSV = flags.DEFINE_list("runs_csv", [], "With --report_only: runs.csv files of earlier reports; a run (algorithm, seed) with no directory in --runs_dir is taken from the first of them that holds it.")



def _parsed_flags():
  """(algorithms and variants, round figures, caps in GiB, seeds) from the
  flags; a bad value exits with one `error:` line (before TensorFlow loads)."""
  unknown = [a for a in _ALGORITHMS.value if a not in accuracy.ALGORITHMS and a not in accuracy.VARIANTS]
  if unknown:
    sys.exit(
        f"error: unknown --algorithms {', '.join(unknown)}; choose from "
        f"{', '.join(accuracy.ALGORITHMS)} or {', '.join(accuracy.VARIANTS)}"
    )
  bad = [a for a in _ABLATIONS.value if a not in accuracy.ABLATIONS]
  if bad:
    sys.exit(f"error: unknown --ablations {', '.join(bad)}; choose from {', '.join(accuracy.ABLATIONS)}")
  algorithms = list(dict.fromkeys(
      _ALGORITHMS.value + [v for a in _ABLATIONS.value for v in accuracy.ABLATIONS[a]]
  ))
  try:
    round_figures = sorted({int(r) for r in _ROUND_FIGURES.value})
  except ValueError:
    sys.exit(f"error: --round_figures must be integers, got {','.join(_ROUND_FIGURES.value)}")
  try:
    caps = sorted(float(c) for c in _CAPS.value)
  except ValueError:
    sys.exit(f"error: --upload_caps_gib must be numbers, got {','.join(_CAPS.value)}")
  if any(c <= 0 for c in caps):
    sys.exit("error: --upload_caps_gib must be > 0")
  try:
    seeds = [int(s) for s in _SEEDS.value]
  except ValueError:
    sys.exit(f"error: --seeds must be integers, got {','.join(_SEEDS.value)}")
  if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
    sys.exit(f"error: --seeds must be distinct integers >= 0, got {','.join(_SEEDS.value)}")
  if _RUNS_DIR.value and not _REPORT_ONLY.value:
    sys.exit("error: --runs_dir needs --report_only (runs train into --output_dir)")
  if _RUNS_CSV.value and not _REPORT_ONLY.value:
    sys.exit("error: --runs_csv needs --report_only")
  return algorithms, round_figures, caps, seeds


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  algorithms, round_figures, caps, seeds = _parsed_flags()
  settings = accuracy.BenchmarkSettings(
      rounds=_ROUNDS.value, eval_every=_EVAL_EVERY.value, data_dir=_DATA_DIR.value
  )
  if _QUICK.value:
    settings = dataclasses.replace(settings, **accuracy.QUICK)
    caps = [c / 1000 for c in caps]
  out = _OUTPUT_DIR.value
  os.makedirs(out, exist_ok=True)
  from tff_feddst import data as data_lib  # pylint: disable=g-import-not-at-top
  from tff_feddst import config as config_lib  # pylint: disable=g-import-not-at-top

  seed_dirs = {s: os.path.join(_RUNS_DIR.value or out, f"seed{s}") for s in seeds}
  if _REPORT_ONLY.value:
    earlier = []
    for path in _RUNS_CSV.value:
      try:
        earlier.append(report.load_seed_runs_csv(path))
      except (OSError, ValueError) as e:
        sys.exit(f"error: --runs_csv: {e}")
    runs, missing = report.finished_runs(algorithms, seed_dirs, earlier)
    if missing:
      sys.exit(
          f"error: no finished run in {', '.join(missing)}"
          f"{' nor in --runs_csv' if earlier else ''}"
      )
  else:
    run_dirs = {a: {} for a in algorithms}
    try:
      with runtime.managed_runtime():
        for s, seed_dir in seed_dirs.items():
          seed_settings = dataclasses.replace(settings, seed=s)
          for a, d in accuracy.run_all(algorithms, seed_settings, seed_dir).items():
            run_dirs[a][s] = d
    except (data_lib.DataError, config_lib.ConfigError) as e:
      sys.exit(f"error: {e}")
    except KeyboardInterrupt:
      sys.exit("interrupted; rerun the same command to continue")

    runs = {a: {s: report.load_rows(d) for s, d in by_seed.items()} for a, by_seed in run_dirs.items()}
  report.write_seed_runs_csv(runs, os.path.join(out, "runs.csv"))
  table = report.seed_table(runs, caps, accuracy.LABELS) + "\n" + report.round_table(runs, round_figures, accuracy.LABELS)
  if _PAIRED_BASE.value in runs and len(runs) > 1:
    table += "\n" + report.paired_table(runs, _PAIRED_BASE.value, round_figures, caps, accuracy.LABELS)
  header = (
      f"{accuracy.describe(settings)}; {settings.rounds} rounds, evaluated every "
      f"{settings.eval_every}. Cells: clients_accuracy within the cap, over the seeds' "
      f"runs (* = some run ended below the cap). Generated "
      f"{datetime.date.today().isoformat()} by `python -m benchmarks "
      f"--rounds={settings.rounds} --eval_every={settings.eval_every} "
      f"--seeds={','.join(map(str, seeds))} --algorithms={','.join(algorithms)} "
      f"--upload_caps_gib={','.join(f'{c:g}' for c in caps)}"
      f"{' --quick' if _QUICK.value else ''}`. Timings: see `python -m benchmarks.speed`.\n\n"
  )
  path = os.path.join(out, "results.md")
  files.write_atomic(path, header + table)
  plots = report.plot_bands(runs, caps, accuracy.LABELS, out, accuracy.describe(settings))
  print(table)
  print(f"wrote {path}, {os.path.join(out, 'runs.csv')}, {', '.join(plots)}")


if __name__ == "__main__":
  runtime.install_shutdown_handlers()
  app.run(main)
