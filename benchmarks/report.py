"""Tables and plots from finished benchmark runs (metrics.csv of each run).

Accuracy at an upload cap: the paper's headline comparison. For a cap of C
bytes uploaded in total (over all clients and rounds), an algorithm's entry
is its `clients_accuracy` at the last evaluated round whose cumulative upload
is within C. A run that ended below the cap is marked with `*` (it could have
trained further within the cap).
"""

import csv
import math
import os

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


def accuracy_at_cap(rows, cap_bits: float):
  """(accuracy, round, ended_below_cap) or None if nothing was evaluated in time."""
  points = [p for p in evaluated(rows) if p[1] <= cap_bits]
  if not points:
    return None
  r, _, acc = points[-1]
  ended_below = int(rows[-1]["cumulative_upload_bits"]) < cap_bits
  return acc, r, ended_below


def write_runs_csv(runs: dict[str, list[dict]], path: str) -> None:
  columns = ["algorithm"] + list(next(iter(runs.values()))[0].keys())
  with files.atomic_output(path) as temp, open(temp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for algorithm, rows in runs.items():
      for row in rows:
        writer.writerow({"algorithm": algorithm, **row})


def markdown_table(runs: dict[str, list[dict]], caps_gib: list[float], labels: dict[str, str]) -> str:
  header = ["algorithm"] + [f"≤ {c:g} GiB" for c in caps_gib]
  rounds = max(int(rows[-1]["round"]) for rows in runs.values())
  header += [f"round {rounds}", "total upload (GiB)"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for algorithm, rows in runs.items():
    cells = [labels.get(algorithm, algorithm)]
    for cap in caps_gib:
      found = accuracy_at_cap(rows, cap * GIB_BITS)
      if found is None:
        cells.append("–")
      else:
        acc, r, below = found
        cells.append(f"{acc:.4f} (r{r}){'*' if below else ''}")
    final = evaluated(rows)[-1]
    cells.append(f"{final[2]:.4f}")
    cells.append(f"{int(rows[-1]['cumulative_upload_bits']) / GIB_BITS:.3f}")
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(
    runs: dict[str, list[dict]], caps_gib: list[float], labels: dict[str, str], out_dir: str,
    title: str = "",
) -> list[str]:
  """Accuracy against cumulative upload and against round (PNG files), titled `title`."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  paths = []
  for name, x_index, xlabel in (
      ("accuracy_vs_upload.png", 1, "cumulative upload, all clients (GiB)"),
      ("accuracy_vs_round.png", 0, "round"),
  ):
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for algorithm, rows in runs.items():
      points = evaluated(rows)
      xs = [p[x_index] / (GIB_BITS if x_index == 1 else 1) for p in points]
      ax.plot(xs, [p[2] for p in points], label=labels.get(algorithm, algorithm), linewidth=1.6)
    if x_index == 1:
      for cap in caps_gib:
        ax.axvline(cap, color="grey", linewidth=0.6, linestyle=":")
      ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("clients_accuracy (mean over clients)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = os.path.join(out_dir, name)
    with files.atomic_output(path) as temp:
      fig.savefig(temp)
    plt.close(fig)
    paths.append(path)
  return paths
