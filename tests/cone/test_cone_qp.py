"""The ConeQP path agrees with the core interior point QP solver, values and gradients."""
import pytest
import torch

from optlayers import solve_qp
from optlayers.cone import ConeStatus
from optlayers.cone.qp import solve_qp_cone


def random_qp(batch: int, n: int, m: int, k: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    L = torch.randn(batch, n, n, generator=gen)
    Q = L @ L.transpose(-1, -2) / n + 0.1 * torch.eye(n)
    z0 = torch.randn(batch, n, generator=gen)
    G = torch.randn(batch, k, n, generator=gen)
    slack = torch.rand(batch, k, generator=gen) * (torch.rand(batch, k, generator=gen) > 0.5)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + slack
    A = torch.randn(batch, m, n, generator=gen)
    b = (A @ z0.unsqueeze(-1)).squeeze(-1)
    p = torch.randn(batch, n, generator=gen)
    return Q, p, G, h, A, b


@pytest.mark.parametrize("solver", ["clarabel", "scs"])
def test_matches_core_qp_solver(solver):
    data = random_qp(3, 6, 2, 8, seed=0)
    leaves_qp = [t.clone().requires_grad_() for t in data]
    leaves_cone = [t.clone().requires_grad_() for t in data]
    ref = solve_qp(*leaves_qp)
    got = solve_qp_cone(*leaves_cone, solver=solver)
    assert (got.status == ConeStatus.SOLVED).all()
    for name in ("z", "lam", "nu", "s"):
        assert torch.allclose(getattr(got, name), getattr(ref, name), atol=1e-7), name
    v = torch.randn(3, 6)
    (ref.z * v).sum().backward()
    (got.z * v).sum().backward()
    for a, b_ in zip(leaves_qp, leaves_cone):
        assert torch.allclose(a.grad, b_.grad, atol=1e-6)


def test_only_inequalities_and_shared_Q():
    Q, p, G, h, _, _ = random_qp(2, 5, 0, 6, seed=1)
    Q_cone, Q_qp = Q[0].clone().requires_grad_(), Q[0].clone().requires_grad_()
    got = solve_qp_cone(Q_cone, p, G, h)
    ref = solve_qp(Q_qp, p, G, h)
    assert torch.allclose(got.z, ref.z, atol=1e-7)
    assert got.nu.shape == (2, 0)
    weights = torch.randn(2, 5)
    (got.z * weights).sum().backward()
    (ref.z * weights).sum().backward()
    assert torch.allclose(Q_cone.grad, Q_qp.grad, atol=1e-6)  # the shared Q's gradient, summed over the batch


def test_checks_and_broadcasts_as_solve_qp():
    """qpth's empty placeholders for absent constraints, shared data broadcast to the batch, and
    the data refused with solve_qp's messages."""
    Q, G, h = torch.eye(2), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([-1.0, 0.5])
    p = torch.tensor([[1.0, -1.0], [0.5, 0.5], [-2.0, 0.0]])
    sol = solve_qp_cone(Q, p, G, h, torch.Tensor(), torch.Tensor())
    torch.testing.assert_close(sol.z, solve_qp(Q, p, G, h).z, rtol=0, atol=1e-5)
    assert sol.z.shape == (3, 2) and sol.lam.shape == (3, 2) and sol.nu.shape == (3, 0)
    with pytest.raises(TypeError, match="p must be a torch.Tensor, got list"):
        solve_qp_cone(Q, [1.0, -1.0], G, h)
    with pytest.raises(ValueError, match=r"G must have shape \(\.\.\., k, 2\)"):
        solve_qp_cone(Q, p, torch.zeros(2, 3), h)


def test_needs_a_constraint():
    with pytest.raises(ValueError, match="at least one constraint"):
        solve_qp_cone(torch.eye(2), torch.ones(2))
    with pytest.raises(ValueError, match="G was given without h"):
        solve_qp_cone(torch.eye(2), torch.ones(2), G=torch.eye(2))


def test_an_unconstrained_qp_is_refused_with_its_fix():
    with pytest.raises(ValueError, match=r"^solve_qp_cone needs at least one constraint; an unconstrained QP is the "
                                         r"linear solve Q z = -p$"):
        solve_qp_cone(torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), torch.empty(0, 2), None)
