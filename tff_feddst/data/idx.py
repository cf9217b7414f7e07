"""Reader and writer for the IDX format of the MNIST and Fashion-MNIST files.

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number
of dimensions), one big-endian uint32 per dimension, then the values in
big-endian order. Files may be gzip-compressed; `read_idx` recognises gzip
by its magic bytes, whatever the file is called.
"""

import gzip
import os
import struct
import zlib

import numpy as np

from tff_feddst.data.common import DataError

_GZIP_MAGIC = b"\x1f\x8b"

# IDX type code -> big-endian numpy dtype.
_CODE_TO_DTYPE = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: str) -> bytes:
  """The file's contents, gunzipped if the file is gzip-compressed."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
  if raw[:2] == _GZIP_MAGIC:
    try:
      return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(
          f"{path}: corrupt or truncated gzip data ({type(e).__name__}: {e})"
      ) from None
  if path.endswith(".gz"):
    raise DataError(f"{path}: not a gzip file (named .gz but no gzip header)")
  return raw


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally gzipped) into a native-endian array.

  Raises:
    DataError: the file is unreadable, not IDX, or its size does not match
      its header.
  """
  path = os.fspath(path)
  data = _read_bytes(path)
  if len(data) < 4:
    raise DataError(
        f"{path}: truncated IDX file ({len(data)} bytes, no header)"
    )
  zero, code, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or code not in _CODE_TO_DTYPE:
    raise DataError(
        f"{path}: bad IDX magic number 0x{data[:4].hex()} (not an IDX file)"
    )
  header_size = 4 + 4 * ndim
  if len(data) < header_size:
    raise DataError(
        f"{path}: truncated IDX header ({ndim} dimensions need {header_size}"
        f" bytes, file has {len(data)})"
    )
  shape = struct.unpack(f">{ndim}I", data[4:header_size])
  dtype = _CODE_TO_DTYPE[code]
  count = int(np.prod(shape, dtype=np.int64))
  expected = count * dtype.itemsize
  found = len(data) - header_size
  if found != expected:
    what = "truncated" if found < expected else "wrong size"
    raise DataError(
        f"{path}: {what}: header says shape {tuple(shape)} ({expected} bytes of"
        f" data), file has {found}"
    )
  values = np.frombuffer(data, dtype=dtype, count=count, offset=header_size)
  return values.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes `array` as an IDX file; gzip-compressed if `path` ends in .gz."""
  path = os.fspath(path)
  array = np.asarray(array)
  for code, dtype in _CODE_TO_DTYPE.items():
    if (
        array.dtype.kind == dtype.kind
        and array.dtype.itemsize == dtype.itemsize
    ):
      break
  else:
    raise ValueError(f"IDX cannot store dtype {array.dtype}")
  if array.ndim > 255:
    raise ValueError("IDX cannot store more than 255 dimensions")
  header = struct.pack(">HBB", 0, code, array.ndim)
  header += struct.pack(f">{array.ndim}I", *array.shape)
  payload = header + np.ascontiguousarray(array, dtype=dtype).tobytes()
  if path.endswith(".gz"):
    payload = gzip.compress(payload)
  with open(path, "wb") as f:
    f.write(payload)
