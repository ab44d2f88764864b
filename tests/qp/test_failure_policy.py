"""Failures never end a training run: the layers give failed elements a finite output, a zero
gradient, a warning that names them and a status; ``on_failure="relax"`` gives infeasible QPs the
solution of their elastic relaxation, whose gradients are checked against finite differences of
the relaxation solved independently (written out in numpy, solved by Clarabel)."""
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


def test_relax_under_vmap_says_why_it_cannot_run():
    Q, p, G, h = mixed_batch()
    with pytest.raises(ValueError, match="on_failure='relax' selects the primal infeasible elements.*vmap"):
        torch.func.vmap(lambda q, hh: solve_qp(Q, q, G, hh, torch.ones(1, 2), torch.ones(1), on_failure="relax").z)(p, h)
