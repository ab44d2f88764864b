"""The engine's step: nonnegative rows as the KKT system's diagonal rows and the same rows as a
cone plug-in (Nesterov–Todd scaling folded into H) are two eliminations of one Newton system, so
they must give the same direction and step (up to rounding)."""
import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch

from optlayers.cone.interior.solver import ConeIPMSettings
from optlayers.engine import cones
from optlayers.engine.constants import constant
from optlayers.engine.step import ConeRows, QPData, State, StepRules, max_step, newton_step

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import kernels  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Residuals:
    r_d: torch.Tensor
    r_e: torch.Tensor
    r_i: torch.Tensor
    r_k: torch.Tensor
    mu: torch.Tensor
    scaled: torch.Tensor | None = None  # the largest scaled residual (the QP's merit search and balanced steps)


def _program(batch=3, n=5, z=2, k=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    M = r(batch, n, n)
    positive = lambda: torch.rand(batch, k, generator=g, dtype=torch.float64) + 0.1  # noqa: E731
    x, nu, lam, s = r(batch, n), r(batch, z), positive(), positive()
    return M @ M.mT / n, r(batch, n), r(batch, z, n), r(batch, z), r(batch, k, n), r(batch, k), x, nu, lam, s


def _state(v, n, z, k, mk, batch):
    zeros = torch.zeros(batch, dtype=torch.int64)
    no = torch.zeros(batch, dtype=torch.bool)
    return State(v, zeros - 1, zeros, zeros.new_zeros(batch, 3), torch.full((batch,), 1e-10, dtype=torch.float64),
                 no, no, n, z, k, mk)


def test_nonnegative_rows_as_diagonal_rows_and_as_a_cone_plug_in_give_one_step():
    Q, p, A, b, G, h, x, nu, lam, s = _program()
    batch, n, z, k = x.shape[0], x.shape[1], nu.shape[1], lam.shape[1]
    r_d = Q @ x.unsqueeze(-1) + A.mT @ nu.unsqueeze(-1) + G.mT @ lam.unsqueeze(-1)
    r_d = r_d.squeeze(-1) + p
    r_e = (A @ x.unsqueeze(-1)).squeeze(-1) - b
    r_p = (G @ x.unsqueeze(-1)).squeeze(-1) + s - h
    mu = (s * lam).sum(-1) / k
    rules = ConeIPMSettings().rules
    empty = r_p[:, :0]
    # as diagonal rows of the KKT system
    diagonal = newton_step(QPData(Q, p, A, b, G, h), None, (), _state(torch.cat([x, nu, lam, s], -1), n, z, k, 0, batch),
                           Residuals(r_d, r_e, r_p, empty, mu), None, rules)
    # as a cone plug-in: k nonnegative cones of one row among the cone rows
    part = cones.Part("nonneg", 0, k, 1, 1)
    folded = newton_step(QPData(Q, p, A, b, G[:, :0], h[:, :0]), ConeRows(G, h), (part,),
                         _state(torch.cat([x, nu, lam, s], -1), n, z, 0, k, batch),
                         Residuals(r_d, r_e, empty, r_p, mu), None, rules)
    assert diagonal.factor_ok.all() and folded.factor_ok.all()
    torch.testing.assert_close(diagonal.dv, folded.dv, rtol=1e-9, atol=1e-9)  # the same layout [x, ν, λ/y, s]
    torch.testing.assert_close(diagonal.alpha, folded.alpha, rtol=1e-9, atol=1e-12)
    assert (diagonal.alpha > 0).all() and (diagonal.alpha <= 1).all()


def test_an_entry_and_its_direction_both_zero_do_not_limit_the_step():
    """max_step over (λ, s) with an entry 0 whose direction is 0 (0/0): the step the other
    entries allow; an entry 0 with a negative direction allows none."""
    w = torch.tensor([[[1.0, 2.0], [0.0, 4.0]]], dtype=torch.float64)
    dw = torch.tensor([[[-0.5, 1.0], [0.0, -8.0]]], dtype=torch.float64)  # limits: 2 and 0.5
    torch.testing.assert_close(max_step(w, dw, scale=0.99), torch.tensor([0.495], dtype=torch.float64))
    torch.testing.assert_close(max_step(w, torch.zeros_like(dw), cap=3.0), torch.tensor([3.0], dtype=torch.float64))
    assert max_step(w, torch.tensor([[[-0.5, 1.0], [-1.0, 0.0]]], dtype=torch.float64)).item() == 0.0


def test_a_qp_iterate_with_a_slack_exactly_zero_solves():
    """A slack s exactly 0 has ds = 0 in the predictor (b4 = −s∘λ = 0): its step must still be
    taken (it was NaN: a failed factorisation, then a numerical failure), and the solve reaches
    the solution of the untouched start."""
    from optlayers.qp import ipm
    from optlayers.qp.problem import prepare_qp, qp_data
    from optlayers.qp.scaling import equilibrate
    from optlayers.status import Status
    from tests.qp.qp_problems import random_qp

    data = random_qp((2,), 6, 8, 2, active=True)
    flat, _ = prepare_qp(*(data[key] for key in ("Q", "p", "G", "h", "A", "b")))
    scaled, sc = equilibrate(qp_data(*flat))
    settings = ipm.default_settings(torch.float64, None, None, None)
    units = ipm.Units.of(sc, scaled, settings)

    def solve(st):
        res = ipm.residuals(scaled, units, st, settings)
        return ipm.iterate(scaled, units, st, res, lambda *args: ipm.step(*args, settings), settings, False).state

    st, _ = ipm.start(scaled, units, settings)
    v = st.v.clone()
    v[0, st.n + st.m + st.k + 3] = 0.0  # s₃ of the first problem
    reference, touched = solve(st), solve(dataclasses.replace(st, v=v))
    assert (touched.status == Status.SOLVED).all() and (touched.iterations > 0).all()
    torch.testing.assert_close(touched.x, reference.x, rtol=1e-8, atol=1e-8)


def test_each_method_departs_from_the_shared_step_rules_only_where_it_says():
    """The QP's and the cone method's settings hold ``StepRules`` built from their options: the
    shared defaults, but for each method's own choices."""
    from optlayers.qp import ipm

    shared = dataclasses.asdict(StepRules())

    def departures(rules):
        return {name: value for name, value in dataclasses.asdict(rules).items() if shared[name] != value}

    qp = ipm.default_settings(torch.float64, None, None, None)
    assert departures(qp.rules) == {"merit": True, "ineq_reg": qp.ineq_reg, "refine_steps": qp.refine_steps, "augment": True,
                                    "balanced_step_fraction": ipm.BALANCED_STEP_FRACTION}
    assert departures(ConeIPMSettings().rules) == {"centring": "affine_step", "full_steps": True, "solve_through_y": True,
                                                   "soc_step_fraction": 0.98, "centring_power": 2,
                                                   "nonneg_step_fraction": 0.999}
    custom = ConeIPMSettings(step_fraction=0.9, backtrack=0.5, max_backtracks=7, kkt_refine_steps=2).rules
    assert (custom.step_fraction, custom.backtrack, custom.max_backtracks, custom.refine_steps) == (0.9, 0.5, 7, 2)


def _reference_max_step(w, dw, cap=1.0, scale=1.0):
    """The step length as first written (nan_to_num, clamp, reciprocal, scale): an independent form."""
    ratios = torch.nan_to_num(dw / w, nan=0.0, neginf=-math.inf)
    return ratios.flatten(1).amin(-1).clamp(max=-1.0 / cap).reciprocal().mul(-scale)


@pytest.mark.parametrize("cap, scale", [(1.0, 1.0), (1.0, 0.99), (1 / 0.99, 0.99), (3.0, 1.0)])
def test_max_step_equals_its_reference_form_bitwise(cap, scale):
    """Random (λ, s) and directions with exact zeros (0/0, 0 with a negative direction) and huge
    and tiny ratios: the same step lengths, bit for bit, as the reference form."""
    gen = torch.Generator().manual_seed(3)
    w = torch.rand(64, 2, 9, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-12, 3, (64, 2, 9), generator=gen)
    dw = torch.randn(64, 2, 9, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-3, 12, (64, 2, 9), generator=gen)
    w[:8, 0, 0], dw[:8, 0, 0] = 0.0, 0.0  # 0/0
    w[8:12, 1, 3], dw[8:12, 1, 3] = 0.0, -1.0  # no step
    w[12:16, 1, 4], dw[12:16, 1, 4] = 0.0, 2.0  # +inf ratio
    dw[16:24] = dw[16:24].abs()  # nothing limits the step: the cap
    got, expected = max_step(w, dw, cap, scale), _reference_max_step(w, dw, cap, scale)
    assert torch.equal(got, expected), (got - expected).abs().max()
    assert (got[8:12] == 0).all() and (got[16:24] == cap * scale).all()


def test_balanced_step_fraction_applies_where_mu_is_not_far_below_the_residuals():
    """``StepRules.balanced_step_fraction``: a problem whose μ is at least ``balance`` times its largest
    scaled residual steps as with that fraction, bit for bit; the others as with ``step_fraction``. On
    programs with other cones it is refused."""
    Q, p, A, b, G, h, x, nu, lam, s = _program(batch=4)
    batch, n, z, k = x.shape[0], x.shape[1], nu.shape[1], lam.shape[1]
    r_d, r_e, r_p = torch.randn(batch, n, dtype=torch.float64), torch.randn(batch, z, dtype=torch.float64), torch.randn(batch, k, dtype=torch.float64)
    mu = (s * lam).sum(-1) / k
    scaled = mu * torch.tensor([1.0, 999.0, 1001.0, 1e-9], dtype=torch.float64)  # balanced: 0, 1, 3 (balance 1e-3)
    residuals = Residuals(r_d, r_e, r_p, r_p[:, :0], mu, scaled)
    state = _state(torch.cat([x, nu, lam, s], -1), n, z, k, 0, batch)

    def alpha(**rules):
        return newton_step(QPData(Q, p, A, b, G, h), None, (), state, residuals, None, StepRules(**rules)).alpha

    mixed, far, near = alpha(step_fraction=0.99, balanced_step_fraction=0.999), alpha(step_fraction=0.99), alpha(step_fraction=0.999)
    balanced = torch.tensor([True, True, False, True])
    assert (near[balanced] > far[balanced]).all()
    assert torch.equal(mixed[balanced], near[balanced]) and torch.equal(mixed[~balanced], far[~balanced])
    part = cones.Part("nonneg", 0, k, 1, 1)
    with pytest.raises(ValueError, match="balanced_step_fraction applies to nonnegative rows only"):
        newton_step(QPData(Q, p, A, b, G[:, :0], h[:, :0]), ConeRows(G, h), (part,), _state(state.v, n, z, 0, k, batch),
                    Residuals(r_d, r_e, r_p[:, :0], r_p, mu, scaled), None, StepRules(balanced_step_fraction=0.999))


def test_max_step_takes_each_problems_own_fraction():
    """A (B,) ``scale`` (``StepRules.balanced_step_fraction``): each problem's step, bit for bit, is the
    one its fraction gives as a number."""
    gen = torch.Generator().manual_seed(5)
    w = torch.rand(32, 2, 7, generator=gen, dtype=torch.float64) + 1e-3
    dw = torch.randn(32, 2, 7, generator=gen, dtype=torch.float64)
    fractions = torch.where(torch.arange(32) % 3 == 0, 0.999, 0.99).to(torch.float64)
    got = max_step(w, dw, 1.0, fractions)
    for fraction in (0.99, 0.999):
        mask = fractions == fraction
        assert torch.equal(got[mask], max_step(w, dw, 1.0, fraction)[mask])


def test_balanced_step_fraction_is_refused_where_it_does_not_apply():
    with pytest.raises(ValueError, match="balanced_step_fraction needs full_steps=False"):
        StepRules(full_steps=True, balanced_step_fraction=0.999)
    with pytest.raises(ValueError, match=r"balanced_step_fraction and nonneg_step_fraction both set .* got 0.999 and 0.98"):
        StepRules(balanced_step_fraction=0.999, nonneg_step_fraction=0.98)


def test_constants_are_made_once_per_value_device_and_dtype():
    like = torch.zeros(3, dtype=torch.float64)
    first = constant(0.25, like)
    assert first is constant(0.25, like) and first.dtype == torch.float64 and first.shape == ()
    assert constant(0.25, like.float()).dtype == torch.float32 and constant((1, 2), like.long()).tolist() == [1, 2]
    with torch.inference_mode():
        inside = constant(0.125, like)
    assert not inside.is_inference() and (inside + like).tolist() == [0.125] * 3  # usable outside inference mode
    counter = kernels.count(lambda: constant(0.25, like))
    assert counter.kernel_count == 0
    with pytest.raises(TypeError, match="like must be a Tensor"):
        constant(1.0, 1.0)


def test_made_once_keeps_one_normal_tensor_per_arguments():
    """The cached tables of the cones (``engine.constants.made_once``): made once per arguments,
    and a normal tensor even when first asked for under inference mode."""
    from optlayers.engine.constants import made_once

    calls = []

    @made_once
    def table(k: int, dtype: torch.dtype) -> torch.Tensor:
        calls.append(k)
        return torch.arange(k, dtype=dtype)

    with torch.inference_mode():
        first = table(3, torch.float64)
    assert not first.is_inference() and first is table(3, torch.float64) and calls == [3]
    assert table(4, torch.float64).tolist() == [0, 1, 2, 3] and calls == [3, 4]


def test_constants_keep_the_sign_of_zero_and_nan_is_one_constant():
    """0.0 and −0.0 compare equal, but a cache keyed by ``==`` must not hand one for the other:
    max_step with an unbounded cap takes −1/cap = −0.0, and after a +0.0 had been cached its
    unblocked step read −inf. A NaN (never equal to itself) is made once, not once per call."""
    like = torch.zeros(2, dtype=torch.float64)
    assert not constant(0.0, like).signbit() and constant(-0.0, like).signbit()
    assert constant((0.0, -0.0), like).signbit().tolist() == [False, True]
    w = torch.ones(1, 2, 2, dtype=torch.float64)
    assert max_step(w, torch.ones_like(w), cap=math.inf).item() == math.inf
    assert constant(float("nan"), like) is constant(float("nan"), like)


def test_block_diagonal_scalings_dense_only_where_small_and_both_forms_agree():
    """The cone rows' scalings as one dense matrix where it is small beside V A (m_K ≤ 4 n or
    ≤ 128 rows), part by part otherwise (a thousand exponential cones would be (B, 3000, 3000));
    both forms give the same products (with vectors, and the scaled rows V A)."""
    from optlayers.engine import cones as cone_parts

    g = torch.Generator().manual_seed(0)
    parts = [cone_parts.Part("soc", 0, 3, 4, 1), cone_parts.Part("exp", 12, 50, 3, 3)]  # m_K = 162
    blocks = [torch.randn(2, p.count, p.size, p.size, dtype=torch.float64, generator=g) for p in parts]
    v = torch.randn(2, 162, dtype=torch.float64, generator=g)
    dense = torch.zeros(2, 162, 162, dtype=torch.float64)
    for M, p in zip(blocks, parts):
        for c in range(p.count):
            rows = slice(p.start + c * p.size, p.start + (c + 1) * p.size)
            dense[:, rows, rows] = M[:, c]
    small, large = cone_parts.block_diagonal(blocks, parts, n=41), cone_parts.block_diagonal(blocks, parts, n=40)
    assert small.dense is not None and large.dense is None
    torch.testing.assert_close(small.dense, dense, rtol=0, atol=0)
    for transpose in (False, True):
        want = (dense.mT if transpose else dense) @ v.unsqueeze(-1)
        for V in (small, large):
            torch.testing.assert_close(cone_parts.apply_blocks(V, v, transpose), want.squeeze(-1), rtol=1e-13, atol=1e-13)
    A = torch.randn(2, 162, 5, dtype=torch.float64, generator=g)
    for V in (small, large):
        torch.testing.assert_close(cone_parts.scaled_rows(A, V), dense @ A, rtol=1e-13, atol=1e-13)
    # a workspace kept over iterations: each writes its blocks over the last one's, and its zeros stay
    workspace = cone_parts.scaling_workspace(parts, 2, 41, v)
    assert cone_parts.scaling_workspace(parts, 2, 40, v) is None and cone_parts.scaling_workspace((), 2, 41, v) is None
    cone_parts.block_diagonal([torch.randn_like(M) for M in blocks], parts, 41, workspace)
    kept = cone_parts.block_diagonal(blocks, parts, 41, workspace)
    assert kept.dense is workspace
    torch.testing.assert_close(kept.dense, dense, rtol=0, atol=0)


def test_the_steps_workspace_takes_its_products_with_the_same_bits():
    """The step's kept buffers (``StepWorkspace``): V A and Q + (V A)ᵀ(V A) written into them are
    the fresh products bit for bit, for a working batch of the first elements too; none where V
    has no dense form."""
    from optlayers.engine import cones as cone_parts

    g = torch.Generator().manual_seed(1)
    parts = [cone_parts.Part("soc", 0, 2, 5, 1), cone_parts.Part("exp", 10, 3, 3, 3)]  # m_K = 19
    like = torch.zeros((), dtype=torch.float64)
    many = [cone_parts.Part("exp", 0, 54, 3, 3)]  # m_K = 162 > 4 n and > 128: no dense form
    assert cone_parts.step_workspace(many, 4, 40, like) is None and cone_parts.step_workspace((), 4, 9, like) is None
    kept = cone_parts.step_workspace(parts, 4, 9, like).first(3)
    assert (kept.V.shape, kept.G.shape, kept.H.shape) == ((3, 19, 19), (3, 19, 9), (3, 9, 9))
    blocks = [torch.randn(3, p.count, p.size, p.size, dtype=torch.float64, generator=g) for p in parts]
    A = torch.randn(3, 19, 9, dtype=torch.float64, generator=g)
    Q = torch.randn(3, 9, 9, dtype=torch.float64, generator=g)
    fresh = cone_parts.block_diagonal(blocks, parts, 9)
    V = cone_parts.block_diagonal(blocks, parts, 9, kept.V)
    G = cone_parts.scaled_rows(A, V, kept.G)
    assert G.data_ptr() == kept.G.data_ptr() and torch.equal(G, cone_parts.scaled_rows(A, fresh))
    for P in (None, Q):
        H = cone_parts.normal_matrix(P, G, kept.H)
        assert H.data_ptr() == kept.H.data_ptr() and torch.equal(H, cone_parts.normal_matrix(P, G))
