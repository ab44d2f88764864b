"""Checks of the QP layer's options (``solve_qp``, ``QPFunction``, the OptNet layers and their
inputs) and of its data; ``qp.problem.prepare_qp`` broadcasts what passes into one flat batch."""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from optlayers.engine.kkt import cholesky
from optlayers.qp.relax import Relaxation
from optlayers.status import ON_FAILURE_CHOICES, listed_elements
from optlayers.validation.options import (check_bool, check_choice, check_fill, check_int, check_not_recorded, check_number,
                                          check_tolerances)

SOLVE_QP_FAILURE_CHOICES = (*ON_FAILURE_CHOICES, "relax")
"""``on_failure`` values: the common policy, plus "relax" (see ``optlayers.qp.relax``)."""

_FLOAT64_DEFAULT_TOL = 1e-12  # the default of ``qp.ipm.default_settings`` for float64 data, the tighter one

_FLOAT_DTYPES = (torch.float32, torch.float64)


# Options

def check_qp_options(tol: object, rel_tol: object, max_iter: object, on_failure: object,
                     failed_value: object = math.nan, relaxation: object = None, *, tol_name: str = "tol",
                     max_iter_name: str = "max_iter") -> None:
    """Options of ``solve_qp`` (and of the layers built on it), refused at the door when impossible;
    ``tol_name``, ``max_iter_name``: the names the caller gave them (qpth's ``eps``, ``maxIter``)."""
    check_tolerances(tol, rel_tol, _FLOAT64_DEFAULT_TOL, tol_name)
    check_int(max_iter_name, max_iter, 1, optional=True)
    check_choice("on_failure", on_failure, SOLVE_QP_FAILURE_CHOICES)
    check_fill("failed_value", failed_value)
    if relaxation is not None and not isinstance(relaxation, Relaxation):
        raise TypeError(f"relaxation must be an optlayers.qp.relax.Relaxation or None, got {type(relaxation).__name__}")


def check_qpth_options(eps: object, tol: object, maxIter: object, max_iter: object, verbose: object,
                       notImprovedLim: object, solver: object, check_Q_spd: object) -> None:
    """``QPFunction``'s qpth arguments: each given once (qpth's name or ours), ``verbose`` an
    integer or a bool (qpth's code passes ``verbose=False``; a bool is the integer it equals, as
    in qpth), ``notImprovedLim`` >= 1, the one supported solver, ``check_Q_spd`` a bool."""
    for qpth_name, value, name, ours in (("eps", eps, "tol", tol), ("maxIter", maxIter, "max_iter", max_iter)):
        if value is not None and ours is not None:
            raise ValueError(f"give {qpth_name} (qpth's name) or {name}, not both; got {qpth_name}={value!r}, "
                             f"{name}={ours!r}")
    if not isinstance(verbose, int):  # a bool is an int: False 0, True 1, as qpth reads them
        raise ValueError(f"verbose must be an integer (-1 silent, 0 warnings, 1 a summary per solve) or a bool, "
                         f"got {verbose!r}")
    check_int("notImprovedLim", notImprovedLim, 1, optional=True)
    check_solver(solver)
    if not isinstance(check_Q_spd, bool):
        raise ValueError(f"check_Q_spd must be True or False, got {check_Q_spd!r}")


def check_solver(solver: object) -> None:
    """``QPFunction(solver=...)``: ``QPSolvers.PDIPM_BATCHED`` (ours or qpth's member, or its name)."""
    name = getattr(solver, "name", solver)  # our QPSolvers, qpth's, or the member's name
    if name == "PDIPM_BATCHED":
        return
    if name == "CVXPY":
        raise ValueError("QPFunction(solver=QPSolvers.CVXPY) is not supported: optlayers solves with its own batched "
                         "interior point method (solver=QPSolvers.PDIPM_BATCHED, the default). To compare with an "
                         "independent solver use optlayers.cone.qp.solve_qp_cone(..., solver='clarabel') or cvxpy")
    raise ValueError(f"solver must be QPSolvers.PDIPM_BATCHED, got {solver!r}")


def check_optnet_options(n: object, n_ineq: object, n_eq: object, eps: object, fixed_q: object,
                         nonnegative: object) -> None:
    """``OptNet``'s sizes and its Q's parameters (the solver's options: ``check_qp_options``)."""
    check_int("n", n, 1)
    check_int("n_ineq", n_ineq, 0)
    check_int("n_eq", n_eq, 0)
    if n_eq >= n:
        raise ValueError(f"n_eq must be < n (= {n}) or the equalities alone fix z = z0, got n_eq={n_eq}")
    check_number("eps", eps, positive=False)
    if fixed_q is not None:
        check_number("fixed_q", fixed_q, positive=False)
    if fixed_q is None and eps == 0:
        raise ValueError("eps must be > 0 when Q = LLᵀ + εI is learned (LLᵀ alone may be singular), got eps=0")
    check_bool("nonnegative", nonnegative)
    inequalities = n_ineq + (n if nonnegative else 0)
    if fixed_q == 0 and inequalities <= n - n_eq:  # a polyhedron of dimension d is bounded only by d + 1 facets or more
        warnings.warn(f"OptNet(fixed_q=0) is a linear program whose feasible set cannot be bounded: {inequalities} "
                      f"inequalities in the {n - n_eq} dimensions the equalities leave (bounded needs at least "
                      f"{n - n_eq + 1}), so the program is unbounded for every p that decreases along one of its unbounded "
                      "directions (DUAL_INFEASIBLE: z = failed_value, zero gradient). Add inequalities (n_ineq), or give "
                      "Q a positive fixed_q",
                      UserWarning, stacklevel=3)


def check_optnet_tv_options(n: object, lam: object, eps: object, n_diff: object, learn_d: object, init: object) -> None:
    """``OptNetTV``'s sizes, weights and initialisation of D (``n_diff`` with its default filled in)."""
    check_int("n", n, 2)
    check_number("lam", lam, positive=True)
    check_number("eps", eps, positive=True)
    check_int("n_diff", n_diff, 1)
    check_bool("learn_d", learn_d)
    if init == "difference" and n_diff != n - 1:
        raise ValueError(f"init='difference' needs n_diff = n - 1 = {n - 1}, got n_diff={n_diff}")
    if init not in ("difference", "random"):
        raise ValueError(f"init must be 'difference' or 'random', got {init!r}")


def layer_dtype(layer: nn.Module) -> torch.dtype | None:
    """The dtype of a layer's floating-point parameters and buffers, where they have one (None
    where it has none, or several)."""
    dtypes = {t.dtype for t in (*layer.parameters(), *layer.buffers()) if t.is_floating_point()}
    return next(iter(dtypes)) if len(dtypes) == 1 else None


def check_layer_input(name: str, x: object, n: int, layer: nn.Module) -> None:
    """An OptNet layer's input ``x`` is a (*, n) tensor of the layer's dtype (that of its parameters
    and buffers, where it has floating-point ones), on the layer's device (where it has one)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (*, {n}), got {type(x).__name__}")
    if x.shape[-1:] != (n,):
        raise ValueError(f"{name} must have shape (*, {n}), got {tuple(x.shape)}")
    dtype = layer_dtype(layer)
    if dtype is not None and dtype not in _FLOAT_DTYPES:  # a layer converted to a half precision
        raise TypeError(f"the layer's parameters are {dtype}, which the solver does not take (float32 or float64); "
                        f"convert the layer (layer.to(torch.float32)) and its input {name} ({name} has dtype {x.dtype})")
    if dtype is not None and x.dtype != dtype:
        layer_too = f" or the layer (layer.to({x.dtype}))" if x.dtype in _FLOAT_DTYPES else ""
        raise TypeError(f"{name} has dtype {x.dtype} but the layer's parameters are {dtype}; convert the input "
                        f"({name}.to({dtype})){layer_too}")
    devices = {t.device for t in (*layer.parameters(), *layer.buffers())}
    if len(devices) == 1 and x.device not in devices:
        (device,) = devices
        raise ValueError(f"{name} is on {x.device} but the layer's parameters are on {device}; move the input "
                         f"({name}.to({str(device)!r})) or the layer (layer.to({str(x.device)!r}))")


# Data: types, dtypes, devices and shapes (before broadcasting)

def is_absent(t: Tensor | None, rows_dim: int) -> bool:
    """Whether ``t`` means "no such constraint": None, an empty tensor of fewer dimensions than a
    batch of rows has (qpth passes ``torch.Tensor()``), or one with no rows (dimension ``rows_dim``:
    -2 for G and A, -1 for h and b). A batch of no problems (a (0, k, n) G or a (0, k) h, the last
    slice of a data loader) has its rows: it is not absent."""
    if t is None:
        return True
    if not isinstance(t, Tensor) or t.numel() != 0:
        return False
    return t.dim() < -rows_dim or t.shape[rows_dim] == 0


def check_qp_data(Q: object, p: object, G: object, h: object, A: object,
                  b: object) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Types, dtypes, devices and shapes of the QP data (p fixes n, dtype and device); returns
    them with an absent constraint pair as (None, None). A solve being recorded by a tracer or
    ``torch.export`` is refused (``check_not_recorded``)."""
    check_not_recorded("a QP solve")
    p = _check_tensor("p", p, None)
    if p.dim() < 1 or p.shape[-1] == 0:
        raise ValueError(f"p must have shape (..., n) with n >= 1, got {tuple(p.shape)}")
    n = p.shape[-1]
    Q = _check_tensor("Q", Q, p)
    _check_p_length(p, {"Q": Q, "G": G, "A": A})
    _check_matrix("Q", Q, n, n, p)
    G, h = _check_pair("G", "h", G, h, p, n)
    A, b = _check_pair("A", "b", A, b, p, n)
    return Q, p, G, h, A, b


def _check_p_length(p: Tensor, matrices: dict[str, object]) -> None:
    """Blame p, not the matrices, where Q is square and Q, G and A (those given) all have one number of
    columns that p's length is not: n is taken from p, and without this a short p would be reported
    as a wrong Q."""
    widths = {name: tuple(M.shape) for name, M in matrices.items()
              if isinstance(M, Tensor) and M.dim() >= 2 and (name == "Q" or not is_absent(M, -2))}
    Q_shape = widths.get("Q")
    if Q_shape is None or Q_shape[-1] != Q_shape[-2] or len({shape[-1] for shape in widths.values()}) != 1:
        return
    n = Q_shape[-1]
    if n != p.shape[-1]:
        given = " and ".join(f"{name} of shape {shape}" for name, shape in widths.items())
        raise ValueError(f"p must have shape (..., {n}) to match {given} (n = {n} variables), got {tuple(p.shape)}")


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


# the symbol of each constraint matrix's row count in the messages: m equalities (A), k inequalities (G)
_ROWS = {"A": "m", "G": "k"}


def _check_matrix(name: str, M: Tensor, rows: int | None, n: int, p: Tensor) -> None:
    if M.dim() < 2 or M.shape[-1] != n or (rows is not None and M.shape[-2] != rows):
        want = f"(..., {rows if rows is not None else _ROWS.get(name, 'rows')}, {n})"
        raise ValueError(f"{name} must have shape {want} to match p of shape {tuple(p.shape)} (n = {n} variables), "
                         f"got {tuple(M.shape)}")


def _check_pair(mat_name: str, vec_name: str, M: object, v: object, ref: Tensor,
                n: int) -> tuple[Tensor, Tensor] | tuple[None, None]:
    """Validate a constraint pair (G, h) or (A, b); an absent pair is (None, None)."""
    absent_M, absent_v = is_absent(M, -2), is_absent(v, -1)
    if absent_M and absent_v:
        return None, None
    if absent_M or absent_v:
        given, missing = (vec_name, mat_name) if absent_M else (mat_name, vec_name)
        empty, present = (M, v) if absent_M else (v, M)
        if isinstance(empty, Tensor) and isinstance(present, Tensor):  # given with no rows: the other has some
            raise ValueError(f"{missing} has no rows (shape {tuple(empty.shape)}) but {given} has shape "
                             f"{tuple(present.shape)}; give both with the same rows, or neither")
        raise ValueError(f"{given} was given without {missing}; pass both or neither")
    M = _check_tensor(mat_name, M, ref)
    v = _check_tensor(vec_name, v, ref)
    _check_matrix(mat_name, M, None, n, ref)
    if v.dim() < 1 or v.shape[-1] != M.shape[-2]:
        raise ValueError(f"{vec_name} must have shape (..., {M.shape[-2]}) to match {mat_name} of shape {tuple(M.shape)}, got {tuple(v.shape)}")
    return M, v


def check_constrained(m: int, k: int) -> None:
    """``solve_qp_cone``: the QP has some constraint (``m`` equalities, ``k`` inequalities), the rows
    of its cone program."""
    if m + k == 0:
        raise ValueError("solve_qp_cone needs at least one constraint; an unconstrained QP is the linear solve Q z = -p")


# Data: values (on the flat batch, inside the solve)

# Q must be symmetric, and positive semidefinite, to this relative tolerance, whatever its dtype: √ε
# of float32, so that a Q formed in float32 (L Lᵀ: symmetric, and semidefinite, only to its rounding,
# 1e-7 of its size) and then converted to float64 passes. The solver takes the symmetric part
# (Q + Qᵀ)/2, which is all the objective sees.
DATA_TOL = math.sqrt(torch.finfo(torch.float32).eps)


def _distinct(Q: Tensor) -> tuple[Tensor, bool]:
    """The matrices of the flat batch Q (B, n, n) to test, and whether one Q is shared by the batch:
    ``prepare_qp`` broadcasts a shared Q by ``expand`` (stride 0), and then Q[:1] alone is tested."""
    shared = Q.dim() > 2 and Q.shape[0] > 1 and Q.stride(0) == 0
    return (Q[:1] if shared else Q), shared


def _asymmetry(Q: Tensor) -> tuple[Tensor, Tensor, float]:
    """max |Q − Qᵀ|, its bound tol·max(1, max|Q|) and tol, as tensors that stay on the device."""
    tol = DATA_TOL
    if Q.numel() == 0:  # an empty batch: nothing to test (amax has no identity)
        zero = Q.new_zeros(())
        return zero, zero + tol, tol
    return (Q - Q.transpose(-2, -1)).abs().amax(), tol * Q.abs().amax().clamp(min=1.0), tol


def semidefinite(Q: Tensor) -> Tensor:
    """(B,) for (B, n, n) Q: whether its symmetric part S has a Cholesky factorisation once shifted by
    δ = ``DATA_TOL``·max|Q| (δ = 1 where Q = 0): S is positive semidefinite up to the rounding of
    float32 data (an eigenvalue below −δ, about, fails). One factorisation, on the device, by the
    engine's (``kkt.cholesky``: LAPACK's ``potf2`` where the engine takes it, a factor with a
    non-finite diagonal refused). δ is added to S's diagonal alone: adding δ times an identity
    matrix took 1.7–2.0 times as long compiled (batch 8, n = 100, one thread: 980 against 585 µs
    with torch's factorisation, 750 against 368 µs with ``potf2``)."""
    if Q.shape[-1] == 0:
        return Q.new_ones(Q.shape[0], dtype=torch.bool)
    size = Q.abs().amax((-2, -1))
    shift = torch.where(size > 0, size * DATA_TOL, 1.0)
    shifted = 0.5 * (Q + Q.transpose(-2, -1))
    shifted.diagonal(dim1=-2, dim2=-1).add_(shift.unsqueeze(-1))
    return cholesky(shifted)[1]


_FINITE_ABSENT_BOUND = ("a row of zeros in G with h = 1, or as a large finite side far above the others (1e20), or leave "
                        "its row out")
ABSENT_BOUND = ("write an absent bound as +inf in h (solve_qp, QPFunction and solve_qp_cone leave its row out), as "
                f"{_FINITE_ABSENT_BOUND}")


class InfiniteSides(ValueError):
    """``check_values``'s refusal of data whose only non-finite entries are +inf in h: absent bounds.
    ``qp.solve.solve_prepared`` catches it and solves the QPs without those rows
    (``problem.without_absent_sides``), and ``cone.qp.solve_qp_cone`` hands them to ``solve_cone``,
    which leaves them out as well; elsewhere (``QPSolveFn`` called directly) it is the refusal it reads as."""


def values_pass(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor) -> Tensor:
    """``check_values``'s test as a 0-d bool tensor on the data's device, not read."""
    # NaN or ±inf exactly where an entry is (or where the sum overflows float64: ``check_values`` says so)
    sums = torch.stack([t.sum(dtype=torch.float64) for t in (Q, p, G, h, A, b)])
    distinct, _ = _distinct(Q)  # a shared Q (an OptNet layer's) is factorised once, not once per element
    asym, bound, _ = _asymmetry(distinct)
    return ((sums - sums) == 0).all() & (asym <= bound) & semidefinite(distinct).all()


def check_values(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, passed: Tensor | bool | None = None) -> None:
    """Value checks (finite, Q symmetric and positive semidefinite: ``semidefinite``); run on plain
    tensors, inside the solve, so that ``torch.func.vmap`` can trace ``prepare_qp``. The data is read
    by the host once (one synchronisation): ``values_pass``, or ``passed`` where the caller computed
    it; only on failure is it read again to name the culprit. A Q that is not semidefinite is refused
    as non-finite data is: the interior point method would take it (the factorised H = Q + GᵀWG + ρI
    can be positive definite all the same) and could report SOLVED at a point that is no minimum."""
    if bool(values_pass(Q, p, G, h, A, b) if passed is None else passed):
        return
    data = {"Q": Q, "p": p, "G": G, "h": h, "A": A, "b": b}
    distinct, shared = _distinct(Q)
    asym, bound, tol = _asymmetry(distinct)
    infinite_sides = torch.isposinf(h)
    for name, t in data.items():
        finite = torch.isfinite(t) | infinite_sides if name == "h" else torch.isfinite(t)
        if not bool(finite.all()):
            bad = (~finite).flatten(1).any(-1).nonzero().tolist()
            what = "NaN or -inf" if name == "h" else "NaN or Inf"
            why = " (+inf is an absent bound; Gz ≤ -inf has no solution)" if name == "h" else ""
            raise ValueError(f"{name} contains {what} at batch elements {listed_elements(bad)} (flattened){why}; QP data must be "
                             f"finite whatever on_failure says: drop those elements; {ABSENT_BOUND}")
    if bool(infinite_sides.any()):
        bad = infinite_sides.flatten(1).any(-1).nonzero().tolist()
        raise InfiniteSides(f"h contains +inf at batch elements {listed_elements(bad)} (flattened): solve_qp, QPFunction and "
                            "solve_qp_cone take it as an absent bound and leave its row out; this entry point does not. "
                            f"Write an absent bound as {_FINITE_ABSENT_BOUND}")
    for name, t in data.items():
        if not bool(torch.isfinite(t.sum(dtype=torch.float64))):
            raise ValueError(f"{name} has entries so large (up to {float(t.abs().max()):.3g}) that their sum overflows float64, "
                             f"which the solve cannot work with; {ABSENT_BOUND}")
    if bool(asym > bound):
        raise ValueError(
            f"Q must be symmetric (positive semidefinite); max |Q - Qᵀ| = {float(asym):.3g} exceeds {tol:.1e}·max(1, max|Q|); "
            "pass (Q + Q.transpose(-1, -2)) / 2"
        )
    failing = ~semidefinite(distinct)
    where = ("(the one Q shared by the batch)" if shared else
             f"at batch elements {listed_elements(failing.nonzero().tolist())} (flattened)")
    refused = distinct[failing].detach().double()  # the error path only: eigenvalues to say how far from semidefinite
    lowest = torch.linalg.eigvalsh(0.5 * (refused + refused.transpose(-2, -1))).amin(-1) / refused.abs().amax((-1, -2))
    raise ValueError(f"Q must be positive semidefinite (a convex QP), got a Q with an eigenvalue below "
                     f"-{DATA_TOL:.1e}·max|Q| {where}: its smallest eigenvalue is {float(lowest.min()):.3g}·max|Q|. "
                     "A Q formed as L Lᵀ (+ εI) is semidefinite; OptNet's layers form it so")


def check_positive_definite(Q: Tensor, batch: torch.Size) -> None:
    """``QPFunction(check_Q_spd=True)``: every Q of the flat batch (batch shape ``batch``) has a
    Cholesky factorisation; the message names the elements whose Q has none (as the failure
    messages do, ``status.listed_elements``), unless the data is unbatched."""
    if torch._C._are_functorch_transforms_active():
        raise ValueError("check_Q_spd=True reads Q's Cholesky factorisation on the host, which torch.func transforms "
                         "(vmap, grad, jacrev) cannot trace; pass check_Q_spd=False (a Q that is not positive definite "
                         "is then reported by the solution's status)")
    distinct, shared = _distinct(Q.detach())
    info = torch.linalg.cholesky_ex(distinct).info
    if bool((info != 0).any()):
        where = ("" if len(batch) == 0 else " (the one Q shared by the batch)" if shared else
                 f" at elements {listed_elements((info.reshape(batch) != 0).nonzero().tolist())}")
        raise ValueError(f"Q is not positive definite (check_Q_spd=True){where}; this solver accepts "
                         "positive semidefinite Q: pass check_Q_spd=False")
