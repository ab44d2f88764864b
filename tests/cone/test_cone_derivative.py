"""Derivatives of the solution map: finite differences, adjoint identity, modes, gradcheck, diffcp."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from optlayers import ConeSpec, solve_cone
from optlayers.cone.testing import ALL_CONES, random_program

FD_STEP = 1e-6
FD_TOL = 1e-5  # solutions are refined to ~1e-13, so central differences are good to ~1e-8 here
PER_CONE = {
    "nonneg": ConeSpec(zero=2, nonneg=8),
    "soc": ConeSpec(zero=2, nonneg=2, soc=[4, 3]),
    "psd": ConeSpec(zero=2, nonneg=2, psd=[3]),
    "exp": ConeSpec(zero=2, nonneg=2, exp=3),
    "exp_dual": ConeSpec(zero=2, nonneg=2, exp_dual=3),
    "all": ALL_CONES,
}
N = {"nonneg": 6, "soc": 5, "psd": 5, "exp": 6, "exp_dual": 6, "all": 15}


def outputs(A, b, c, P, spec, **kwargs):
    sol = solve_cone(A, b, c, spec, P, **kwargs)
    return torch.cat([sol.x, sol.y, sol.s], -1)


def data_direction(A, b, c, P, seed):
    gen = torch.Generator().manual_seed(seed)
    dP = None
    if P is not None:
        L = torch.randn(P.shape, generator=gen)
        dP = L + L.transpose(-1, -2)
    return (torch.randn(A.shape, generator=gen), torch.randn(b.shape, generator=gen),
            torch.randn(c.shape, generator=gen), dP)


def jvp_error(name, quadratic):
    """max |JVP - FD| / (1 + max |FD|) of the solution map (x, y, s) for one random program per cone family."""
    spec = PER_CONE[name]
    A, b, c, P, *_ = random_program(spec, N[name], batch=2, quadratic=quadratic, seed=11)
    dA, db, dc, dP = data_direction(A, b, c, P, seed=12)
    plus = outputs(A + FD_STEP * dA, b + FD_STEP * db, c + FD_STEP * dc, None if P is None else P + FD_STEP * dP, spec)
    minus = outputs(A - FD_STEP * dA, b - FD_STEP * db, c - FD_STEP * dc, None if P is None else P - FD_STEP * dP, spec)
    fd = (plus - minus) / (2 * FD_STEP)
    primals = (A, b, c) if P is None else (A, b, c, P)
    tangents = (dA, db, dc) if P is None else (dA, db, dc, dP)
    _, jvp = torch.func.jvp(lambda *args: outputs(*args, *([None] if P is None else []), spec), primals, tangents)
    return float((jvp - fd).abs().max()) / (1 + float(fd.abs().max()))


@pytest.mark.parametrize("name", list(PER_CONE))
@pytest.mark.parametrize("quadratic", [False, True])
def test_jvp_matches_finite_differences(name, quadratic):
    err = jvp_error(name, quadratic)
    assert err < FD_TOL, f"{name}: |JVP - FD| / (1 + |FD|) = {err:.2e}"


@pytest.mark.slow
def test_report_max_jvp_errors(capsys):
    """Prints the largest |JVP - FD| / (1 + |FD|) of the solution map per cone family (for docs/cone.md)."""
    errors = {name: max(jvp_error(name, quadratic) for quadratic in (False, True)) for name in PER_CONE}
    with capsys.disabled():
        print("\nmax |solution JVP - FD| / (1 + max |FD|) per cone:", {k: f"{v:.1e}" for k, v in sorted(errors.items())})
    assert all(err < FD_TOL for err in errors.values()), errors


@pytest.mark.parametrize("mode", ["dense", "lsqr"])
def test_adjoint_identity(mode):
    A, b, c, P, *_ = random_program(ALL_CONES, 15, batch=3, quadratic=True, seed=13)
    dA, db, dc, dP = data_direction(A, b, c, P, seed=14)
    v = torch.randn(3, 15 + 2 * ALL_CONES.size)
    leaves = [t.clone().requires_grad_() for t in (A, b, c, P)]
    out = outputs(*leaves, ALL_CONES, mode=mode)
    grads = torch.autograd.grad((out * v).sum(), leaves)
    _, jvp = torch.func.jvp(lambda *args: outputs(*args, ALL_CONES, mode=mode), (A, b, c, P), (dA, db, dc, dP))
    lhs = (jvp * v).sum()
    rhs = sum((g * d).sum() for g, d in zip(grads, (dA, db, dc, dP)))
    assert torch.allclose(lhs, rhs, rtol=1e-8), (float(lhs), float(rhs))


def test_dense_and_lsqr_agree():
    A, b, c, _, *_ = random_program(ALL_CONES, 15, batch=2, seed=15)
    grads = {}
    for mode in ("dense", "lsqr", "lsmr"):
        leaves = [t.clone().requires_grad_() for t in (A, b, c)]
        sol = solve_cone(*leaves, ALL_CONES, mode=mode)
        (sol.x.sum() + (sol.y * torch.arange(ALL_CONES.size)).sum()).backward()
        grads[mode] = [t.grad for t in leaves]
    for mode in ("lsqr", "lsmr"):
        for g_dense, g_iter in zip(grads["dense"], grads[mode]):
            assert torch.allclose(g_dense, g_iter, atol=1e-7)


def test_gradcheck_small_problem():
    spec = ConeSpec(zero=1, nonneg=2, soc=[3], exp=1)
    A, b, c, P, *_ = random_program(spec, 4, batch=None, quadratic=True, seed=16)
    inputs = tuple(t.clone().requires_grad_() for t in (A, b, c, P))
    fn = lambda *args: tuple(getattr(solve_cone(*args[:3], spec, args[3]), k) for k in ("x", "y", "s"))  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_shared_A_gradient_is_sum_over_batch():
    A, b, c, _, *_ = random_program(ALL_CONES, 15, batch=3, shared_A=True, seed=17)
    weights = torch.randn(3, 15)
    shared = A.clone().requires_grad_()
    (solve_cone(shared, b, c, ALL_CONES).x * weights).sum().backward()
    total = torch.zeros_like(A)
    for i in range(3):
        single = A.clone().requires_grad_()
        (solve_cone(single, b[i], c[i], ALL_CONES).x * weights[i]).sum().backward()
        total += single.grad
    assert torch.allclose(shared.grad, total, atol=1e-9)


def test_sparse_A_gradient_on_pattern():
    A, b, c, _, *_ = random_program(ALL_CONES, 15, batch=2, shared_A=True, seed=18)
    A = A * (torch.rand(A.shape, generator=torch.Generator().manual_seed(0)) > 0.3)
    dense = A.clone().requires_grad_()
    solve_cone(dense, b, c, ALL_CONES).x.sum().backward()
    sparse = A.to_sparse_coo().requires_grad_()
    solve_cone(sparse, b, c, ALL_CONES).x.sum().backward()
    grad = sparse.grad.to_dense()
    mask = A != 0
    assert torch.allclose(grad[mask], dense.grad[mask], atol=1e-9)
    assert (grad[~mask] == 0).all()


def test_gradients_flow_from_y_and_s_only():
    A, b, c, _, *_ = random_program(ALL_CONES, 15, batch=2, seed=19)

    def loss(c):
        sol = solve_cone(A, b, c, ALL_CONES)
        return sol.y.sum() + sol.s.square().sum()

    leaf = c.clone().requires_grad_()
    loss(leaf).backward()
    direction = torch.randn(c.shape, generator=torch.Generator().manual_seed(0))
    fd = (loss(c + FD_STEP * direction) - loss(c - FD_STEP * direction)) / (2 * FD_STEP)
    assert float(fd.abs()) > 1e-3  # the loss depends on c through y and s
    assert float((leaf.grad * direction).sum()) == pytest.approx(float(fd), rel=1e-5, abs=1e-7)


def test_against_diffcp():
    diffcp = pytest.importorskip("diffcp", reason="diffcp not installed")
    spec = ConeSpec(zero=2, nonneg=6, soc=[4], psd=[2], exp=1)
    A, b, c, _, *_ = random_program(spec, 9, batch=2, seed=20)
    leaves = [t.clone().requires_grad_() for t in (A, b, c)]
    sol = solve_cone(*leaves, spec)
    v = torch.randn(2, 9)
    (sol.x * v).sum().backward()
    for i in range(2):
        x, y, s, _, DT = diffcp.solve_and_derivative(sp.csc_matrix(A[i].numpy()), b[i].numpy(), c[i].numpy(),
                                                     spec.scs_cone(), mode="dense", solve_method="SCS",
                                                     eps=1e-10, max_iters=100000)
        assert np.allclose(x, sol.x[i].detach().numpy(), atol=1e-6)
        dA, db, dc = DT(v[i].numpy(), np.zeros(spec.size), np.zeros(spec.size))
        # diffcp's dA is sparse on A's pattern (dense here); its cotangents carry the same sign convention
        assert np.allclose(dc, leaves[2].grad[i].numpy(), atol=1e-4)
        assert np.allclose(db, leaves[1].grad[i].numpy(), atol=1e-4)
        assert np.allclose(dA.toarray(), leaves[0].grad[i].numpy(), atol=1e-4)


@pytest.mark.parametrize("bound, warns", [(None, True), (1e-3, False)])  # bound in units of RESIDUAL_WARN
def test_inaccurate_derivative_solve_warns_unless_known_accurate(monkeypatch, bound, warns):
    """The adjoint warns when its linear solve's residual is above RESIDUAL_WARN; it skips the look
    (a host sync) only when the solver has bounded every residual below it on the host."""
    import dataclasses
    import warnings

    from optlayers.cone import derivative, linsolve

    real = linsolve.solve_dense

    def inaccurate(*args, **kwargs):
        result = real(*args, **kwargs)
        scale = derivative.RESIDUAL_WARN
        return dataclasses.replace(result, residual=torch.full_like(result.residual, 1e3 * scale),
                                   bound=None if bound is None else bound * scale)

    monkeypatch.setattr(linsolve, "solve_dense", inaccurate)
    spec = ConeSpec(zero=1, nonneg=4)
    A, b, c, *_ = random_program(spec, 3, batch=2, seed=0)
    A = A.clone().requires_grad_(True)
    sol = solve_cone(A, b, c, spec)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol.x.sum().backward()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("derivative's linear system" in m for m in messages) == warns, messages


def test_derivatives_at_the_refined_w_match_those_at_y_minus_s():
    """The refinement hands the derivatives its last w (whose projection is y) and the exponential
    cones' roots there; they agree with the derivatives taken at y - s (round-off apart). (That the
    adjoint then makes no look of the root iteration is pinned by test_cone_kernels' sync bounds.)"""
    import dataclasses

    from optlayers.cone import autograd, derivative

    A, b, c, *_ = random_program(ALL_CONES, 14, batch=4, seed=11)
    settings = autograd.Settings(ALL_CONES, "ipm", "dense", {}, None, None)
    point, status, _ = autograd._solve_and_refine(A, b, c, None, settings)
    assert point.w is not None and sum(r is not None for r in point.roots) >= 1
    assert torch.allclose(point.w, point.y - point.s, atol=1e-12)
    plain = dataclasses.replace(point, w=None, roots=None)
    g = torch.Generator().manual_seed(12)
    vx, vy, vs = (torch.randn(4, k, generator=g, dtype=torch.float64) for k in (14, ALL_CONES.size, ALL_CONES.size))
    torch.testing.assert_close(derivative.vjp(point, "dense", vx, vy, vs), derivative.vjp(plain, "dense", vx, vy, vs),
                               rtol=1e-9, atol=1e-9)
    dA, db, dc = (torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (A, b, c))
    for got, want in zip(derivative.jvp(point, "dense", dA, db, dc, None), derivative.jvp(plain, "dense", dA, db, dc, None)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("quadratic", [False, True])
@pytest.mark.parametrize("spec", [ALL_CONES, ConeSpec(zero=2, nonneg=4), ConeSpec(soc=[3], exp=1, psd=[2])],
                         ids=["all", "diagonal", "no-diagonal-lead"])
def test_dense_residual_derivative_matches_its_products(quadratic, spec):
    """M's dense form (written block by block into one column-major buffer, D in place, A^T D on
    D's diagonal lead as scaled columns) is the matrix of its matvec and rmatvec, for a
    batch-shared and a batched A, and for the elements picked by an index; the product cone's D
    written into a block of a larger tensor, or broadcast over a batch, is its dense()."""
    from optlayers.cone import embedding, product

    gen = torch.Generator().manual_seed(3)
    m, n, batch = spec.size, 5, 3
    A = torch.randn(batch, m, n, dtype=torch.float64, generator=gen)
    P = None
    if quadratic:
        root = torch.randn(batch, n, n, dtype=torch.float64, generator=gen)
        P = root @ root.mT
    v = torch.randn(batch, m, dtype=torch.float64, generator=gen)
    D = product.derivative(spec, v, dual=True)
    eye = torch.eye(n + m, dtype=torch.float64).expand(batch, n + m, n + m)
    for shared in (False, True):
        M = embedding.ResidualDerivative(A[0] if shared else A, P, D)
        columns = torch.stack([M.matvec(e) for e in eye.unbind(-1)], -1)  # M e_j, column j
        rows = torch.stack([M.rmatvec(e) for e in eye.unbind(-1)], -2)  # M^T e_i, row i
        torch.testing.assert_close(M.dense(batch), columns, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(M.dense(batch), rows, rtol=1e-13, atol=1e-13)
        pick = torch.tensor([True, False, True])
        torch.testing.assert_close(M.dense(batch, pick), columns[pick], rtol=1e-13, atol=1e-13)
    big = torch.full((batch, m + 2, m + 2), 7.0, dtype=torch.float64).mT
    D.write_dense(big[:, 1:-1, 1:-1])
    assert torch.equal(big[:, 1:-1, 1:-1], D.dense()) and (big[:, 0] == 7).all() and (big[:, -1] == 7).all()
    one = product.derivative(spec, v[:1], dual=True)
    torch.testing.assert_close(one.write_dense(torch.empty(batch, m, m, dtype=torch.float64)),
                               one.dense().expand(batch, m, m), rtol=0, atol=0)
