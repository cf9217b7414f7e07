"""Data sets, client partitions and TFF client data for FedDST.

`load_arrays` reads a data set's standard files (see `loaders`), the
`*_partition` functions split examples among clients, and
`load_federated_data` does both and wraps the result as `FederatedData`
(TFF `ClientData` for train and test). Every data problem is a `DataError`.
"""

from tff_feddst.data.common import (
    DATASETS,
    NATURAL_DATASETS,
    PARTITIONS,
    ArraySplit,
    DataError,
)
from tff_feddst.data.federated import (
    FederatedData,
    default_client_ids,
    load_federated_data,
)
from tff_feddst.data.idx import read_idx, write_idx
from tff_feddst.data.loaders import load_arrays
from tff_feddst.data.partitions import (
    Partition,
    dirichlet_partition,
    iid_partition,
    natural_client_ids,
    natural_partition,
    pathological_partition,
)

__all__ = [
    "DATASETS",
    "NATURAL_DATASETS",
    "PARTITIONS",
    "ArraySplit",
    "DataError",
    "FederatedData",
    "Partition",
    "default_client_ids",
    "dirichlet_partition",
    "iid_partition",
    "load_arrays",
    "load_federated_data",
    "natural_client_ids",
    "natural_partition",
    "pathological_partition",
    "read_idx",
    "write_idx",
]
