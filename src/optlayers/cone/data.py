"""solve_cone's inputs, checked (``validation.cone``) and made canonical: ``ConeData``."""
from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import scipy.sparse as sp
import torch

from optlayers.cone.spec import ConeSpec
from optlayers.validation.cone import check_cone_data, check_cone_tensor, check_cones
from optlayers.validation.options import check_not_recorded


@dataclasses.dataclass(frozen=True)
class ConeData:
    """Canonical data: A (B, m, n) or shared (m, n) (dense or sparse), b (B, m), c (B, n), P or None.

    ``batch`` is B, or None when every input was unbatched (outputs are then squeezed).
    """

    A: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    P: torch.Tensor | None
    batch: int | None


def _to_tensor(name: str, value, allow_sparse: bool) -> torch.Tensor:
    """A torch tensor from a tensor, numpy array or scipy sparse matrix (a torch sparse CSR one
    where ``allow_sparse``, dense otherwise), checked."""
    if sp.issparse(value):
        if not allow_sparse:
            value = value.toarray()
        else:
            csr = sp.csr_matrix(value)
            with warnings.catch_warnings():  # torch's notice that its CSR support is in beta: not the user's doing
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
                value = torch.sparse_csr_tensor(torch.as_tensor(csr.indptr, dtype=torch.int64),
                                                torch.as_tensor(csr.indices, dtype=torch.int64),
                                                torch.as_tensor(csr.data), size=csr.shape, check_invariants=False)
    if isinstance(value, np.ndarray):
        value = torch.as_tensor(value)
    check_cone_tensor(name, value, allow_sparse)
    return value


def prepare_cone(A, b, c, P, cones: ConeSpec) -> ConeData:
    """Check types, dtypes, devices, shapes and the cone sizes (``validation.cone``; finiteness is
    checked inside the solve, ``validation.cone.check_finite``); return canonical data. A solve being
    recorded by a tracer or ``torch.export`` is refused (``validation.options.check_not_recorded``)."""
    check_not_recorded("solve_cone")
    check_cones(cones)
    tensors = {"A": _to_tensor("A", A, True), "b": _to_tensor("b", b, False), "c": _to_tensor("c", c, False)}
    if P is not None:
        tensors["P"] = _to_tensor("P", P, False)
    m, n, batch = check_cone_data(tensors, cones)
    dtype = tensors["A"].dtype
    size = 1 if batch is None else batch
    cast = {name: t.to(dtype) for name, t in tensors.items()}
    return ConeData(A=cast["A"], b=cast["b"].expand(size, m), c=cast["c"].expand(size, n),
                    P=cast.get("P"), batch=batch)
