"""Validation of user QP data and its broadcasting into one flat batch."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from optlayers.qp.scaling import QPData
from optlayers.status import listed_elements

_FLOAT_DTYPES = (torch.float32, torch.float64)


def is_absent(t: Tensor | None) -> bool:
    """None and empty tensors both mean "no such constraint" (qpth passes empty tensors)."""
    return t is None or (isinstance(t, Tensor) and t.numel() == 0)


def _check_tensor(name: str, t: object, ref: Tensor | None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {t.dtype}; convert it with {name}.double() or {name}.float()")
    if t.is_sparse or t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor, got layout {t.layout}; use {name}.to_dense()")
    if ref is not None and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but p has dtype {ref.dtype}; all QP data must share one dtype")
    if ref is not None and t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but p is on {ref.device}; all QP data must be on one device")
    return t


def _check_matrix(name: str, M: Tensor, rows: int | None, n: int) -> None:
    if M.dim() < 2 or M.shape[-1] != n or (rows is not None and M.shape[-2] != rows):
        want = f"(..., {rows if rows is not None else 'k'}, {n})"
        raise ValueError(f"{name} must have shape {want} (n = {n} from p), got {tuple(M.shape)}")


def _check_pair(mat_name: str, vec_name: str, M: Tensor | None, v: Tensor | None, ref: Tensor,
                n: int) -> tuple[Tensor, Tensor] | tuple[None, None]:
    """Validate a constraint pair (G, h) or (A, b); an absent pair is (None, None)."""
    if is_absent(M) and is_absent(v):
        return None, None
    if is_absent(M) or is_absent(v):
        given, missing = (vec_name, mat_name) if is_absent(M) else (mat_name, vec_name)
        raise ValueError(f"{given} was given without {missing}; pass both or neither")
    M = _check_tensor(mat_name, M, ref)
    v = _check_tensor(vec_name, v, ref)
    _check_matrix(mat_name, M, None, n)
    if v.dim() < 1 or v.shape[-1] != M.shape[-2]:
        raise ValueError(f"{vec_name} must have shape (..., {M.shape[-2]}) to match {mat_name} of shape {tuple(M.shape)}, got {tuple(v.shape)}")
    return M, v


def _asymmetry(Q: Tensor) -> tuple[Tensor, Tensor, float]:
    """max |Q − Qᵀ|, its bound tol·max(1, max|Q|) and tol, as tensors that stay on the device."""
    tol = math.sqrt(torch.finfo(Q.dtype).eps)
    if Q.numel() == 0:  # an empty batch: nothing to test (amax has no identity)
        zero = Q.new_zeros(())
        return zero, zero + tol, tol
    return (Q - Q.mT).abs().amax(), tol * Q.abs().amax().clamp(min=1.0), tol


def prepare_qp(
    Q: Tensor, p: Tensor, G: Tensor | None, h: Tensor | None, A: Tensor | None, b: Tensor | None
) -> tuple[tuple[Tensor, ...], torch.Size]:
    """Validate QP data and broadcast it to one flat batch.

    Returns:
        (Q, p, G, h, A, b) of shapes (B, n, n), (B, n), (B, k, n), (B, k), (B, m, n), (B, m), where
        absent constraints have k = 0 or m = 0, and the broadcast batch shape (B = its product,
        or 1 for unbatched data).
    """
    p = _check_tensor("p", p, None)
    if p.dim() < 1 or p.shape[-1] == 0:
        raise ValueError(f"p must have shape (..., n) with n >= 1, got {tuple(p.shape)}")
    n = p.shape[-1]
    Q = _check_tensor("Q", Q, p)
    _check_matrix("Q", Q, n, n)
    G, h = _check_pair("G", "h", G, h, p, n)
    A, b = _check_pair("A", "b", A, b, p, n)
    data = {"Q": (Q, 2), "p": (p, 1), "G": (G, 2), "h": (h, 1), "A": (A, 2), "b": (b, 1)}
    parts = {name: () if t is None else t.shape[: t.dim() - tail] for name, (t, tail) in data.items()}
    given = {shape for shape in parts.values() if shape}  # () broadcasts to any batch shape
    try:
        batch = given.pop() if len(given) == 1 else torch.broadcast_shapes(*parts.values())  # one shape: itself
    except RuntimeError:
        listed = ", ".join(f"{k}: {tuple(v)}" for k, v in parts.items())
        raise ValueError(f"the batch dimensions of the QP data do not broadcast together ({listed})") from None
    size = math.prod(batch)
    flat = tuple(
        p.new_zeros(size, *((0, n) if tail == 2 else (0,))) if t is None  # an absent pair: empty, made once
        else t if len(batch) == 1 and t.shape[:-tail] == batch  # already (B, ·)
        else t.expand(*batch, *t.shape[t.dim() - tail :]).reshape(size, *t.shape[t.dim() - tail :])
        for t, tail in data.values()
    )
    return flat, batch


def values_pass(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor) -> Tensor:
    """``check_values``'s test as a 0-d bool tensor on the data's device, not read."""
    sums = torch.stack([t.sum() for t in (Q, p, G, h, A, b)])  # NaN or ±inf exactly where an entry is (or overflow)
    asym, bound, _ = _asymmetry(Q)
    return ((sums - sums) == 0).all() & (asym <= bound)


def check_values(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, passed: Tensor | bool | None = None) -> None:
    """Value checks (finite, Q symmetric); run on plain tensors, inside the solve, so that
    ``torch.func.vmap`` can trace ``prepare_qp``. The data is read by the host once (one
    synchronisation): ``values_pass``, or ``passed`` where the caller computed it; only on failure
    is it read again to name the culprit."""
    if bool(values_pass(Q, p, G, h, A, b) if passed is None else passed):
        return
    data = {"Q": Q, "p": p, "G": G, "h": h, "A": A, "b": b}
    asym, bound, tol = _asymmetry(Q)
    for name, t in data.items():
        if not bool(torch.isfinite(t).all()):
            bad = (~torch.isfinite(t)).flatten(1).any(-1).nonzero().tolist()
            raise ValueError(f"{name} contains NaN or Inf at batch elements {listed_elements(bad)} (flattened); QP data must be finite "
                             "whatever on_failure says: drop those elements, and write an absent bound as a large finite "
                             "one or leave its row out")
    if bool(asym > bound):
        raise ValueError(
            f"Q must be symmetric (positive semidefinite); max |Q - Qᵀ| = {float(asym):.3g} exceeds {tol:.1e}·max(1, max|Q|); "
            "pass (Q + Q.transpose(-1, -2)) / 2"
        )


def qp_data(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor) -> QPData:
    """Flat tensors to ``QPData``, with Q symmetrised."""
    return QPData(Q=0.5 * (Q + Q.transpose(-1, -2)), p=p, A=A, b=b, G=G, h=h)
