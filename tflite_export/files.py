"""Reading model files, and writing files atomically."""

import json
import os
from typing import Union
import uuid

ModelSource = Union[bytes, bytearray, str, os.PathLike]


def read_bytes(model: ModelSource) -> bytes:
  """`model` itself if it is bytes, else the content of the file it names."""
  if isinstance(model, (bytes, bytearray)):
    return bytes(model)
  with open(model, "rb") as f:
    return f.read()


def write_temp(directory: str, name: str, data: bytes) -> str:
  """Writes `data` to a new hidden temp file in `directory`; returns its path.

  The file gets the usual permissions (0o666 less the umask); it is flushed
  and fsync'ed, and removed again if writing fails.
  """
  path = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
  except BaseException:
    os.unlink(path)
    raise
  return path


def atomic_write(path: str, data: bytes) -> None:
  """Writes `path` so that it holds either its old content or all of `data`."""
  directory, name = os.path.split(os.path.abspath(path))
  temp = write_temp(directory, name, data)
  try:
    os.replace(temp, path)
  except BaseException:
    os.unlink(temp)
    raise


def json_bytes(obj) -> bytes:
  """Indented JSON (strict: NaN is not allowed) ending with a newline."""
  return (
      json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
  ).encode()
