"""Batched primal-dual interior point method for cone programs, on the engine's loop and step.

    minimize c^T x + 1/2 x^T P x   subject to   A x + s = b,  s in K

with K of zero, nonnegative, second-order, PSD and exponential cones (spec.py). The program is
handed to the engine's step (``engine/step.py``) as zero-cone rows (equalities), nonnegative
rows (the diagonal rows of the KKT system) and the other cones' rows, whose plug-ins
(``engine/cones/``) scale them: Nesterov–Todd for the symmetric cones, a primal-dual scaling
(Dahl–Andersen) with a third-order correction for the exponential cones (dual exponential cones
are first mapped to primal ones). This module keeps what is the cone method's own: the start
(x = 0 and the cones' central points, without a feasibility phase), the relative convergence
test, the statuses, and the step's rules (``ConeIPMSettings.rules``).

There are no infeasibility certificates (the QP method's, on the nonnegative rows, are its own
``assess``; cone programs have none, whatever their cones): an element that does not converge
within ``max_iter`` is reported MAX_ITER (NUMERICAL_ERROR if its linear algebra broke down), so
that the caller can hand it to Clarabel. The iterations run on the engine's loop (engine/loop.py): converged
elements are frozen, and leave the working batch when the host looks (host.py); the
iterations themselves make no host synchronisation.
"""
from __future__ import annotations

import dataclasses

import torch

from optlayers import threads
from optlayers.compiling import compiled, owned
from optlayers.cone import exp as exp_module
from optlayers.cone import nonneg, psd, soc
from optlayers.cone.spec import ConeSpec
from optlayers.cone.status import ConeStatus
from optlayers.engine import cones as cone_parts
from optlayers.engine import device_loop, loop
from optlayers.engine.cones import svec
from optlayers.engine.constants import constant, made_once
from optlayers.engine.graphed import GraphedStep, linalg_key, replays_graphs
from optlayers.engine.cones.exponential import DEGREE as EXP_DEGREE
from optlayers.engine.cones.symmetric import all_finite
from optlayers.engine.kkt import next_regularisation
from optlayers.engine.step import ConeRows, QPData, State, StepRules, newton_step
from optlayers.host import RUNNING
from optlayers.linalg import inf_norm, mtv, mv


# A CPU batch is cut into slices on parallel threads only above this many matrix entries
# (batch x (m + n) x n). The iteration makes ~1,000 small torch operations (at this size mostly per-element
# library calls and dispatch): on two
# cores, m = 96, n = 48, two slices of 64 ran 15 % slower than one batch of 128 (the threads
# queue on the GIL), two slices of 256 ran 15-20 % faster than one batch of 512.
_MIN_SLICE_ENTRIES = 1_500_000
# A compiled solve (``ConeIPMSettings.compiled``), one call that releases the GIL, is cut into
# slices of at least this many programs.
_MIN_COMPILED_SLICE = 8


@dataclasses.dataclass(frozen=True)
class ConeIPMSettings:
    """Hyperparameters (immutable); ``solve_cone(solver="ipm", solver_options={...})`` sets them.

    Attributes:
        tol: relative primal, dual and gap residual at which an element stops. 1e-8 as
            Clarabel: the Newton refinement after the solver takes most elements to round-off,
            but a degenerate element it cannot improve keeps this accuracy (1e-6 left such
            elements 1e-3 off on badly scaled rows).
        inaccurate_tol: an element that stalls (on an exponential cone the membership test
            loses its digits near the boundary) or runs out of iterations with a residual below
            this is returned INACCURATE, for the refinement to finish; above, it has failed.
        max_iter: iteration limit (elements of the cone benchmark's programs take 9-13; 60 leaves room
            for badly scaled ones before Clarabel takes over).
        step_fraction, backtrack, max_backtracks: the step's rules of these names
            (``engine.step.StepRules``, whose defaults they take).
        soc_step_fraction: the fraction of the step to the second-order cones' boundary that
            is taken (``StepRules.soc_step_fraction``). 0.98: at 0.99 the iterates come so close
            to that boundary that the next steps are cut short again (two thirds of the cone
            benchmark's steps were cut by a second-order cone); 0.98 took 3 % fewer iterations
            on its programs and 6-12 % fewer on programs of second-order cones, and the slowest
            elements 3-4 fewer. Lower for all cones slowed the nonnegative and exponential ones
            (docs/cone.md, "Iterations against Clarabel").
        centring_power: p of the centring σ = (1 − α_aff)ᵖ. 2: less centring after a long
            affine step than Clarabel's 3; on the cone benchmark's programs 4-5 % fewer
            iterations, on the second-order and exponential kinds of
            ``benchmarks/cone_fallbacks.py`` 4 %, on the nonnegative and PSD kinds 4 % more.
        nonneg_step_fraction: the fraction of the step to the nonnegative rows' boundary that
            is taken. 0.999, as linear programming's interior point codes (0.995-0.99995):
            near the solution the step to that boundary is just above 1, and 0.99 of it leaves
            1 % of the residuals for another iteration; 12-13 % fewer iterations on programs of
            nonnegative rows alone, the cone benchmark's unchanged (with the cube centring, QPs
            whose nonnegative rows are not strictly complementary failed twice as often; with
            the square as often as at 0.99).
        reg: regularisation of the reduced KKT system, small enough (1e-10) to move the steps
            far less than the tolerance; ``kkt_refine_steps`` of iterative refinement remove it.
            Where a factorisation fails, that element retries in the next iteration with its
            regularisation multiplied by 100 (at most four times in a row); it falls back
            towards ``reg`` after each sound step.
        kkt_refine_steps: iterative refinement steps per Newton solve (0: none were needed).
        compiled: run the start and every iteration as one ``torch.compile``d call
            (``fullgraph=True``; ``solve_cone(compile=True)``): the iterations in a
            ``while_loop`` on the device until no element runs or ``max_iter``, the same
            ``_start`` and ``_step`` as the eager path. The batch keeps its shape (finished
            elements stay in it, frozen, as on an accelerator between the host's looks); on the CPU
            the batch is cut into equal slices of at least ``_MIN_COMPILED_SLICE`` programs, one
            compiled call each on parallel threads (``solve``); one compilation per slice shape and
            cone list.
    """

    tol: float = 1e-8
    inaccurate_tol: float = 1e-5
    max_iter: int = 60
    step_fraction: float = StepRules.step_fraction
    backtrack: float = StepRules.backtrack
    max_backtracks: int = StepRules.max_backtracks
    reg: float = 1e-10
    kkt_refine_steps: int = 0
    compiled: bool = False
    soc_step_fraction: float = 0.98
    nonneg_step_fraction: float = 0.999
    centring_power: int = 2

    @property
    def rules(self) -> StepRules:
        """The step's rules (``engine.step``): the centring σ = (1 − α_aff)ᵖ (Clarabel's, whose p is 3), no merit
        search, a full step where it stays ``step_fraction`` inside the cones, the nonnegative
        rows' W⁻¹ = λ/s unregularised, no refinement of the predictor, solves through kkt's
        Y = L⁻¹Cᵀ."""
        return StepRules(centring="affine_step", full_steps=True, solve_through_y=True, step_fraction=self.step_fraction,
                         refine_steps=self.kkt_refine_steps, backtrack=self.backtrack, max_backtracks=self.max_backtracks,
                         soc_step_fraction=self.soc_step_fraction, centring_power=self.centring_power,
                         nonneg_step_fraction=self.nonneg_step_fraction)

    def __post_init__(self) -> None:
        for name in ("max_iter", "max_backtracks", "kkt_refine_steps", "centring_power"):
            value = getattr(self, name)
            least = 1 if name in ("max_iter", "max_backtracks", "centring_power") else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"ConeIPMSettings.{name} must be an int >= {least}, got {value!r}")
        for name, lo, hi in (("tol", 0.0, 1.0), ("inaccurate_tol", 0.0, 1.0), ("step_fraction", 0.0, 1.0),
                             ("soc_step_fraction", 0.0, 1.0), ("nonneg_step_fraction", 0.0, 1.0),
                             ("backtrack", 0.0, 1.0), ("reg", 0.0, 1.0)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo < value < hi:
                raise ValueError(f"ConeIPMSettings.{name} must be a number in ({lo}, {hi}), got {value!r}")
        if not isinstance(self.compiled, bool):
            raise ValueError(f"ConeIPMSettings.compiled must be True or False, got {self.compiled!r}")
        if self.inaccurate_tol < self.tol:
            raise ValueError(f"ConeIPMSettings.inaccurate_tol ({self.inaccurate_tol}) must be >= tol ({self.tol})")


def solve(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None, spec: ConeSpec,
          settings: ConeIPMSettings = ConeIPMSettings(), max_slices: int | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve a batch: A (B, m, n), b (B, m), c (B, n), P (B, n, n), shared (n, n) or None; float64.

    Returns x (B, n), y (B, m), s (B, m) and status (B,) int64 (ConeStatus: SOLVED, INACCURATE,
    MAX_ITER or NUMERICAL_ERROR); every element holds its last iterate. A large CPU batch is
    solved in at most ``max_slices`` (default: torch's thread count) slices on parallel threads
    (threads.py), with the same result; with ``settings.compiled`` in equal slices
    (``threads.equal_slice_count``), each one compiled call.
    """
    if any(t.dtype != torch.float64 for t in (A, b, c)) or (P is not None and P.dtype != torch.float64):
        raise TypeError("A, b, c and P must be float64 (solve_cone converts its inputs)")
    if max_slices is not None and (not isinstance(max_slices, int) or max_slices < 1):
        raise ValueError(f"max_slices must be an int >= 1 or None, got {max_slices!r}")
    if A.dim() != 3 or b.shape != A.shape[:2] or c.shape != (A.shape[0], A.shape[2]):
        raise ValueError(f"A must be (B, m, n), b (B, m) and c (B, n); got A {tuple(A.shape)}, b {tuple(b.shape)}, "
                         f"c {tuple(c.shape)}")
    batch, m, n = A.shape
    if P is not None:
        if P.shape[-2:] != (n, n) or P.dim() not in (2, 3) or (P.dim() == 3 and P.shape[0] != batch):
            raise ValueError(f"P must be (n, n) = ({n}, {n}) or (B, n, n) = ({batch}, {n}, {n}), got {tuple(P.shape)}")
        P = P.expand(batch, n, n)
    if spec.size != m:
        raise ValueError(f"spec covers {spec.size} rows but A has m = {m}")
    if settings.compiled:
        count = threads.equal_slice_count(batch, 1, A.device, _MIN_COMPILED_SLICE, max_slices)
    else:
        count = threads.slice_count(batch, (m + n) * n, A.device, _MIN_SLICE_ENTRIES)
        count = min(count, max_slices or count)
    parts = threads.map_slices(
        lambda part: _solve(A[part], b[part], c[part], None if P is None else P[part], spec, settings), batch, count)
    return tuple(torch.cat(outputs) for outputs in zip(*parts))


def parts_of(spec: ConeSpec) -> list[cone_parts.Part]:
    """The non-zero cones of ``spec`` as the engine's parts (``engine.cones.Part``), offsets counted
    from the first non-zero row."""
    parts = []
    for block in spec.blocks():
        if block.module is nonneg:
            kind, degree = "nonneg", 1
        elif block.module is soc:
            kind, degree = "soc", 1
        elif block.module is psd:
            kind, degree = "psd", svec.order(block.size)
        elif block.module is exp_module:
            kind, degree = "exp", EXP_DEGREE
        else:
            continue
        parts.append(cone_parts.Part(kind, block.start - spec.zero, block.count, block.size, degree, block.dual))
    return parts


def _solve(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None, spec: ConeSpec,
           settings: ConeIPMSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``solve`` for one slice: set up, then iterate and map back (``_solved``; one compiled call
    with ``settings.compiled``)."""
    parts = tuple(parts_of(spec))
    program, step_parts = _setup(A, b, c, P, spec, parts, workspace=not (settings.compiled or _graphed(A.device, settings, parts)))
    solved = compiled(_solved, A.device.type) if settings.compiled else _solved
    return solved(program, step_parts, parts, settings)


def _solved(program: _Program, step_parts: tuple[cone_parts.Part, ...], parts: tuple[cone_parts.Part, ...],
            settings: ConeIPMSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, y, s and the statuses of the program set up by ``_setup``: iterate, map back."""
    st, status = _iterate(program, step_parts, settings)
    y_k, s_k = _from_primal_exp(torch.cat([st.lam, st.y_k], -1), torch.cat([st.s, st.s_k], -1), parts)
    return st.x, torch.cat([st.nu, y_k], -1), torch.cat([torch.zeros_like(st.nu), s_k], -1), status


@dataclasses.dataclass(frozen=True)
class _Program:
    """The program as the loop carries it: P (B, n, n) or None (no quadratic term), c (B, n), and
    all rows at once, A (B, m, n) and b (B, m), with the dual exponential rows mapped to primal
    ones, as the residuals read them; the engine's rows are views of them (``split``), so that
    dropping finished elements from the working batch copies A once (and no zero P: ``Q`` is
    one zero matrix read B times). ``zero`` and ``nonneg`` count the zero-cone and nonnegative
    rows (the first rows, in SCS order). ``workspace``: () or the step's buffers for the whole
    batch (``cone_parts.StepWorkspace``: the block-diagonal scaling matrix, zero outside its
    blocks, so that each iteration writes only its blocks, where a fresh zero-filled one per
    iteration was the most written tensor of the step; the scaled rows and H, so that their pages
    are not handed back and faulted in again), kept over the iterations; a tuple, so that the
    loop's ``take`` (which indexes tensor fields) leaves it whole: a working batch of B' elements
    takes its first B' matrices."""

    P: torch.Tensor | None
    c: torch.Tensor
    A: torch.Tensor
    b: torch.Tensor
    workspace: tuple[cone_parts.StepWorkspace, ...]
    zero: int
    nonneg: int

    @property
    def quadratic(self) -> bool:
        return self.P is not None

    @property
    def Q(self) -> torch.Tensor:
        """P, or zeros (B, n, n)."""
        if self.P is not None:
            return self.P
        batch, n = self.c.shape
        return _zero_matrix(n, self.c.device, self.c.dtype).expand(batch, n, n)

    def split(self) -> tuple[QPData, ConeRows]:
        """The engine's form: zero-cone rows as equalities, nonnegative rows as its diagonal rows,
        the others as cone rows."""
        A, b, z, k = self.A, self.b, self.zero, self.zero + self.nonneg
        workspace = self.workspace[0].first(len(A)) if self.workspace else None
        return (QPData(self.Q, self.c, A[:, :z], b[:, :z], A[:, z:k], b[:, z:k]),
                ConeRows(A[:, k:], b[:, k:], workspace, self.quadratic))


@made_once
def _zero_matrix(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A (1, n, n) zero matrix, made once per size, device and dtype."""
    return torch.zeros(1, n, n, device=device, dtype=dtype)


def _setup(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None, spec: ConeSpec,
           parts: tuple[cone_parts.Part, ...], workspace: bool = True) -> tuple[_Program, tuple[cone_parts.Part, ...]]:
    """The program with the dual exponential rows mapped to primal ones, and the parts of the cone
    rows other than the nonnegative ones, counted from the first of them; with ``workspace``, the
    step's buffers kept over the iterations (``_Program``; a compiled loop's body may not write
    into its inputs, and makes them in each step instead)."""
    batch, _, n = A.shape
    if any(part.dual for part in parts):
        T = cone_parts.device_constant(exp_module.DUAL_TO_PRIMAL, A)
        A, b = A.clone(), b.clone()
        for part in (part for part in parts if part.dual):
            rows = slice(spec.zero + part.start, spec.zero + part.stop)
            A[:, rows] = (T @ cone_parts.piece(A[:, spec.zero:], part)).reshape(batch, -1, n)
            b[:, rows] = (cone_parts.piece(b[:, spec.zero:], part) @ T.mT).reshape(batch, -1)
    step_parts = tuple(dataclasses.replace(part, start=part.start - spec.nonneg) for part in parts if part.kind != "nonneg")
    kept = cone_parts.step_workspace(step_parts, batch, n, A) if workspace else None
    return _Program(P, c, A, b, () if kept is None else (kept,), spec.zero, spec.nonneg), step_parts


def _from_primal_exp(y: torch.Tensor, s: torch.Tensor, parts: tuple[cone_parts.Part, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo ``_setup``'s map on the dual exponential rows: y = T^T y', s = T^-1 s'."""
    if not any(part.dual for part in parts):
        return y, s
    T = cone_parts.device_constant(exp_module.DUAL_TO_PRIMAL, y)
    T_inv = cone_parts.device_constant(exp_module.PRIMAL_TO_DUAL, y)
    y, s = y.clone(), s.clone()
    for part in (part for part in parts if part.dual):
        y[:, part.start:part.stop] = (cone_parts.piece(y, part) @ T).reshape(y.shape[0], -1)
        s[:, part.start:part.stop] = (cone_parts.piece(s, part) @ T_inv.mT).reshape(s.shape[0], -1)
    return y, s


@dataclasses.dataclass(frozen=True)
class _Residuals:
    """r_d (B, n), r_e (B, z) on the equality rows, r_i (B, k) on the nonnegative rows, r_k
    (B, m_K) on the other cones' rows, the mean complementarity mu and the relative error (B,)."""

    r_d: torch.Tensor
    r_e: torch.Tensor
    r_i: torch.Tensor
    r_k: torch.Tensor
    mu: torch.Tensor
    error: torch.Tensor


def _norms(*parts: torch.Tensor) -> torch.Tensor:
    """The infinity norms of the (B, ·) tensors ``parts`` of one shape, (len(parts), B); zeros
    where they are empty."""
    if not parts[0].shape[-1]:
        return parts[0].new_zeros(len(parts), parts[0].shape[0])
    return inf_norm(torch.stack(parts))  # one reduction (on an accelerator), no |parts| written


def _residuals(program: _Program, st: State, degree: int) -> _Residuals:
    """r_d = P x + A^T y + c, r_e = A_z x - b_z, r_i and r_k = A x + s - b on the cone rows, and
    the relative error: the largest of the primal and dual residuals and the gap s^T y, each
    divided by 1 + the size of its terms. One pass over all rows of A for A x and one for A^T y;
    the norms of each residual and its terms stacked, and s^T y, b^T y as one product."""
    x, z, k = st.x, st.m, st.k
    y = torch.cat([st.nu, st.lam, st.y_k], -1)
    s = torch.cat([constant(0.0, st.v).expand_as(st.nu), st.s, st.s_k], -1)
    ax, aty = mv(program.A, x), mtv(program.A, y)
    r_p = ax + s - program.b
    if program.quadratic:
        px = mv(program.Q, x)
        r_d = px + aty + program.c
        dual_norms = _norms(r_d, program.c, aty, px)
        cx = ((program.c + px) * x).sum(-1, keepdim=True)  # c^T x + x^T P x
    else:
        r_d = aty + program.c
        dual_norms = _norms(r_d, program.c, aty, aty)  # aty twice: as many terms as the primal's
        cx = (program.c * x).sum(-1, keepdim=True)
    norms = torch.stack([_norms(r_p, program.b, ax, s), dual_norms])  # (2, 4, B): residual, then its terms
    relative = norms[:, 0] / (1 + norms[:, 1:].amax(1))  # primal, dual (2, B)
    sy_by = mv(torch.stack([s, program.b], -2), y)  # (B, 2): s^T y, b^T y
    complementarity = sy_by[:, 0]
    gap = complementarity / (1 + torch.cat([cx, sy_by[:, 1:]], -1).abs().amax(-1))
    return _Residuals(r_d, r_p[:, :z], r_p[:, z:z + k], r_p[:, z + k:], complementarity / degree,
                      torch.cat([relative, gap.abs().unsqueeze(0)]).amax(0))


def _converged(st: State, res: _Residuals, settings: ConeIPMSettings) -> State:
    """``st`` with the running elements whose error is within ``settings.tol`` SOLVED."""
    return dataclasses.replace(st, status=st.status.masked_fill((st.status == RUNNING) & (res.error <= settings.tol),
                                                                int(ConeStatus.SOLVED)))


def _start(program: _Program, parts: tuple[cone_parts.Part, ...], degree: int,
           settings: ConeIPMSettings) -> tuple[State, _Residuals]:
    """x = 0, nu = 0 and s = y at the cones' central points; its residuals and convergence test."""
    c = program.c
    (batch, n), z, k = c.shape, program.zero, program.nonneg
    mk = program.b.shape[-1] - z - k
    centre, ones = cone_parts.central_point(list(parts), batch, c), c.new_ones(batch, 2 * k)
    v = torch.cat([c.new_zeros(batch, n + z), ones, centre, centre], -1)
    zeros = torch.zeros(batch, dtype=torch.int64, device=v.device)
    no = torch.zeros(batch, dtype=torch.bool, device=v.device)
    st = State(v, torch.full_like(zeros, RUNNING), zeros, zeros.new_zeros(batch, 3),
               v.new_full((batch,), settings.reg), no, no, n, z, k, mk)
    res = _residuals(program, st, degree)
    return _converged(st, res, settings), res


def _step(program: _Program, st: State, res: _Residuals, parts: tuple[cone_parts.Part, ...], degree: int,
          settings: ConeIPMSettings) -> tuple[State, _Residuals]:
    """The engine's step where an element runs and the step is sound (its factorisation
    succeeded, it is finite, it stays inside the exponential cones), then the residuals and the
    convergence test at the new point. A failed factorisation is retried in the next iteration
    with more regularisation; other failures keep their last iterate: INACCURATE if close, else
    NUMERICAL_ERROR."""
    step = newton_step(*program.split(), parts, st, res, None, settings.rules)
    moved = torch.addcmul(st.v, step.alpha.unsqueeze(-1), step.dv)
    finite = all_finite(moved)  # the step and its length finite (and no overflow)
    ok = step.factor_ok & finite if step.inside is None else step.factor_ok & finite & step.inside
    running = st.status == RUNNING
    advance = running & ok
    retry, reg = next_regularisation(st.reg, settings.reg, running, step.factor_ok, advance)
    # INACCURATE and NUMERICAL_ERROR as cached 0-d int64 tensors (a Python number in torch.where is a tensor per call)
    inaccurate, numerical_error = (constant(int(status), st.status) for status in (ConeStatus.INACCURATE, ConeStatus.NUMERICAL_ERROR))
    failed = torch.where(res.error <= settings.inaccurate_tol, inaccurate, numerical_error)
    v = torch.where(advance.unsqueeze(-1), moved, st.v)
    fails = running > (ok | retry)  # running, and neither stepping nor retrying
    st = dataclasses.replace(st, v=v, status=torch.where(fails, failed, st.status),
                             iterations=st.iterations + advance, reg=reg)
    res = _residuals(program, st, degree)
    return _converged(st, res, settings), res


def _iterate(program: _Program, parts: tuple[cone_parts.Part, ...],
             settings: ConeIPMSettings) -> tuple[State, torch.Tensor]:
    """The interior point method on the engine's loop (``engine.loop.run``; with
    ``settings.compiled`` on the device, ``_on_device``): the last state and status of every
    element. Elements still running after ``max_iter`` steps are INACCURATE if their error is
    within ``inaccurate_tol``, else MAX_ITER."""
    degree = max(program.nonneg + cone_parts.degree(parts), 1)
    st, res = _start(program, parts, degree, settings)
    step = lambda program, st, res: _step(program, st, res, parts, degree, settings)  # noqa: E731
    graphed = _graphed(program.c.device, settings, parts)
    if graphed:  # one CUDA graph replay per iteration (``engine.graphed``), over a batch that keeps its shape
        plain = step
        replayed = GraphedStep(lambda program, _, st, res: plain(program, st, res), ("cone", parts, degree, settings, *linalg_key()))
        step = lambda program, st, res: replayed(program, _NO_UNITS, st, res)  # noqa: E731
    if settings.compiled:
        full, res = _on_device(program, st, res, step, settings.max_iter)
        error = res.error
    else:
        out = loop.run((program,), st, res, step, settings.max_iter, program.c.device, compact=not graphed)
        full, error = out.state, out.working_res.error
        if graphed:  # out of the graph's buffers, which the next solve's replays overwrite
            full, error = owned(full), error.clone()
        if out.index is not None:  # the elements outside the working batch have finished
            error = error.new_full(full.status.shape, float("inf")).index_copy(0, out.index, error)
    close = torch.where(error <= settings.inaccurate_tol, int(ConeStatus.INACCURATE), int(ConeStatus.MAX_ITER))
    return full, torch.where(full.status == RUNNING, close, full.status)


@dataclasses.dataclass(frozen=True)
class _NoUnits:
    """The units argument of ``GraphedStep``'s step signature, which the cone step does not take."""


_NO_UNITS = _NoUnits()


def _graphed(device: torch.device, settings: ConeIPMSettings, parts: tuple[cone_parts.Part, ...]) -> bool:
    """Whether the eager step runs as a ``GraphedStep`` (on CUDA, ``engine.graphed.EAGER_GRAPHS``),
    where it has no PSD cone: their scalings and step lengths call ``torch.linalg.svd`` and
    ``eigvalsh``, which on CUDA read their error codes on the host, and a capture fails on such a
    read. (The compiled solve runs its loop on the device instead, ``_on_device``.)"""
    return not settings.compiled and replays_graphs(device, False) and not any(part.kind == "psd" for part in parts)


def _on_device(program: _Program, st: State, res: _Residuals, step: loop.Step, max_iter: int) -> tuple[State, _Residuals]:
    """``step`` from ``st`` (with residuals ``res``) until no element runs or after ``max_iter``
    steps, on the engine's device loop (``engine.device_loop.run``: a ``while_loop``, no host look;
    the loop of a compiled solve). Finished elements stay in the batch, frozen by the step's masks."""
    kinds = (State, _Residuals)
    where = device_loop.layout(st, res)

    def proceeds(j: torch.Tensor, st: State, res: _Residuals) -> torch.Tensor:
        return (st.status == RUNNING).any() & (j < max_iter)

    packed, _ = device_loop.run((program,), device_loop.pack(st, res), where, kinds, step, proceeds)
    return device_loop.unpack(packed, where, kinds)
