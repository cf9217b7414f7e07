"""python -m benchmarks: the paper's comparison, accuracy against upload.

  python -m benchmarks --rounds=200 --output_dir=runs/benchmark
  python -m benchmarks --quick          # a few rounds of each, as a smoke test

Trains FedAvg, FedAvgM, FedProx, RandomMask, SNIP, GraSP (S=0.8) and FedDST
(S=0.8, alpha 0.05, Delta_R 10) on Fashion-MNIST with the paper's pathological split,
same seed and partition, then writes into --output_dir:
  runs.csv                 every round of every run;
  results.md               clients_accuracy at upload caps and at the end;
  accuracy_vs_upload.png, accuracy_vs_round.png.
Finished runs in --output_dir/<algorithm> are reused (and, with checkpoints,
interrupted ones resume), so rerunning continues where it stopped.
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
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 5, "Evaluation period.", lower_bound=1)
_ALGORITHMS = flags.DEFINE_list("algorithms", list(accuracy.ALGORITHMS), "Algorithms to compare.")
_CAPS = flags.DEFINE_list("upload_caps_gib", ["0.1", "0.2", "0.4", "0.8"], "Total upload caps (GiB) of the table (FedDST at S=0.8 uploads about 0.4 GiB in 100 rounds).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every run.", lower_bound=0)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Fashion-MNIST directory (default: the Debian package's).")
_QUICK = flags.DEFINE_bool("quick", False, "Smoke test: 4 rounds, 40 clients, 5 per round, 1 epoch, FedDST readjusting every round.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rebuild table and plots from finished runs.")

LABELS = {
    "fedavg": "FedAvg",
    "fedavgm": "FedAvgM (server momentum 0.9)",
    "fedprox": "FedProx (mu 0.01)",
    "randommask": "RandomMask (S=0.8)",
    "snip": "SNIP (S=0.8)",
    "grasp": "GraSP (S=0.8)",
    "feddst": "FedDST (S=0.8, a=0.05, dR=10)",
}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)
  unknown = [a for a in _ALGORITHMS.value if a not in accuracy.ALGORITHMS]
  if unknown:
    sys.exit(f"error: unknown --algorithms {', '.join(unknown)}; choose from {', '.join(accuracy.ALGORITHMS)}")
  try:
    caps = sorted(float(c) for c in _CAPS.value)
  except ValueError:
    sys.exit(f"error: --upload_caps_gib must be numbers, got {','.join(_CAPS.value)}")
  if any(c <= 0 for c in caps):
    sys.exit("error: --upload_caps_gib must be > 0")
  settings = accuracy.BenchmarkSettings(
      rounds=_ROUNDS.value, eval_every=_EVAL_EVERY.value, seed=_SEED.value, data_dir=_DATA_DIR.value
  )
  if _QUICK.value:
    settings = dataclasses.replace(settings, **accuracy.QUICK)
    caps = [c / 1000 for c in caps]
  out = _OUTPUT_DIR.value
  os.makedirs(out, exist_ok=True)
  from tff_feddst import data as data_lib  # pylint: disable=g-import-not-at-top
  from tff_feddst import config as config_lib  # pylint: disable=g-import-not-at-top

  if _REPORT_ONLY.value:
    run_dirs = {a: os.path.join(out, a) for a in _ALGORITHMS.value}
    missing = [d for d in run_dirs.values() if not os.path.exists(os.path.join(d, "metrics.csv"))]
    if missing:
      sys.exit(f"error: no finished run in {', '.join(missing)}")
  else:
    try:
      with runtime.managed_runtime():
        run_dirs = accuracy.run_all(_ALGORITHMS.value, settings, out)
    except (data_lib.DataError, config_lib.ConfigError) as e:
      sys.exit(f"error: {e}")
    except KeyboardInterrupt:
      sys.exit("interrupted; rerun the same command to continue")

  runs = {a: report.load_rows(d) for a, d in run_dirs.items()}
  report.write_runs_csv(runs, os.path.join(out, "runs.csv"))
  table = report.markdown_table(runs, caps, LABELS)
  header = (
      f"{accuracy.describe(settings)}, seed {settings.seed}; "
      f"{settings.rounds} rounds, evaluated every {settings.eval_every}. "
      f"Cells: clients_accuracy at the last evaluation within the cap (round in "
      f"brackets; * = the run ended below the cap). Generated "
      f"{datetime.date.today().isoformat()} by `python -m benchmarks "
      f"--rounds={settings.rounds} --eval_every={settings.eval_every} "
      f"--upload_caps_gib={','.join(f'{c:g}' for c in caps)}"
      f"{' --quick' if _QUICK.value else ''}`. Timings: see `python -m benchmarks.speed`.\n\n"
  )
  path = os.path.join(out, "results.md")
  files.write_atomic(path, header + table)
  plots = report.plot(runs, caps, LABELS, out, accuracy.describe(settings))
  print(table)
  print(f"wrote {path}, {os.path.join(out, 'runs.csv')}, {', '.join(plots)}")


if __name__ == "__main__":
  runtime.install_shutdown_handlers()
  app.run(main)
