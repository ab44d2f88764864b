"""Infeasible, unbounded and failed elements: their status, the policy, and the rest of the batch."""
import warnings

import numpy as np
import pytest
import torch

from benchmarks.nearly_dependent import problem
from optlayers import ConeSolveError, ConeStatus, QPSolveError, QPStatus, SolveError, Status, solve_qp
from optlayers.cone.qp import solve_qp_cone
from optlayers.status import describe_failures


def _mixed_batch():
    """Element 0 feasible, 1 primal infeasible (x₁ ≤ −1 and x₁ ≥ 1), 2 feasible."""
    Q = torch.eye(2).expand(3, 2, 2)
    p = torch.tensor([[2.0, 1.0], [1.0, 1.0], [0.5, -1.0]])
    G = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    h = torch.tensor([[1.0, 1.0], [-1.0, -1.0], [1.0, 1.0]])
    return Q, p, G, h


def test_primal_infeasible_element_is_reported_and_others_are_correct():
    Q, p, G, h = _mixed_batch()
    sol = solve_qp(Q, p, G, h, on_failure="ignore")
    assert sol.status.tolist() == [QPStatus.SOLVED, QPStatus.PRIMAL_INFEASIBLE, QPStatus.SOLVED]
    assert torch.isnan(sol.z[1]).all() and torch.isnan(sol.lam[1]).all()
    np.testing.assert_allclose(sol.z[0].numpy(), [-1.0, -1.0], atol=1e-9)
    np.testing.assert_allclose(sol.z[2].numpy(), [-0.5, 1.0], atol=1e-9)
    alone = solve_qp(Q[0], p[0], G, h[0])
    np.testing.assert_allclose(sol.z[0].numpy(), alone.z.numpy(), atol=1e-12)


def test_dual_infeasible_linear_program():
    Q = torch.zeros(2, 2, 2)
    p = torch.tensor([[-1.0, 0.0], [1.0, 1.0]])
    G = -torch.eye(2)
    h = torch.zeros(2)
    sol = solve_qp(Q, p, G, h, on_failure="ignore")
    assert sol.status.tolist() == [QPStatus.DUAL_INFEASIBLE, QPStatus.SOLVED]
    np.testing.assert_allclose(sol.z[1].numpy(), [0.0, 0.0], atol=1e-9)


def test_inconsistent_equalities_are_primal_infeasible():
    A = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([1.0, 2.0])
    sol = solve_qp(torch.eye(2), torch.zeros(2), A=A, b=b, on_failure="ignore")
    assert int(sol.status) == QPStatus.PRIMAL_INFEASIBLE


def test_raise_names_failed_elements():
    Q, p, G, h = _mixed_batch()
    with pytest.raises(QPSolveError, match=r"1 of 3 QPs were not solved: primal_infeasible \(elements 1\)") as info:
        solve_qp(Q, p, G, h)
    assert info.value.status.tolist()[1] == QPStatus.PRIMAL_INFEASIBLE


def test_warn_returns_nan_for_failed_elements():
    Q, p, G, h = _mixed_batch()
    with pytest.warns(RuntimeWarning, match="Their outputs are NaN"):
        sol = solve_qp(Q, p, G, h, on_failure="warn")
    assert torch.isnan(sol.z[1]).all() and torch.isfinite(sol.z[[0, 2]]).all()


def test_max_iter_status():
    Q, p, G, h = _mixed_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = solve_qp(Q[0], p[0], G, h[0], max_iter=1, on_failure="ignore")
    assert int(sol.status) == QPStatus.MAX_ITER
    assert "max_iter" in QPStatus.MAX_ITER.message


def test_gradients_of_failed_elements_are_zero_not_nan():
    Q, p, G, h = _mixed_batch()
    p = p.clone().requires_grad_()
    sol = solve_qp(Q, p, G, h, on_failure="ignore")
    solved = sol.status == QPStatus.SOLVED
    sol.z[solved].sum().backward()
    assert torch.isfinite(p.grad).all()
    assert (p.grad[1] == 0).all() and (p.grad[0] != 0).any()


def test_one_status_vocabulary_for_qp_and_cone():
    assert QPStatus is Status and ConeStatus is Status
    assert QPSolveError is SolveError and ConeSolveError is SolveError
    codes = {code.name: int(code) for code in Status}
    assert len(set(codes.values())) == len(codes)
    # the QP layer's codes are unchanged
    assert codes["SOLVED"] == 0 and codes["MAX_ITER"] == 1 and codes["PRIMAL_INFEASIBLE"] == 2
    assert codes["DUAL_INFEASIBLE"] == 3 and codes["NUMERICAL_ERROR"] == 4
    for code in Status:
        assert code.message and code.name.lower() not in ("", None)


@pytest.mark.parametrize("solver", ["clarabel", "scs"])
def test_qp_through_the_cone_path_reports_the_same_codes(solver):
    pytest.importorskip(solver)
    Q, p, G, h = (t.double() for t in _mixed_batch())
    qp = solve_qp(Q, p, G, h, on_failure="ignore")
    cone = solve_qp_cone(Q, p, G, h, solver=solver, on_failure="ignore")
    assert cone.status.tolist() == qp.status.tolist() == [Status.SOLVED, Status.PRIMAL_INFEASIBLE, Status.SOLVED]


def test_failures_are_named_by_multi_index_and_grouped_by_reason():
    status = torch.tensor([[0, 2], [4, 2]])
    text = describe_failures(status, "QPs")
    assert text.startswith("3 of 4 QPs were not solved: ")
    assert "primal_infeasible (elements (0, 1), (1, 1))" in text and "numerical_error (elements (1, 0))" in text
    assert Status.PRIMAL_INFEASIBLE.message in text and "solved to the requested tolerance" not in text


def test_failure_of_a_batched_qp_names_its_multi_index():
    Q, p, G, h = _mixed_batch()
    with pytest.raises(SolveError, match=r"primal_infeasible \(elements \(0, 1\)\)"):
        solve_qp(Q, p.reshape(1, 3, 2), G, h.reshape(1, 3, 2))


def _clarabel_feasible(G, h, A, b):
    """Whether Clarabel finds {Gz ≤ h, Az = b} feasible (an independent verdict)."""
    import clarabel
    import scipy.sparse as sp

    n = G.shape[1]
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    result = clarabel.DefaultSolver(sp.csc_matrix((n, n)), np.zeros(n), sp.csc_matrix(np.vstack([A, G])),
                                    np.concatenate([b, h]), [clarabel.ZeroConeT(len(b)), clarabel.NonnegativeConeT(len(h))],
                                    settings).solve()
    assert str(result.status) in ("Solved", "PrimalInfeasible"), result.status
    return str(result.status) == "Solved"


def test_infeasible_lp_whose_direction_keeps_a_negative_multiplier_step_is_certified():
    """A 1-D LP (z ≤ −2.84 and z ≥ −1.83) whose Newton direction keeps dλ_min ≈ −0.035‖dy‖ while λ
    grows along a Farkas direction: the iterate's own Farkas test certifies it (it ended
    NUMERICAL_ERROR after 88 iterations when only the direction was tested)."""
    d = torch.float64
    G, h = torch.tensor([[2.5], [0.7], [-0.3], [-1.3]], dtype=d), torch.tensor([-7.1, -1.5, 0.55, 2.4], dtype=d)
    for q in (0.0, 1.0):
        sol = solve_qp(torch.full((1, 1), q, dtype=d), torch.tensor([-0.1], dtype=d), G, h, on_failure="ignore")
        assert int(sol.status) == QPStatus.PRIMAL_INFEASIBLE and int(sol.iterations) < 20, (q, sol)


@pytest.mark.parametrize("n, k, m, lp", [(1, 6, 0, True), (2, 8, 0, True), (3, 10, 1, False), (10, 30, 3, True)])
def test_random_infeasible_batches_are_certified_and_feasible_ones_are_not(n, k, m, lp):
    """Random data (mostly infeasible; LPs kept bounded by a box): every element Clarabel finds
    infeasible is PRIMAL_INFEASIBLE, none it finds feasible is (before the iterate's Farkas test,
    7-20 % of the infeasible ones ended MAX_ITER or NUMERICAL_ERROR here)."""
    pytest.importorskip("clarabel")
    d, batch = torch.float64, 100
    g = torch.Generator().manual_seed(0)
    Q = torch.zeros(batch, n, n, dtype=d) if lp else (lambda L: L @ L.mT / n)(torch.randn(batch, n, n, generator=g, dtype=d))
    p = torch.randn(batch, n, generator=g, dtype=d)
    G, h = torch.randn(batch, k, n, generator=g, dtype=d), torch.randn(batch, k, generator=g, dtype=d)
    A, b = torch.randn(batch, m, n, generator=g, dtype=d), torch.randn(batch, m, generator=g, dtype=d)
    if lp:
        eye = torch.eye(n, dtype=d).expand(batch, n, n)
        G, h = torch.cat([G, eye, -eye], 1), torch.cat([h, torch.full((batch, 2 * n), 10.0, dtype=d)], 1)
    sol = solve_qp(Q, p, G, h, A if m else None, b if m else None, on_failure="ignore")
    feasible = torch.tensor([_clarabel_feasible(G[i].numpy(), h[i].numpy(), A[i].numpy(), b[i].numpy())
                             for i in range(batch)])
    assert (~feasible).sum() > batch // 2
    assert (sol.status[~feasible] == QPStatus.PRIMAL_INFEASIBLE).all(), sol.status[~feasible]
    assert (sol.status[feasible] == QPStatus.SOLVED).all(), sol.status[feasible]


@pytest.mark.parametrize("seed", [158, 271])
def test_nearly_dependent_equality_rows_are_not_certified_infeasible(seed):
    """Two equality rows 2^-27 to 2^-40 apart leave Newton directions dy whose ‖Aᵀdν + Gᵀdλ‖ is below
    1e-7‖dy‖ with bᵀdν + hᵀdλ < −1e-7‖dy‖, helped by negative dλ on rows with h > 0. Those two
    relative tests alone prove only that no feasible point lies within about one (scaled) unit of
    the origin, and pass on these feasible LPs. The certificate is (dν, dλ⁺), and it must put every
    feasible point beyond twice the iterate's size."""
    lp = problem(seed, 27, 40)  # LPs over a box, feasible at an integer point: benchmarks/nearly_dependent.py
    sol = solve_qp(*(torch.tensor(lp[name]) for name in ("Q", "p", "G", "h", "A", "b")), on_failure="ignore")
    assert int(sol.status) != QPStatus.PRIMAL_INFEASIBLE, sol.status
    assert int(sol.status) in (QPStatus.SOLVED, QPStatus.INACCURATE, QPStatus.MAX_ITER), sol.status


@pytest.mark.parametrize("inequality", [False, True])
def test_problems_infeasible_by_a_small_margin_are_certified(inequality):
    """A box |x| ≤ 1 and a row a·x = ‖a‖₁ + margin (or ≥), infeasible by margins 1e-1 to 1e-6: every
    one PRIMAL_INFEASIBLE. (A test of the direction against ε times −bᵀdν − hᵀdλ⁺, which puts feasible
    points beyond 1/ε, certifies the equality rows only down to margins of 2e-3: the regularised
    direction's ‖Aᵀdν + Gᵀdλ⁺‖ is 3e-11 to 8e-10 ‖dy‖.)"""
    d, n = torch.float64, 6
    g = torch.Generator().manual_seed(0)
    margin = 10.0 ** -torch.linspace(1, 6, 16, dtype=d)
    a = torch.randn(16, n, generator=g, dtype=d)
    L = torch.randn(16, n, n, generator=g, dtype=d)
    Q, p = L @ L.mT / n, torch.randn(16, n, generator=g, dtype=d)
    eye = torch.eye(n, dtype=d).expand(16, n, n)
    G, h = torch.cat([eye, -eye], 1), torch.ones(16, 2 * n, dtype=d)
    side = a.abs().sum(-1) + margin
    if inequality:
        sol = solve_qp(Q, p, torch.cat([G, -a[:, None]], 1), torch.cat([h, -side[:, None]], 1), on_failure="ignore")
    else:
        sol = solve_qp(Q, p, G, h, a[:, None], side[:, None], on_failure="ignore")
    assert (sol.status == QPStatus.PRIMAL_INFEASIBLE).all(), sol.status
