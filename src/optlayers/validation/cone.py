"""Checks of ``solve_cone``'s and ``ConeLayer``'s options (each solver's ``solver_options`` by that
solver's rules) and of the cone program's data; ``cone.data.prepare_cone`` builds the canonical
data from what passes."""
from __future__ import annotations

import dataclasses
import math

import torch

from optlayers.cone import backends
from optlayers.cone.interior.solver import ConeIPMSettings
from optlayers.cone.linsolve import MODES
from optlayers.cone.refine import MAX_STEPS as REFINE_STEPS
from optlayers.cone.spec import ConeSpec
from optlayers.status import ON_FAILURE_CHOICES, listed_elements
from optlayers.validation.options import check_bool, check_choice, check_fill, check_int, check_number
from optlayers.validation.qp import DATA_TOL, semidefinite

SOLVERS = ("auto", "ipm") + backends.SOLVERS
"""``solve_cone``'s ``solver`` values."""

LAYER_OPTIONS = ("solver", "mode", "on_failure", "solver_options", "max_workers", "refine_steps", "failed_value",
                 "compile")
"""The keyword arguments of ``solve_cone`` that ``ConeLayer`` takes."""


# Options

def check_cone_options(solver: object, mode: object, on_failure: object, solver_options: object,
                       max_workers: object, refine_steps: object, failed_value: object = math.nan,
                       compile: object = False) -> None:
    """``solve_cone``'s options, refused at the door when unknown or impossible."""
    check_choice("solver", solver, SOLVERS)
    check_bool("compile", compile)
    if compile and solver not in ("auto", "ipm"):
        raise ValueError(f"compile=True compiles the batched interior point method: it needs solver='ipm' or 'auto', "
                         f"got solver={solver!r}")
    check_choice("mode", mode, MODES)
    check_choice("on_failure", on_failure, ON_FAILURE_CHOICES)
    check_int("refine_steps", refine_steps, 0)
    check_int("max_workers", max_workers, 1, optional=True)
    check_fill("failed_value", failed_value)
    if solver_options is not None and not isinstance(solver_options, dict):
        raise TypeError(f"solver_options must be a dict or None, got {type(solver_options).__name__}")
    _SOLVER_OPTION_CHECKS[solver](dict(solver_options or {}))


def check_layer_options(cones: object, options: dict) -> None:
    """``ConeLayer(cones, **options)``: a ``ConeSpec``, and ``solve_cone``'s options by their names
    (``options`` with the layer's defaults of ``on_failure`` and ``failed_value`` filled in)."""
    check_cones(cones)
    for name in options:
        if name not in LAYER_OPTIONS:
            raise TypeError(f"unknown option {name!r}; expected one of {LAYER_OPTIONS}")
    check_cone_options(options.get("solver", "auto"), options.get("mode", "dense"), options["on_failure"],
                       options.get("solver_options"), options.get("max_workers"),
                       options.get("refine_steps", REFINE_STEPS), options["failed_value"],
                       options.get("compile", False))


def check_cones(cones: object) -> None:
    if not isinstance(cones, ConeSpec):
        raise TypeError(f"cones must be a ConeSpec, got {type(cones).__name__}")


def _check_auto_options(options: dict) -> None:
    if options:
        raise ValueError(f"solver_options belong to one solver, and solver='auto' picks one by the batch: pass "
                         f"solver='clarabel' or solver='ipm' (or 'scs') with them, got {sorted(options)}")


def _check_ipm_options(options: dict) -> None:
    if "compiled" in options:
        raise ValueError("solver_options for solver='ipm' cannot set 'compiled': pass solve_cone's compile=True")
    known = {field.name for field in dataclasses.fields(ConeIPMSettings)} - {"compiled"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"solver_options for solver='ipm' must be ConeIPMSettings fields {sorted(known)}, got {unknown}")
    ConeIPMSettings(**options)  # checks each value


def _check_clarabel_options(options: dict) -> None:
    if not options:
        return
    import clarabel

    defaults = clarabel.DefaultSettings()
    unknown = sorted(name for name in options if not hasattr(defaults, name))
    if unknown:
        raise ValueError(f"solver_options for solver='clarabel' must be clarabel.DefaultSettings attributes, "
                         f"got {unknown}")
    for name, value in options.items():
        if isinstance(value, bool) != isinstance(getattr(defaults, name), bool):
            raise ValueError(f"solver_options[{name!r}] must be of the type of Clarabel's default "
                             f"{getattr(defaults, name)!r}, got {value!r}")
        refused = backends.refusal("clarabel", name, value)
        if refused:
            raise ValueError(f"solver_options[{name!r}] = {value!r} is refused by Clarabel ({refused})")
        setattr(defaults, name, value)
        if name in _CLARABEL_RANGES:  # values Clarabel takes without a word and then fails every solve with
            low, high = _CLARABEL_RANGES[name]
            if not low < value <= high:
                raise ValueError(f"solver_options[{name!r}] must be in ({low}, {high}], got {value!r}")
        if "max_iter" in name:
            check_int(f"solver_options[{name!r}]", value, 1 if name == "max_iter" else 0)
        elif "tol" in name:
            check_number(f"solver_options[{name!r}]", value, positive=name in ("tol_feas", "tol_ktratio"))
        elif name == "time_limit" and not (value > 0):
            raise ValueError(f"solver_options['time_limit'] must be > 0 seconds (inf for none), got {value!r}")
    if defaults.tol_gap_abs == 0 and defaults.tol_gap_rel == 0:
        raise ValueError("solver_options tol_gap_abs and tol_gap_rel cannot both be 0: Clarabel would only run to "
                         "max_iter")


# Clarabel settings whose values out of (low, high] Clarabel takes without a word and then fails every
# solve with (max_step_fraction 2: NumericalError)
_CLARABEL_RANGES = {"max_step_fraction": (0.0, 1.0), "linesearch_backtrack_step": (0.0, 1.0)}


def _check_scs_options(options: dict) -> None:
    for name in ("eps_abs", "eps_rel", "eps_infeas", "time_limit_secs"):
        if name in options:
            check_number(f"solver_options[{name!r}]", options[name], positive=False)
    if "max_iters" in options:
        check_int("solver_options['max_iters']", options["max_iters"], 1)
    if options.get("eps_abs", 1.0) == 0 and options.get("eps_rel", 1.0) == 0:
        raise ValueError("solver_options eps_abs and eps_rel cannot both be 0: SCS would only run to max_iters")
    for name, value in options.items():  # SCS's own checks of names and values (those of the installed version)
        refused = backends.refusal("scs", name, value)
        if refused:
            raise ValueError(f"solver_options[{name!r}] = {value!r} is refused by SCS ({refused})")


_SOLVER_OPTION_CHECKS = {"auto": _check_auto_options, "ipm": _check_ipm_options, "clarabel": _check_clarabel_options,
                         "scs": _check_scs_options}


# Data

def check_cone_tensor(name: str, value: object, allow_sparse: bool) -> None:
    """One input (numpy arrays already converted): a float32 or float64 tensor, dense unless
    ``allow_sparse``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, numpy array{' or scipy sparse matrix' if allow_sparse else ''}, "
                        f"got {type(value).__name__}")
    if value.layout != torch.strided and not allow_sparse:
        raise TypeError(f"{name} must be dense, got layout {value.layout}; call {name}.to_dense()")
    if value.layout not in (torch.strided, torch.sparse_csr, torch.sparse_coo):
        raise TypeError(f"{name} must be dense, sparse CSR or sparse COO, got layout {value.layout}; call "
                        f"{name}.to_sparse_csr() or {name}.to_dense()")
    if value.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be a float32 or float64 tensor, got {value.dtype}; convert with {name}.double()")


def _check_dims(name: str, t: torch.Tensor, allowed: tuple[int, ...], meaning: str) -> None:
    if t.dim() not in allowed:
        raise ValueError(f"{name} must have {' or '.join(map(str, allowed))} dimensions ({meaning}), "
                         f"got shape {tuple(t.shape)}")


def check_cone_data(tensors: dict[str, torch.Tensor], cones: ConeSpec) -> tuple[int, int, int | None]:
    """Devices, dtypes, shapes and the cone sizes of A, b, c (and P where given); returns m, n and
    the batch size (None when no input is batched). Finiteness: ``check_finite``."""
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all inputs must be on one device, got {devices}; move them with .to(device)")
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"all inputs must have one dtype, got {dtypes}; convert them with .double() (or .float())")
    A_t = tensors["A"]
    _check_dims("A", A_t, (2,) if A_t.layout != torch.strided else (2, 3), "(m, n), or (B, m, n) batched; sparse A is 2-D")
    m, n = A_t.shape[-2:]
    _check_dims("b", tensors["b"], (1, 2), f"(m,) = ({m},) or (B, m)")
    _check_dims("c", tensors["c"], (1, 2), f"(n,) = ({n},) or (B, n)")
    _check_A_shape(tensors, cones, m, n)
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
    if n == 0:
        raise ValueError(f"A has no columns (shape {tuple(A_t.shape)}): a program without variables has nothing to "
                         "solve for; give at least one variable")
    if cones.size != m:
        raise ValueError(f"cones cover {cones.size} rows ({cones}) but A has m = {m} rows; "
                         "the cone sizes must add up to the number of rows of A")
    batches = {name: t.shape[0] for name, t in tensors.items() if t.dim() == (3 if name in ("A", "P") else 2)}
    if len(set(batches.values())) > 1:
        raise ValueError(f"batched inputs must share one batch size, got {batches}")
    return m, n, next(iter(batches.values())) if batches else None


def _check_A_shape(tensors: dict[str, torch.Tensor], cones: ConeSpec, m: int, n: int) -> None:
    """Blame A, not b or c, where the others agree on a size that A's is not: b's length with the
    cones' rows, or c's with P's order (m and n are taken from A, and without this a wrong A would be
    reported as a wrong b or c)."""
    A_shape, b_rows, c_cols = tuple(tensors["A"].shape), tensors["b"].shape[-1], tensors["c"].shape[-1]
    if b_rows != m and b_rows == cones.size:
        raise ValueError(f"A must have shape (..., {b_rows}, n) to match b of shape {tuple(tensors['b'].shape)} and the "
                         f"cones' {cones.size} rows ({cones}), got {A_shape}")
    P = tensors.get("P")
    if c_cols != n and P is not None and P.dim() >= 2 and tuple(P.shape[-2:]) == (c_cols, c_cols):
        raise ValueError(f"A must have shape (..., m, {c_cols}) to match c of shape {tuple(tensors['c'].shape)} and P of "
                         f"shape {tuple(P.shape)}, got {A_shape}")


def _values(t: torch.Tensor) -> torch.Tensor:
    if t.layout == torch.sparse_csr:
        return t.values()
    if t.layout == torch.sparse_coo:
        return t.coalesce().values()
    return t


def check_finite(tensors: dict[str, torch.Tensor | None]) -> None:
    """Refuse NaN or Inf. Run on plain tensors inside the solve (``ConeProgram.forward``), so that
    ``torch.func.vmap`` can trace ``cone.data.prepare_cone``."""
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
            raise ValueError(f"{name} contains NaN or Inf; all data must be finite" + (
                " (but for +inf in b on a nonnegative row, an absent bound; not with a sparse A, nor under "
                "torch.func.vmap beside an A it does not map)" if name == "b" else ""))


def check_semidefinite(P: torch.Tensor | None) -> None:
    """Refuse a P (shared (n, n) or (B, n, n), dense) that is not positive semidefinite
    (``validation.qp.semidefinite``, to the rounding of float32 data): a solver would take it and
    could report SOLVED at a point that is no minimum (x = 0, the maximum of −x²/2 on [−1, 1], was).
    Run inside the solve, after ``check_finite``."""
    if P is None or P.numel() == 0:
        return
    ok = semidefinite(P.reshape(-1, *P.shape[-2:]))
    if bool(ok.all()):
        return
    where = "" if P.dim() == 2 else f" at batch elements {listed_elements((~ok).nonzero().tolist())}"
    raise ValueError(f"P must be positive semidefinite (a convex objective), got a P with an eigenvalue below "
                     f"-{DATA_TOL:.1e}·max|P|{where}; a P formed as L Lᵀ is")

