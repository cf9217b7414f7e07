"""Tables and plots from finished benchmark runs (metrics.csv of each run,
one run per algorithm and seed).

Accuracy at an upload cap: the paper's headline comparison. For a cap of C
bits uploaded in total (over all clients and rounds), an algorithm's run is
judged on its evaluations whose cumulative upload is within C: the best of
them, and the mean of the last few (single evaluations on the pathological
split swing by 10 points). Over the seeds, the table gives the mean and the
[min, max]. A run that ended below the cap is marked with `*` (it could
have trained further within the cap).
"""

import csv
import math
import os
import textwrap

from tff_feddst import files

GIB_BITS = 8 * 2**30


def _float(value):
  return float(value) if value not in ("", None) else math.nan


def load_rows(run_dir: str) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.csv"), newline="") as f:
    return list(csv.DictReader(f))


def evaluated(rows):
  """(round, cumulative upload bits, clients_accuracy) of evaluated rounds."""
  return [
      (int(r["round"]), int(r["cumulative_upload_bits"]), _float(r["clients_accuracy"]))
      for r in rows
      if r["clients_accuracy"] not in ("", None)
  ]


# Evaluations averaged at the end of a curve (within a cap): single
# evaluations on the pathological split swing by 10 points.
LAST_EVALUATIONS = 5


def cap_figures(rows, cap_bits: float):
  """(best, mean of the last `LAST_EVALUATIONS`, ended below the cap) of
  the evaluations within `cap_bits` uploaded, or None if none was in time."""
  accuracies = [acc for _, bits, acc in evaluated(rows) if bits <= cap_bits]
  if not accuracies:
    return None
  last = accuracies[-LAST_EVALUATIONS:]
  ended_below = int(rows[-1]["cumulative_upload_bits"]) < cap_bits
  return max(accuracies), sum(last) / len(last), ended_below


def spread(values) -> tuple[float, float, float]:
  """(mean, min, max)."""
  values = list(values)
  return sum(values) / len(values), min(values), max(values)


def _cell(values) -> str:
  mean, low, high = spread(values)
  if len(values) == 1:
    return f"{mean:.4f}"
  return f"{mean:.4f} [{low:.4f}, {high:.4f}]"


def seed_table(
    runs: dict[str, dict[int, list[dict]]], caps_gib: list[float], labels: dict[str, str]
) -> str:
  """Per algorithm and upload cap, over the seeds' runs (`runs[algorithm]
  [seed]`): the mean and [min, max] of (a) the best evaluation within the
  cap and (b) the mean of its last `LAST_EVALUATIONS` evaluations within
  the cap; and the same at the end of the runs. `*`: some seed's run ended
  below the cap; `–`: some seed evaluated nothing within it."""
  seeds = sorted({s for by_seed in runs.values() for s in by_seed})
  header = ["algorithm", "figure"] + [f"≤ {c:g} GiB" for c in caps_gib]
  rounds = max(int(rows[-1]["round"]) for by_seed in runs.values() for rows in by_seed.values())
  header += [f"round {rounds}", "total upload (GiB)"]
  lines = [
      f"Seeds {', '.join(map(str, seeds))}: mean [min, max] over seeds.\n",
      "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
  ]
  for algorithm, by_seed in runs.items():
    label = labels.get(algorithm, algorithm)
    for index, figure in enumerate(("best", f"mean of last {LAST_EVALUATIONS}")):
      cells = [label if index == 0 else "", figure]
      for cap in [c * GIB_BITS for c in caps_gib] + [math.inf]:
        found = [cap_figures(rows, cap) for rows in by_seed.values()]
        if any(f is None for f in found):
          cells.append("–")
          continue
        below = cap != math.inf and any(f[2] for f in found)
        cells.append(_cell([f[index] for f in found]) + ("*" if below else ""))
      totals = [int(rows[-1]["cumulative_upload_bits"]) / GIB_BITS for rows in by_seed.values()]
      cells.append(f"{spread(totals)[0]:.3f}" if index == 0 else "")
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def round_figures(rows, round_: int):
  """(the evaluation at `round_`, the mean of the last `LAST_EVALUATIONS`
  evaluations up to it), or None if the run did not evaluate that round."""
  points = [(r, acc) for r, _, acc in evaluated(rows) if r <= round_]
  if not points or points[-1][0] != round_:
    return None
  last = [acc for _, acc in points[-LAST_EVALUATIONS:]]
  return points[-1][1], sum(last) / len(last)


def round_table(
    runs: dict[str, dict[int, list[dict]]], rounds: list[int], labels: dict[str, str]
) -> str:
  """Per algorithm, at equal rounds: the mean and [min, max] over the seeds'
  runs of the evaluation at each round and of the mean of the last
  `LAST_EVALUATIONS` evaluations up to it; rounds that not every run
  evaluated are left out."""
  rounds = [
      r for r in rounds
      if all(round_figures(rows, r) for by_seed in runs.values() for rows in by_seed.values())
  ]
  if not rounds:
    return ""
  header = ["algorithm"] + [
      f"{figure} {r}" for r in rounds
      for figure in ("round", f"last {LAST_EVALUATIONS} to")
  ]
  lines = [
      "At equal rounds (clients_accuracy; mean [min, max] over seeds):\n",
      "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
  ]
  for algorithm, by_seed in runs.items():
    cells = [labels.get(algorithm, algorithm)]
    for r in rounds:
      found = [round_figures(rows, r) for rows in by_seed.values()]
      cells += [_cell([f[0] for f in found]), _cell([f[1] for f in found])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def paired_table(
    runs: dict[str, dict[int, list[dict]]], base: str, rounds: list[int],
    caps_gib: list[float], labels: dict[str, str],
) -> str:
  """Every other algorithm against `base` on the same seeds (same
  partition and client sampling): per seed the difference of the mean of
  the last `LAST_EVALUATIONS` evaluations up to each round and within each
  upload cap, in points; cells give the mean [min, max] of the seeds'
  differences and how many seeds the other one is ahead."""
  columns = [(f"round {r}", lambda rows, r=r: round_figures(rows, r)) for r in rounds] + [
      (f"≤ {c:g} GiB", lambda rows, c=c: cap_figures(rows, c * GIB_BITS)) for c in caps_gib
  ]
  header = ["algorithm"] + [name for name, _ in columns]
  lines = [
      f"Against {labels.get(base, base)}, seed by seed: the difference in points of the "
      f"mean of the last {LAST_EVALUATIONS} evaluations (mean [min, max] over seeds; "
      "n/N: seeds ahead).\n",
      "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
  ]
  for algorithm, by_seed in runs.items():
    if algorithm == base:
      continue
    seeds = sorted(set(by_seed) & set(runs[base]))
    cells = [labels.get(algorithm, algorithm)]
    for _, figure in columns:
      found = [(figure(by_seed[s]), figure(runs[base][s])) for s in seeds]
      if not found or any(a is None or b is None for a, b in found):
        cells.append("–")
        continue
      deltas = [100 * (a[1] - b[1]) for a, b in found]
      mean, low, high = spread(deltas)
      ahead = sum(d > 0 for d in deltas)
      cells.append(f"{mean:+.1f} [{low:+.1f}, {high:+.1f}] {ahead}/{len(deltas)}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_seed_runs_csv(runs: dict[str, dict[int, list[dict]]], path: str) -> None:
  """Every round of every run, with its algorithm and seed."""
  # The runs' columns in the order first seen (runs read from another
  # report's runs.csv may lack a column newer runs have: left empty).
  columns = {"algorithm": None, "seed": None}
  for by_seed in runs.values():
    for rows in by_seed.values():
      for row in rows:
        columns.update(dict.fromkeys(row))
  with files.atomic_output(path) as temp, open(temp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(columns), restval="")
    writer.writeheader()
    for algorithm, by_seed in runs.items():
      for seed, rows in sorted(by_seed.items()):
        for row in rows:
          writer.writerow({"algorithm": algorithm, "seed": seed, **row})


def load_seed_runs_csv(path: str) -> dict[str, dict[int, list[dict]]]:
  """The runs of a `write_seed_runs_csv` file: {algorithm: {seed: rows}},
  each row as `load_rows` gives a run's metrics.csv rows (strings, without
  the algorithm and seed columns)."""
  runs: dict[str, dict[int, list[dict]]] = {}
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    if reader.fieldnames is None or reader.fieldnames[:2] != ["algorithm", "seed"]:
      raise ValueError(f"{path} is not a runs.csv (its first columns are not algorithm, seed)")
    for row in reader:
      algorithm, seed = row.pop("algorithm"), int(row.pop("seed"))
      runs.setdefault(algorithm, {}).setdefault(seed, []).append(row)
  return runs


def finished_runs(algorithms, seed_dirs: dict[int, str], earlier=()):
  """({algorithm: {seed: rows}}, the run directories missing) of the
  finished runs `<seed_dirs[seed]>/<algorithm>/metrics.csv`; a run with no
  directory is taken from the first of `earlier` (`load_seed_runs_csv`
  results) that holds it."""
  runs, missing = {}, []
  for algorithm in algorithms:
    for seed, seed_dir in seed_dirs.items():
      run_dir = os.path.join(seed_dir, algorithm)
      if os.path.exists(os.path.join(run_dir, "metrics.csv")):
        runs.setdefault(algorithm, {})[seed] = load_rows(run_dir)
        continue
      found = next((e[algorithm][seed] for e in earlier if seed in e.get(algorithm, {})), None)
      if found is None:
        missing.append(run_dir)
      else:
        runs.setdefault(algorithm, {})[seed] = found
  return runs, missing


def band(by_seed: dict[int, list[dict]]):
  """(rounds, mean cumulative upload bits, mean, min, max accuracy) over the
  rounds every seed's run evaluated."""
  points = [{r: (bits, acc) for r, bits, acc in evaluated(rows)} for rows in by_seed.values()]
  common = sorted(set.intersection(*(set(p) for p in points)))
  columns = ([], [], [], [], [])
  for r in common:
    bits = [p[r][0] for p in points]
    mean, low, high = spread(p[r][1] for p in points)
    for column, value in zip(columns, (r, sum(bits) / len(bits), mean, low, high)):
      column.append(value)
  return columns


def plot_bands(
    runs: dict[str, dict[int, list[dict]]], caps_gib: list[float], labels: dict[str, str],
    out_dir: str, title: str = "",
) -> list[str]:
  """Accuracy against cumulative upload and against round: per algorithm
  the mean over seeds, with a band from the seeds' min to max (PNG files)."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  paths = []
  for name, x_index, xlabel in (
      ("accuracy_vs_upload.png", 1, "cumulative upload, all clients (GiB; mean over seeds)"),
      ("accuracy_vs_round.png", 0, "round"),
  ):
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    # Past the 10 colours of the default cycle, lines repeat a colour with
    # another dash pattern, so that no two curves look alike.
    styles = ("-", "--", ":", "-.")
    for index, (algorithm, by_seed) in enumerate(runs.items()):
      rounds, bits, mean, low, high = band(by_seed)
      xs = rounds if x_index == 0 else [b / GIB_BITS for b in bits]
      (line,) = ax.plot(
          xs, mean, label=labels.get(algorithm, algorithm), linewidth=1.4,
          color=f"C{index % 10}", linestyle=styles[(index // 10) % len(styles)],
      )
      if len(by_seed) > 1:
        ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.18, linewidth=0)
    if x_index == 1:
      for cap in caps_gib:
        ax.axvline(cap, color="grey", linewidth=0.6, linestyle=":")
      ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("clients_accuracy (mean over clients)")
    seeds = len(next(iter(runs.values())))
    lines = textwrap.wrap(title, 90) + [
        f"mean over {seeds} seed{'s' if seeds > 1 else ''}"
        + (", band: min to max" if seeds > 1 else "")
    ]
    ax.set_title("\n".join(lines), fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    with files.atomic_output(path) as temp:
      fig.savefig(temp)
    plt.close(fig)
    paths.append(path)
  return paths
