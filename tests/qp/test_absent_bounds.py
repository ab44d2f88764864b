"""Sides of +inf in h are absent bounds: solve_qp and QPFunction solve the QPs without those rows
(``problem.without_absent_sides``), whose λ is 0 and s +inf, with zero derivatives. The reference is
each QP solved with its absent rows left out of G and h."""
import math

import pytest
import torch

from optlayers import QPFunction, Status, solve_qp
from optlayers.cone.qp import solve_qp_cone
from qp_problems import generic_qps


def _with_absent_rows():
    """The generic QPs with a box −3 ≤ z ≤ 3 appended, a different set of its sides +inf in each
    QP (the first QP none, the last all), and the mask of those sides."""
    Q, p, G, h, A, b, w = generic_qps()
    B, n, k = p.shape[0], p.shape[1], h.shape[1]
    eye = torch.eye(n, dtype=torch.float64).expand(B, n, n)
    G = torch.cat([G, eye, -eye], 1)
    h = torch.cat([h, torch.full((B, 2 * n), 3.0, dtype=torch.float64)], 1)
    absent = torch.zeros(B, k + 2 * n, dtype=torch.bool)
    generator = torch.Generator().manual_seed(1)
    absent[1:-1] = torch.rand(B - 2, k + 2 * n, generator=generator) < 0.4
    absent[-1] = True
    return Q, p, G, h.masked_fill(absent, math.inf), A, b, w, absent


def _leaves(*tensors):
    return [t.clone().requires_grad_() for t in tensors]


def test_sides_of_plus_inf_are_the_qps_without_those_rows():
    """Solution, λ, s and the gradients w.r.t. every input of 8 QPs, each with its own set of absent
    sides (none, some, all): those of the QPs with the rows left out, solved one by one; at the
    absent rows λ = 0, s = +inf, and the gradients of G's rows and of h are exactly 0."""
    Q, p, G, h, A, b, w, absent = _with_absent_rows()
    leaves = _leaves(Q, p, G, h, A, b)
    sol = solve_qp(*leaves)
    assert (sol.status == Status.SOLVED).all()
    assert (sol.lam[absent] == 0).all() and torch.isposinf(sol.s[absent]).all()
    ((sol.z * w).sum() + (sol.lam.masked_fill(absent, 0.0) * 0.3).sum()).backward()
    gQ, gp, gG, gh, gA, gb = (t.grad for t in leaves)
    assert (gG[absent] == 0).all() and (gh[absent] == 0).all()
    for i in range(p.shape[0]):
        keep = ~absent[i]
        ref = _leaves(Q[i], p[i], G[i][keep], h[i][keep], A[i], b[i])
        one = solve_qp(*ref)
        ((one.z * w[i]).sum() + (one.lam * 0.3).sum()).backward()
        torch.testing.assert_close(sol.z[i], one.z, rtol=0, atol=1e-9)
        torch.testing.assert_close(sol.lam[i][keep], one.lam, rtol=0, atol=1e-9)
        torch.testing.assert_close(sol.s[i][keep], one.s, rtol=0, atol=1e-9)
        for got, want in zip((gQ[i], gp[i], gG[i][keep], gh[i][keep], gA[i], gb[i]), (t.grad for t in ref)):
            if want is None:  # the last QP's G and h without rows: empty, and no gradient
                assert got.numel() == 0
            else:
                torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_absent_sides_gradient_against_finite_differences():
    """The gradients w.r.t. p and the finite sides of a QP with absent sides against central
    differences of the solve itself."""
    Q, p, G, h, A, b, w, absent = (t[3] for t in _with_absent_rows())
    assert absent.any() and not absent.all()

    def loss(p, h):
        return float((solve_qp(Q, p, G, h, A, b).z * w).sum())

    p_, h_ = _leaves(p, h)
    (solve_qp(Q, p_, G, h_, A, b).z * w).sum().backward()
    eps = 1e-6
    for j in range(p.shape[0]):
        step = eps * torch.eye(p.shape[0], dtype=p.dtype)[j]
        assert abs((loss(p + step, h) - loss(p - step, h)) / (2 * eps) - float(p_.grad[j])) < 1e-6
    for j in (~absent).nonzero().squeeze(-1).tolist():
        step = eps * torch.eye(h.shape[0], dtype=h.dtype)[j]
        assert abs((loss(p, h + step) - loss(p, h - step)) / (2 * eps) - float(h_.grad[j])) < 1e-6


def test_qpfunction_takes_plus_inf_sides_and_the_compiled_path_agrees(eager_backend):
    """QPFunction (qpth's keywords) and ``compile=True`` (traced by dynamo) take absent sides alike."""
    Q, p, G, h, A, b, w, absent = _with_absent_rows()
    eager = solve_qp(Q, p, G, h, A, b)
    z = QPFunction(verbose=-1)(Q, p, G, h, A, b)
    torch.testing.assert_close(z, eager.z, rtol=0, atol=1e-12)
    leaves = _leaves(p, h)
    compiled = solve_qp(Q, leaves[0], G, leaves[1], A, b, compile=True)
    (compiled.z * w).sum().backward()
    torch.testing.assert_close(compiled.z, eager.z, rtol=0, atol=1e-9)
    assert torch.isposinf(compiled.s[absent]).all() and (leaves[1].grad[absent] == 0).all()


def test_absent_sides_under_vmap_and_forward_mode():
    """``torch.func.vmap`` over the batch and ``torch.func.jvp`` give the batched solve's answers."""
    Q, p, G, h, A, b, w, absent = _with_absent_rows()
    batched = solve_qp(Q, p, G, h, A, b)
    mapped = torch.func.vmap(lambda *data: solve_qp(*data).z)(Q, p, G, h, A, b)
    torch.testing.assert_close(mapped, batched.z, rtol=0, atol=1e-12)
    dp = torch.randn_like(p)
    _, tangent = torch.func.jvp(lambda p: solve_qp(Q, p, G, h, A, b).z, (p,), (dp,))
    p_ = p.clone().requires_grad_()
    z = solve_qp(Q, p_, G, h, A, b).z
    reverse = torch.stack([torch.autograd.grad(z[:, j].sum(), p_, retain_graph=True)[0] for j in range(p.shape[1])], -1)
    torch.testing.assert_close(tangent, (reverse.mT @ dp.unsqueeze(-1)).squeeze(-1), rtol=0, atol=1e-8)


def test_every_side_absent_is_the_qp_without_inequalities():
    Q, p, G, h, A, b, w, absent = _with_absent_rows()
    sol = solve_qp(Q, p, G, torch.full_like(h, math.inf), A, b)
    torch.testing.assert_close(sol.z, solve_qp(Q, p, A=A, b=b).z, rtol=0, atol=1e-9)


def test_absent_sides_with_relaxation():
    """``on_failure="relax"`` relaxes a QP with absent sides whose finite rows are infeasible
    (z₀ ≤ −1 and −z₀ ≤ −1): it holds the relaxation of the QP without those rows."""
    Q, p, G, h, A, b, w, absent = _with_absent_rows()
    n, k = p.shape[1], h.shape[1] - 2 * p.shape[1]
    absent[2, [k, k + n]] = False
    h = h.masked_fill(absent, math.inf)
    h[2, [k, k + n]] = -1.0
    keep = ~absent[2]
    with pytest.warns(RuntimeWarning, match="elastic relaxation"):
        sol = solve_qp(Q, p, G, h, A, b, on_failure="relax")
    with pytest.warns(RuntimeWarning, match="elastic relaxation"):
        one = solve_qp(Q[2], p[2], G[2][keep], h[2][keep], A[2], b[2], on_failure="relax")
    assert sol.relaxed.tolist() == [False, False, True] + [False] * 5 and bool(one.relaxed)
    torch.testing.assert_close(sol.z[2], one.z, rtol=0, atol=1e-8)
    assert torch.isposinf(sol.s[2][absent[2]]).all() and (sol.lam[2][absent[2]] == 0).all()


@pytest.mark.parametrize("side, pattern", [(-math.inf, r"h contains NaN or -inf at batch elements 4 .*Gz ≤ -inf has no solution"),
                                           (math.nan, r"h contains NaN or -inf")])
def test_minus_inf_and_nan_sides_are_refused(side, pattern):
    Q, p, G, h, A, b, w, absent = _with_absent_rows()
    h = h.clone()
    h[4, 0] = side
    with pytest.raises(ValueError, match=pattern):
        solve_qp(Q, p, G, h, A, b)


def test_the_cone_route_takes_plus_inf_sides_alike():
    """``solve_qp_cone`` (Clarabel forward, the HSDE derivative) takes absent sides as ``solve_qp``
    does: the same z, λ, s and gradient w.r.t. h."""
    Q, p, G, h, A, b, w, absent = _with_absent_rows()
    h_qp, h_cone = _leaves(h, h)
    qp, cone = solve_qp(Q, p, G, h_qp, A, b), solve_qp_cone(Q, p, G, h_cone, A, b)
    (qp.z * w).sum().backward()
    (cone.z * w).sum().backward()
    torch.testing.assert_close(cone.z, qp.z, rtol=0, atol=1e-8)
    assert torch.isposinf(cone.s[absent]).all() and (cone.lam[absent] == 0).all()
    torch.testing.assert_close(h_cone.grad, h_qp.grad, rtol=0, atol=1e-6)


def test_plus_inf_sides_are_refused_by_the_solver_called_directly():
    """The autograd function itself (no ``solve_prepared`` around it) refuses them, naming the ways
    to write an absent bound."""
    from optlayers.qp.autograd import QPSolveFn
    from optlayers.qp.ipm import default_settings
    Q, p, G, h, A, b, w, absent = _with_absent_rows()
    with pytest.raises(ValueError, match=r"h contains \+inf at batch elements 1, 2, 3, 4, 5, 6, 7 .*take it as an absent bound"):
        QPSolveFn.apply(Q, p, G, h, A, b, default_settings(torch.float64, None, None, None, False), False, "ignore", (8,))
