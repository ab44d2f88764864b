"""The interior point step shared by the QP and the cone methods: one Mehrotra
predictor-corrector direction and its step length, with no host synchronisation.

The program is

    minimize ½xᵀQx + pᵀx   subject to   A x = b,   G x + s = h, s ≥ 0,   A_K x + s_K = b_K, s_K ∈ K

with equality rows (A, b), nonnegative rows (G, h) and the rows of the other cones (``ConeRows``,
described by ``cones.Part``s: second-order, PSD, exponential). The nonnegative rows enter the KKT
system as its diagonal W⁻¹ = λ/(s + δᵢλ) rows (``engine/kkt.py``: the stiff split and the diagonal
path apply to them); each other cone's scaling V (VᵀV = (WᵀW)⁻¹, ``engine/cones/``) is folded
into the H handed to ``kkt.factor_kkt``: H = Q + A_Kᵀ VᵀV A_K. The iterate is one tensor
v = [x, ν, λ, s, y_K, s_K] (``State``).

One step (``newton_step``):

1. factorise the KKT system at the current point;
2. predictor: the affine direction (complementarity right-hand side −s∘λ, and −s_K on the cone
   rows) and its longest step to the boundary α_aff;
3. centring σμ: ``rules.centring`` "mehrotra", σ = (μ_aff / μ)³ (μ_aff the mean complementarity
   after the affine step; the QP's), or "affine_step", σ = (1 − α_aff)ᵖ (the cone method's, as
   Clarabel, whose p is 3; ``rules.centring_power``);
4. corrector: the combined right-hand side (σμ − s∘λ − ds∘dλ on the nonnegative rows, each
   cone's ``combined_rhs`` on its own), the same factorisation;
5. step length: ``step_fraction`` of the step to the boundary (at most 1, or with
   ``full_steps`` a full step where it stays that fraction inside), shortened until the
   exponential cones hold it (``cones.exp_step``), and with ``merit`` the merit search below.

Each method passes its rules (``StepRules``), held by its settings (``qp.ipm.IPMSettings``,
``cone.interior.solver.ConeIPMSettings``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from optlayers.engine import cones as cone_parts
from optlayers.engine.constants import constant
from optlayers.engine.kkt import KKTFactor, factor_kkt, solve_reduced
from optlayers.linalg import mv

# For the derivatives, inequalities with W⁻¹ = λ/s above this (scaled units) are kept out of H
# and handled like equalities (see ``kkt.KKTFactor``): near-active rows would otherwise make H
# as ill-conditioned as 1/tol and cost the derivatives digits.
STIFF_W_INV = 1.0

# Along a step the residuals shrink like (1 − α), but for a QP the mean complementarity
# μ(α) = μ + α(σ − 1)μ + α² dsᵀdλ / k has a positive quadratic term (dsᵀdλ = dxᵀQ dx on a
# feasible iterate), so a long step can raise it; predictor-corrector iterates can then cycle
# (seen on a 2-variable QP whose solution is interior). Steps are shortened until the merit
# μ(α) + (1 − α)·‖r‖ falls by at least this fraction of α, trying α, αβ, αβ², ...
_MERIT_DECREASE = 0.01
BACKTRACK = 0.7
BACKTRACK_STEPS = 12


@dataclass(frozen=True)
class StepRules:
    """How ``newton_step`` steps. Each method's settings hold theirs (``rules``), built from their
    own options; the defaults here are the ones both methods share.

    Attributes:
        centring: "mehrotra" or "affine_step" (see the module docstring).
        centring_power: the exponent p of the "affine_step" centring σ = (1 − α_aff)ᵖ.
        merit: shorten steps by the merit search (nonnegative rows only).
        full_steps: a full step where it stays ``step_fraction`` inside; else at most
            ``step_fraction``.
        step_fraction: fraction of the step to the boundary that is taken (0.99, as Clarabel's
            max_step_fraction); on exponential cones the step must stay inside when divided by
            it, so that every cone keeps the same margin.
        ineq_reg: δᵢ of W⁻¹ = λ/(s + δᵢλ) on the nonnegative rows.
        refine_steps: iterative refinement steps of the corrector's solve.
        predictor_refine_steps: ... and of the predictor's, which only sets the centring and
            the corrector's second-order term.
        solve_through_y: solve through kkt's Y = L⁻¹Cᵀ (``kkt.solve_reduced``'s ``use_y``).
        backtrack: factor by which a step that leaves an exponential cone is shortened, after
            the fine first trials (``cones._EXP_FINE_FACTOR``) (0.8: finer factors changed the
            iteration count by < 3 % and failed more often).
        max_backtracks: shortenings before an element is declared a numerical failure
            (0.8^40 ≈ 1e-4).
        soc_step_fraction, nonneg_step_fraction: the fraction of the step to the second-order
            cones' boundary, and to the nonnegative rows', that the step may take (None:
            ``step_fraction``); the other cones keep ``step_fraction``.
        augment: factorise H + σAᵀA in place of H (``kkt.factor_kkt``'s ``augment``).
        balanced_step_fraction: where a problem's μ is at least ``balance`` times its largest
            scaled residual (``res.scaled``), the fraction of the step to the boundary taken in
            place of ``step_fraction`` (None: ``step_fraction`` everywhere). Where μ has fallen far
            below the residuals, the iterate is nearing the boundary away from a solution, and a
            step closer to the boundary only drives μ down faster (to underflow). Nonnegative rows
            only (no other cones), without ``full_steps`` and without ``nonneg_step_fraction``.
        balance: see ``balanced_step_fraction``.
    """

    centring: str = "mehrotra"
    centring_power: int = 3
    merit: bool = False
    full_steps: bool = False
    step_fraction: float = 0.99
    ineq_reg: float = 0.0
    refine_steps: int = 0
    predictor_refine_steps: int = 0
    solve_through_y: bool = False
    backtrack: float = 0.8
    max_backtracks: int = 40
    soc_step_fraction: float | None = None
    nonneg_step_fraction: float | None = None
    augment: bool = False
    balanced_step_fraction: float | None = None
    balance: float = 1e-3

    def __post_init__(self) -> None:
        if self.balanced_step_fraction is not None and self.full_steps:
            raise ValueError("StepRules: balanced_step_fraction needs full_steps=False")
        if self.balanced_step_fraction is not None and self.nonneg_step_fraction is not None:
            raise ValueError("StepRules: balanced_step_fraction and nonneg_step_fraction both set the nonnegative rows' "
                             f"fraction; give one, got {self.balanced_step_fraction} and {self.nonneg_step_fraction}")


@dataclass(frozen=True)
class QPData:
    """The data of the step: a batch of B QPs, minimize ½xᵀQx + pᵀx s.t. Ax = b, Gx ≤ h (a cone
    program's Q, c, its zero rows and its nonnegative rows; its other cones' rows are ``ConeRows``).

    Shapes: Q (B, n, n), p (B, n), A (B, m, n), b (B, m), G (B, k, n), h (B, k).
    ``diagonal``: every Q is diagonal and no row of G has two nonzeros, so that the interior point
    method's H = Q + Gᵀ W G is diagonal (``kkt.diagonal_h``; False: not known).
    """

    Q: Tensor
    p: Tensor
    A: Tensor
    b: Tensor
    G: Tensor
    h: Tensor
    diagonal: bool = False


@dataclass(frozen=True)
class ConeRows:
    """The rows of the cones other than the nonnegative one: A_K (B, m_K, n), b_K (B, m_K), and
    optionally a workspace (``cones.StepWorkspace``) that each step writes its scalings'
    block-diagonal matrix, the scaled rows and H into (None: fresh ones per step). ``quadratic`` False: the program's
    Q is zero, and is neither added to H (H = A_Kᵀ VᵀV A_K is formed by one product instead of
    added to a zero matrix) nor multiplied by the step (``Step.q_dx`` is None)."""

    A: Tensor
    b: Tensor
    workspace: cone_parts.StepWorkspace | None = None
    quadratic: bool = True


@dataclass(frozen=True)
class State:
    """Iterate and per-problem bookkeeping; all tensors have leading batch dimension B.

    The primal-dual point lives in one tensor ``v`` = [x, ν, λ, s, y_K, s_K] (B, n + m + 2k + 2m_K),
    so that a step updates all of it with one operation; ``x``, ``nu``, ``lam``, ``s``, ``y_k``,
    ``s_k`` are views of it. ``counters`` holds the consecutive-iteration counts (stalls, primal
    and dual infeasibility certificates; for the QP also iterations without progress) side by side,
    ``reg`` each problem's primal/equality regularisation (raised where a factorisation fails; see
    ``kkt.next_regularisation``), ``stiff`` (B,) the problems that keep their near-active inequalities out of H (see
    ``newton_step``), and ``stiff_tried`` (B,) those that have been switched to that split once.
    ``best`` and ``best_v``, where a method tracks progress (the QP's ``ipm.assess``; None
    otherwise): the measures of progress at each problem's last progress (B, ·) and its iterate then
    (laid out as ``v``), to which a problem that stops progressing returns.
    """

    v: Tensor
    status: Tensor
    iterations: Tensor
    counters: Tensor
    reg: Tensor
    stiff: Tensor
    stiff_tried: Tensor
    n: int
    m: int
    k: int
    mk: int = 0
    best: Tensor | None = None
    best_v: Tensor | None = None

    @property
    def x(self) -> Tensor:
        return self.v[:, : self.n]

    @property
    def nu(self) -> Tensor:
        return self.v[:, self.n : self.n + self.m]

    @property
    def lam(self) -> Tensor:
        return self.v[:, self.n + self.m : self.n + self.m + self.k]

    @property
    def s(self) -> Tensor:
        return self.v[:, self.n + self.m + self.k : self.n + self.m + 2 * self.k]

    @property
    def lam_s(self) -> Tensor:
        """(B, 2, k) view of λ and s: the pair that must stay positive."""
        return self.v[:, self.n + self.m : self.n + self.m + 2 * self.k].unflatten(-1, (2, self.k))

    @property
    def y_k(self) -> Tensor:
        start = self.n + self.m + 2 * self.k
        return self.v[:, start : start + self.mk]

    @property
    def s_k(self) -> Tensor:
        return self.v[:, self.n + self.m + 2 * self.k + self.mk :]

    def split(self) -> tuple[Tensor, ...]:
        """(x, ν, λ, s, y_K, s_K), the same views as the properties, taken in one operation where
        several are read at once (each property is a slicing of its own)."""
        return self.v.split([self.n, self.m, self.k, self.k, self.mk, self.mk], -1)


@dataclass(frozen=True)
class Step:
    """A Newton direction dv (B, ·) laid out as ``State.v``, Q dx (None where the cone rows say
    Q is zero), the step length α (B,), the factorisation's health (B,) and, where exponential
    cones were searched, whether a step inside them was found (B,; None: no search)."""

    dv: Tensor
    q_dx: Tensor | None
    alpha: Tensor
    factor_ok: Tensor
    inside: Tensor | None = None


def max_step(w: Tensor, dw: Tensor, cap: float = 1.0, scale: float | Tensor = 1.0) -> Tensor:
    """``scale`` (a number, or (B,): each problem's) times the largest α ≤ ``cap`` with w + α dw ≥ 0
    over the last two dimensions of (B, 2, k), per problem, for w ≥ 0: α = 1 / max(1/cap, maxᵢ −dwᵢ/wᵢ),
    in four kernels (five with a number ``scale``, six with a (B,) one). An entry with wᵢ = dwᵢ = 0
    (0/0) does not limit the step (an s that is exactly 0 has ds = 0 in the predictor; ``fmin``
    ignores its NaN); one with wᵢ = 0 > dwᵢ allows no step."""
    lowest = torch.fmin(dw / w, constant(-1.0 / cap, w)).amin((-2, -1))  # −1/α
    if not isinstance(scale, Tensor) and scale == 1.0:
        return torch.div(constant(-1.0, lowest), lowest)  # correctly rounded, as (1/lowest)·(−1)
    return lowest.reciprocal().mul(-scale)


def _merit_step(dw: Tensor, b4: Tensor, alpha: Tensor, res, factors: Tensor) -> Tensor:
    """The longest candidate step α·βʲ (``factors`` (B, j) holds βʲ, β = ``BACKTRACK``) with
    sufficient merit decrease (see above); ``alpha`` itself where none has it (shorter steps would
    only crawl). ``dw`` (B, 2, k) is the direction of (λ, s), ``b4`` (B, k) = s∘dλ + λ∘ds; ‖r‖ is
    the largest entry of the scaled residuals (``res.scaled``).

    With μ(a) = μ + a·c₁ + a²·c₂ (c₁ = Σb4/k, c₂ = dsᵀdλ/k) the test
    μ(a) + (1 − a)‖r‖ ≤ (1 − δa)(μ + ‖r‖) reads, multiplied by k/a > 0,
    k·c₁ + a·k·c₂ ≤ k((1 − δ)‖r‖ − δμ). The first candidate that passes is the longest (argmax
    takes the first maximum; none passing gives j = 0, α itself)."""
    k = dw.shape[-1]
    dlam, ds = dw.unbind(1)
    linear, quadratic = torch.stack([b4, dlam * ds], dim=1).sum(-1).split(1, -1)  # (B, 1) each: k·c₁, k·c₂
    bound = torch.add(res.scaled, res.mu, alpha=-_MERIT_DECREASE / (1 - _MERIT_DECREASE)) * ((1 - _MERIT_DECREASE) * k)
    a = alpha.unsqueeze(-1) * factors
    passed = torch.addcmul(linear, a, quadratic) <= bound.unsqueeze(-1)
    return a.gather(-1, passed.max(-1, keepdim=True).indices).squeeze(-1)


def factor_at(H: Tensor, A: Tensor, G: Tensor, lam: Tensor, s: Tensor, reg: Tensor, rules: StepRules,
              stiff: bool | Tensor = False, retries: int = 0, diagonal: bool = False, check_finite: bool = True,
              overwrite_h: bool = False, active: Tensor | None = None) -> KKTFactor:
    """The KKT factorisation at (λ, s) of the nonnegative rows G, with H = Q (plus the other
    cones' folded scalings); ``stiff``: keep the near-active inequalities (``STIFF_W_INV``) out
    of H for every problem (True), for none (False), or for those of a (B,) mask; ``diagonal``:
    H is diagonal (``QPData.diagonal``); ``check_finite`` as in ``kkt.factor_kkt``;
    ``overwrite_h``: H is the caller's own scratch, which the factorisation may overwrite
    (``kkt.factor_kkt``'s ``overwrite_q``); ``active``: the problems whose factors are read
    (``kkt.factor_kkt``)."""
    w_inv = lam / torch.add(s, lam, alpha=rules.ineq_reg)
    mask = None
    if isinstance(stiff, Tensor):
        mask = (w_inv > STIFF_W_INV) & stiff.unsqueeze(-1)
    elif stiff:
        mask = w_inv > STIFF_W_INV
    return factor_kkt(H, A, G, w_inv, reg, reg, stiff=mask, retries=retries, diagonal=diagonal, check_finite=check_finite,
                      overwrite_q=overwrite_h, augment=rules.augment, active=active)


def newton_step(data: QPData, rows: ConeRows | None, parts: tuple, st: State, res, backtrack: Tensor | None, rules: StepRules,
                stiff: str = "none", check_finite: bool = True, active: Tensor | None = None) -> Step:
    """One predictor-corrector direction and step length for every problem (see the module
    docstring). ``data`` holds Q, p, A, b, G, h (``QPData``), ``rows`` and ``parts``
    the other cones' rows (None and () for none), ``res`` the residuals r_d, r_e, r_i (and r_k
    on the cone rows), μ and, for the merit search, the largest scaled residual; ``backtrack``
    (B, j) the merit search's candidate factors.

    ``stiff``: "none", or "all" (every running problem is marked in ``st.stiff``) or "mixed"
    (some are): the marked problems factorise with their near-active inequalities beside the
    equalities (``kkt.KKTFactor``'s stiff rows) instead of in H. Late in a solve,
    H = Q + ρI + GᵀW⁻¹G has eigenvalues from ρ to |W⁻¹| ≈ 1/δᵢ, a condition beyond double
    precision wherever Q is singular, and whether its Cholesky factorisation succeeds depends on
    the rounding (on the thread count); the stiff split keeps H well-conditioned at the cost of a
    Schur complement with k more rows, so only problems whose factorisation has failed pay it.
    (Raising ρ instead also factorises, but its steps stall the duality gap.) "mixed" computes
    both directions for every problem and keeps each problem's own, so that a problem's iterates
    do not depend on the others of its batch.

    ``check_finite``: the factorisation's health (``Step.factor_ok``) includes the finiteness of
    its factors (``kkt.factor_kkt``); a method that tests the step's finiteness itself and treats
    a non-finite step as a failed factorisation (the QP's) passes False.

    ``active``: optional (B,) mask of the problems whose step is taken (the running ones, where the
    method discards the others' steps): the factorisation may leave the others out
    (``kkt.factor_kkt``), so that their directions are meaningless but finite."""
    if stiff == "mixed":
        plain = newton_step(data, rows, parts, st, res, backtrack, rules, check_finite=check_finite, active=active)
        split = newton_step(data, rows, parts, st, res, backtrack, rules, "all", check_finite, active)
        pick = st.stiff
        return Step(torch.where(pick.unsqueeze(-1), split.dv, plain.dv), torch.where(pick.unsqueeze(-1), split.q_dx, plain.q_dx),
                    torch.where(pick, split.alpha, plain.alpha), torch.where(pick, split.factor_ok, plain.factor_ok),
                    None if plain.inside is None else torch.where(pick, split.inside, plain.inside))
    n, m, k, mk = st.n, st.m, st.k, st.mk
    batch, parts = st.v.shape[0], parts

    def on_cones(dv: Tensor) -> tuple[Tensor, Tensor]:
        """(dy_K, ds_K) of a direction laid out as ``State.v``."""
        return dv[:, n + m + 2 * k : n + m + 2 * k + mk], dv[:, n + m + 2 * k + mk :]

    H, V, G_k, scalings, s_parts, y_parts = data.Q, None, None, [], [], []
    if parts:
        mu = res.mu.unsqueeze(-1)
        s_parts, y_parts = [cone_parts.piece(st.s_k, part) for part in parts], [cone_parts.piece(st.y_k, part) for part in parts]
        scalings = [cone_parts.scaling(part, s, y, mu.expand(batch, part.count)) for part, s, y in zip(parts, s_parts, y_parts)]
        blocks = [sc.V for sc in scalings]
        kept = rows.workspace
        V = cone_parts.block_diagonal(blocks, parts, rows.A.shape[-1], kept and kept.V)
        G_k = cone_parts.scaled_rows(rows.A, V, kept and kept.G)
        H = cone_parts.normal_matrix(data.Q if rows.quadratic else None, G_k, kept and kept.H)
    w = st.lam_s
    lam, s = w.unbind(1)
    # with cone rows H is the step's own (``normal_matrix``), and the nonnegative rows are added into it in place
    f = factor_at(H, data.A, data.G, lam, s, st.reg, rules, stiff=st.stiff if stiff == "all" else False,
                  diagonal=data.diagonal, check_finite=check_finite, overwrite_h=bool(parts), active=active)
    minus_s_lam = torch.addcmul(constant(0.0, s), lam, s, value=-1)  # the predictor's b4 −s∘λ, in one kernel
    # −r_d, or r_d where the nonnegative rows' solve folds the negation in (``negated_rx``); −r_e (None: no rows, no arithmetic)
    fold_negation = k > 0 and len(parts) == 0
    r_x, minus_r_e = (res.r_d if fold_negation else res.r_d.neg()), (res.r_e.neg() if m else None)

    def direction(b4: Tensor, v: Tensor, q: Tensor | None, refine_steps: int) -> Tensor:
        """dv of the Newton system with λ∘ds + s∘dλ = b4 on the nonnegative rows (``v`` = b4/λ + r_i)
        and ds_K + (VᵀV)⁻¹ dy_K = q on the cone rows: the cone rows are eliminated,
        dy_K = VᵀV (A_K dx + r_k + q), and ds_K = −r_k − A_K dx."""
        rx = r_x
        if parts:
            u = cone_parts.apply_blocks(V, res.r_k + q)
            rx = torch.baddbmm(rx.unsqueeze(-2), u.unsqueeze(-2), G_k, alpha=-1).squeeze(-2)  # −r_d − A_Kᵀ Vᵀ u, G_k = V A_K
        dx, dnu, dlam = solve_reduced(f, rx, minus_r_e, v if k else None, refine_steps, rules.solve_through_y,
                                      negated_rx=fold_negation)
        pieces = [dx, dnu, dlam, torch.addcmul(b4, s, dlam, value=-1).div(lam)] if k else [dx, dnu]
        if parts:
            a_dx = mv(rows.A, dx)
            pieces += [cone_parts.apply_blocks(V, mv(G_k, dx) + u, transpose=True),
                       -res.r_k - a_dx]
        return torch.cat(pieces, dim=-1)

    def boundary(dv: Tensor, cap: float, scale: float = 1.0, soc_scale: float = 1.0,
                 nonneg_scale: float = 1.0) -> tuple[Tensor, Tensor]:
        """The direction of (λ, s) as (B, 2, k), and ``scale`` times the longest step (at most
        ``cap``) that keeps the nonnegative rows and the cones with a closed-form step inside,
        the second-order cones' step counted ``soc_scale`` times and the nonnegative rows' (and
        nonnegative cones') ``nonneg_scale`` times (min(cap, rα) = r·min(cap/r, α))."""
        dw = dv[:, n + m : n + m + 2 * k].unflatten(-1, (2, k))

        def rows_step(times: float) -> Tensor:  # ``times`` the nonnegative rows' step, counted ``nonneg_scale`` times
            if nonneg_scale == 1.0:
                return max_step(w, dw, cap, times)
            return max_step(w, dw, cap / nonneg_scale, times * nonneg_scale)

        if not parts:
            return dw, rows_step(scale)
        step = rows_step(1.0) if k else st.v.new_full((batch,), cap)
        own_scales = {"soc": soc_scale, "nonneg": nonneg_scale}
        # the PSD cones last: their test takes the step so far, and solves for their own step
        # only where it is shorter (``NTScaling.max_step``'s bound)
        for sc, part, s_, y_ in sorted(zip(scalings, parts, s_parts, y_parts), key=lambda each: each[1].kind == "psd"):
            if part.kind == "exp":  # no closed form: searched (``searched``)
                continue
            dy_, ds_ = (cone_parts.piece(d, part) for d in on_cones(dv))
            limit = sc.max_step(s_, y_, ds_, dy_, step).amin(-1)
            own = own_scales.get(part.kind, 1.0)
            step = torch.minimum(step, limit * own if own != 1.0 else limit)
        return dw, step if scale == 1.0 else scale * step

    def searched(dv: Tensor, alpha: Tensor, fraction: float) -> tuple[Tensor, Tensor | None]:
        """``alpha`` shortened until ``alpha / fraction`` keeps the exponential cones inside, and
        whether that succeeded (None: there are none)."""
        if not any(part.kind == "exp" for part in parts):
            return alpha, None
        dy_k, ds_k = on_cones(dv)
        return cone_parts.exp_step(parts, st.s_k, st.y_k, ds_k, dy_k, alpha, fraction, rules.backtrack,
                                   rules.max_backtracks)

    if not k and not parts:  # no inequalities: the Newton step solves the problem
        dv = direction(minus_s_lam, minus_s_lam, None, rules.refine_steps)
        return Step(dv, mv(data.Q, dv[:, :n]), st.v.new_ones(batch), f.ok)
    # the predictor: b4 = −s∘λ, so b4/λ + r_i = r_i − s
    dv = direction(minus_s_lam, res.r_i - s if k else None, -st.s_k if parts else None, rules.predictor_refine_steps)
    dw, alpha_aff = boundary(dv, 1.0)
    alpha_aff, _ = searched(dv, alpha_aff, 1.0)
    if rules.centring == "mehrotra":
        w_aff = torch.addcmul(w, alpha_aff.view(-1, 1, 1), dw)
        if parts:
            (dy_k, ds_k), a = on_cones(dv), alpha_aff.unsqueeze(-1)
            mu_aff = w_aff.prod(-2).sum(-1) + ((st.s_k + a * ds_k) * (st.y_k + a * dy_k)).sum(-1)
            mu_aff = mu_aff / (k + cone_parts.degree(parts))
        else:
            mu_aff = w_aff.prod(-2).mean(-1)
        sigma = (mu_aff / res.mu.clamp(min=torch.finfo(s.dtype).tiny)).clamp(0.0, 1.0) ** 3
        sigma_mu = sigma * res.mu
    else:
        sigma_mu = (1 - alpha_aff) ** rules.centring_power * res.mu
    b4 = torch.addcmul(minus_s_lam + sigma_mu.unsqueeze(-1), *dw.unbind(1), value=-1)  # σμ − s∘λ − dλ∘ds
    q = None
    if parts:
        dy_aff, ds_aff = on_cones(dv)
        q = cone_parts.join([sc.combined_rhs(sigma_mu[:, None, None], cone_parts.piece(ds_aff, part),
                                             cone_parts.piece(dy_aff, part), s_, y_)
                             for sc, part, s_, y_ in zip(scalings, parts, s_parts, y_parts)], batch, st.s_k)
    dv = direction(b4, torch.addcdiv(res.r_i, b4, lam) if k else None, q, rules.refine_steps)
    fraction = rules.step_fraction
    if rules.balanced_step_fraction is not None:
        if parts:
            raise ValueError(f"newton_step: rules.balanced_step_fraction applies to nonnegative rows only, got {len(parts)} "
                             "parts of other cones")
        balanced = res.mu >= rules.balance * res.scaled
        fraction = torch.where(balanced, constant(rules.balanced_step_fraction, res.mu), constant(fraction, res.mu))
    # fraction · step ≤ 1: the step is at most 1/fraction (full steps) or 1
    soc_scale, nonneg_scale = (1.0 if own is None else own / fraction
                               for own in (rules.soc_step_fraction, rules.nonneg_step_fraction))
    dw, alpha = boundary(dv, 1 / fraction if rules.full_steps else 1.0, fraction, soc_scale, nonneg_scale)
    alpha, inside = searched(dv, alpha, fraction)
    if rules.merit:
        alpha = _merit_step(dw, b4, alpha, res, backtrack)
    if rows is not None and not rows.quadratic:  # Q is zero: no Q dx
        return Step(dv, None, alpha, f.ok, inside)
    return Step(dv, mv(data.Q, dv[:, :n]), alpha, f.ok, inside)
