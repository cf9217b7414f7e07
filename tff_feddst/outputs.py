"""A run's output directory: its lock, and metrics through TFF release managers.

Per-round metrics go out through `tff.program` release managers, grouped:
- `metrics.csv`: `tff.program.CSVFileReleaseManager` keyed by `round`; a
  release of round k first drops the rows of rounds >= k, so a resumed run
  never leaves a duplicate row;
- TensorBoard event files under `<output_dir>/tensorboard/`
  (`tff.program.TensorBoardReleaseManager`): every numeric column as a
  scalar at step = round (the evaluation columns only in evaluated rounds).
  A resumed run rebuilds them from metrics.csv's rows up to its checkpoint,
  so the rounds run again after a kill are not there twice. TensorBoard
  stores every scalar as float32: counters above 2^24 (the bit counts)
  are rounded there to 24 significant bits; metrics.csv holds them exactly;
- the console line (`ConsoleReleaseManager`).
Every other file is written with `files.write_atomic`.

`RunLock` keeps two runs from sharing an output directory.
"""

import csv
import errno
import fcntl
import io
import os
import shutil

import tensorflow_federated as tff

from tff_feddst import costs
from tff_feddst import files
from tff_feddst import runtime
from tff_feddst.config import ConfigError
from tff_feddst.rounds import METRIC_COLUMNS

METRICS_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".lock"


class RunLock:
  """An exclusive lock on an output directory, held while a run works there.

  `flock` on `<output_dir>/.lock`, which holds the owner's process id. The
  kernel drops the lock when its process dies (even by SIGKILL), so a lock
  left by a killed run does not block the next one. The file is removed
  when the lock is released.
  """

  def __init__(self, output_dir: str):
    self.output_dir = output_dir
    self.path = os.path.join(output_dir, LOCK_FILE)
    self._fd = None

  def acquire(self) -> None:
    try:
      os.makedirs(self.output_dir, exist_ok=True)
    except FileExistsError:
      raise ConfigError(f"--output_dir {self.output_dir} is a file, not a directory") from None
    except OSError as e:
      raise ConfigError(f"--output_dir {self.output_dir} cannot be created: {e.strerror}") from None
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES):
          raise
        raise ConfigError(
            f"{self.output_dir} is in use by another run (process {owner}); "
            "wait for it to end or use another --output_dir"
        ) from None
      # The previous owner may have removed the file between our open and
      # flock: then the lock is on an unlinked file, so take the new one.
      try:
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.unlink(self.path)
    except FileNotFoundError:
      pass
    os.close(self._fd)
    self._fd = None

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


def check_metrics(output_dir: str, last_round: int) -> None:
  """Raises ConfigError unless metrics.csv holds one row per round 1..last_round."""
  path = os.path.join(output_dir, METRICS_FILE)
  try:
    with open(path, newline="") as f:
      rounds = [int(r["round"]) for r in csv.DictReader(f)]
  except (OSError, ValueError, KeyError, TypeError, csv.Error) as e:
    raise ConfigError(
        f"cannot resume: {path} is missing or corrupt ({e}); delete the output "
        "directory to start over"
    ) from None
  if [r for r in rounds if r <= last_round] != list(range(1, last_round + 1)):
    raise ConfigError(
        f"cannot resume: {path} does not hold one row for each of rounds "
        f"1-{last_round}; delete the output directory to start over"
    )


def _number(text: str) -> int | float:
  try:
    return int(text)
  except ValueError:
    return float(text)


def _release_saved_rows(path: str, last_round: int, manager) -> None:
  """Releases metrics.csv's rows of rounds 1..last_round to `manager` (a
  resumed run's TensorBoard), each with the types the run released."""
  with open(path, newline="") as f:
    rows = [r for r in csv.DictReader(f) if int(r["round"]) <= last_round]
  for row in rows:
    values = {k: _number(v) for k, v in row.items() if k != "round" and v != ""}
    runtime.run_coroutine(manager.release(values, int(row["round"])))


def console_line(row, rounds: int, note: str = "") -> str:
  """The one line a round prints."""
  line = (
      f"round {row['round']:>4}/{rounds}  loss {row['train_loss']:.4f}  "
      f"sparsity {row['sparsity']:.3f}  up {costs.format_bits(row['round_upload_bits'])} "
      f"(total {costs.format_bits(row['cumulative_upload_bits'])})  "
      f"{row['round_seconds']:.2f} s"
  )
  if row["failed_clients"] or row["rejected_clients"]:
    line += f"  failed {row['failed_clients']} rejected {row['rejected_clients']}"
  if row["round_skipped"]:
    line += "  (skipped: no update accepted)"
  if note:
    line += f"  {note}"
  if row["clients_accuracy"] != "":
    line += (
        f"  clients_acc {row['clients_accuracy']:.4f}"
        f"  test_acc {row['test_accuracy']:.4f}"
    )
  if row.get("personalised_accuracy", "") != "":
    line += f"  personalised_acc {row['personalised_accuracy']:.4f}"
  return line


class ConsoleReleaseManager(tff.program.ReleaseManager):
  """Releases a metrics row as the round's console line."""

  def __init__(self, log, rounds: int, note_fn=lambda: ""):
    self._log = log
    self._rounds = rounds
    self._note_fn = note_fn

  async def release(self, value, key) -> None:
    row = {"round": int(key), **value}
    self._log(console_line(row, self._rounds, self._note_fn()))


class MetricsReleaser:
  """metrics.csv, TensorBoard and the console, released together per round."""

  def __init__(
      self, output_dir: str, log, rounds: int, resume_round: int | None, note_fn,
      columns: tuple[str, ...] = METRIC_COLUMNS,
  ):
    self._columns = tuple(columns)
    path = os.path.join(output_dir, METRICS_FILE)
    tensorboard = os.path.join(output_dir, TENSORBOARD_DIR)
    if resume_round is None:
      # The header fixes the column order (the release manager would sort
      # them); it also replaces leftovers of a run that ended before its
      # first checkpoint.
      header = io.StringIO()
      csv.writer(header).writerow(self._columns)
      files.write_atomic(path, header.getvalue())
    shutil.rmtree(tensorboard, ignore_errors=True)
    board = tff.program.TensorBoardReleaseManager(tensorboard)
    if resume_round is not None:
      _release_saved_rows(path, resume_round, board)
    self._manager = tff.program.GroupingReleaseManager([
        tff.program.CSVFileReleaseManager(
            path, save_mode=tff.program.CSVSaveMode.APPEND, key_fieldname="round"
        ),
        board,
        ConsoleReleaseManager(log, rounds, note_fn),
    ])

  def release(self, row: dict) -> None:
    assert tuple(row) == self._columns, tuple(row)
    values = {k: v for k, v in row.items() if k != "round"}
    runtime.run_coroutine(self._manager.release(values, int(row["round"])))
