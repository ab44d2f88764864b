"""The primitive checks of user options (integers, numbers, booleans, choices, fill values,
tolerances), which the QP and cone checks and the settings' ``__post_init__`` use: each names the
argument, what it must be, and what was given. They import nothing of the package.

Booleans are refused where numbers are expected (``True`` is an ``int`` in Python, but
``max_iter=True`` is a mistake, not a request for one iteration).
"""
from __future__ import annotations

import math
import numbers

import torch

FLOAT64_RESOLUTION = torch.finfo(torch.float64).eps
"""Unit roundoff of float64 (2.2e-16): residuals computed in float64 are not reliably smaller than
this times the size of their terms, so a tolerance below it can only be met by luck."""


def check_not_recorded(solve: str) -> None:
    """Refuse a solve that ``torch.jit.trace`` (or ``torch.onnx.export``'s tracer) or
    ``torch.export.export`` is recording, with a message that says why, in place of the error deep in
    the solve that either reaches: the interior point method's loop, its checks and its choice of
    path read values on the host, which a trace would freeze as constants and an exported graph
    cannot hold."""
    if torch.jit.is_tracing():
        recorder = "torch.jit.trace"
    elif torch.compiler.is_exporting():
        recorder = "torch.export"
    else:
        return
    raise NotImplementedError(
        f"{solve} cannot be recorded by {recorder}: its interior point method reads values on the host "
        "(its loop, its checks and its choice of path depend on the data), which a recorded graph cannot hold; "
        "call the model as it is, or torch.compile it (the solve stays a call of its own, and compile=True "
        "compiles the solver's parts)")


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_int(name: str, value: object, minimum: int, *, optional: bool = False) -> None:
    """``value`` is an integer (not a bool) >= ``minimum``, or None when ``optional``."""
    if optional and value is None:
        return
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        extra = " or None" if optional else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{extra}, got {value!r}")


def check_number(name: str, value: object, *, positive: bool, optional: bool = False) -> None:
    """``value`` is a finite real number (not a bool), > 0 when ``positive`` else >= 0."""
    if optional and value is None:
        return
    ok = _is_number(value) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        bound = "> 0" if positive else ">= 0"
        extra = " or None" if optional else ""
        raise ValueError(f"{name} must be a finite number {bound}{extra}, got {value!r}")


def check_bool(name: str, value: object) -> None:
    """``value`` is True or False (not a truthy number or string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_fill(name: str, value: object) -> None:
    """``value`` fills failed elements: NaN, or a finite number (not a bool, not ±inf)."""
    if not (_is_number(value) and (math.isnan(value) or math.isfinite(value))):
        raise ValueError(f"{name} must be a float (NaN, or a finite value such as 0.0), got {value!r}")


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_tolerances(tol: object, rel_tol: object, default: float, tol_name: str = "tol") -> None:
    """The QP solver's absolute ``tol`` and relative ``rel_tol`` (None: ``rel_tol`` follows ``tol``,
    and ``tol`` is ``default``). Each residual must fall below ``tol + rel_tol * size``; settings
    that float64 cannot meet (both zero, or both below its resolution) would only run to
    ``max_iter`` and are refused."""
    check_number(tol_name, tol, positive=False, optional=True)
    check_number("rel_tol", rel_tol, positive=False, optional=True)
    absolute = default if tol is None else float(tol)
    relative = absolute if rel_tol is None else float(rel_tol)
    if max(absolute, relative) < FLOAT64_RESOLUTION:
        unset = f" (rel_tol defaults to {tol_name})" if rel_tol is None else ""
        raise ValueError(
            f"{tol_name}={tol!r} with rel_tol={rel_tol!r}{unset} asks for residuals below float64's resolution "
            f"({FLOAT64_RESOLUTION:.1e}), which the solver cannot reach: it would only run to max_iter. "
            f"Give {tol_name} or rel_tol >= 2.2e-16 (e.g. rel_tol=1e-12)")
