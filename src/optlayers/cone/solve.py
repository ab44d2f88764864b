"""The public entry point: solve_cone."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from optlayers.compiling import opaque_to_user_compile
from optlayers.cone.autograd import ConeProgram, Settings
from optlayers.cone import autograd
from optlayers.cone.data import prepare_cone
from optlayers.cone.refine import MAX_STEPS as REFINE_STEPS
from optlayers.cone.scaling import equilibration, far_row_scales, looks_at_sides, unit_scales
from optlayers.cone.spec import ConeSpec
from optlayers.sides import with_absent, without_absent
from optlayers.status import FailurePolicy, Status
from optlayers.validation.cone import check_cone_options, check_layer_options
from optlayers.validation.options import check_int


# solver="auto" (the default) runs the batched interior point method ("ipm") on the CPU where
#     batch * m ** AUTO_CPU_POWER >= AUTO_CPU_WORK
# (m: the programs' rows), Clarabel elsewhere on the CPU. Why: ipm pays a fixed cost per iteration
# (~1,000 torch dispatches) that a batch shares, Clarabel a cost per program that grows faster with
# m than ipm's per-program share. Forward + adjoint (backward of x . v) of testing.random_program
# batches mixing all cone kinds, Clarabel with its default thread pool, alternating in one process,
# best of 3, on the quiet 2-core Xeon VM (2026-12-01 20:36 UTC, torch's two threads): ipm / clarabel
# time crossed 1 at batch ~400 for m = 20, ~200 for m = 44, 48 for m = 96, ~12 for m = 192, ~3 for
# m = 288 and below 1 for m = 384 (docs/cone.md has the table). batch * m^2 ~ 4e5 fits the first
# five within a factor of 1.3 in the time lost either side; programs of m >= 384 alone would take
# ipm from batch 1 (it is then up to 2.4x faster at batch 1-2). Thread count: under load (other jobs
# on both cores) ipm with two threads looked many times slower than with one and the crossover moved;
# on the quiet machine two threads made ipm faster, so the rule does not look at it.
AUTO_CPU_POWER = 2
AUTO_CPU_WORK = 4e5
# On a GPU (any device but the CPU) the same rule with AUTO_GPU_WORK: ipm on the device below it
# paid its per-iteration launches on too few programs. Forward only, per program, all five cone
# kinds, m = 96 (benchmarks/bench_cone.py, NVIDIA H200 with 16 Xeon cores beside it, torch 2.11,
# 2026-12-04, BENCHMARKS.md's GPU section): ipm on CUDA 11.5 / 4.9 / 2.9 ms at batch 16 / 128 / 512,
# Clarabel on the host's threads 3.5 / 2.6 ms at batch 16 / 128 (512 not reached); forward + adjoint
# at batch 128: ipm 0.633 s, Clarabel with the derivative on CUDA 0.330 s. A later run the same day
# (tree 420e505) reached batch 512: ipm 14.7 / 5.6 / 2.57 ms, Clarabel 4.1 / 2.5 / 2.40 ms. The limit
# is batch 512 at m = 96, where the two meet (within 7 %); a host with fewer cores would move it down.
AUTO_GPU_WORK = 512 * 96 ** AUTO_CPU_POWER


@dataclasses.dataclass(frozen=True)
class ConeSolution:
    """Primal x (B, n), dual y (B, m), slack s (B, m) and per-element ``status`` (B,) int64 ``Status``
    codes (``optlayers.Status``, also named ``ConeStatus``).

    Unbatched inputs give unbatched outputs. Failed elements hold ``failed_value`` (NaN by
    default) in x, y, s.
    """

    x: torch.Tensor
    y: torch.Tensor
    s: torch.Tensor
    status: torch.Tensor


# a pytree node (its fields the children): torch.func.vmap and torch.export take it as an output
torch.export.register_dataclass(ConeSolution, serialized_type_name="optlayers.ConeSolution")


def choose_solver(rows: int, batch: int, device: torch.device | str) -> str:
    """The solver ``solver="auto"`` runs for ``batch`` programs of ``rows`` constraint rows (m) on
    ``device``: "ipm" where batch * rows ** AUTO_CPU_POWER reaches AUTO_CPU_WORK on the CPU or
    AUTO_GPU_WORK on any other device (where it was measured to be faster, see the constants'
    notes; below, Clarabel solves on the host's threads, the derivative stays on the device), and
    wherever the clarabel package is missing; "clarabel" otherwise."""
    check_int("rows", rows, 1)
    check_int("batch", batch, 1)
    if not autograd._clarabel_available():
        return "ipm"
    limit = AUTO_CPU_WORK if torch.device(device).type == "cpu" else AUTO_GPU_WORK
    return "ipm" if batch * rows ** AUTO_CPU_POWER >= limit else "clarabel"


@opaque_to_user_compile
def solve_cone(A, b, c, cones: ConeSpec, P=None, *, solver: str = "auto", mode: str = "dense",
               on_failure: str = "raise", solver_options: dict | None = None,
               warm_start: ConeSolution | None = None, max_workers: int | None = None,
               refine_steps: int = REFINE_STEPS, failed_value: float = math.nan, compile: bool = False) -> ConeSolution:
    """Solve min c^T x + 1/2 x^T P x  s.t.  A x + s = b, s in K, differentiably in A, b, c, P.

    Args:
        A: (m, n) shared or (B, m, n); dense tensor, torch sparse (CSR/COO, shared only) or scipy sparse.
        b: (m,) or (B, m); +inf on a nonnegative row is an absent bound (the row left out; y = 0, s = +inf;
            refused with a sparse A, and under torch.func.vmap beside an A it does not map).
        c: (n,) or (B, n).
        cones: the cone K (SCS order and conventions), covering the m rows.
        P: optional (n, n) or (B, n, n) PSD matrix; its symmetric part is used. One that is not
            semidefinite (an eigenvalue below about −3.5e-4·max|P|) is refused.
        solver: "auto" (the default: "ipm" where it is measured to be faster, "clarabel"
            otherwise, see ``choose_solver``), "ipm" (the batched interior point method of
            ``optlayers.cone.interior``, on the data's device, CPU or CUDA; elements it leaves
            unsolved go to Clarabel), "clarabel" (interior point, element by element in threads) or
            "scs" (splitting; uses ``warm_start``). "auto" runs "ipm" for batches that are large for
            their programs' size (on the CPU from 44 programs of m = 96 rows, 207 of m = 44,
            1,000 of m = 20, where it takes down to half of Clarabel's time; on a GPU from 512
            programs of m = 96) (docs/cone.md, "Which forward solver"), and Clarabel otherwise,
            handing the elements Clarabel leaves without a solution or a certificate to "ipm".
        mode: the derivative's linear solve: "dense" (batched LU, CPU or CUDA), or "lsqr"/"lsmr"
            (matrix-free, element by element, for large sparse problems; reverse mode only:
            forward mode, torch.func.jvp, always uses the dense solve).
        on_failure: "raise", "warn" or "ignore" when an element is not solved.
        solver_options: passed to the solver named by ``solver`` (ConeIPMSettings fields for "ipm",
            Clarabel settings attributes, SCS keyword arguments; refused with "auto", which may run
            either: name the solver they are for); their tolerances apply to the program as solved,
            which is equilibrated where its variables or rows differ far in size and scaled to unit
            size where its data are far from it (``cone.scaling``); names
            and values are checked first (unknown
            names, iteration limits below 1, negative or non-finite tolerances, or all-zero
            tolerances that would only run to the limit are refused).
        warm_start: a previous solution of the same shapes (used by SCS).
        max_workers: threads for the batch (default: all cores).
        refine_steps: Newton steps on the residual map after the solver (0 to skip), see refine.py.
        failed_value: what failed elements hold in x, y, s (NaN; ``ConeLayer`` uses 0.0); their
            gradients are zero either way.
        compile: run the batched interior point method ("ipm", or "auto" where it picks "ipm") as
            one ``torch.compile``d call (``fullgraph=True``): its start and all its iterations, in a
            loop on the device, over a batch of fixed shape (on the CPU, equal slices of at least 8
            programs side by side, one compiled call per thread). Opt-in: each
            new program shape costs a compilation of minutes (docs/cone.md, "The compiled
            path"). The refinement and the derivatives run as without it; the answers are the
            eager method's to rounding. Refused with "clarabel" and "scs".

    Returns:
        ConeSolution with x (B, n), y (B, m), s (B, m), status (B,); x, y, s differentiable
        (reverse mode and torch.func.jvp). Shared A and P receive the sum of per-element gradients.
    """
    check_cone_options(solver, mode, on_failure, solver_options, max_workers, refine_steps, failed_value, compile)
    data = prepare_cone(A, b, c, P, cones)
    if data.b.shape[0] == 0:
        return _empty_solution(data)
    automatic = solver == "auto"
    if automatic:
        solver = choose_solver(cones.size, data.b.shape[0], data.b.device)
    warm = None
    if warm_start is not None:
        if not isinstance(warm_start, ConeSolution):
            raise TypeError(f"warm_start must be a ConeSolution (an earlier solve_cone's result) or None, "
                            f"got {type(warm_start).__name__}")
        batch, (m, n) = data.b.shape[0], (data.b.shape[-1], data.c.shape[-1])
        expected = ((batch, n), (batch, m), (batch, m))
        given = tuple(tuple(t.reshape(-1, t.shape[-1]).shape) if t.dim() else () for t in (warm_start.x, warm_start.y, warm_start.s))
        if given != expected:
            raise ValueError(f"warm_start must be a solution of the same shapes: x, y, s of {expected} (batch "
                             f"dimensions flattened), got {given}")
    # The solvers, the refinement and the derivative all work in float64, on the program equilibrated
    # where its variables or rows are far apart in size, its far rows scaled and the whole at unit
    # size (``cone.scaling``); outputs follow the inputs' dtype and scale.
    A, b, c, P = (None if t is None else t.to(torch.float64) for t in (data.A, data.b, data.c, data.P))
    variables, rows = torch.ones_like(c[:1, :1]), torch.ones_like(b[:1, :1])
    scales = equilibration(A, P, cones)  # x = d·x', y = e·y', s = s'/e
    if scales is not None:
        variables, rows = scales
        A, b, c = _scaled_matrix(A, rows, variables), b * rows, c * variables
        P = None if P is None else _scaled_matrix(P, variables, variables)
    far, has_absent = far_row_scales(A, b, c, P, cones)  # far: (B, m) or None: far nonnegative rows scaled, y = r·y', s = s'/r
    absent = None
    if far is not None:
        A, b, rows = A * far.unsqueeze(-1), b * far, rows * far
    if _may_have_absent_bounds(A, b, cones, far, has_absent):
        absent = _absent_bounds(b, cones, has_absent)  # nonnegative rows of side +inf, solved as rows that always hold
        if absent is not None:
            A, b = without_absent(A, b, absent)
    matrix, primal, dual = unit_scales(A, b, c, P)
    x_scale = variables * primal / matrix  # x = d(β/α)x̃
    if warm_start is not None:
        x0, y0, s0 = (t.detach().cpu().double().reshape(data.b.shape[0], -1) / scale
                      for t, scale in ((warm_start.x, x_scale), (warm_start.y, dual * rows), (warm_start.s, primal / rows)))
        if absent is not None:  # an absent bound's s = +inf is, in the program solved (a zero row), its side
            s0 = torch.where(absent.cpu(), (b / primal).detach().cpu().double().expand_as(s0), s0)
        x0, y0, s0 = (t.numpy() for t in (x0, y0, s0))
        warm = tuple(None if not (np.isfinite(x0[i]).all() and np.isfinite(y0[i]).all() and np.isfinite(s0[i]).all())
                     else (x0[i], y0[i], s0[i]) for i in range(len(x0)))
    policy = FailurePolicy(on_failure, failed_value, "cone programs")  # applied inside, so also under vmap
    settings = Settings(cones, solver, mode, dict(solver_options or {}), warm, max_workers, refine_steps, policy, compile,
                        automatic)
    if P is not None:
        ratio = primal / dual / (matrix * matrix)  # (B, 1): a shared P stays shared
        # where every program has the same (read by the host, which torch.func's transforms cannot:
        # there it is one per program)
        one = P.dim() == 2 and not torch._C._are_functorch_transforms_active() and bool((ratio == ratio[0]).all())
        P = P * ratio[0] if one else P * ratio.unsqueeze(-1)
    if A.layout == torch.strided and (torch._C._are_functorch_transforms_active() or bool((matrix != 1).any())):
        A = A / (matrix.unsqueeze(-1) if A.dim() == 3 else matrix)  # (the host's read spares A's copy at unit size)
    x, y, s, status, *_ = ConeProgram.apply(A, b / primal, c / (dual * matrix), P, settings)
    x, y, s = ((t * scale).to(data.b.dtype) for t, scale in ((x, x_scale), (y, dual * rows), (s, primal / rows)))
    if absent is not None:  # y = 0 and s = +inf on an absent bound
        y, s = with_absent(y, s, absent, status == Status.SOLVED)
    if not math.isnan(failed_value):
        solved = (status == Status.SOLVED).unsqueeze(-1)
        x, y, s = (torch.where(solved, t, failed_value) for t in (x, y, s))
    if data.batch is None:
        x, y, s, status = x[0], y[0], s[0], status[0]
    return ConeSolution(x, y, s, status)


def _absent_bounds(b: torch.Tensor, cones: ConeSpec, known: bool | None) -> torch.Tensor | None:
    """(B, m) the nonnegative rows whose side in ``b`` (B, m) is +inf: absent bounds, which ``known``
    (True) says ``far_row_scales`` read there are; otherwise (None) None where there is none, read by the
    host (under torch.func's transforms, which cannot read, the mask). A side of +inf on another cone's
    row stays, and is refused (``validation.cone.check_finite``), as it is where
    ``_may_have_absent_bounds`` does not look (a sparse A; a shared A under vmap)."""
    rows = torch.isposinf(b[:, cones.zero:cones.zero + cones.nonneg])
    absent = torch.cat([torch.zeros_like(b[:, :cones.zero], dtype=torch.bool), rows,
                        torch.zeros_like(b[:, cones.zero + cones.nonneg:], dtype=torch.bool)], -1)
    if known is None and not torch._C._are_functorch_transforms_active() and not bool(absent.any()):
        return None
    return absent


def _may_have_absent_bounds(A: torch.Tensor, b: torch.Tensor, cones: ConeSpec, far: torch.Tensor | None,
                            known: bool | None) -> bool:
    """Whether ``solve_cone`` looks for absent bounds (``_absent_bounds``): where ``far_row_scales``
    read that there are some (``known``, read with its far sides), or gave scales without reading
    (under torch.func's transforms), or did not look at the sides (fewer than two nonnegative rows and
    second-order cones: one host read more, for such small programs only), or under torch.func's
    transforms, where it gives no scales for a 2-D A: there where A is one program's (mapped by vmap
    at some level) or the program is one (b is not mapped either), not beside a shared A under vmap,
    which zeroed rows would copy into every program. Never for a sparse A (its rows are not zeroed)."""
    if A.layout != torch.strided or cones.nonneg == 0 or known is False:
        return False
    if known or far is not None or not looks_at_sides(A, cones):
        return True
    if torch._C._are_functorch_transforms_active():
        return _mapped(A) or not _mapped(b)
    return False


def _mapped(t: torch.Tensor) -> bool:
    """Whether ``t`` is mapped by torch.func.vmap at some level of the transforms it is wrapped in."""
    functorch = torch._C._functorch
    while True:
        if functorch.is_batchedtensor(t):
            return True
        if not functorch.is_functorch_wrapped_tensor(t):
            return False
        t = functorch.get_unwrapped(t)


def _scaled_matrix(M: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """diag(rows) M diag(columns) for M (r, c) shared or (B, r, c), and scalings (1 or B, ·): a shared M
    with one scaling stays shared."""
    if M.dim() == 2 and rows.shape[0] == 1 and columns.shape[0] == 1:
        return M * rows[0].unsqueeze(-1) * columns[0]
    return M * rows.unsqueeze(-1) * columns.unsqueeze(-2)


def _empty_solution(data) -> ConeSolution:
    """The solution of an empty batch: x (0, n), y and s (0, m), joined to the inputs (through a
    zero) so that their gradients are zero, as for any batch whose outputs do not use them."""
    def entries(t: torch.Tensor) -> torch.Tensor:  # a sparse A's stored values (a COO one's once coalesced)
        return t if t.layout == torch.strided else (t.coalesce() if t.layout == torch.sparse_coo else t).values()
    zero = sum(entries(t).sum() for t in (data.A, data.b, data.c, data.P) if t is not None) * 0
    x, y = data.c * 0 + zero, data.b * 0 + zero
    return ConeSolution(x, y, y.clone(), torch.zeros(0, dtype=torch.int64, device=data.b.device))


class ConeLayer(torch.nn.Module):
    """A thin ``nn.Module`` around ``solve_cone`` for a fixed cone and fixed solver settings.

    Failed elements never end a training run unless asked to: by default (``on_failure="warn"``,
    ``failed_value=0.0``) a warning names them, their x, y, s are 0 and their gradients zero;
    ``last_status`` holds the ``Status`` codes of the last forward (also in the returned
    solution's ``status``).

    Args:
        cones: the cone K.
        **options: keyword arguments of ``solve_cone`` (solver, mode, on_failure, solver_options,
            failed_value, ...), checked here.

    Shape:
        forward(A, b, c, P=None) with the shapes of ``solve_cone``; returns a ``ConeSolution``.

    Example:
        >>> layer = ConeLayer(ConeSpec(zero=1, nonneg=2), solver="scs")
        >>> sol = layer(A, b, c)
    """

    def __init__(self, cones: ConeSpec, **options):
        super().__init__()
        options = {"on_failure": "warn", "failed_value": 0.0, **options}
        check_layer_options(cones, options)
        self.cones, self.options = cones, options
        self.last_status: torch.Tensor | None = None

    @opaque_to_user_compile
    def forward(self, A, b, c, P=None) -> ConeSolution:
        sol = solve_cone(A, b, c, self.cones, P, **self.options)
        if not torch._C._are_functorch_transforms_active():
            self.last_status = sol.status.detach()
        return sol

    def extra_repr(self) -> str:
        return f"cones={self.cones}" + "".join(f", {k}={v!r}" for k, v in self.options.items())

