"""What one round of a learning process sends across TFF's placements, read
from the types in its computation.

In a TFF federated computation every value that moves between the server
and the clients goes through an intrinsic: `federated_broadcast` (and
`federated_select`) send server values to the clients; the aggregations
(`federated_sum`, `federated_mean`, `federated_weighted_mean`,
`federated_aggregate`, the secure sums, min and max) take one value from
each client. `crossings(process.next)` lists every such call in the
round's computation with the bits of the value that one client receives
or sends, from its type. The model messages are the large ones; the others
are the client's weight and its metrics' sums (a few scalars).

The dense algorithms' download and upload bits in metrics.csv are read
from here (`model_message_bits`): the broadcast model, and the largest
value a client sends.
"""

import dataclasses

import tensorflow_federated as tff
from tensorflow_federated.python.core.impl.compiler import building_blocks
from tensorflow_federated.python.core.impl.compiler import tree_analysis

from tff_feddst import messages

DOWN = "down"  # server to clients
UP = "up"  # clients to server

_UP_INTRINSICS = (
    "federated_aggregate", "federated_sum", "federated_mean", "federated_weighted_mean",
    "federated_secure_sum", "federated_secure_sum_bitwidth", "federated_secure_modular_sum",
    "federated_min", "federated_max",
)


@dataclasses.dataclass(frozen=True)
class Crossing:
  """One intrinsic call: its direction and the bits per client."""

  intrinsic: str
  direction: str
  bits: int | None  # of one client's value (None: not fixed by the type)
  type: str  # the value's type, as TFF prints it


def type_bits(type_spec) -> int | None:
  """Bits of a value of `type_spec` (a struct of tensors); None if a
  tensor's shape is not fully known."""
  leaves = list(_tensor_leaves(type_spec))
  if any(None in tuple(leaf.shape) for leaf in leaves):  # TFF's shapes are tuples
    return None
  return messages.message_bits(leaves)


def _tensor_leaves(type_spec):
  if isinstance(type_spec, tff.TensorType):
    yield type_spec
  elif isinstance(type_spec, tff.StructType):
    for _, element in tff.structure.to_elements(type_spec):
      yield from _tensor_leaves(element)
  elif isinstance(type_spec, tff.SequenceType):
    raise TypeError(f"a sequence crosses the placements: {type_spec}")


def _placed_values(parameter, placement):
  """The member types of `parameter`'s values placed at `placement`."""
  if isinstance(parameter, tff.FederatedType):
    if parameter.placement == placement:
      yield parameter.member
  elif isinstance(parameter, tff.StructType):
    for _, element in tff.structure.to_elements(parameter):
      yield from _placed_values(element, placement)


def crossings(computation) -> list[Crossing]:
  """Every placement crossing in `computation` (a federated computation,
  e.g. `process.next`), in the order its building block lists them."""
  found = []

  def visit(block):
    if not isinstance(block, building_blocks.Intrinsic):
      return
    uri, parameter = block.uri, block.type_signature.parameter
    if uri == "federated_select":
      # A client receives the values its keys select: how many, its keys
      # say at run time. Listed with the server's values' type, bits None.
      server_values = list(_placed_values(parameter, tff.SERVER))[-1]
      found.append(Crossing(uri, DOWN, None, str(server_values)))
      return
    if uri == "federated_broadcast":
      direction, values = DOWN, list(_placed_values(parameter, tff.SERVER))
    elif uri in _UP_INTRINSICS:
      direction, values = UP, list(_placed_values(parameter, tff.CLIENTS))
    else:
      return
    for member in values:
      found.append(Crossing(uri, direction, type_bits(member), str(member)))

  tree_analysis.visit_postorder(computation.to_building_block(), visit)
  return found


def model_message_bits(computation) -> tuple[int, int]:
  """(download, upload) bits per client of the model messages: the
  largest value the server broadcasts (the others are settings, such as
  the clients' learning rate), and the largest value a client sends."""
  found = crossings(computation)
  down = [c.bits for c in found if c.intrinsic == "federated_broadcast"]
  up = [c.bits for c in found if c.direction == UP]
  if not down or not up or None in down + up:
    raise ValueError(f"no broadcast model or no fixed uploads: {found}")
  return max(down), max(up)
