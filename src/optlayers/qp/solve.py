"""Public entry points of the QP layer: ``solve_qp`` and the qpth-compatible ``QPFunction``."""
from __future__ import annotations

import dataclasses
import enum
import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from optlayers.compiling import opaque_to_user_compile
from optlayers.qp.autograd import QPSolveFn
from optlayers.qp.equalities import given_multipliers, orthonormal_rows
from optlayers.qp.ipm import IPMSettings, default_settings
from optlayers.qp.problem import prepare_qp, without_absent_sides
from optlayers.sides import with_absent
from optlayers.qp.relax import Relaxation, elastic_data, original_parts
from optlayers.status import FailurePolicy, Status, listed_elements, possibly_infeasible, user_stacklevel
from optlayers.validation.options import check_bool
from optlayers.validation.qp import InfiniteSides, check_positive_definite, check_qp_options, check_qpth_options


@dataclass(frozen=True)
class QPSolution:
    """Solution of a batch of QPs; batch shape ``...`` is the broadcast of the inputs' batch shapes.

    Attributes:
        z: (..., n) primal solution (differentiable).
        lam: (..., k) inequality multipliers, ≥ 0 (differentiable).
        nu: (..., m) equality multipliers (differentiable).
        s: (..., k) slacks h − Gz ≥ 0 (differentiable); +inf, and lam 0, where h is +inf.
        status: (...,) ``Status`` codes (``optlayers.Status``, also named ``QPStatus``); elements
            not ``SOLVED`` hold ``failed_value`` (NaN by default) in z, lam, nu, s and get zero
            gradient — except relaxed ones.
        iterations: (...,) interior point iterations taken.
        primal_residual, dual_residual, gap: (...,) final residuals of the original problem
            (infinity norms; gap = |zᵀQz + pᵀz + bᵀν + hᵀλ|, at least sᵀλ). For float64 data a
            SOLVED element's gap meets the tolerance at the returned point itself: where float64's
            plain sum of its terms cannot tell (rel_tol = 0 and terms far above tol), it is
            evaluated with error-free products and sums, and the problem is scaled by powers of
            two, so that the returned point is the solver's iterate without rounding. (Float32 data
            are solved in float64; rounding the point to float32 moves the gap again.) Where nearly
            dependent equality rows were replaced by an equivalent set (``qp.equalities``), the
            primal residual is that of the replaced rows, each of about unit size.
        relaxed: (...,) bool: elements that were PRIMAL_INFEASIBLE and hold the solution of their
            elastic relaxation (``on_failure="relax"``): its z, the multipliers of Gz ≤ h + t and
            Az = b + u − v, and the slacks h + t − Gz, all differentiable. All False otherwise.
    """

    z: Tensor
    lam: Tensor
    nu: Tensor
    s: Tensor
    status: Tensor
    iterations: Tensor
    primal_residual: Tensor
    dual_residual: Tensor
    gap: Tensor
    relaxed: Tensor


# a pytree node (its fields the children): torch.func.vmap and torch.export take it as an output
torch.export.register_dataclass(QPSolution, serialized_type_name="optlayers.QPSolution")


@opaque_to_user_compile
def solve_qp(
    Q: Tensor,
    p: Tensor,
    G: Tensor | None = None,
    h: Tensor | None = None,
    A: Tensor | None = None,
    b: Tensor | None = None,
    *,
    tol: float | None = None,
    rel_tol: float | None = None,
    max_iter: int | None = None,
    on_failure: str = "raise",
    failed_value: float = math.nan,
    relaxation: Relaxation | None = None,
    compile: bool = False,
) -> QPSolution:
    """Solve minimize ½zᵀQz + pᵀz subject to Az = b, Gz ≤ h, batched and differentiably.

    Args:
        Q: (..., n, n) symmetric positive semidefinite (singular and zero allowed); checked, to
            float32's rounding, with the data's finiteness (``validation.qp.check_values``).
        p: (..., n).
        G, h: (..., k, n) and (..., k) inequality constraints, or None. A side of +inf is an
            absent bound: each QP is solved without such rows (docs/qp.md, "Absent bounds").
        A, b: (..., m, n) and (..., m) equality constraints, or None.
        tol: absolute tolerance on the primal residual, dual residual and gap (default 1e-12 for
            float64 data, 1e-10 for float32, times the size of p, h and b where that is below
            2^-6, and the gap's times its square; the iteration itself always runs in float64).
        rel_tol: relative tolerance (default: ``tol``). Settings float64 cannot meet (both
            below 2.2e-16, e.g. ``tol=0`` with ``rel_tol`` unset) are refused.
        max_iter: iteration limit (default 100).
        on_failure: what to do about elements that are not SOLVED: "raise" (``SolveError``
            naming them), "warn", "ignore"; or "relax": primal infeasible elements, and those
            that stopped (MAX_ITER, NUMERICAL_ERROR) with their primal residual above tolerance,
            are re-solved as their always-feasible elastic relaxation (``optlayers.qp.relax``) and
            hold its solution, differentiable (``relaxed`` marks them; ``status`` is unchanged); a
            warning names them. Other failures are then warned about. "relax" selects elements by
            their status, which ``torch.func.vmap`` cannot trace.
        failed_value: what failed elements hold in z, lam, nu, s (NaN; the layers use 0.0).
            Their gradients are zero either way.
        relaxation: the weights of the relaxation for "relax" (default ``Relaxation()``).
        compile: run each interior point iteration as one ``torch.compile``d graph (on CUDA
            captured in a CUDA graph) over a batch of fixed shape. Opt-in: each new problem
            shape costs a compilation (about a minute on a CPU); it is repaid after thousands of
            calls on small problems (docs/qp.md, "The compiled path"). The answers are those of
            the eager solver.

    Each argument has its own batch dimensions or none; they broadcast like torch. Gradients of
    a shared argument are summed over the batch. Device and dtype follow the inputs. A derivative
    taken where a solved element's solution has an inequality row neither clearly active nor
    clearly inactive (weakly active), or is not unique (a face of optima), warns, naming the
    elements (``InexactDerivativeWarning``; docs/qp.md, "Where the derivative is inexact or does
    not exist").

    Example:
        >>> sol = solve_qp(torch.eye(2), torch.tensor([1.0, -1.0]), G=torch.eye(2), h=torch.tensor([0.5, 0.5]))
        >>> sol.z  # z₂ ≤ 0.5 holds with equality
        tensor([-1.0000,  0.5000])
    """
    check_qp_options(tol, rel_tol, max_iter, on_failure, failed_value, relaxation)
    check_bool("compile", compile)
    flat, batch = prepare_qp(Q, p, G, h, A, b)
    settings = default_settings(flat[1].dtype, tol, rel_tol, max_iter, compile)
    return solve_prepared(flat, batch, settings, on_failure, failed_value, relaxation)


def solve_prepared(flat: tuple[Tensor, ...], batch: torch.Size, settings: IPMSettings, on_failure: str,
                   failed_value: float = math.nan, relaxation: Relaxation | None = None) -> QPSolution:
    """``solve_qp`` on data already checked and flattened by ``prepare_qp``. Sides of +inf in h
    are absent bounds: the QPs are solved without those rows (``problem.without_absent_sides``; the
    value checks find them, so data without them pay nothing), whose λ is 0 and s +inf."""
    relax = on_failure == "relax"
    policy = FailurePolicy("ignore" if relax else on_failure, failed_value, "QPs")
    absent = None
    try:
        out = _solve_flat(flat, settings, policy, batch)  # failed elements hold failed_value
    except InfiniteSides:
        flat, absent = without_absent_sides(flat)
        out = _solve_flat(flat, settings, policy, batch)
    z, lam, nu, s, status = out[:5]
    if relax:  # the relaxed elements' solutions replace failed_value
        z, lam, nu, s, relaxed = _relax(flat, settings, out, relaxation or Relaxation())
        _warn_relaxed(status.reshape(batch), relaxed.reshape(batch), failed_value)
    else:
        relaxed = torch.zeros_like(status, dtype=torch.bool)
    if absent is not None:
        lam, s = with_absent(lam, s, absent, (status == Status.SOLVED) | relaxed)
    outputs = (z, lam, nu, s, *out[4:9], relaxed)  # out[9], the primal residual's bound, only serves _relaxable
    if tuple(batch) != tuple(status.shape):  # not already the batch's shape (B,)
        outputs = tuple(t.reshape((*batch, *t.shape[1:])) for t in outputs)
    return QPSolution(*outputs)


def _solve_flat(flat: tuple[Tensor, ...], settings: IPMSettings, policy: FailurePolicy,
                batch: tuple[int, ...]) -> tuple[Tensor, ...]:
    """``QPSolveFn`` on the flat data, nearly dependent equality rows replaced by an equivalent
    well-conditioned set (``equalities.orthonormal_rows``) and the SOLVED elements' ν mapped back to
    the given rows (the others hold ``failed_value``)."""
    keep_factor = torch.is_grad_enabled() and any(t.requires_grad for t in flat)
    A, b, rows = orthonormal_rows(flat[4], flat[5])
    out = QPSolveFn.apply(*flat[:4], A, b, settings, keep_factor, policy, tuple(batch))
    if rows is None:
        return out
    nu = torch.where((out[4] == Status.SOLVED).unsqueeze(-1), given_multipliers(rows, out[2]), out[2])
    return (*out[:2], nu, *out[3:])


def _relaxable(out: tuple[Tensor, ...]) -> Tensor:
    """(B,) bool: the elements ``on_failure="relax"`` re-solves: PRIMAL_INFEASIBLE ones, and those
    that ``status.possibly_infeasible`` names: stopped (MAX_ITER, NUMERICAL_ERROR) with the reported
    primal residual above its bound (``primal_limit``, ``forward._public``), as infeasible problems
    whose Farkas certificate was not found end."""
    status = out[4]
    return (status == Status.PRIMAL_INFEASIBLE) | possibly_infeasible(status, out[6], out[9])


def _relax(flat: tuple[Tensor, ...], settings: IPMSettings, out: tuple[Tensor, ...],
           relaxation: Relaxation) -> tuple[Tensor, ...]:
    """Replace the ``_relaxable`` elements of ``out`` by their relaxation's solution, where it was
    SOLVED (an element whose relaxation fails keeps its ``failed_value``)."""
    z, lam, nu, s, status = out[:5]
    try:
        index = _relaxable(out).nonzero().squeeze(-1)
    except RuntimeError as error:
        if "vmap" not in str(error):
            raise
        raise ValueError("on_failure='relax' selects the primal infeasible elements by their status, which "
                         "torch.func.vmap cannot trace; batch the data instead of vmapping, or use "
                         "on_failure='warn' under vmap") from None
    relaxed = torch.zeros_like(status, dtype=torch.bool)
    if index.numel() == 0:
        return z, lam, nu, s, relaxed
    data = elastic_data(*(t[index] for t in flat), relaxation)
    sub = _solve_flat(data, settings, FailurePolicy("ignore"), (index.numel(),))
    ok = sub[4] == Status.SOLVED
    n, k = flat[1].shape[-1], flat[2].shape[-2]
    parts = original_parts(n, k, *sub[:4])
    index = index[ok]
    relaxed[index] = True
    merged = tuple(whole.index_put((index,), part[ok]) for whole, part in zip((z, lam, nu, s), parts))
    return (*merged, relaxed)


def _warn_relaxed(status: Tensor, relaxed: Tensor, failed_value: float) -> None:
    """One warning naming the relaxed elements (and those among them that were not certified
    infeasible), and one for failures that were not relaxed."""
    if bool(relaxed.any()):
        uncertified = relaxed & (status != Status.PRIMAL_INFEASIBLE)
        what, note = "were primal infeasible", ""
        if status.dim() == 0:  # unbatched: no elements to name
            what = "was primal infeasible"
            if bool(uncertified):
                what += (", or stopped with the primal residual above tolerance (it has no infeasibility certificate; "
                         "its status: max_iter or numerical_error),")
            warnings.warn(f"the QP {what} and holds the solution of its elastic relaxation", RuntimeWarning,
                          stacklevel=user_stacklevel())
        else:
            if bool(uncertified.any()):
                what = "were primal infeasible, or stopped with the primal residual above tolerance,"
                note = (f"; elements {listed_elements(uncertified.nonzero().tolist())} have no infeasibility certificate (their status: "
                        "max_iter or numerical_error)")
            warnings.warn(f"{int(relaxed.sum())} of {status.numel()} QPs {what} and hold the solution of their elastic "
                          f"relaxation (elements {listed_elements(relaxed.nonzero().tolist())}){note}", RuntimeWarning,
                          stacklevel=user_stacklevel())
    rest = torch.where(relaxed, int(Status.SOLVED), status)
    FailurePolicy("warn", failed_value, "QPs").apply(rest)


class QPSolvers(enum.Enum):
    """qpth's solver choice, for ``QPFunction(solver=...)``; only ``PDIPM_BATCHED`` (the batched
    primal-dual interior point method, ours) is supported."""

    PDIPM_BATCHED = 1
    CVXPY = 2


class QPFunction(nn.Module):
    """Drop-in replacement for ``qpth.qp.QPFunction``: ``QPFunction()(Q, p, G, h, A, b)`` returns z.

    qpth's arguments, in qpth's order and with its meanings:

    Args:
        eps: tolerance on the residuals (qpth's ``eps``; here ``tol``, absolute and relative, on
            each of the primal residual, dual residual and gap in the infinity norm). Default:
            ``solve_qp``'s (1e-12 for float64 data). Give ``eps`` or ``tol``, not both.
        verbose: -1 silent (failed elements are not warned about), 0 (default) a warning naming
            failed elements, 1 also a one-line summary of every solve (iterations, largest
            residuals, statuses) printed to stdout; qpth's per-iteration log is not available.
            ``False`` and ``True`` are 0 and 1, as in qpth.
        notImprovedLim: consecutive iterations with a negligible step after which an element stops
            with status NUMERICAL_ERROR (default 5: ``IPMSettings.stall_limit``). qpth counts
            iterations without a smaller residual instead; here that is ``progress_limit`` (20,
            not set from this keyword: it ends INACCURATE those whose residuals stop within 100
            times the tolerance).
        maxIter: iteration limit (default 100; qpth's 20 is not imposed: the solver stops on
            its tolerance). Give ``maxIter`` or ``max_iter``, not both.
        solver: ``QPSolvers.PDIPM_BATCHED`` (qpth's own enum members are accepted too);
            ``QPSolvers.CVXPY`` is refused.
        check_Q_spd: raise ``ValueError`` if some Q is not positive definite (qpth's default is
            True because its solver needs it; ours accepts positive semidefinite Q, so False).

    The package's own keywords: ``tol``, ``rel_tol``, ``max_iter`` as in ``solve_qp``;
    ``on_failure`` "warn" / "ignore" (default from ``verbose``), "raise", or "relax" (infeasible
    elements, and those stopped with the primal residual above tolerance, hold their elastic
    relaxation's solution, see ``solve_qp``); ``relaxation`` its
    weights; ``compile`` as in ``solve_qp``. Failed elements never end a training run unless ``on_failure="raise"``: their z is
    ``failed_value`` (0.0) with zero gradient, and ``last_status`` holds the statuses of the last
    forward (outside ``torch.func`` transforms); ``solve`` returns the whole ``QPSolution``.

    Shape:
        Q (..., n, n), p (..., n), G (..., k, n), h (..., k), A (..., m, n), b (..., m); absent
        constraints as None or empty tensors. Output z (..., n).

    Example:
        >>> layer = QPFunction(verbose=-1)
        >>> z = layer(Q, p, G, h, torch.Tensor(), torch.Tensor())
    """

    def __init__(self, eps: float | None = None, verbose: int = 0, notImprovedLim: int | None = None,
                 maxIter: int | None = None, solver: object = QPSolvers.PDIPM_BATCHED, check_Q_spd: bool = False,
                 *, tol: float | None = None, rel_tol: float | None = None, max_iter: int | None = None,
                 on_failure: str | None = None, failed_value: float = 0.0, relaxation: Relaxation | None = None,
                 compile: bool = False):
        super().__init__()
        check_qpth_options(eps, tol, maxIter, max_iter, verbose, notImprovedLim, solver, check_Q_spd)
        tol = eps if tol is None else tol
        max_iter = maxIter if max_iter is None else max_iter
        on_failure = ("ignore" if verbose < 0 else "warn") if on_failure is None else on_failure
        check_qp_options(tol, rel_tol, max_iter, on_failure, failed_value, relaxation,
                         tol_name="eps" if eps is not None else "tol", max_iter_name="maxIter" if maxIter is not None else "max_iter")
        self.tol, self.rel_tol, self.max_iter, self.on_failure = tol, rel_tol, max_iter, on_failure
        self.verbose, self.not_improved_lim, self.check_Q_spd = int(verbose), notImprovedLim, check_Q_spd
        check_bool("compile", compile)
        self.failed_value, self.relaxation, self.compile = float(failed_value), relaxation, compile
        self.last_status: Tensor | None = None

    @opaque_to_user_compile
    def solve(self, Q: Tensor, p: Tensor, G: Tensor | None = None, h: Tensor | None = None,
              A: Tensor | None = None, b: Tensor | None = None) -> QPSolution:
        """The whole solution (z, multipliers, slacks, status, residuals) for this layer's options."""
        flat, batch = prepare_qp(Q, p, G, h, A, b)
        if self.check_Q_spd:
            check_positive_definite(flat[0], batch)
        settings = default_settings(flat[1].dtype, self.tol, self.rel_tol, self.max_iter, self.compile)
        if self.not_improved_lim is not None:
            settings = dataclasses.replace(settings, stall_limit=self.not_improved_lim)
        sol = solve_prepared(flat, batch, settings, self.on_failure, self.failed_value, self.relaxation)
        if not torch._C._are_functorch_transforms_active():
            self.last_status = sol.status.detach()
            if self.verbose >= 1:
                print(_summary(sol))
        return sol

    @opaque_to_user_compile
    def forward(self, Q: Tensor, p: Tensor, G: Tensor | None = None, h: Tensor | None = None,
                A: Tensor | None = None, b: Tensor | None = None) -> Tensor:
        return self.solve(Q, p, G, h, A, b).z

    def extra_repr(self) -> str:
        return (f"tol={self.tol}, rel_tol={self.rel_tol}, max_iter={self.max_iter}, on_failure={self.on_failure!r}, "
                f"verbose={self.verbose}, compile={self.compile}")


def _summary(sol: QPSolution) -> str:
    counts = {code.name: int((sol.status == code).sum()) for code in Status if bool((sol.status == code).any())}
    if sol.status.numel() == 0:
        return "QPFunction: empty batch"
    return (f"QPFunction: {sol.status.numel()} QPs, {counts}; iterations {int(sol.iterations.min())}-"
            f"{int(sol.iterations.max())}; largest primal residual {float(sol.primal_residual.max()):.2e}, "
            f"dual {float(sol.dual_residual.max()):.2e}, gap {float(sol.gap.max()):.2e}")


__all__ = ["QPFunction", "QPSolution", "QPSolvers", "solve_prepared", "solve_qp"]
