"""The benchmark's table and plots from hand-made metrics."""

import csv
import dataclasses
import os

import pytest

from benchmarks import accuracy
from benchmarks import report

GIB = report.GIB_BITS


def _rows(per_round_bits, accuracies, eval_every=2):
  rows, total = [], 0
  for r, acc in enumerate(accuracies, start=1):
    total += per_round_bits
    rows.append({
        "round": str(r),
        "clients_accuracy": f"{acc}" if r % eval_every == 0 or r == len(accuracies) else "",
        "cumulative_upload_bits": str(total),
        "round_seconds": str(1.0 + r),
    })
  return rows


def test_cap_figures_are_the_evaluations_within_the_cap():
  rows = _rows(GIB // 4, [0.1, 0.2, 0.3, 0.4, 0.5])  # 0.25 GiB per round
  # Evaluated rounds 2 (0.5 GiB), 4 (1 GiB), 5 (1.25 GiB).
  assert report.cap_figures(rows, 0.4 * GIB) is None
  assert report.cap_figures(rows, 0.5 * GIB) == (0.2, 0.2, False)
  assert report.cap_figures(rows, 1.2 * GIB) == (0.4, pytest.approx(0.3), False)
  # The run ended below the cap: all its evaluations, marked.
  assert report.cap_figures(rows, 2 * GIB) == (0.5, pytest.approx(1.1 / 3), True)


def test_one_seed_gives_plain_values():
  runs = {
      "fedavg": {0: _rows(GIB // 4, [0.1, 0.2, 0.3, 0.4, 0.5])},
      "feddst": {0: _rows(GIB // 16, [0.2, 0.3, 0.4, 0.5, 0.6])},
  }
  lines = [line for line in report.seed_table(runs, [0.5, 1.0], {"feddst": "FedDST"}).splitlines() if line]
  assert lines[0] == "Seeds 0: mean [min, max] over seeds."
  assert lines[3].split(" | ")[1:4] == ["best", "0.2000", "0.4000"]
  # FedDST sent 5/16 GiB in all: both caps are above its total.
  assert lines[5].split(" | ")[:5] == ["| FedDST", "best", "0.6000*", "0.6000*", "0.6000"]


def test_seed_table_gives_mean_and_range_of_best_and_last_evaluations(tmp_path):
  """Two seeds, evaluated every round, 0.25 GiB a round: at the 1 GiB cap
  (rounds 1-4) seed 0's best is 0.4 and its last evaluations' mean
  (0.1 + 0.2 + 0.3 + 0.4) / 4 = 0.25; seed 1's 0.6 and 0.45."""
  runs = {
      "fedavg": {
          0: _rows(GIB // 4, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], eval_every=1),
          1: _rows(GIB // 4, [0.3, 0.4, 0.5, 0.6, 0.2, 0.1, 0.0], eval_every=1),
      },
  }
  assert report.cap_figures(runs["fedavg"][0], 1.0 * GIB) == (0.4, 0.25, False)
  table = report.seed_table(runs, [0.1, 1.0], {"fedavg": "FedAvg"})
  lines = [line for line in table.splitlines() if line]
  assert lines[0] == "Seeds 0, 1: mean [min, max] over seeds."
  assert lines[1].startswith("| algorithm | figure | ≤ 0.1 GiB | ≤ 1 GiB | round 7 |")
  best, last = lines[3].split(" | "), lines[4].split(" | ")
  assert best[1:5] == ["best", "–", "0.5000 [0.4000, 0.6000]", "0.6500 [0.6000, 0.7000]"]
  # At the end, the last five: seed 0 (0.3..0.7) 0.5, seed 1 (0.5, 0.6, 0.2, 0.1, 0.0) 0.28.
  assert last[1:5] == ["mean of last 5", "–", "0.3500 [0.2500, 0.4500]", "0.3900 [0.2800, 0.5000]"]
  assert best[5].strip(" |") == f"{7 / 4:.3f}"
  # A run that ended below a cap is marked.
  below = [line for line in report.seed_table(runs, [4.0], {}).splitlines() if line][3]
  assert below.split(" | ")[2].endswith("*")
  report.write_seed_runs_csv(runs, str(tmp_path / "runs.csv"))
  text = (tmp_path / "runs.csv").read_text().splitlines()
  assert text[0].startswith("algorithm,seed,round,") and len(text) == 1 + 14
  assert text[8].startswith("fedavg,1,1,0.3,")
  rounds, bits, mean, low, high = report.band(runs["fedavg"])
  assert rounds == list(range(1, 8)) and bits[0] == GIB // 4
  assert mean[0] == pytest.approx(0.2) and (low[4], high[4]) == (0.2, 0.5)
  for path in report.plot_bands(runs, [1.0], {}, str(tmp_path), "title"):
    assert os.path.getsize(path) > 1000


def test_round_table_compares_at_equal_rounds():
  """Two seeds evaluated every round: at round 4, seed 0's evaluation 0.4
  and its mean of rounds 1-4 0.25; seed 1's 0.6 and 0.45. A round that one
  run did not evaluate (3 with evaluations every 2 rounds) is left out."""
  runs = {
      "fedavg": {
          0: _rows(GIB // 4, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], eval_every=1),
          1: _rows(GIB // 4, [0.3, 0.4, 0.5, 0.6, 0.2, 0.1, 0.0], eval_every=1),
      },
  }
  assert report.round_figures(runs["fedavg"][0], 4) == (0.4, pytest.approx(0.25))
  assert report.round_figures(runs["fedavg"][0], 8) is None
  lines = [line for line in report.round_table(runs, [4, 7, 9], {"fedavg": "FedAvg"}).splitlines() if line]
  assert lines[1] == "| algorithm | round 4 | last 5 to 4 | round 7 | last 5 to 7 |"
  assert lines[3].split(" | ")[:3] == ["| FedAvg", "0.5000 [0.4000, 0.6000]", "0.3500 [0.2500, 0.4500]"]
  # Round 7, the last 5: seed 0 (0.3..0.7) 0.5, seed 1 (0.5, 0.6, 0.2, 0.1, 0.0) 0.28.
  assert lines[3].split(" | ")[4] == "0.3900 [0.2800, 0.5000] |"
  runs["feddst"] = {0: _rows(GIB // 4, [0.1] * 7, eval_every=2)}
  assert "round 3" not in report.round_table(runs, [3, 4], {})
  assert report.round_table(runs, [3], {}) == ""


def test_paired_table_gives_each_seeds_difference_from_the_base():
  """Seed 0: the variant's last five to round 5 average 0.4 against the
  base's 0.2 (+20 points); seed 1: 0.3 against 0.4 (-10)."""
  runs = {
      "feddst": {
          0: _rows(GIB // 4, [0.2] * 5, eval_every=1),
          1: _rows(GIB // 4, [0.4] * 5, eval_every=1),
      },
      "variant": {
          0: _rows(GIB // 8, [0.4] * 5, eval_every=1),
          1: _rows(GIB // 8, [0.3] * 5, eval_every=1),
      },
  }
  lines = [line for line in report.paired_table(runs, "feddst", [5], [0.5], {"variant": "V"}).splitlines() if line]
  assert lines[1] == "| algorithm | round 5 | ≤ 0.5 GiB |"
  assert len(lines) == 4  # the base has no row of its own
  cells = lines[3].split(" | ")
  assert cells[1] == "+5.0 [-10.0, +20.0] 1/2"
  # Within 0.5 GiB: the base's rounds 1-2 (0.2, 0.4), the variant's rounds 1-4.
  assert cells[2] == "+5.0 [-10.0, +20.0] 1/2 |"
  runs["variant"][1] = _rows(GIB // 8, [0.3] * 4, eval_every=1)  # no round 5
  assert report.paired_table(runs, "feddst", [5], [], {}).splitlines()[-1] == "| variant | – |"


def test_ablation_variants_change_one_feddst_setting_each():
  settings = accuracy.BenchmarkSettings(rounds=100)
  base = accuracy.experiment_config("feddst", settings, "/x/feddst")
  expected = {
      "feddst_alpha0": ("readjustment_ratio", 0.0),
      "feddst_alpha0.01": ("readjustment_ratio", 0.01),
      "feddst_alpha0.2": ("readjustment_ratio", 0.2),
      "feddst_dR1": ("rounds_between_readjustments", 1),
      "feddst_dR5": ("rounds_between_readjustments", 5),
      "feddst_dR20": ("rounds_between_readjustments", 20),
      "feddst_S0.5": ("sparsity", 0.5),
      "feddst_S0.9": ("sparsity", 0.9),
      "feddst_S0.95": ("sparsity", 0.95),
      "feddst_uniform": ("sparsity_distribution", "uniform"),
      "feddst_float16": ("upload_dtype", "float16"),
      "feddst_momentum0.9": ("server_momentum", 0.9),
      "feddst_rescaled": ("sparse_init", "rescaled"),
  }
  combined = {"feddst_rescaled_uniform": {"sparse_init": "rescaled", "sparsity_distribution": "uniform"}}
  assert accuracy.ABLATIONS["combined"] == combined
  lr = accuracy.experiment_config("fedavg_lr0.02", settings, "/x/f")
  assert (lr.algorithm, lr.client_lr, lr.sparsity) == ("fedavg", 0.02, 0.0)
  lr = accuracy.experiment_config("feddst_rescaled_lr0.02", settings, "/x/f")
  assert (lr.algorithm, lr.client_lr, lr.sparse_init) == ("feddst", 0.02, "rescaled")
  best = accuracy.experiment_config("feddst_rescaled_lr0.02_float16", settings, "/x/f")
  assert (best.algorithm, best.client_lr, best.sparse_init, best.upload_dtype) == (
      "feddst", 0.02, "rescaled", "float16"
  )
  snip = accuracy.experiment_config("snip_lr0.02_float16", settings, "/x/f")
  assert (snip.algorithm, snip.client_lr, snip.sparse_init, snip.upload_dtype, snip.sparsity) == (
      "snip", 0.02, "keras", "float16", 0.8
  )
  assert set(accuracy.VARIANTS) == (
      set(expected) | set(combined) | set(accuracy.ABLATIONS["client_lr"])
      | {"feddst_rescaled_lr0.02_float16"} | set(accuracy.ABLATIONS["snip_options"])
  )
  for name, algorithm in [("snip_float16", "snip"), ("feddst_snip_float16", "feddst_snip")]:
    config = accuracy.experiment_config(name, settings, "/x/f")
    assert (config.algorithm, config.client_lr, config.upload_dtype) == (algorithm, 0.01, "float16")
  for name, (field, value) in expected.items():
    config = accuracy.experiment_config(name, settings, f"/x/{name}")
    assert config.algorithm == "feddst" and getattr(config, field) == value, name
    was, now = dataclasses.asdict(base), dataclasses.asdict(config)
    changed = {k for k in was if was[k] != now[k]} - {"output_dir"}
    # The final sparsity follows S; nothing else differs from the base run.
    assert changed == ({field, "final_sparsity"} if field == "sparsity" else {field}), name


def test_benchmark_configs_share_seed_and_partition():
  settings = accuracy.BenchmarkSettings(rounds=7)
  configs = {a: accuracy.experiment_config(a, settings, f"/x/{a}") for a in accuracy.ALGORITHMS}
  assert {c.seed for c in configs.values()} == {0}
  assert {(c.partition, c.total_clients, c.clients_per_round, c.local_epochs) for c in configs.values()} == {
      ("pathological", 400, 20, 10)
  }
  assert configs["fedavgm"].server_momentum == 0.9 and configs["fedavg"].server_momentum == 0.0
  assert configs["fedprox"].prox_mu == 0.01
  assert configs["feddst"].sparsity == 0.8 and configs["fedavg"].sparsity == 0.0
  assert configs["randommask"].sparsity == 0.8
  for name in ("prunefl", "lotteryfl"):
    assert configs[name].sparsity == 0.8 and configs[name].client_execution == "per_client"
  with pytest.raises(ValueError):
    accuracy.experiment_config("nope", settings, "/x")


def test_quick_settings_readjust_and_are_described_as_run(tmp_path):
  import dataclasses  # pylint: disable=g-import-not-at-top

  from tff_feddst import masks  # pylint: disable=g-import-not-at-top

  quick = dataclasses.replace(accuracy.BenchmarkSettings(), **accuracy.QUICK)
  config = accuracy.experiment_config("feddst", quick, str(tmp_path / "feddst"))
  readjusting = [
      r for r in range(1, config.rounds + 1)
      if masks.is_readjustment_round(
          r, config.readjustment_ratio, config.rounds_between_readjustments,
          config.readjustment_end_round, config.readjustment_schedule,
      )
  ]
  assert readjusting == [1]  # R_end = 2: FedDST is not RandomMask here
  assert accuracy.describe(quick) == (
      "Fashion-MNIST, pathological split (40 clients x 2 classes), 5 clients per round, "
      "1 local epoch, batch 32"
  )
  assert accuracy.describe(accuracy.BenchmarkSettings()).startswith(
      "Fashion-MNIST, pathological split (400 clients x 2 classes), 20 clients per round, "
      "10 local epochs"
  )


def test_the_pool_benchmark_gives_every_client_one_training_image(fashion_mnist_available):
  """`benchmarks.workers` measures pools of clients of one image each."""
  from benchmarks import workers  # pylint: disable=g-import-not-at-top
  from tff_feddst import data  # pylint: disable=g-import-not-at-top

  for pool in (400, 10000, 60000):
    values = dict(
        flag.removeprefix("--").split("=") for flag in workers._partition_flags(pool)  # pylint: disable=protected-access
    )
    fed = data.load_federated_data(
        "fashion_mnist", values.pop("partition"), total_clients=pool,
        **{k: int(v) for k, v in values.items()},
    )
    assert len(fed.client_ids) == pool
    assert {len(idx) for idx in fed.partition.train} == {1}, pool
  with pytest.raises(ValueError, match="one image per client"):
    workers._partition_flags(20000)  # pylint: disable=protected-access


def _metrics_dir(directory, rows):
  """A run directory holding `rows` as its metrics.csv."""
  directory.mkdir(parents=True)
  with open(directory / "metrics.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return directory


def test_a_reports_runs_csv_gives_back_its_runs(tmp_path):
  runs = {
      "fedavg": {0: _rows(GIB // 4, [0.1, 0.2, 0.3]), 1: _rows(GIB // 4, [0.3, 0.2, 0.1])},
      "feddst": {1: _rows(GIB // 16, [0.5, 0.6, 0.7])},
  }
  path = str(tmp_path / "runs.csv")
  report.write_seed_runs_csv(runs, path)
  assert report.load_seed_runs_csv(path) == runs
  # Written again from what was read: the same file, byte for byte.
  report.write_seed_runs_csv(report.load_seed_runs_csv(path), str(tmp_path / "again.csv"))
  assert (tmp_path / "again.csv").read_bytes() == (tmp_path / "runs.csv").read_bytes()
  (tmp_path / "metrics.csv").write_text("round,clients_accuracy\n1,0.5\n")
  with pytest.raises(ValueError, match="not a runs.csv"):
    report.load_seed_runs_csv(str(tmp_path / "metrics.csv"))


def test_finished_runs_take_directories_first_then_earlier_reports(tmp_path):
  old = {"fedavg": {0: _rows(GIB, [0.1, 0.2]), 1: _rows(GIB, [0.3, 0.4])}}
  newer = {"fedavg": {1: _rows(GIB, [0.9, 0.9])}, "feddst": {1: _rows(GIB, [0.6, 0.7])}}
  fresh = _rows(GIB // 2, [0.5, 0.6, 0.7])
  _metrics_dir(tmp_path / "seed1" / "fedavg", fresh)
  seed_dirs = {s: str(tmp_path / f"seed{s}") for s in (0, 1)}
  runs, missing = report.finished_runs(["fedavg", "feddst"], seed_dirs, [old, newer])
  # fedavg seed 0 from the first file, seed 1 from its directory (not from
  # either file); feddst seed 1 from the second file; feddst seed 0 nowhere.
  assert runs == {"fedavg": {0: old["fedavg"][0], 1: fresh}, "feddst": {1: newer["feddst"][1]}}
  assert missing == [os.path.join(seed_dirs[0], "feddst")]
  # Runs from files with fewer columns share one runs.csv, the gaps empty.
  runs["fedavg"][0] = [{k: v for k, v in r.items() if k != "round_seconds"} for r in old["fedavg"][0]]
  report.write_seed_runs_csv(runs, str(tmp_path / "runs.csv"))
  lines = (tmp_path / "runs.csv").read_text().splitlines()
  assert lines[0] == "algorithm,seed,round,clients_accuracy,cumulative_upload_bits,round_seconds"
  assert lines[1] == f"fedavg,0,1,,{GIB}," and lines[3].startswith("fedavg,1,1,,")


def test_every_algorithm_and_variant_has_a_label():
  names = set(accuracy.ALGORITHMS) | set(accuracy.VARIANTS)
  assert names <= set(accuracy.LABELS)
  assert accuracy.LABELS["snip_lr0.02_float16"] == "SNIP, client_lr=0.02, upload_dtype=float16"
