"""Reads a .tflite flatbuffer and reports which tensors are stored sparse.

TFLite marks a sparse-encoded tensor with a `sparsity` table in the schema
(traversal order, block map and per-dimension DENSE / SPARSE_CSR metadata);
its buffer then holds only the non-zero values plus index arrays. This module
parses the file with the flatbuffer schema that TensorFlow ships
(`tensorflow.lite.python.schema_py_generated`; the copy in `ai_edge_litert`
where TensorFlow is absent), so nothing is allocated or run.
"""

import collections
import dataclasses

try:
  from tensorflow.lite.python import schema_py_generated as schema
except ImportError:  # A device-side environment with the standalone runtime.
  from ai_edge_litert import schema_py_generated as schema

from tff_feddst.files import ModelSource, read_bytes

# Ops whose kernels read a sparse tensor directly; any other consumer of a
# sparse tensor gets wrong values (seen: DEQUANTIZE of float16 weights).
SPARSE_READERS = frozenset({"DENSIFY", "FULLY_CONNECTED"})


def _enum_names(enum_class) -> dict[int, str]:
  return {
      value: name
      for name, value in vars(enum_class).items()
      if not name.startswith("_") and isinstance(value, int)
  }


_OP_NAMES = _enum_names(schema.BuiltinOperator)
_TYPE_NAMES = _enum_names(schema.TensorType)
_DIM_NAMES = _enum_names(schema.DimensionType)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One tensor of a subgraph and how its buffer is stored."""

  subgraph: int
  index: int
  name: str
  shape: tuple[int, ...]
  dtype: str
  buffer: int
  num_bytes: int  # Bytes of constant data in the file (0 for activations).
  sparse: bool
  traversal_order: tuple[int, ...] = ()
  block_map: tuple[int, ...] = ()
  dim_formats: tuple[str, ...] = ()  # "DENSE" or "SPARSE_CSR" per dimension.
  consumers: tuple[str, ...] = ()  # Names of the ops that read the tensor.

  @property
  def kept_sparse(self) -> bool:
    """A sparse tensor the runtime computes with as it is stored: no DENSIFY
    op reads it (DENSIFY expands it to a dense tensor once, at load)."""
    return self.sparse and "DENSIFY" not in self.consumers


def _parse(content: bytes):
  return schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(content, 0))


def _op_names(parsed) -> list[str]:
  names = []
  for code in parsed.operatorCodes:
    builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
    if builtin == schema.BuiltinOperator.CUSTOM:
      names.append((code.customCode or b"CUSTOM").decode())
    else:
      names.append(_OP_NAMES.get(builtin, str(builtin)))
  return names


def _ints(values) -> tuple[int, ...]:
  """A schema vector (None, list or numpy array) as a tuple of ints."""
  return () if values is None else tuple(int(v) for v in values)


def _tensor_info(
    subgraph_index, index, tensor, buffers, consumers
) -> TensorInfo:
  data = buffers[tensor.buffer].data if tensor.buffer < len(buffers) else None
  sparsity = tensor.sparsity
  fields = {}
  if sparsity is not None:
    fields = dict(
        traversal_order=_ints(sparsity.traversalOrder),
        block_map=_ints(sparsity.blockMap),
        dim_formats=tuple(
            _DIM_NAMES.get(m.format, str(m.format))
            for m in sparsity.dimMetadata or []
        ),
    )
  return TensorInfo(
      subgraph=subgraph_index,
      index=index,
      name=(tensor.name or b"").decode(),
      shape=_ints(tensor.shape),
      dtype=_TYPE_NAMES.get(tensor.type, str(tensor.type)),
      buffer=int(tensor.buffer),
      num_bytes=0 if data is None else len(data),
      sparse=sparsity is not None,
      consumers=tuple(consumers.get(index, ())),
      **fields,
  )


def tensor_infos(model: ModelSource) -> list[TensorInfo]:
  """Every tensor of every subgraph, with its storage format."""
  parsed = _parse(read_bytes(model))
  op_names = _op_names(parsed)
  buffers = parsed.buffers or []
  infos = []
  for s, subgraph in enumerate(parsed.subgraphs or []):
    consumers = collections.defaultdict(list)
    for op in subgraph.operators or []:
      for i in _ints(op.inputs):
        if i >= 0:
          consumers[i].append(op_names[op.opcodeIndex])
    for t, tensor in enumerate(subgraph.tensors or []):
      infos.append(_tensor_info(s, t, tensor, buffers, consumers))
  return infos


def sparse_tensors(model: ModelSource) -> list[TensorInfo]:
  """The tensors stored in TFLite's sparse format."""
  return [info for info in tensor_infos(model) if info.sparse]


def count_sparse_tensors(model: ModelSource) -> int:
  return len(sparse_tensors(model))


def operators(model: ModelSource) -> list[str]:
  """The op names of the first subgraph, in execution order."""
  parsed = _parse(read_bytes(model))
  names = _op_names(parsed)
  return [names[op.opcodeIndex] for op in parsed.subgraphs[0].operators or []]


def unreadable_sparse_inputs(model: ModelSource) -> list[str]:
  """Names of sparse tensors fed to an op that cannot read the sparse format."""
  return [
      info.name
      for info in sparse_tensors(model)
      if any(op not in SPARSE_READERS for op in info.consumers)
  ]


def summarize(model: ModelSource) -> dict:
  """A JSON-ready summary: tensor counts, sparse tensors, op counts.

  Each sparse tensor says whether the runtime keeps it sparse
  (`kept_sparse`: no DENSIFY op reads it, so its consumer runs a sparse
  kernel) or expands it at load.
  """
  infos = tensor_infos(model)
  sparse = [info for info in infos if info.sparse]
  return {
      "num_tensors": len(infos),
      "num_constant_tensors": sum(1 for info in infos if info.num_bytes > 0),
      "num_sparse_tensors": len(sparse),
      "num_kept_sparse_tensors": sum(info.kept_sparse for info in sparse),
      "sparse_tensors": [
          {
              "name": info.name,
              "shape": list(info.shape),
              "dtype": info.dtype,
              "num_bytes": info.num_bytes,
              "block_map": list(info.block_map),
              "dim_formats": list(info.dim_formats),
              "consumers": list(info.consumers),
              "kept_sparse": info.kept_sparse,
          }
          for info in sparse
      ],
      "operators": dict(collections.Counter(operators(model))),
  }
