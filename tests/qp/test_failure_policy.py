"""Failures never end a training run: the layers give failed elements a finite output, a zero
gradient, a warning that names them and a status; ``on_failure="relax"`` gives infeasible QPs the
solution of their elastic relaxation, whose gradients are checked against finite differences of
the relaxation solved independently (written out in numpy, solved by Clarabel)."""
import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch

from optlayers import ConeLayer, ConeSpec, OptNet, OptNetTV, QPFunction, Relaxation, Status, solve_qp

from qp_problems import clarabel_solve

pytest.importorskip("clarabel")


def mixed_batch():
    """Element 1 is primal infeasible (z₁ ≤ −1 and z₁ ≥ 1); 0 and 2 are feasible."""
    Q = torch.eye(2)
    p = torch.tensor([[2.0, 1.0], [1.0, 1.0], [0.5, -1.0]])
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    h = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0]])
    return Q, p, G, h


def relaxed_reference(Q, p, G, h, relaxation, A=None, b=None):
    """The elastic relaxation written out independently over (z, t, u, v) and solved by Clarabel."""
    Q, p, G, h = (t.detach().numpy() for t in (Q, p, G, h))
    n, k = p.shape[0], h.shape[0]
    m = 0 if A is None else A.shape[0]
    A = np.zeros((0, n)) if A is None else A.detach().numpy()
    b = np.zeros(0) if b is None else b.detach().numpy()
    rho, eps = relaxation.penalty, relaxation.quadratic
    N = n + k + 2 * m
    Q_r = np.zeros((N, N))
    Q_r[:n, :n] = Q
    Q_r[n:, n:] = eps * np.eye(k + 2 * m)
    p_r = np.concatenate([p, rho * np.ones(k + 2 * m)])
    G_r = np.zeros((k + k + 2 * m, N))
    G_r[:k, :n], G_r[:k, n:n + k] = G, -np.eye(k)           # G z - t <= h
    G_r[k:, n:] = -np.eye(k + 2 * m)                        # t, u, v >= 0
    h_r = np.concatenate([h, np.zeros(k + 2 * m)])
    A_r = np.zeros((m, N))
    A_r[:, :n], A_r[:, n + k:n + k + m], A_r[:, n + k + m:] = A, -np.eye(m), np.eye(m)  # A z - u + v = b
    as_t = torch.tensor
    x = clarabel_solve(as_t(Q_r), as_t(p_r), as_t(G_r), as_t(h_r), as_t(A_r) if m else None, as_t(b) if m else None)[0]
    return x[:n]


def test_qpfunction_default_keeps_training_alive():
    Q, p, G, h = mixed_batch()
    p = p.clone().requires_grad_()
    layer = QPFunction()
    with pytest.warns(RuntimeWarning, match=r"1 of 3 QPs were not solved: primal_infeasible \(elements 1\).*"
                                            r"Their outputs are 0 and their gradients zero"):
        z = layer(Q, p, G, h)
    assert layer.last_status.tolist() == [Status.SOLVED, Status.PRIMAL_INFEASIBLE, Status.SOLVED]
    assert torch.isfinite(z).all() and (z[1] == 0).all()
    reference = solve_qp(Q, p[[0, 2]].detach(), G, h[[0, 2]])
    torch.testing.assert_close(z[[0, 2]].detach(), reference.z, atol=1e-10, rtol=0)
    z.square().sum().backward()
    assert torch.isfinite(p.grad).all() and (p.grad[1] == 0).all() and (p.grad[[0, 2]] != 0).all()


def test_solve_qp_keeps_nan_by_default_and_fills_when_asked():
    Q, p, G, h = mixed_batch()
    assert torch.isnan(solve_qp(Q, p, G, h, on_failure="ignore").z[1]).all()
    filled = solve_qp(Q, p, G, h, on_failure="ignore", failed_value=0.0)
    assert (filled.z[1] == 0).all() and (filled.lam[1] == 0).all() and torch.isfinite(filled.z).all()


@pytest.mark.parametrize("failed_value", [0.0, math.nan])
def test_forward_mode_through_a_failure_is_zero_as_reverse_mode(failed_value):
    """A failed element's outputs are the constant ``failed_value`` (NaN by default): their tangent
    is zero, as their gradient is in reverse mode."""
    Q, p, G, h = mixed_batch()
    tangent = torch.ones_like(p)
    z, dz = torch.func.jvp(lambda q: solve_qp(Q, q, G, h, on_failure="ignore", failed_value=failed_value).z, (p,), (tangent,))
    assert torch.equal(torch.isnan(z[1]), torch.full_like(z[1], math.isnan(failed_value), dtype=torch.bool))
    assert (dz[1] == 0).all() and torch.isfinite(dz).all() and (dz[[0, 2]] != 0).any()


@pytest.mark.parametrize("make", [
    lambda: OptNet(4, n_ineq=3, n_eq=1, max_iter=1),
    lambda: OptNetTV(6, lam=1.0, max_iter=1),
])
def test_optnet_layers_train_through_failures(make):
    """max_iter=1 makes every QP fail: the step still runs on finite values, the status says why."""
    layer = make()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(5, layer.n)
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match=r"5 of 5 QPs were not solved: max_iter"):
            out = layer(x)
        loss = (out - x).square().sum()
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert (layer.last_status == Status.MAX_ITER).all() and (out == 0).all()
    assert all(torch.isfinite(q).all() for q in layer.parameters())


def test_optnet_raise_still_raises_when_asked():
    with pytest.raises(RuntimeError, match="were not solved"):
        OptNet(4, n_ineq=3, max_iter=1, on_failure="raise")(torch.randn(2, 4))


def test_cone_layer_default_keeps_training_alive():
    pytest.importorskip("clarabel")
    spec = ConeSpec(nonneg=2)
    A = torch.tensor([[1.0], [-1.0]]).expand(2, 2, 1)
    b = torch.tensor([[1.0, 1.0], [-1.0, -1.0]], requires_grad=True)  # element 1: x ≤ -1 and x ≥ 1
    c = torch.tensor([[1.0], [1.0]])
    layer = ConeLayer(spec)
    with pytest.warns(RuntimeWarning, match=r"1 of 2 cone programs were not solved: primal_infeasible \(elements 1\)"):
        sol = layer(A, b, c)
    assert layer.last_status.tolist() == [Status.SOLVED, Status.PRIMAL_INFEASIBLE]
    assert torch.isfinite(sol.x).all() and (sol.x[1] == 0).all() and (sol.y[1] == 0).all()
    (sol.x.sum() + sol.y.sum()).backward()
    assert torch.isfinite(b.grad).all() and (b.grad[1] == 0).all() and (b.grad[0] != 0).any()


def test_relax_solves_the_elastic_relaxation_of_infeasible_elements_only():
    Q, p, G, h = mixed_batch()
    relaxation = Relaxation()
    with pytest.warns(RuntimeWarning, match=r"1 of 3 QPs were primal infeasible and hold the solution of their "
                                            r"elastic relaxation \(elements 1\)"):
        sol = solve_qp(Q, p, G, h, on_failure="relax")
    assert sol.relaxed.tolist() == [False, True, False]
    assert sol.status.tolist() == [Status.SOLVED, Status.PRIMAL_INFEASIBLE, Status.SOLVED]
    # z₁ ≤ −1 + t₁, z₁ ≥ 1 − t₂: t₁ + t₂ = 2 whatever z₁, so z₁ minimises ½z₁² + z₁ + ½ε((z₁ + 1)² + (1 − z₁)²)
    exact = [-1.0 / (1.0 + 2.0 * relaxation.quadratic), -1.0]
    np.testing.assert_allclose(sol.z[1].numpy(), exact, atol=1e-12)
    # Clarabel meets its tolerance with the penalty 1e3 in the objective only to about 1e-6
    np.testing.assert_allclose(sol.z[1].numpy(), relaxed_reference(Q, p[1], G, h[1], relaxation), atol=1e-5)
    plain = solve_qp(Q, p[[0, 2]], G, h[[0, 2]])
    torch.testing.assert_close(sol.z[[0, 2]], plain.z, atol=1e-12, rtol=0)
    assert (sol.s[1] >= 0).all() and (sol.lam[1] >= 0).all()


def test_relax_of_an_unbatched_qp_says_so_without_naming_elements():
    """Unbatched data has no elements to name (the warning had read "elements ()")."""
    Q, p, G, h = mixed_batch()
    with pytest.warns(RuntimeWarning, match=r"^the QP was primal infeasible and holds the solution of its elastic relaxation$"):
        sol = solve_qp(Q, p[1], G, h[1], on_failure="relax")
    assert bool(sol.relaxed) and sol.z.shape == p[1].shape


def test_relax_with_equalities_matches_the_independent_relaxation():
    Q, p = torch.eye(3), torch.tensor([1.0, -1.0, 0.5])
    A = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    b = torch.tensor([1.0, 2.0])  # contradictory equalities
    G, h = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([-1.0])
    relaxation = Relaxation(penalty=10.0, quadratic=0.1)
    with pytest.warns(RuntimeWarning, match="elastic relaxation"):
        sol = solve_qp(Q, p, G, h, A, b, on_failure="relax", relaxation=relaxation)
    assert bool(sol.relaxed)
    np.testing.assert_allclose(sol.z.numpy(), relaxed_reference(Q, p, G, h, relaxation, A, b), atol=1e-7)


def test_training_continues_when_a_learned_h_makes_the_constraints_contradictory():
    """h is learned; its regulariser pushes h₁ + h₂ below 0, where z₁ ≤ h₁ and −z₁ ≤ h₂ contradict.
    With on_failure="relax" every step has finite outputs and gradients, and at an infeasible
    point the gradient is that of the relaxed problem (central finite differences via Clarabel)."""
    Q = torch.eye(2)
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    h = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    target = torch.tensor([0.3, -0.2])
    p = torch.tensor([[-0.5, 0.1], [0.4, 0.2]])
    relaxation = Relaxation(penalty=5.0, quadratic=0.5)
    layer = QPFunction(on_failure="relax", relaxation=relaxation)
    optimizer = torch.optim.SGD([h], lr=0.2)
    statuses = []

    def loss_of(z, h):
        return (z - target).square().sum() + 2.0 * h.sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(8):
            z = layer(Q, p, G, h)
            loss = loss_of(z, h)
            optimizer.zero_grad()
            loss.backward()
            assert torch.isfinite(z).all() and torch.isfinite(loss) and torch.isfinite(h.grad).all()
            statuses.append(layer.last_status.tolist())
            optimizer.step()
    assert statuses[0] == [Status.SOLVED] * 2 and statuses[-1] == [Status.PRIMAL_INFEASIBLE] * 2
    assert float(h.detach().sum()) < 0

    # the relaxed gradient at the final, infeasible h against finite differences of the relaxation
    h_now = h.detach().clone().requires_grad_()
    with pytest.warns(RuntimeWarning, match="elastic relaxation"):
        z = layer(Q, p, G, h_now)
    (z - target).square().sum().backward()

    def reference_loss(hv):
        return sum(float(np.sum((relaxed_reference(Q, p[i], G, torch.tensor(hv), relaxation) - target.numpy()) ** 2))
                   for i in range(2))

    step, fd = 1e-5, np.zeros(2)
    for j in range(2):
        e = np.zeros(2)
        e[j] = step
        fd[j] = (reference_loss(h_now.detach().numpy() + e) - reference_loss(h_now.detach().numpy() - e)) / (2 * step)
    assert np.abs(fd).max() > 1e-3  # the relaxed gradient is informative, not zero
    np.testing.assert_allclose(h_now.grad.numpy(), fd, rtol=1e-4, atol=1e-6)


def uncertified_batch():
    """Two infeasible problems in float64 whose certificate the direction test alone missed: a 1-D LP
    (z ≤ −2.84 from the first row, z ≥ −1.83 from the third) and a 3-variable QP with an
    equality (it ended MAX_ITER then)."""
    d = torch.float64
    lp = (torch.zeros(1, 1, dtype=d), torch.tensor([-0.1], dtype=d), torch.tensor([[2.5], [0.7], [-0.3], [-1.3]], dtype=d),
          torch.tensor([-7.1, -1.5, 0.55, 2.4], dtype=d), None, None)
    qp = (torch.tensor([[1.3504498399215186, 0.028643842024417693, -0.15659971047237045],
                        [0.028643842024417693, 0.007275809409710365, 0.01286723870417087],
                        [-0.15659971047237045, 0.01286723870417087, 0.06718826661167589]], dtype=d),
          torch.tensor([-0.07760010782718937, 1.8712949571402568, 0.6546438876618429], dtype=d),
          torch.tensor([[-0.7853935449962534, -1.4258229557637552, -0.06606952904007542],
                        [-0.8863863420265747, -2.47292100561565, -1.0843268490465838],
                        [-0.1930908877730821, 1.2393124833917384, -0.949502974744384],
                        [0.992186196676654, -0.15964563475331758, 0.5756124267856332],
                        [-0.8615261985677211, 0.5056529199509903, -0.14489842017632287],
                        [-1.2985904224036569, 1.7709376128084515, 0.23677686499241177],
                        [-1.1302543795254474, -0.16426531204970665, -0.3571727311610039],
                        [-0.5589407399353263, -1.703810792935872, 0.7215315505830605],
                        [-0.8138384165735475, -0.5591459381088011, -0.8364159721866883],
                        [0.41385289163058575, -1.18082758521727, -0.17847176545399335]], dtype=d),
          torch.tensor([1.125820866348606, -0.2524340465724646, -0.15610696036306732, 1.1535439319165555,
                        -0.21003539783367822, -0.741778014975391, 0.36117169040037694, -2.037222417208104,
                        0.08453627609720528, -0.41929556692724546], dtype=d),
          torch.tensor([[1.5960143295690055, -0.5938703696335703, 1.9757411681311077]], dtype=d),
          torch.tensor([1.0858935113911918], dtype=d))
    return lp, qp


@pytest.mark.parametrize("which", ["lp", "qp"])
def test_relax_reaches_infeasible_elements_whatever_their_status(which):
    """Whether or not the certificate is found, an infeasible element is relaxed (checked against the
    relaxation solved by Clarabel)."""
    problem = dict(zip(("lp", "qp"), uncertified_batch()))[which]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sol = solve_qp(*problem, on_failure="relax")
    assert bool(sol.relaxed) and int(sol.status) in (Status.PRIMAL_INFEASIBLE, Status.MAX_ITER, Status.NUMERICAL_ERROR)
    np.testing.assert_allclose(sol.z.numpy(), relaxed_reference(*problem[:4], Relaxation(), *problem[4:]), atol=1e-5)


@pytest.mark.parametrize("which", ["lp", "qp"])
def test_relax_reaches_infeasible_elements_without_a_certificate(monkeypatch, which):
    """With the certificate never believed (its persistence out of reach), an infeasible element
    stops MAX_ITER or NUMERICAL_ERROR with its primal residual far above tolerance: it is relaxed,
    keeps its status, and the warning says it has no certificate."""
    from optlayers.qp import ipm

    monkeypatch.setattr(ipm, "_CERTIFICATE_PERSISTENCE", 10**9)
    problem = dict(zip(("lp", "qp"), uncertified_batch()))[which]
    plain = solve_qp(*problem, on_failure="ignore")
    assert int(plain.status) in (Status.MAX_ITER, Status.NUMERICAL_ERROR) and float(plain.primal_residual) > 1e-3
    with pytest.warns(RuntimeWarning, match=r"^the QP was primal infeasible, or stopped with the primal residual "
                                            r"above tolerance \(it has no infeasibility certificate; its status: max_iter "
                                            r"or numerical_error\), and holds the solution of its elastic relaxation$"):
        sol = solve_qp(*problem, on_failure="relax")
    assert bool(sol.relaxed) and int(sol.status) == int(plain.status)
    assert int(sol.iterations) == int(plain.iterations) and torch.isnan(plain.z).all()
    np.testing.assert_allclose(sol.z.numpy(), relaxed_reference(*problem[:4], Relaxation(), *problem[4:]), atol=1e-5)
    assert (sol.s >= 0).all() and (sol.lam >= 0).all()


def feasible_batch(batch=12, n=4, k=8):
    """Feasible QPs with an equality (z₀ strictly inside the inequalities); their multipliers are far below 1e3."""
    g = torch.Generator().manual_seed(1)
    d = torch.float64
    L = torch.randn(batch, n, n, generator=g, dtype=d)
    Q, p, G = L @ L.mT / n, torch.randn(batch, n, generator=g, dtype=d), torch.randn(batch, k, n, generator=g, dtype=d)
    z0 = torch.randn(batch, n, generator=g, dtype=d)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + torch.rand(batch, k, generator=g, dtype=d)
    A = torch.randn(batch, 1, n, generator=g, dtype=d)
    return Q, p, G, h, A, (A @ z0.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("max_iter", [3, 6, 8])
def test_relax_leaves_feasible_elements_stopped_by_max_iter_no_worse(max_iter):
    """Feasible elements stopped by ``max_iter``: statuses and iterations are those of
    on_failure="ignore", solved elements are untouched, and an element is either left as it was
    (NaN) or relaxed and then holds its own solution (Clarabel's), its multipliers being below ρ.
    (With the same ``max_iter`` the larger relaxation rarely converges where the original did not:
    here every stopped element is left as it was; the relaxed case is the next test's.)"""
    data = feasible_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = solve_qp(*data, max_iter=max_iter, on_failure="ignore")
        sol = solve_qp(*data, max_iter=max_iter, on_failure="relax")
    assert (plain.status == Status.MAX_ITER).any()
    assert torch.equal(sol.status, plain.status) and torch.equal(sol.iterations, plain.iterations)
    for i in range(len(sol.status)):
        if sol.relaxed[i]:
            np.testing.assert_allclose(sol.z[i].numpy(), clarabel_solve(*(t[i] for t in data))[0], atol=1e-6)
        else:
            torch.testing.assert_close(sol.z[i], plain.z[i], equal_nan=True, rtol=0, atol=0)


def test_relaxed_feasible_element_holds_its_own_solution(monkeypatch):
    """The exact penalty: a feasible element stopped with its primal residual above tolerance, whose
    relaxation is solved (here given the iterations the first solve was denied), holds the original
    problem's solution (Clarabel's) and multipliers, with zero relaxation slacks; an element whose
    multipliers exceed a small penalty holds the relaxation's own minimiser instead."""
    from optlayers.qp import solve as qp_solve

    calls, solve_flat = [], qp_solve._solve_flat

    def first_call_short(flat, settings, policy, batch):
        calls.append(settings.max_iter)
        return solve_flat(flat, dataclasses.replace(settings, max_iter=2) if len(calls) == 1 else settings, policy, batch)

    monkeypatch.setattr(qp_solve, "_solve_flat", first_call_short)
    data = feasible_batch(batch=4)
    with pytest.warns(RuntimeWarning, match="have no infeasibility certificate"):
        sol = solve_qp(*data, on_failure="relax")
    assert len(calls) == 2 and sol.relaxed.all() and (sol.status == Status.MAX_ITER).all()
    for i in range(4):
        z, lam, nu = clarabel_solve(*(t[i] for t in data))
        assert float(np.abs(lam).max()) < Relaxation().penalty
        np.testing.assert_allclose(sol.z[i].numpy(), z, atol=1e-7)
        np.testing.assert_allclose(sol.lam[i].numpy(), lam, atol=1e-7)
        np.testing.assert_allclose(sol.nu[i].numpy(), nu, atol=1e-7)
    calls.clear()
    small = Relaxation(penalty=1e-3, quadratic=1e-3)
    with pytest.warns(RuntimeWarning, match="elastic relaxation"):
        weak = solve_qp(*data, on_failure="relax", relaxation=small)
    for i in range(4):
        reference = relaxed_reference(*(t[i] for t in data[:4]), small, *(t[i] for t in data[4:]))
        np.testing.assert_allclose(weak.z[i].numpy(), reference, atol=1e-6)
        assert np.abs(reference - clarabel_solve(*(t[i] for t in data))[0]).max() > 1e-3


def test_relax_under_vmap_says_why_it_cannot_run():
    Q, p, G, h = mixed_batch()
    with pytest.raises(ValueError, match="on_failure='relax' selects the primal infeasible elements.*vmap"):
        torch.func.vmap(lambda q, hh: solve_qp(Q, q, G, hh, torch.ones(1, 2), torch.ones(1), on_failure="relax").z)(p, h)
