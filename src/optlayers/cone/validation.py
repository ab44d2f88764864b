"""Validate and canonicalize solve_cone's inputs at the door, with messages that name the fix."""
from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp
import torch

from optlayers.cone.spec import ConeSpec


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
    if sp.issparse(value):
        if not allow_sparse:
            value = value.toarray()
        else:
            csr = sp.csr_matrix(value)
            return torch.sparse_csr_tensor(torch.as_tensor(csr.indptr, dtype=torch.int64),
                                           torch.as_tensor(csr.indices, dtype=torch.int64),
                                           torch.as_tensor(csr.data), size=csr.shape)
    if isinstance(value, np.ndarray):
        value = torch.as_tensor(value)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, numpy array{' or scipy sparse matrix' if allow_sparse else ''}, "
                        f"got {type(value).__name__}")
    if value.layout != torch.strided and not allow_sparse:
        raise TypeError(f"{name} must be dense, got layout {value.layout}; call {name}.to_dense()")
    if value.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be a float32 or float64 tensor, got {value.dtype}; convert with {name}.double()")
    return value


def _values(t: torch.Tensor) -> torch.Tensor:
    if t.layout == torch.sparse_csr:
        return t.values()
    if t.layout == torch.sparse_coo:
        return t.coalesce().values()
    return t


def _check_dims(name: str, t: torch.Tensor, allowed: tuple[int, ...], meaning: str) -> None:
    if t.dim() not in allowed:
        raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions ({meaning}), "
                         f"got shape {tuple(t.shape)}")


def check_finite(tensors: dict[str, torch.Tensor | None]) -> None:
    """Refuse NaN or Inf. Run on plain tensors inside the solve (``ConeProgram.forward``), so that
    ``torch.func.vmap`` can trace ``validate``."""
    given = {name: _values(t) for name, t in tensors.items() if t is not None}
    given = {name: values for name, values in given.items() if values.numel()}  # an empty one is finite
    if not given:
        return
    # Each tensor's smallest and largest entries (NaN where it holds a NaN) are finite exactly
    # where all its entries are: isfinite of the whole tensor would write |t| and two masks the
    # size of the data.
    extremes = torch.stack([end for t in given.values() for end in torch.aminmax(t)])
    finite = torch.isfinite(extremes).view(len(given), 2).all(-1)
    if bool(finite.all()):  # one host sync for all of them
        return
    for name, ok in zip(given, finite.tolist()):
        if not ok:
            raise ValueError(f"{name} contains NaN or Inf; all data must be finite")


def validate(A, b, c, P, cones: ConeSpec) -> ConeData:
    """Check types, dtypes, devices, shapes and the cone sizes (finiteness: ``check_finite``);
    return canonical data."""
    if not isinstance(cones, ConeSpec):
        raise TypeError(f"cones must be a ConeSpec, got {type(cones).__name__}")
    tensors = {"A": _to_tensor("A", A, True), "b": _to_tensor("b", b, False), "c": _to_tensor("c", c, False)}
    if P is not None:
        tensors["P"] = _to_tensor("P", P, False)
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}; move them with .to(device)")
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"all inputs must have one dtype, got {dtypes}; convert them with .double() (or .float())")
    dtype = tensors["A"].dtype
    A_t = tensors["A"]
    _check_dims("A", A_t, (2,) if A_t.layout != torch.strided else (2, 3), "(m, n), or (B, m, n) batched; sparse A is 2-D")
    m, n = A_t.shape[-2:]
    _check_dims("b", tensors["b"], (1, 2), f"(m,) = ({m},) or (B, m)")
    _check_dims("c", tensors["c"], (1, 2), f"(n,) = ({n},) or (B, n)")
    expected = {"b": (m,), "c": (n,), "P": (n, n)}
    for name, tail in expected.items():
        if name in tensors and tuple(tensors[name].shape[-len(tail):]) != tail:
            raise ValueError(f"{name} must end in shape {tail} to match A of shape {tuple(A_t.shape)}, "
                             f"got {tuple(tensors[name].shape)}")
    if "P" in tensors:
        _check_dims("P", tensors["P"], (2, 3), f"(n, n) = ({n}, {n}) or (B, n, n)")
    if cones.size == 0:
        raise ValueError(f"cones cover no rows ({cones}): a program without constraints has no cone to differentiate "
                         "through; give at least one row")
    if cones.size != m:
        raise ValueError(f"cones cover {cones.size} rows ({cones}) but A has m = {m} rows; "
                         "the cone sizes must add up to the number of rows of A")
    batches = {name: t.shape[0] for name, t in tensors.items() if t.dim() == (3 if name in ("A", "P") else 2)}
    if len(set(batches.values())) > 1:
        raise ValueError(f"batched inputs must share one batch size, got {batches}")
    batch = next(iter(batches.values())) if batches else None
    size = 1 if batch is None else batch
    cast = {name: t.to(dtype) for name, t in tensors.items()}
    return ConeData(A=cast["A"], b=cast["b"].expand(size, m), c=cast["c"].expand(size, n),
                    P=cast.get("P"), batch=batch)
