"""The batched interior point method (optlayers.cone.interior): scalings and Jordan algebras
against their defining identities, the exponential barrier against autodiff of an independent
formula, the solver against programs with known solutions and against Clarabel, the Clarabel
fallback, and gradients through solve_cone(solver="ipm")."""
import collections
import dataclasses
import math

import pytest
import torch

from optlayers import host
from optlayers.cone import ConeSolveError, ConeSpec, ConeStatus, solve_cone
from optlayers.cone import exp as exp_cone
from optlayers.cone.interior import solver
from optlayers.engine.cones import exponential, symmetric
from optlayers.engine import cones as cone_parts
from optlayers.cone.testing import ALL_CONES, n_range, random_program

IDENTITY_TOL = 1e-10  # algebraic identities on well-conditioned random points hold to round-off
STEP_RTOL = 1e-8  # max_step against a 200-step bisection on cone membership
BISECTION_FAR = 1e6  # a direction still inside the cone at this step is taken never to leave it
IPM_TOL = {"polyhedral": 1e-4, "curved": 5e-3}  # the raw IPM stops at relative residual 1e-8: solutions on
# a polyhedral face are then good to ~1e-6, on a curved boundary only to ~sqrt of that (observed <= 1.5e-3)
REFINED_TOL = 1e-9  # solve_cone refines the IPM's answer to ~1e-13
GRAD_TOL = 1e-7  # both solvers' answers are refined to the same point, and share the backward pass
RETURNED = (int(ConeStatus.SOLVED), int(ConeStatus.INACCURATE))

def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (M @ v.unsqueeze(-1)).squeeze(-1)


# --- points and membership, written here from the definitions --------------------------------

def svec_indices(d: int) -> list[tuple[int, int]]:
    """SCS's order: the lower triangle stacked column by column."""
    return [(i, j) for j in range(d) for i in range(j, d)]


def svec(M: torch.Tensor) -> torch.Tensor:
    idx = svec_indices(M.shape[-1])
    return torch.stack([M[..., i, j] * (1 if i == j else math.sqrt(2)) for i, j in idx], -1)


def smat(v: torch.Tensor) -> torch.Tensor:
    d = (math.isqrt(8 * v.shape[-1] + 1) - 1) // 2
    M = v.new_zeros(*v.shape[:-1], d, d)
    for k, (i, j) in enumerate(svec_indices(d)):
        value = v[..., k] / (1 if i == j else math.sqrt(2))
        M[..., i, j] = value
        M[..., j, i] = value
    return M


def random_interior(kind: str, shape: tuple[int, ...], k: int, g: torch.Generator) -> torch.Tensor:
    """Points (*shape, k) strictly inside the nonnegative orthant, second-order cone or PSD cone."""
    if kind == "nonneg":
        return 0.2 + torch.rand(*shape, k, generator=g)
    if kind == "soc":
        tail = torch.randn(*shape, k - 1, generator=g)
        return torch.cat([tail.norm(dim=-1, keepdim=True) + 0.2 + torch.rand(*shape, 1, generator=g), tail], -1)
    d = (math.isqrt(8 * k + 1) - 1) // 2
    L = torch.randn(*shape, d, d, generator=g)
    return svec(L @ L.mT / d + 0.3 * torch.eye(d))


def scaled_interior(kind: str, shape: tuple[int, ...], k: int, g: torch.Generator) -> torch.Tensor:
    """Points from which Jordan.max_step measures: interior points, diagonal ones on the PSD cone
    (where the solver measures from the NT-scaled, diagonal lambda)."""
    if kind != "psd":
        return random_interior(kind, shape, k, g)
    d = (math.isqrt(8 * k + 1) - 1) // 2
    return svec(torch.diag_embed(0.3 + torch.rand(*shape, d, generator=g)))


def margin(kind: str, v: torch.Tensor) -> torch.Tensor:
    """>= 0 exactly on the cone: least entry, x0 - ||x1||, least eigenvalue."""
    if kind == "nonneg":
        return v.amin(-1)
    if kind == "soc":
        return v[..., 0] - v[..., 1:].norm(dim=-1)
    return torch.linalg.eigvalsh(smat(v))[..., 0]


def exp_primal_margin(p: torch.Tensor) -> torch.Tensor:
    """z - y exp(x / y) where y > 0, -inf elsewhere: > 0 on int K_exp."""
    x, y, z = p.unbind(-1)
    safe = torch.where(y > 0, y, torch.ones_like(y))
    return torch.where(y > 0, z - safe * torch.exp(x / safe), torch.full_like(y, -torch.inf))


def exp_dual_margin(q: torch.Tensor) -> torch.Tensor:
    """e w + u exp(v / u) where u < 0, -inf elsewhere: > 0 on int K_exp^*."""
    u, v, w = q.unbind(-1)
    safe = torch.where(u < 0, u, -torch.ones_like(u))
    return torch.where(u < 0, math.e * w + safe * torch.exp(v / safe), torch.full_like(u, -torch.inf))


def random_exp_primal(count: int, g: torch.Generator) -> torch.Tensor:
    y, z, gap = torch.exp(0.5 * torch.randn(3, count, generator=g))
    return torch.stack([y * torch.log(z / y) - gap, y, z], -1)


def random_exp_dual(count: int, g: torch.Generator) -> torch.Tensor:
    a, w, gap = torch.exp(0.5 * torch.randn(3, count, generator=g))
    u = -a
    return torch.stack([u, u - u * torch.log(-u / w) + gap, w], -1)


def in_closed_cones(spec: ConeSpec, v: torch.Tensor, dual: bool) -> torch.Tensor:
    """Whether each row of v (B, m) lies in K (or K^* if ``dual``) outside the zero cone, up to round-off."""
    ok = torch.ones(v.shape[0], dtype=torch.bool)
    slack = 1e-12 * (1 + v.abs().amax(-1, keepdim=True))
    for block in spec.blocks():
        name = block.module.__name__.rsplit(".", 1)[-1]
        rows = v[:, block.start:block.stop].reshape(v.shape[0], block.count, block.size)
        if name in ("nonneg", "soc", "psd"):
            ok &= (margin(name, rows) >= -slack).all(-1)
        elif name == "exp":
            primal = block.dual == dual  # s of a K_exp block, or y of a K_exp^* block
            m = exp_primal_margin(rows) if primal else exp_dual_margin(rows)
            ok &= (m >= -slack).all(-1)
    return ok


# --- 1. Nesterov-Todd scalings -----------------------------------------------------------------

SCALINGS = {"nonneg": symmetric.nonneg_scaling, "soc": symmetric.soc_scaling, "psd": symmetric.psd_scaling}
ALGEBRAS = {"nonneg": symmetric.NONNEG, "soc": symmetric.SOC, "psd": symmetric.PSD}
SYMMETRIC_CASES = [("nonneg", 1)] + [("soc", k) for k in (2, 3, 5)] + [("psd", d * (d + 1) // 2) for d in (1, 2, 3, 4)]
CASE_IDS = [f"{kind}-{k}" for kind, k in SYMMETRIC_CASES]
BATCH = (4, 3)  # two leading dimensions, as the solver's (batch, cones of a kind)


def step_cases(cases: list[tuple[str, int]]) -> list:
    """The cases for max_step."""
    return [pytest.param(kind, k, id=f"{kind}-{k}") for kind, k in cases]


def scaled_pair(kind: str, k: int, seed: int):
    g = gen(seed)
    s, y = random_interior(kind, BATCH, k, g), random_interior(kind, BATCH, k, g)
    return s, y, SCALINGS[kind](s, y)


@pytest.mark.parametrize("kind, k", SYMMETRIC_CASES, ids=CASE_IDS)
def test_nt_scaling_identities(kind, k):
    s, y, sc = scaled_pair(kind, k, seed=k)
    eye = torch.eye(k).expand(*BATCH, k, k)
    assert sc.W.shape == sc.W_inv.shape == (*BATCH, k, k) and sc.lam.shape == (*BATCH, k)
    assert torch.allclose(mv(sc.W, y), sc.lam, atol=IDENTITY_TOL)
    assert torch.allclose(mv(torch.linalg.inv(sc.W).mT, s), sc.lam, atol=IDENTITY_TOL)
    assert torch.allclose(sc.W @ sc.W_inv, eye, atol=IDENTITY_TOL)
    assert torch.allclose(sc.V.mT @ sc.V, torch.linalg.inv(sc.W.mT @ sc.W), atol=IDENTITY_TOL)
    assert torch.allclose(mv(sc.W.mT @ sc.W, y), s, atol=IDENTITY_TOL)  # W^T W maps y to s
    assert (margin(kind, sc.lam) > 0).all()  # the scaled point is inside the cone


@pytest.mark.parametrize("kind, k", SYMMETRIC_CASES, ids=CASE_IDS)
def test_nt_newton_right_hand_sides(kind, k):
    """affine: lam o (V ds + W dy) = -lam o lam with ds + W^T W dy = q means q = -W^T lam = -s;
    combined: lam o (V q) = sigma mu e - lam o lam - (V ds) o (W dy)."""
    s, y, sc = scaled_pair(kind, k, seed=10 + k)
    algebra = ALGEBRAS[kind]
    assert torch.allclose(-s, -mv(sc.W.mT, sc.lam), atol=IDENTITY_TOL)  # the solver's affine right-hand side
    g = gen(20 + k)
    ds, dy = torch.randn(*BATCH, k, generator=g), torch.randn(*BATCH, k, generator=g)
    sigma_mu = torch.rand(*BATCH, 1, generator=g)
    q = sc.combined_rhs(sigma_mu, ds, dy, s, y)
    lam = sc.lam
    want = sigma_mu * algebra.unit(lam) - algebra.product(lam, lam) - algebra.product(mv(sc.V, ds), mv(sc.W, dy))
    assert torch.allclose(algebra.product(lam, mv(sc.V, q)), want, atol=IDENTITY_TOL)


@pytest.mark.parametrize("kind, k", step_cases(SYMMETRIC_CASES))
def test_nt_max_step_equals_step_in_original_coordinates(kind, k):
    """W and V are automorphisms of the cone: the step measured from lambda is the step from s, y."""
    s, y, sc = scaled_pair(kind, k, seed=30 + k)
    g = gen(40 + k)
    ds, dy = torch.randn(*BATCH, k, generator=g), torch.randn(*BATCH, k, generator=g)
    dy[0] = random_interior(kind, BATCH[1:], k, g)  # where ds, dy both stay inside: inf
    ds[0] = random_interior(kind, BATCH[1:], k, g)
    want = torch.minimum(bisection_step(kind, s, ds), bisection_step(kind, y, dy))
    got = sc.max_step(s, y, ds, dy)
    assert got.shape == BATCH
    assert torch.isinf(got[0]).all() and torch.isfinite(got[1:]).any()
    assert torch.allclose(got, want, rtol=STEP_RTOL)


def test_cholesky_or_nan_marks_only_the_failed_elements():
    g = gen(50)
    L = torch.randn(3, 4, 4, generator=g)
    M = L @ L.mT + torch.eye(4)
    M[1, 0, 0] = -1.0  # indefinite
    chol = symmetric.cholesky_or_nan(M)
    assert torch.isnan(chol[1]).all() and torch.isfinite(chol[[0, 2]]).all()
    assert torch.allclose(chol[[0, 2]] @ chol[[0, 2]].mT, M[[0, 2]], atol=IDENTITY_TOL)
    assert torch.equal(chol[[0, 2]], chol[[0, 2]].tril())


# --- 2. Jordan algebras ----------------------------------------------------------------------

def reference_product(kind: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if kind == "nonneg":
        return a * b
    if kind == "soc":
        return torch.cat([(a * b).sum(-1, keepdim=True), a[..., :1] * b[..., 1:] + b[..., :1] * a[..., 1:]], -1)
    A, B = smat(a), smat(b)
    return svec((A @ B + B @ A) / 2)


JORDAN_CASES = [("nonneg", 5)] + [("soc", k) for k in (2, 3, 5)] + [("psd", d * (d + 1) // 2) for d in (1, 2, 3, 4)]
JORDAN_IDS = [f"{kind}-{k}" for kind, k in JORDAN_CASES]


@pytest.mark.parametrize("kind, k", JORDAN_CASES, ids=JORDAN_IDS)
def test_jordan_product_unit_and_division(kind, k):
    algebra, g = ALGEBRAS[kind], gen(60 + k)
    a, b = torch.randn(*BATCH, k, generator=g), torch.randn(*BATCH, k, generator=g)
    assert torch.allclose(algebra.product(a, b), reference_product(kind, a, b), atol=IDENTITY_TOL)
    assert torch.allclose(algebra.product(a, b), algebra.product(b, a), atol=IDENTITY_TOL)
    e = algebra.unit(a)
    assert e.shape == a.shape
    assert torch.allclose(algebra.product(e, a), a, atol=IDENTITY_TOL)
    if kind == "psd":  # the PSD division is for the diagonal scaled point lambda of psd_scaling (documented)
        lam = SCALINGS[kind](random_interior(kind, BATCH, k, g), random_interior(kind, BATCH, k, g)).lam
        assert torch.allclose(smat(lam), torch.diag_embed(smat(lam).diagonal(dim1=-2, dim2=-1)), atol=IDENTITY_TOL)
    else:
        lam = random_interior(kind, BATCH, k, g)
    assert torch.allclose(algebra.product(lam, algebra.divide(lam, b)), b, atol=IDENTITY_TOL)
    assert torch.allclose(algebra.divide(lam, algebra.product(lam, b)), b, atol=IDENTITY_TOL)


def bisection_step(kind: str, x: torch.Tensor, dx: torch.Tensor, iterations: int = 200) -> torch.Tensor:
    """sup {alpha >= 0: x + alpha dx in K} by bisection on membership (inf if still inside at BISECTION_FAR)."""
    shape = x.shape[:-1]
    far = margin(kind, x + BISECTION_FAR * dx) >= 0
    lo, hi = torch.zeros(shape), torch.full(shape, BISECTION_FAR)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        inside = margin(kind, x + mid.unsqueeze(-1) * dx) >= 0
        lo, hi = torch.where(inside, mid, lo), torch.where(inside, hi, mid)
    return torch.where(far, torch.inf, lo)


def special_directions(kind: str, k: int, count: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Directions (rows) that never leave the cone, those along its boundary, and the negatives of
    both (which do leave it). Boundary directions are exact for the nonnegative and second-order
    cones (unit vectors, integer Pythagorean tuples); a rank-one PSD direction is on the boundary
    only up to round-off, so its step may be a huge finite number instead of inf."""
    inside = torch.cat([torch.zeros(1, k), random_interior(kind, (count,), k, g)])
    if kind == "nonneg":
        boundary = torch.eye(k)
    elif kind == "soc":
        boundary = torch.tensor({2: [1.0, 1.0], 3: [5.0, 3.0, 4.0], 5: [2.0, 1.0, 1.0, 1.0, -1.0]}[k]).unsqueeze(0)
    else:
        v = torch.randn(count, (math.isqrt(8 * k + 1) - 1) // 2, generator=g)
        boundary = svec(v.unsqueeze(-1) * v.unsqueeze(-2))
    return {"inside": inside, "boundary": boundary, "leaving": -torch.cat([inside[1:], boundary])}


@pytest.mark.parametrize("kind, k", step_cases(JORDAN_CASES))
def test_jordan_max_step_against_bisection(kind, k):
    algebra, g = ALGEBRAS[kind], gen(70 + k)
    x = scaled_interior(kind, BATCH, k, g)
    dx = 2 * torch.randn(*BATCH, k, generator=g)
    want = bisection_step(kind, x, dx)
    got = algebra.max_step(x, dx)
    assert got.shape == BATCH
    assert torch.isfinite(want).any()
    assert torch.allclose(got, want, rtol=STEP_RTOL)

    for name, directions in special_directions(kind, k, 4, g).items():
        x = scaled_interior(kind, (directions.shape[0],), k, g)
        got = algebra.max_step(x, directions)
        assert got.shape == directions.shape[:1]
        if name == "inside" or (name == "boundary" and kind != "psd"):
            assert torch.isinf(got).all(), name
        elif name == "boundary":
            assert (got > BISECTION_FAR).all(), name
        else:
            assert torch.isfinite(got).all(), name
            assert torch.allclose(got, bisection_step(kind, x, directions), rtol=STEP_RTOL), name


# --- 3. the exponential cone -------------------------------------------------------------------

def primal_barrier(p: torch.Tensor) -> torch.Tensor:
    """The standard barrier of K_exp: -log(y log(z / y) - x) - log y - log z."""
    x, y, z = p.unbind(-1)
    return -torch.log(y * torch.log(z / y) - x) - torch.log(y) - torch.log(z)


def reference_dual_barrier(q: torch.Tensor) -> torch.Tensor:
    """The primal barrier at (u - v, -u, w), which lies in K_exp exactly when (u, v, w) is in K_exp^*."""
    u, v, w = q.unbind(-1)
    return primal_barrier(torch.stack([u - v, -u, w], -1))


def test_dual_barrier_matches_autodiff_and_is_logarithmically_homogeneous():
    y = random_exp_dual(64, gen(80))
    assert (exp_dual_margin(y) > 0).all()
    grad, hess = exponential.dual_barrier(y)
    want_grad = torch.vmap(torch.func.grad(reference_dual_barrier))(y)
    want_hess = torch.vmap(torch.func.hessian(reference_dual_barrier))(y)
    scale = 1 + want_hess.abs().amax((-2, -1), keepdim=True)
    assert torch.allclose(grad, want_grad, rtol=1e-10, atol=1e-10)
    assert ((hess - want_hess).abs() <= 1e-10 * scale).all()
    assert torch.allclose(-(y * grad).sum(-1), torch.full((64,), float(exponential.DEGREE)), atol=1e-9)
    assert torch.allclose(mv(hess, y), -grad, rtol=1e-9, atol=1e-9)
    assert (torch.linalg.eigvalsh(hess) > 0).all()


def test_exp_membership_against_definitions():
    g = gen(81)
    points = torch.cat([2 * torch.randn(4000, 3, generator=g), random_exp_primal(500, g), random_exp_dual(500, g)])
    for test, reference in ((exponential.in_primal, exp_primal_margin), (exponential.in_dual, exp_dual_margin)):
        m = reference(points)
        clear = ~(m.abs() <= 1e-9 * (1 + points.abs().amax(-1)))  # leave out points within round-off of the boundary
        want = m > 0
        got = test(points)
        assert got.dtype == torch.bool and got.shape == (points.shape[0],)
        assert torch.equal(got[clear], want[clear])
        assert 500 <= int(want[clear].sum()) <= points.shape[0] - 500  # both outcomes well represented


def test_exp_dual_to_primal_map_and_central_point():
    g = gen(82)
    points = torch.cat([2 * torch.randn(2000, 3, generator=g), random_exp_dual(200, g)])
    T = torch.tensor(exp_cone.DUAL_TO_PRIMAL)
    assert torch.equal(exponential.in_dual(points), exponential.in_primal(mv(T, points)))
    dual = random_exp_dual(200, g)
    assert (exp_primal_margin(mv(T, dual)) > 0).all()
    center = torch.tensor(exponential.CENTRAL_POINT)
    assert exponential.in_primal(center) and exponential.in_dual(center)
    grad, _ = exponential.dual_barrier(center)
    assert torch.allclose(-grad, center, atol=1e-9)  # on the central path with mu = 1 and s = y


def bfgs_dual_scaling(s: torch.Tensor, y: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """mu hess f*(y) + s s^T / <s, y> - mu g g^T / 3, g = grad f*(y), from the barrier's reference autodiff."""
    grad = torch.vmap(torch.func.grad(reference_dual_barrier))(y)
    hess = torch.vmap(torch.func.hessian(reference_dual_barrier))(y)
    m = mu[:, None, None]
    return (m * hess + s.unsqueeze(-1) * s.unsqueeze(-2) / (s * y).sum(-1)[:, None, None]
            - m * grad.unsqueeze(-1) * grad.unsqueeze(-2) / exponential.DEGREE)


def test_exp_dual_scaling_is_the_bfgs_corrected_dual_hessian():
    g = gen(83)
    s, y = random_exp_primal(50, g), random_exp_dual(50, g)
    mu = torch.cat([(s * y).sum(-1)[:25] / exponential.DEGREE, torch.exp(torch.randn(25, generator=g))])
    sc = exponential.exp_scaling(s, y, mu, dual_only=torch.ones(50, dtype=torch.bool))
    assert not sc.primal_dual.any()
    grad, _ = exponential.dual_barrier(y)
    assert torch.allclose(sc.grad, grad, atol=IDENTITY_TOL)
    H = torch.linalg.inv(sc.V.mT @ sc.V)
    want = bfgs_dual_scaling(s, y, mu)
    scale = want.abs().amax((-2, -1), keepdim=True)
    assert ((H - want).abs() <= 1e-8 * scale).all()
    assert torch.allclose(mv(H, y), s, rtol=1e-8, atol=1e-8 * float(s.abs().max()))
    assert (torch.linalg.eigvalsh((H + H.mT) / 2) > 0).all()


def test_wright_omega_against_scipy():
    scipy_special = pytest.importorskip("scipy.special")
    e = torch.cat([torch.logspace(-14, 12, 400), torch.rand(200, generator=gen(84)) * 5])
    want = torch.as_tensor(scipy_special.wrightomega((1 + e).numpy()).real) - 1
    got = exponential._omega_minus_one(e)
    assert ((got - want).abs() <= 1e-13 * want.abs() + 1e-15).all()
    assert ((got + torch.log1p(got) - e).abs() <= 1e-15 * e.clamp_min(1)).all()  # the defining equation, also where
    # scipy's omega(1 + e) - 1 has lost the digits of a small e


def test_exp_primal_gradient_inverts_the_dual_gradient():
    """f is the conjugate of f*: s = -grad f*(z) exactly when z = -grad f(s), on points deep inside and
    within 1e-8 of the boundary; and <s, grad f(s)> = -3 (logarithmic homogeneity)."""
    g = gen(85)
    z = random_exp_dual(200, g)
    a, w, gap = torch.exp(0.5 * torch.randn(3, 100, generator=g))
    u = -a
    near = torch.stack([u, u - u * torch.log(-u / w) + 1e-8 * gap, w], -1)  # u log(-u / w) - u + v = 1e-8 gap
    z = torch.cat([z, near])
    assert exponential.in_dual(z).all()
    s = -exponential.dual_barrier(z)[0]
    assert exponential.in_primal(s).all()
    back = -exponential.primal_gradient(s)
    # s is computed from z with a relative error of ~eps / margin, hence 1e-6 near the boundary (measured
    # <= 1.5e-7 on 1,000 such points) and 1e-11 inside
    assert ((back - z).abs().amax(-1) <= 1e-6 * z.abs().amax(-1)).all()
    assert ((back - z).abs().amax(-1)[:200] <= 1e-11 * z.abs().amax(-1)[:200]).all()
    assert torch.allclose((s * exponential.primal_gradient(s)).sum(-1), torch.full((300,), -3.0), atol=1e-8)
    on_boundary = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, math.e]])  # y log(z / y) = x
    assert exponential.primal_gradient(on_boundary).isnan().all()


def test_exp_third_derivative_matches_autodiff():
    g = gen(86)
    y = random_exp_dual(64, g)
    a, b = torch.randn(2, 64, 3, generator=g)

    def hess_times(z, d):
        return torch.func.jvp(torch.func.grad(reference_dual_barrier), (z,), (d,))[1]

    want = torch.vmap(lambda z, u, v: torch.func.jvp(lambda w: hess_times(w, v), (z,), (u,))[1])(y, a, b)
    got = exponential.third_derivative(y, a, b)
    assert ((got - want).abs() <= 1e-9 * (1 + want.abs())).all()
    assert torch.allclose(exponential.third_derivative(y, b, a), got, rtol=1e-10, atol=1e-10)  # symmetric


def test_exp_primal_dual_scaling_identities():
    """Off the central path: H y = s and H z~ = s~ for the shadow iterates s~ = -grad f*(y),
    z~ = -grad f(s); H is the written rank-three form and positive definite. On the central path
    (and where ``dual_only``) the dual scaling is used."""
    g = gen(87)
    s, y = random_exp_primal(100, g), random_exp_dual(100, g)
    mu = (s * y).sum(-1) / exponential.DEGREE
    sc = exponential.exp_scaling(s, y, mu)
    assert sc.primal_dual.all()
    H = torch.linalg.inv(sc.V.mT @ sc.V)
    s_shadow, z_shadow = -exponential.dual_barrier(y)[0], -exponential.primal_gradient(s)
    scale = float(s.abs().max())
    assert torch.allclose(mv(H, y), s, rtol=1e-8, atol=1e-8 * scale)
    assert torch.allclose(mv(H, z_shadow), s_shadow, rtol=1e-8, atol=1e-8 * float(s_shadow.abs().max()))
    assert (torch.linalg.eigvalsh((H + H.mT) / 2) > 0).all()
    # the rank-three form written out from its definition (Dahl-Andersen's conditions, Clarabel's t)
    hess = torch.vmap(torch.func.hessian(reference_dual_barrier))(y)
    m = mu.unsqueeze(-1)
    mu_shadow = (s_shadow * z_shadow).sum(-1) / 3
    d_s, d_z = s - m * s_shadow, y - m * z_shadow
    q = mu_shadow.unsqueeze(-1) * s_shadow - mv(hess, z_shadow)
    curvature = (z_shadow * mv(hess, z_shadow)).sum(-1) - 3 * mu_shadow ** 2
    rest = hess - s_shadow.unsqueeze(-1) * s_shadow.unsqueeze(-2) / 3 - q.unsqueeze(-1) * q.unsqueeze(-2) / curvature[:, None, None]
    t = mu * torch.linalg.matrix_norm(rest)
    axis = torch.linalg.cross(y, z_shadow)
    axis = axis / axis.norm(dim=-1, keepdim=True)

    def outer(v):
        return v.unsqueeze(-1) * v.unsqueeze(-2)

    want = (outer(s) / (s * y).sum(-1)[:, None, None] + outer(d_s) / (d_s * d_z).sum(-1)[:, None, None]
            + t[:, None, None] * outer(axis))
    assert ((H - want).abs() <= 1e-7 * want.abs().amax((-2, -1), keepdim=True)).all()

    central = exponential.exp_scaling(-2.0 * exponential.dual_barrier(y)[0], y, torch.full((100,), 2.0))
    assert not central.primal_dual.any()
    edge = torch.tensor([[1.0, 1.0, math.e]])  # s on the boundary in floating point: no primal gradient
    at_edge = exponential.exp_scaling(edge, y[:1], mu[:1])
    assert not at_edge.primal_dual.any() and at_edge.V.isfinite().all()
    masked = exponential.exp_scaling(s, y, mu, dual_only=torch.arange(100) % 2 == 0)
    assert torch.equal(masked.primal_dual, torch.arange(100) % 2 == 1)
    assert torch.equal(masked.V[1::2], sc.V[1::2])
    dual_H = torch.linalg.inv(masked.V[::2].mT @ masked.V[::2])
    assert torch.allclose(dual_H, bfgs_dual_scaling(s[::2], y[::2], mu[::2]), rtol=1e-7, atol=1e-7 * scale)


def test_exp_corrector_adds_the_third_order_term():
    """combined_rhs = -s - sigma mu grad f*(y) + 1/2 D^3 f*(y)[dy, hess^-1 ds], the Hessian inverse
    from the reference autodiff; without a Cholesky factor (NaN) the term is left out, never NaN."""
    g = gen(88)
    s, y = random_exp_primal(40, g), random_exp_dual(40, g)
    ds, dy = 0.1 * torch.randn(2, 40, 3, generator=g)
    sigma_mu = torch.rand(40, 1, generator=g)
    sc = exponential.exp_scaling(s, y, (s * y).sum(-1) / 3)
    hess = torch.vmap(torch.func.hessian(reference_dual_barrier))(y)
    eta = exponential.third_derivative(y, dy, torch.linalg.solve(hess, ds)) / 2
    want = -s - sigma_mu * sc.grad + eta
    assert torch.allclose(sc.combined_rhs(sigma_mu, ds, dy, s, y), want, rtol=1e-9, atol=1e-9)
    broken = dataclasses.replace(sc, chol=torch.full_like(sc.chol, torch.nan))
    assert torch.allclose(broken.combined_rhs(sigma_mu, ds, dy, s, y), -s - sigma_mu * sc.grad, atol=1e-12)


# --- 4. the solver on programs with known solutions ---------------------------------------------

KINDS = {
    "nonneg": (ConeSpec(nonneg=8), "polyhedral"),
    "soc": (ConeSpec(soc=[4, 3, 3]), "curved"),
    "psd": (ConeSpec(psd=[3, 1, 2, 2]), "curved"),
    "exp": (ConeSpec(exp=3), "curved"),
    "exp_dual": (ConeSpec(exp_dual=3), "curved"),
}


def middle_n(spec: ConeSpec) -> int:
    lo, hi = n_range(spec)
    return (lo + hi) // 2


def check_ipm_solution(spec: ConeSpec, A, b, c, P, x, y, s, family: str) -> None:
    X, Y, S, status = solver.solve(A, b, c, P, spec)
    batch, m, n = A.shape
    assert X.shape == (batch, n) and Y.shape == S.shape == (batch, m) and status.dtype == torch.int64
    assert all(v in RETURNED for v in status.tolist()), status.tolist()
    tol = IPM_TOL[family]
    for name, got, want in (("x", X, x), ("y", Y, y), ("s", S, s)):
        err = float((got - want).abs().max())
        assert err < tol, f"{name}: |ipm - known| = {err:.1e}"
    assert (S[:, :spec.zero] == 0).all()
    assert in_closed_cones(spec, S, dual=False).all() and in_closed_cones(spec, Y, dual=True).all()


def check_refined_solution(spec: ConeSpec, A, b, c, P, x, y, s) -> None:
    sol = solve_cone(A, b, c, spec, P, solver="ipm")
    assert (sol.status == ConeStatus.SOLVED).all()
    for got, want in ((sol.x, x), (sol.y, y), (sol.s, s)):
        assert torch.allclose(got, want, atol=REFINED_TOL)


@pytest.mark.parametrize("zero", [0, 2])
@pytest.mark.parametrize("kind", list(KINDS))
def test_ipm_recovers_known_solution_per_cone(kind, zero):
    spec, family = KINDS[kind]
    spec = dataclasses.replace(spec, zero=zero)
    A, b, c, P, x, y, s = random_program(spec, middle_n(spec), batch=3, seed=99 + zero)
    check_ipm_solution(spec, A, b, c, P, x, y, s, family)
    check_refined_solution(spec, A, b, c, P, x, y, s)


@pytest.mark.parametrize("quadratic", [False, True])
def test_ipm_recovers_known_solution_all_cones(quadratic):
    A, b, c, P, x, y, s = random_program(ALL_CONES, 15, batch=4, quadratic=quadratic, seed=100)
    check_ipm_solution(ALL_CONES, A, b, c, P, x, y, s, "curved")
    check_refined_solution(ALL_CONES, A, b, c, P, x, y, s)


def test_ipm_recovers_known_solution_with_scalings_applied_part_by_part(monkeypatch):
    """Many cones beside few variables apply the scalings part by part (no dense (B, m_K, m_K)
    block-diagonal matrix, engine.cones.block_diagonal): the same solution."""
    monkeypatch.setattr(cone_parts, "_DENSE_ROWS_PER_VARIABLE", 0)
    monkeypatch.setattr(cone_parts, "_DENSE_MAX_ROWS", 0)
    A, b, c, P, x, y, s = random_program(ALL_CONES, 15, batch=4, quadratic=True, seed=100)
    check_ipm_solution(ALL_CONES, A, b, c, P, x, y, s, "curved")


# The interior point method alone (no refinement, no fallback) on 200 random programs of three
# exponential (or dual exponential) cones, two zero-cone rows, n = 6 (the generator of
# benchmarks/cone_fallbacks.py, seed 120): with the primal-dual scaling and the third-order
# correction 200 and 200 SOLVED, the raw x within 9.2e-5 and 7.1e-5 of Clarabel's (relative to
# 1 + |x|); with the dual scaling alone and no correction (the method before) 115 and 113 SOLVED,
# 84 and 78 stalled near the tolerance (INACCURATE), 1 and 9 failed (NUMERICAL_ERROR).
EXP_PROGRAMS, EXP_MIN_SOLVED, EXP_CLARABEL_TOL = 200, 190, 1e-3


@pytest.mark.parametrize("kind", ["exp", "exp_dual"])
def test_ipm_alone_solves_random_exponential_programs(kind):
    spec = ConeSpec(zero=2, **{kind: 3})
    A, b, c, *_ = random_program(spec, 6, batch=EXP_PROGRAMS, seed=120)
    X, _, _, status = solver.solve(A, b, c, None, spec)
    ref = solve_cone(A, b, c, spec, solver="clarabel")
    assert (ref.status == ConeStatus.SOLVED).all()
    solved = status == ConeStatus.SOLVED
    assert int(solved.sum()) >= EXP_MIN_SOLVED, collections.Counter(ConeStatus(v).name for v in status.tolist())
    distance = (X - ref.x).abs().amax(-1) / (1 + ref.x.abs().amax(-1))
    assert float(distance[solved].max()) <= EXP_CLARABEL_TOL


def _iterated(A, b, c, P, spec: ConeSpec, max_iter: int) -> tuple[torch.Tensor, ...]:
    """x, the iterations and the statuses of the interior point method alone, at most ``max_iter`` iterations."""
    parts = tuple(solver.parts_of(spec))
    program, step_parts = solver._setup(A, b, c, P, spec, parts)
    st, status = solver._iterate(program, step_parts, solver.ConeIPMSettings(max_iter=max_iter))
    return st.x, st.iterations, status


@pytest.mark.parametrize("kind", [*KINDS, "all"])
def test_batch_elements_are_solved_independently(kind):
    """An element's iterates must not depend on the other elements of its batch, nor on when they
    stop: alone and in a batch, its iterates agree to round-off after three iterations (a step or a
    centring taken for the batch as a whole would part them at once); in the batch, an element
    that stopped keeps its iterate bit for bit while the others go on; and it ends with the same
    status, as close as the method's accuracy. (The batched linear algebra may round differently
    for another batch size — MKL on an AMD EPYC machine does — and near an exponential cone's
    boundary the last iterations magnify a difference of 1e-15 in the first to 1e-5, and may
    take one more iteration.)"""
    spec = ALL_CONES if kind == "all" else dataclasses.replace(KINDS[kind][0], zero=1)
    for seed in range(102, 110):  # the first batch whose elements stop at different iterations (what is tested)
        A, b, c, P, *_ = random_program(spec, middle_n(spec), batch=3, quadratic=True, seed=seed)
        x, iterations, status = _iterated(A, b, c, P, spec, 60)
        if (status == ConeStatus.SOLVED).all() and len(set(iterations.tolist())) > 1:
            break
    else:
        pytest.fail("no batch of seeds 102-109 has elements stopping at different iterations: the case is not tested")
    early = _iterated(A, b, c, P, spec, 3)
    for i in range(3):
        one = slice(i, i + 1)
        early_alone, final_alone = _iterated(A[one], b[one], c[one], P[one], spec, 3), _iterated(A[one], b[one], c[one], P[one], spec, 60)
        torch.testing.assert_close(early[0][i], early_alone[0][0], rtol=0, atol=1e-10)
        assert final_alone[2][0] == status[i]
        torch.testing.assert_close(x[i], final_alone[0][0], rtol=0, atol=1e-4 * (1 + float(x[i].abs().max())))
        stopped = _iterated(A, b, c, P, spec, int(iterations[i]))[0][i]  # the batch cut off where element i stopped
        assert torch.equal(stopped, x[i])


def test_ipm_shared_and_unbatched_inputs():
    A, b, c, _, x, _, _ = random_program(ALL_CONES, 14, batch=3, shared_A=True, seed=92)
    assert A.dim() == 2
    assert torch.allclose(solve_cone(A, b, c, ALL_CONES, solver="ipm").x, x, atol=REFINED_TOL)
    A, b, c, P, x, _, _ = random_program(ALL_CONES, 14, batch=None, quadratic=True, seed=93)
    sol = solve_cone(A, b, c, ALL_CONES, P, solver="ipm")
    assert sol.x.shape == x.shape and sol.status.shape == ()
    assert torch.allclose(sol.x, x, atol=REFINED_TOL)


def qp_like_program(batch: int, n: int, seed: int):
    """min 1/2 x^T P x + c^T x  s.t.  sum(x) = 1, x >= -1, ||x|| <= 2, with a singular PSD P (rank n - 2)."""
    g = gen(seed)
    spec = ConeSpec(zero=1, nonneg=n, soc=[n + 1])
    eye = torch.eye(n)
    A = torch.cat([torch.ones(1, n), -eye, torch.zeros(1, n), -eye]).expand(batch, -1, -1)
    b = torch.cat([torch.ones(1), torch.ones(n), torch.full((1,), 2.0), torch.zeros(n)]).expand(batch, -1)
    L = torch.randn(batch, n, n - 2, generator=g)
    P = L @ L.mT / n
    c = 3 * torch.randn(batch, n, generator=g)
    return spec, A.contiguous(), b.contiguous(), c, P


def test_ipm_with_singular_quadratic_term_matches_clarabel():
    spec, A, b, c, P = qp_like_program(batch=3, n=6, seed=94)
    ref = solve_cone(A, b, c, spec, P, solver="clarabel")
    assert (ref.status == ConeStatus.SOLVED).all()
    X, Y, S, status = solver.solve(A, b, c, P, spec)
    assert all(v in RETURNED for v in status.tolist())
    assert torch.allclose(X, ref.x, atol=IPM_TOL["curved"])
    assert torch.allclose(Y, ref.y, atol=IPM_TOL["curved"])
    sol = solve_cone(A, b, c, spec, P, solver="ipm")
    assert (sol.status == ConeStatus.SOLVED).all()
    for got, want in ((sol.x, ref.x), (sol.y, ref.y), (sol.s, ref.s)):
        assert torch.allclose(got, want, atol=REFINED_TOL)
    assert (sol.x.norm(dim=-1) > 2 - 1e-6).any() or (sol.x < -1 + 1e-6).any()  # some constraint is active


# --- 5. the Clarabel fallback --------------------------------------------------------------------

def infeasible_program():
    """x0 <= -1 and x0 >= 1 (nonnegative rows -1 - x0 >= 0 and -1 + x0 >= 0), and |x1| <= 1."""
    spec = ConeSpec(nonneg=4)
    A = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    b = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    c = torch.tensor([0.0, 1.0])
    return spec, A, b, c


def test_infeasible_program_falls_back_to_clarabel_certificate():
    spec, A, b, c = infeasible_program()
    _, _, _, status = solver.solve(A.unsqueeze(0), b.unsqueeze(0), c.unsqueeze(0), None, spec)
    assert int(status[0]) in (ConeStatus.MAX_ITER, ConeStatus.NUMERICAL_ERROR)  # no certificates in the IPM
    sol = solve_cone(A, b, c, spec, solver="ipm", on_failure="ignore")
    assert sol.status == ConeStatus.PRIMAL_INFEASIBLE
    assert torch.isnan(sol.x).all() and torch.isnan(sol.y).all() and torch.isnan(sol.s).all()
    with pytest.raises(ConeSolveError, match="primal_infeasible"):
        solve_cone(A, b, c, spec, solver="ipm")


def test_infeasible_elements_of_a_batch_with_psd_cones_fall_back_beside_solved_ones():
    """Element 0 keeps its own b and c, elements 1 and 2 take another element's with A of element 0
    (infeasible): Clarabel certifies them with NaN y and s, which the merged projection of y - s
    (its PSD part by eigh) must not be handed (it raised); the statuses are Clarabel's own."""
    A, b, c, *_ = random_program(ALL_CONES, 16, batch=3, seed=1)
    sol = solve_cone(A[0], b, c, ALL_CONES, solver="ipm", on_failure="ignore")
    ref = solve_cone(A[0], b, c, ALL_CONES, solver="clarabel", on_failure="ignore")
    assert sol.status.tolist() == ref.status.tolist() == [0, 2, 2]
    assert torch.allclose(sol.x[0], ref.x[0], atol=REFINED_TOL)


def test_iteration_limit_falls_back_to_clarabel():
    A, b, c, P, x, _, _ = random_program(ALL_CONES, 15, batch=3, quadratic=True, seed=95)
    _, _, _, status = solver.solve(A, b, c, P, ALL_CONES, solver.ConeIPMSettings(max_iter=2))
    assert (status == ConeStatus.MAX_ITER).all()
    sol = solve_cone(A, b, c, ALL_CONES, P, solver="ipm", solver_options={"max_iter": 2})
    ref = solve_cone(A, b, c, ALL_CONES, P, solver="clarabel")
    assert (sol.status == ConeStatus.SOLVED).all()
    for got, want in ((sol.x, ref.x), (sol.y, ref.y), (sol.s, ref.s)):
        assert torch.allclose(got, want, atol=REFINED_TOL)
    assert torch.allclose(sol.x, x, atol=REFINED_TOL)


def test_without_clarabel_the_interior_point_statuses_stand(monkeypatch):
    """The fallback needs the clarabel package; without it unsolved elements are reported, not raised on."""
    from optlayers.cone import autograd

    monkeypatch.setattr(autograd, "_clarabel_available", lambda: False)
    A, b, c, P, _, _, _ = random_program(ALL_CONES, 15, batch=3, quadratic=True, seed=95)
    sol = solve_cone(A, b, c, ALL_CONES, P, solver="ipm", solver_options={"max_iter": 2}, on_failure="ignore")
    assert (sol.status == ConeStatus.MAX_ITER).all()
    assert torch.isnan(sol.x).all()


def mixed_batch():
    """Three nonnegative programs with known solutions; the middle one made infeasible."""
    spec = ConeSpec(nonneg=8)
    A, b, c, _, x, _, _ = random_program(spec, n_range(spec)[0], batch=3, seed=96)
    A, b = A.clone(), b.clone()
    A[1, :2] = 0
    A[1, 0, 0], A[1, 1, 0] = 1.0, -1.0  # x0 <= -1 and x0 >= 1
    b[1, :2] = -1.0
    return spec, A, b, c, x


def test_mixed_feasible_and_infeasible_batch():
    spec, A, b, c, x = mixed_batch()
    _, _, _, status = solver.solve(A, b, c, None, spec)
    assert status[0] in RETURNED and status[2] in RETURNED and status[1] not in RETURNED
    leaves = {name: [t.clone().requires_grad_() for t in (A, b, c)] for name in ("ipm", "clarabel")}
    weights = torch.randn(3, x.shape[-1], generator=gen(97))
    sols = {}
    for name, (A_, b_, c_) in leaves.items():
        sols[name] = solve_cone(A_, b_, c_, spec, solver=name, on_failure="ignore")
        (sols[name].x[[0, 2]] * weights[[0, 2]]).sum().backward()
    sol = sols["ipm"]
    assert sol.status.tolist() == [ConeStatus.SOLVED, ConeStatus.PRIMAL_INFEASIBLE, ConeStatus.SOLVED]
    assert torch.isnan(sol.x[1]).all()
    assert torch.allclose(sol.x[[0, 2]], x[[0, 2]], atol=REFINED_TOL)
    for g_ipm, g_ref in zip(*(leaves[name][1:] for name in ("ipm", "clarabel"))):  # b and c
        assert (g_ipm.grad[1] == 0).all() and torch.isfinite(g_ipm.grad).all()
        assert torch.allclose(g_ipm.grad, g_ref.grad, atol=GRAD_TOL)
    grad_A = leaves["ipm"][0].grad
    assert torch.allclose(grad_A[[0, 2]], leaves["clarabel"][0].grad[[0, 2]], atol=GRAD_TOL)


def test_failed_element_leaves_A_and_P_gradients_finite():
    spec, A, b, _ = infeasible_program()
    b = torch.stack([b, torch.ones(4)])  # element 0 infeasible, element 1 feasible
    c = torch.tensor([[0.0, 1.0], [0.3, 1.0]])
    A, P = A.clone().requires_grad_(), torch.eye(2).requires_grad_()  # shared by both elements
    sol = solve_cone(A, b, c, spec, P, solver="ipm", on_failure="ignore")
    assert sol.status.tolist() == [ConeStatus.PRIMAL_INFEASIBLE, ConeStatus.SOLVED]
    sol.x[1].sum().backward()
    A_alone, P_alone = A.detach().clone().requires_grad_(), torch.eye(2).requires_grad_()
    solve_cone(A_alone, b[1], c[1], spec, P_alone, solver="ipm").x.sum().backward()
    assert torch.allclose(A.grad, A_alone.grad, atol=1e-9) and torch.allclose(P.grad, P_alone.grad, atol=1e-9)
    assert A_alone.grad.abs().max() > 0


# --- 6. gradients through solve_cone(solver="ipm") ---------------------------------------------

@pytest.mark.parametrize("quadratic, shared_A", [(False, True), (True, False)])
def test_gradients_match_clarabel(quadratic, shared_A):
    A, b, c, P, *_ = random_program(ALL_CONES, 15, batch=2, quadratic=quadratic, shared_A=shared_A, seed=98)
    g = gen(99)
    m = ALL_CONES.size
    vx, vy, vs = torch.randn(2, 15, generator=g), torch.randn(2, m, generator=g), torch.randn(2, m, generator=g)
    grads = {}
    for name in ("ipm", "clarabel"):
        leaves = [t.clone().requires_grad_() for t in (A, b, c, P) if t is not None]
        sol = solve_cone(*leaves[:3], ALL_CONES, leaves[3] if quadratic else None, solver=name)
        ((sol.x * vx).sum() + (sol.y * vy).sum() + (sol.s * vs).sum()).backward()
        grads[name] = [t.grad for t in leaves]
    assert grads["ipm"][0].shape == A.shape
    for g_ipm, g_ref in zip(grads["ipm"], grads["clarabel"]):
        assert g_ipm.abs().max() > 0
        assert torch.allclose(g_ipm, g_ref, rtol=1e-6, atol=GRAD_TOL)


def test_gradcheck_through_ipm():
    spec = ConeSpec(nonneg=2, soc=[3])
    A, b, c, P, *_ = random_program(spec, 2, batch=None, quadratic=True, seed=103)
    inputs = tuple(t.clone().requires_grad_() for t in (A, b, c, P))

    def fn(A, b, c, P):
        sol = solve_cone(A, b, c, spec, P, solver="ipm")
        return sol.x, sol.y, sol.s

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


# --- 7. CUDA -------------------------------------------------------------------------------------

def test_a_graphed_step_solves_as_the_plain_one_and_its_results_outlive_the_next_solve(monkeypatch):
    """On CUDA the eager step is replayed from a CUDA graph (``engine.graphed.GraphedStep``, over a
    batch that keeps its shape and no workspace). Run on the CPU with a stand-in graph whose replay
    runs the captured body: two solves of one shape give, to the bit, the plain step's answers (on a
    batch that keeps its shape too), the first one's still intact after the second has replayed the
    same buffers."""
    from optlayers.engine import graphed
    from tests import stand_in_graph

    run = solver.loop.run
    monkeypatch.setattr(solver.loop, "run", lambda *args, **kwargs: run(*args, **{**kwargs, "compact": False}))
    spec = ConeSpec(zero=3, nonneg=4, soc=[3, 4], exp=2)  # every cone but PSD, which is not graphed (``solver._graphed``)
    programs = [random_program(spec, 15, batch=5, quadratic=True, seed=seed)[:4] for seed in (201, 202)]
    settings = solver.ConeIPMSettings()
    solve = lambda program: solver._solve(*program, spec, settings)  # noqa: E731 — one slice: its outputs as the loop leaves them
    with host.accelerator_schedule():  # the branches a GPU takes (the stand-in capture refuses host reads)
        expected = [[t.clone() for t in solve(program)] for program in programs]

        monkeypatch.setattr(graphed, "_GRAPHS", graphed._Graphs())
        monkeypatch.setattr(graphed, "warm_up", stand_in_graph.warm_up)
        monkeypatch.setattr(graphed, "capture", stand_in_graph.capture)  # records, computing nothing; a replay computes
        monkeypatch.setattr(solver, "replays_graphs", lambda device, compiled: True)
        got = [solve(program) for program in programs]  # the second solve replays the first one's graph
        assert len(graphed._GRAPHS.captured) == 1
        (entry,) = graphed._GRAPHS.captured.values()
        assert entry.graph is not None
        for outputs, want in zip(got, expected):
            for t, w in zip(outputs, want):
                assert torch.equal(t, w)
        assert solver._graphed(torch.device("cuda"), settings, tuple(solver.parts_of(spec)))
        assert not solver._graphed(torch.device("cuda"), settings, tuple(solver.parts_of(ALL_CONES)))  # PSD cones: not graphed


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.filterwarnings("error:optlayers on CUDA:RuntimeWarning")  # the step must be captured, not run uncaptured
def test_a_graphed_step_on_cuda_solves_as_the_cpu_without_psd_cones():
    """Programs without PSD cones (every other kind) run their step on CUDA replayed from a CUDA
    graph (``solver._graphed``): captured (a fallback's warning is an error here), with the CPU's
    statuses and solutions to the method's accuracy, twice (the second solve replays the graph)."""
    from optlayers.engine import graphed

    spec = ConeSpec(zero=3, nonneg=4, soc=[3, 4], exp=2)
    graphed.clear()
    for seed in (301, 302):
        A, b, c, P, x, _, _ = random_program(spec, 12, batch=4, quadratic=True, seed=seed)
        X_cpu, _, _, status_cpu = solver.solve(A, b, c, P, spec)
        X, _, _, status = solver.solve(*(t.cuda() for t in (A, b, c, P)), spec)
        assert torch.equal(status.cpu(), status_cpu)
        returned = torch.tensor([v in RETURNED for v in status_cpu.tolist()])
        assert int(returned.sum()) >= 3
        torch.testing.assert_close(X.cpu()[returned], X_cpu[returned], rtol=0, atol=IPM_TOL["curved"])
    captured = list(graphed._GRAPHS.captured.values())
    assert len(captured) == 1 and captured[0].graph is not None  # one layout, captured once


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.filterwarnings("error:optlayers on CUDA:RuntimeWarning")  # the step must be captured, not run uncaptured
def test_ipm_on_cuda_matches_cpu():
    A, b, c, P, x, _, _ = random_program(ALL_CONES, 15, batch=4, quadratic=True, seed=101)
    raw, refined, grads = {}, {}, {}
    for device in ("cpu", "cuda"):
        data = [t.to(device) for t in (A, b, c, P)]
        X, _, _, status = solver.solve(*data[:3], data[3], ALL_CONES)
        assert X.device.type == device and status.device.type == device
        raw[device] = (X.cpu(), status.cpu())
        leaves = [t.clone().requires_grad_() for t in data]
        sol = solve_cone(*leaves[:3], ALL_CONES, leaves[3], solver="ipm")
        assert sol.x.device.type == device
        (sol.x.sum() + sol.y.square().sum()).backward()
        refined[device] = sol.x.detach().cpu()
        grads[device] = [t.grad.cpu() for t in leaves]
    for device in ("cpu", "cuda"):  # rounding differs between the devices: an element may stall on one only
        X, status = raw[device]
        returned = torch.tensor([v in RETURNED for v in status.tolist()])
        assert int(returned.sum()) >= 3
        assert torch.allclose(X[returned], x[returned], atol=IPM_TOL["curved"])
    assert torch.allclose(refined["cuda"], refined["cpu"], atol=REFINED_TOL)
    assert torch.allclose(refined["cuda"], x, atol=REFINED_TOL)
    for g_cpu, g_cuda in zip(grads["cpu"], grads["cuda"]):
        assert torch.allclose(g_cpu, g_cuda, atol=1e-8)
    spec, A_mix, b_mix, c_mix, x_mix = mixed_batch()  # the fallback merges Clarabel's answers back onto the GPU
    sol = solve_cone(A_mix.cuda(), b_mix.cuda(), c_mix.cuda(), spec, solver="ipm", on_failure="ignore")
    assert sol.x.device.type == "cuda"
    assert sol.status.cpu().tolist() == [ConeStatus.SOLVED, ConeStatus.PRIMAL_INFEASIBLE, ConeStatus.SOLVED]
    assert torch.allclose(sol.x[[0, 2]].cpu(), x_mix[[0, 2]], atol=REFINED_TOL)


@pytest.mark.parametrize("options, message", [
    ({"max_backtracks": 0}, r"ConeIPMSettings.max_backtracks must be an int >= 1, got 0"),
    ({"max_iter": 2.5}, r"ConeIPMSettings.max_iter must be an int >= 1, got 2.5"),
    ({"step_fraction": 0.0}, r"ConeIPMSettings.step_fraction must be a number in \(0.0, 1.0\), got 0.0"),
    ({"tol": 1e-3, "inaccurate_tol": 1e-4}, r"inaccurate_tol \(0.0001\) must be >= tol \(0.001\)"),
])
def test_ipm_settings_are_checked_at_the_door(options, message):
    A, b, c, *_ = random_program(ConeSpec(nonneg=4), 2, batch=1, seed=0)
    with pytest.raises(ValueError, match=message):
        solve_cone(A, b, c, ConeSpec(nonneg=4), solver="ipm", solver_options=options)


def test_solver_checks_shapes_and_takes_a_shared_P():
    spec = ConeSpec(zero=1, nonneg=6)
    A, b, c, P, *_ = random_program(spec, 4, batch=3, quadratic=True, seed=7)
    with pytest.raises(ValueError, match=r"A must be \(B, m, n\)"):
        solver.solve(A[0], b, c, None, spec)
    with pytest.raises(ValueError, match=r"P must be \(n, n\)"):
        solver.solve(A, b, c, P[:, :2], spec)
    with pytest.raises(TypeError, match="must be float64"):
        solver.solve(A.float(), b, c, None, spec)
    with pytest.raises(ValueError, match="max_slices must be an int >= 1"):
        solver.solve(A, b, c, None, spec, max_slices=0)
    shared = P[0]
    together = solver.solve(A, b, c, shared, spec)
    expanded = solver.solve(A, b, c, shared.expand(3, 4, 4), spec)
    for got, want in zip(together, expanded):
        assert torch.equal(got, want)



def test_equality_constrained_program_without_cones():
    """Zero-cone rows only (an equality-constrained QP): no cone parts at all."""
    g = gen(11)
    A, b, c = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, generator=g), torch.randn(2, 5, generator=g)
    P = torch.eye(5).expand(2, 5, 5)
    spec = ConeSpec(zero=3)
    x, y, s, status = solver.solve(A, b, c, P, spec)
    assert (status == ConeStatus.SOLVED).all() and torch.equal(s, torch.zeros_like(s))
    kkt = torch.linalg.solve(torch.cat([torch.cat([P, A.mT], -1), torch.cat([A, torch.zeros(2, 3, 3)], -1)], -2),
                             torch.cat([-c, b], -1))
    assert torch.allclose(x, kkt[:, :5], atol=1e-8) and torch.allclose(y, kkt[:, 5:], atol=1e-8)


def test_exp_scaling_cpu_shortcut_equals_the_merged_scalings():
    """On the CPU the dual scaling is formed only where some cone needs it: with every cone off
    the central path the V is the primal-dual one, exactly as the merged form an accelerator
    computes; with some on it, the merged form itself."""
    g = gen(91)
    s, y = random_exp_primal(60, g), random_exp_dual(60, g)
    mu = (s * y).sum(-1) / exponential.DEGREE
    on_path = torch.cat([s[:30], -2.0 * exponential.dual_barrier(y[30:])[0]])  # the last 30 central
    for s_case in (s, on_path):
        free = exponential.exp_scaling(s_case, y, mu)
        with host.accelerator_schedule():
            merged = exponential.exp_scaling(s_case, y, mu)
        assert torch.equal(free.primal_dual, merged.primal_dual)
        assert torch.equal(free.V, merged.V)
    assert exponential.exp_scaling(s, y, mu).primal_dual.all()
    assert not exponential.exp_scaling(on_path, y, mu).primal_dual[30:].any()


def test_exp_step_search_cpu_shortcut_equals_the_full_search():
    """On the CPU the step search tries its first trials before the others; the answer is the
    full search's, also for elements that need the later (shorter) trials or find none."""
    spec = ConeSpec(exp=2, exp_dual=1)
    parts = solver.parts_of(spec)
    g = gen(93)
    s = torch.stack([random_exp_primal(3, g).flatten() for _ in range(6)])
    y = torch.stack([random_exp_dual(3, g).flatten() for _ in range(6)])
    ds, dy = torch.randn(6, 9, generator=g, dtype=s.dtype), torch.randn(6, 9, generator=g, dtype=s.dtype)
    scale = torch.tensor([0.1, 1.0, 10.0, 100.0, 1e3, 1e6], dtype=s.dtype).unsqueeze(-1)  # long steps need backtracks
    alpha = torch.ones(6, dtype=s.dtype)
    settings = solver.ConeIPMSettings(max_backtracks=20)
    free = cone_parts.exp_step(parts, s, y, ds * scale, dy * scale, alpha, 0.99, settings.backtrack, settings.max_backtracks)
    with host.accelerator_schedule():
        full = cone_parts.exp_step(parts, s, y, ds * scale, dy * scale, alpha, 0.99, settings.backtrack,
                                   settings.max_backtracks)
    assert torch.equal(free[0], full[0]) and torch.equal(free[1], full[1])
    first = cone_parts._EXP_FINE_FACTOR ** (cone_parts._EXP_FINE_TRIALS - 1) * settings.backtrack ** (
        cone_parts._EXP_FIRST_TRIALS - cone_parts._EXP_FINE_TRIALS)
    assert bool((full[0][full[1]] < first).any()), "no element needed the later trials: the case is not tested"
    assert not bool(full[1].all()), "every element found a step: the failure case is not tested"


def test_dropping_finished_elements_copies_the_program_once(monkeypatch):
    """When the loop drops finished elements from its working batch, the program's data is copied
    once: A (B', m, n), b, c and Q for the B' kept elements; the engine's rows are views of A and
    b, not copies beside them."""
    from optlayers.engine import loop

    copied, drops, real_take = [], [], loop.take

    def take(obj, index):
        out = real_take(obj, index)
        if isinstance(obj, solver.State):
            drops.append(len(index))
        elif not isinstance(obj, solver._Residuals):  # the loop's data: entries copied per kept element
            copied.append(sum(t.numel() for t in vars(out).values() if isinstance(t, torch.Tensor)) / len(index))
        return out

    monkeypatch.setattr(loop, "take", take)
    spec = ALL_CONES
    m, n = spec.size, middle_n(spec)
    A, b, c, P, *_ = random_program(spec, n, batch=8, quadratic=True, seed=102)
    solver.solve(A, b, c, P, spec)
    assert drops, "no element was dropped: the case is not tested"
    assert sum(copied) == len(drops) * (m * n + m + n + n * n)  # A, b, c, Q


def test_a_fallback_keeps_the_refined_w_of_the_other_elements(monkeypatch):
    """Where one element falls back to Clarabel, the forward still hands the derivatives a w
    (and exponential roots) for every element: the others' own, the fallback's from its
    refinement; each w projects onto K* to its y, and the gradients are those of the batch
    solved without a fallback."""
    from optlayers.cone import autograd, product

    A, b, c, P, _, _, _ = random_program(ALL_CONES, 15, batch=3, quadratic=True, seed=95)
    A = A.clone().requires_grad_(True)
    solve_cone(A, b, c, ALL_CONES, P, solver="ipm").x.sum().backward()
    expected, A.grad = A.grad, None
    real = solver.solve

    def one_unsolved(*args, **kwargs):
        x, y, s, status = real(*args, **kwargs)
        return x, y, s, torch.where(torch.arange(len(status)) == 1, int(ConeStatus.MAX_ITER), status)

    monkeypatch.setattr(autograd.interior_solver, "solve", one_unsolved)
    settings = autograd.Settings(ALL_CONES, "ipm", "dense", {}, None, None)
    x, y, s, status, _, _, packed = autograd.ConeProgram.apply(A.detach(), b, c, P, settings)
    assert (status == ConeStatus.SOLVED).all() and packed.numel()
    w, roots = autograd._unpack_w(ALL_CONES, packed)
    projected, want_roots = product.project_with_roots(ALL_CONES, w, dual=True)
    torch.testing.assert_close(projected, y, rtol=0, atol=1e-12)
    for got, want in zip(roots, want_roots):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    solve_cone(A, b, c, ALL_CONES, P, solver="ipm").x.sum().backward()
    torch.testing.assert_close(A.grad, expected, rtol=1e-6, atol=1e-7)


def _iteration_counts(spec: ConeSpec, n: int, batch: int, seed: int, **options) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each element's iterations, statuses and distance max|x - x*| / (1 + max|x*|) to the known
    solution, from the interior point method alone (no refinement, no fallback)."""
    A, b, c, _, x_star, *_ = random_program(spec, n, batch=batch, seed=seed)
    parts = tuple(solver.parts_of(spec))
    program, step_parts = solver._setup(A, b, c, None, spec, parts)
    st, status = solver._iterate(program, step_parts, solver.ConeIPMSettings(**options))
    return st.iterations, status, (st.x - x_star).abs().amax(-1) / (1 + x_star.abs().amax(-1))


def _assert_saves_iterations(spec: ConeSpec, n: int, old: dict, gain: float, distance: float) -> None:
    """On a fixed batch of 64 programs, in one run: the default settings and the ``old`` settings
    both solve every element, both within ``distance`` of the known solution; the default settings
    take fewer than ``gain`` times the ``old`` settings' iterations in all, and their slowest
    element takes no more iterations than the ``old`` settings' slowest. Only counts from the same
    run are compared (batched linear algebra rounds differently on different machines, which moves
    single counts by one)."""
    iterations, status, error = _iteration_counts(spec, n, 64, 0)
    before, before_status, before_error = _iteration_counts(spec, n, 64, 0, **old)
    assert (status == ConeStatus.SOLVED).all() and (before_status == ConeStatus.SOLVED).all()
    assert int(iterations.sum()) < gain * int(before.sum())
    assert int(iterations.max()) <= int(before.max())
    assert error.max() <= distance and before_error.max() <= distance


def test_second_order_step_fraction_saves_iterations():
    """Steps that stop 0.98 of the way to the second-order cones' boundary (the other cones 0.99)
    keep the iterates off that boundary, where the next steps are cut short. On a fixed batch of
    programs with four second-order cones: fewer than 0.9 times the iterations in all with 0.99,
    the slowest element no slower; every element solved, as close to the known solution.
    (Measured on an AMD EPYC machine at commit e015c51: 624 iterations in all and at most 13 per
    element, against 719 and 16 at 0.99.)"""
    _assert_saves_iterations(ConeSpec(zero=3, nonneg=4, soc=[5, 5, 2, 8]), 10, {"soc_step_fraction": 0.99},
                             gain=0.9, distance=1e-4)


def test_centring_power_two_saves_iterations_on_the_benchmark_programs():
    """σ = (1 − α_aff)² instead of Clarabel's cube. On a fixed batch of the cone benchmark's
    programs (all five cones, m = 96, n = 48): fewer than 0.97 times the iterations in all with
    the cube, the slowest element no slower; every element solved, as close to the known solution.
    (Measured on an AMD EPYC machine at commit e015c51: 660 iterations in all and at most 14 per
    element, against 687 and 14 with the cube; an Intel machine gave at most 13.)"""
    _assert_saves_iterations(ConeSpec(zero=14, nonneg=30, soc=[10, 10, 10], psd=[4], exp=4), 48, {"centring_power": 3},
                             gain=0.97, distance=1e-4)


def test_nonnegative_step_fraction_saves_iterations_on_linear_programs():
    """Steps that stop 0.999 of the way to the nonnegative rows' boundary (the other cones
    0.99 or less): near the solution that step is just above 1, and 0.99 of it leaves 1 % of the
    residuals for another iteration. On a fixed batch of linear programs (m = 45, n = 20): fewer
    than 0.93 times the iterations in all at 0.99, the slowest element no slower; every element
    solved, as close to the known solution. (Measured on an AMD EPYC machine at commit e015c51:
    432 iterations in all and at most 8 per element, against 481 and 9 at 0.99.)"""
    _assert_saves_iterations(ConeSpec(zero=5, nonneg=40), 20, {"nonneg_step_fraction": 0.99},
                             gain=0.93, distance=1e-6)
