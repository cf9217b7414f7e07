"""Files that are either whole or absent: the one atomic-write helper.

Every output of the project other than `metrics.csv` and the TensorBoard
events (which go through `tff.program` release managers, see `outputs.py`)
is written with `atomic_output` (or its shorthand `write_atomic`): the content
goes to a hidden temporary file in the same directory, is flushed to disk,
and is renamed over the target, so a reader (or a resumed run) sees the old
file or the new one, never half of one.
"""

import contextlib
import json
import os
import uuid
from typing import Union

# A model (or any file's content) given as bytes or as the path of a file.
ModelSource = Union[bytes, bytearray, str, os.PathLike]


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike):
  """Yields a temporary path to write; on success it replaces `path`.

  The temporary file keeps `path`'s extension (Keras and matplotlib choose
  the format from it). On an exception it is removed and `path` is left as
  it was.
  """
  directory, name = os.path.split(os.path.abspath(os.fspath(path)))
  stem, ext = os.path.splitext(name)
  temp = os.path.join(directory, f".{stem}.{uuid.uuid4().hex}.tmp{ext}")
  try:
    yield temp
    if os.path.isfile(temp):
      with open(temp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(temp, path)
  finally:
    if os.path.isdir(temp) and not os.path.islink(temp):
      import shutil  # pylint: disable=g-import-not-at-top

      shutil.rmtree(temp, ignore_errors=True)
    elif os.path.lexists(temp):
      os.unlink(temp)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
  """Writes `data` (text or bytes) to `path` atomically."""
  with atomic_output(path) as temp:
    with open(temp, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)


def read_bytes(source: ModelSource) -> bytes:
  """`source` itself if it is bytes, else the content of the file it names."""
  if isinstance(source, (bytes, bytearray)):
    return bytes(source)
  with open(source, "rb") as f:
    return f.read()


def json_text(obj, sort_keys: bool = True, strict: bool = False) -> str:
  """Indented JSON ending with a newline (`strict`: NaN is refused)."""
  return json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=not strict) + "\n"
