"""Smaller multipliers where the active constraints' gradients are dependent (``qp/multipliers.py``):
the least-norm multipliers against numpy's least squares, and an iterate far out on a ray of the
multiplier set whose dual residual is its terms' rounding, brought back by the end of the solve."""
import dataclasses

import numpy as np
import pytest
import torch

from optlayers import QPStatus
from optlayers.host import RUNNING
from optlayers.qp import ipm
from optlayers.qp.multipliers import least_norm_multipliers, smaller_multipliers
from optlayers.qp.problem import prepare_qp, qp_data
from optlayers.qp.scaling import equilibrate
from tests.qp.qp_problems import random_qp


def _scaled(d: dict):
    flat, _ = prepare_qp(d["Q"], d["p"], d["G"], d["h"], d.get("A"), d.get("b"))
    return equilibrate(qp_data(*flat))


def test_least_norm_multipliers_match_numpy_least_squares_with_dependent_rows():
    """At a random iterate, with a repeated equality row and an inequality row equal to an equality
    row (the constraint gradients dependent): ν and the active rows' λ (λ > s) are numpy's
    least-norm least-squares solution of Aᵀν + G_Aᵀλ_A = −(Qx + p + G_Iᵀλ_I); the inactive rows' λ
    are kept."""
    torch.manual_seed(3)
    d = random_qp((4,), 12, 10, 4)
    d["A"][:, 3] = d["A"][:, 0]
    d["G"][:, 5] = d["A"][:, 1]
    data, _ = _scaled(d)
    settings = dataclasses.replace(ipm.default_settings(torch.float64, 1e-8, 0.0, 100), compiled=False)
    st, _ = ipm.start(data, ipm.Units.of(_scaled(d)[1], data, settings), settings)
    lam, s = torch.rand(4, 10, dtype=torch.float64), torch.rand(4, 10, dtype=torch.float64)
    v = st.v.clone()
    v[:, st.n + st.m : st.n + st.m + 2 * st.k] = torch.cat([lam, s], -1)
    st = dataclasses.replace(st, v=v)
    nu_star, lam_star = least_norm_multipliers(data, st)
    active = (lam > s).numpy()
    for i in range(4):
        Q, p, A, G = (t[i].numpy() for t in (data.Q, data.p, data.A, data.G))
        x, li = st.x[i].numpy(), lam[i].numpy()
        target = -(Q @ x + p + G[~active[i]].T @ li[~active[i]])
        y = np.linalg.lstsq(np.vstack([A, G[active[i]]]).T, target, rcond=None)[0]
        np.testing.assert_allclose(nu_star[i].numpy(), y[: st.m], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(lam_star[i].numpy()[active[i]], y[st.m :], rtol=1e-8, atol=1e-10)
        np.testing.assert_array_equal(lam_star[i].numpy()[~active[i]], li[~active[i]])


def _fixed_and_bounded(p1: float) -> dict:
    """min ½‖x‖² + pᵀx s.t. 3x₁ = 0, x₁ ≥ 0, x ≤ 1: the equality and the bound on x₁ have parallel
    gradients, so their multipliers (ν₁, λ₁) with 3ν₁ − λ₁ = −p₁ form an unbounded set."""
    p = torch.tensor([[p1, -0.5, -3.0]], dtype=torch.float64)
    G = torch.cat([-torch.eye(3, dtype=torch.float64)[:1], torch.eye(3, dtype=torch.float64)]).unsqueeze(0)
    return dict(Q=torch.eye(3, dtype=torch.float64).unsqueeze(0), p=p, G=G, h=torch.tensor([[0.0, 1, 1, 1]], dtype=torch.float64),
                A=torch.tensor([[[3.0, 0, 0]]], dtype=torch.float64), b=torch.zeros(1, 1, dtype=torch.float64))


def _far_out_on_the_ray(p1: float, x2_error: float = 0.0):
    """The solution of ``_fixed_and_bounded(p1)`` (scaled), its multipliers moved by 1e9·√2 along
    the ray (ν₁, λ₁) += (t, 3t) (the same Aᵀν + Gᵀλ in exact arithmetic; s₁ divided as λ₁ is
    multiplied, so that the gap stays), x₂ and the slack of x₂ ≤ 1 moved by ``x2_error``, status
    INACCURATE."""
    data, sc = _scaled(_fixed_and_bounded(p1))
    settings = dataclasses.replace(ipm.default_settings(torch.float64, 1e-8, 0.0, 100), compiled=False)
    units = ipm.Units.of(sc, data, settings)
    result = ipm.solve_scaled(data, sc, settings, with_factor=False)
    assert result.state.status.item() == QPStatus.SOLVED
    st = result.state
    ray = 1e9 * 2**0.5 * sc.c  # ν = eν̂/c, λ = fλ̂/c
    v = st.v.clone()
    v[:, st.n] += ray / sc.e[:, 0]
    v[:, st.n + st.m] += 3 * ray / sc.f[:, 0]
    v[:, st.n + st.m + st.k] *= st.lam[:, 0] / v[:, st.n + st.m]
    v[:, 1] += x2_error / sc.d[:, 1]
    v[:, st.n + st.m + st.k + 2] -= x2_error * sc.f[:, 2]  # s of the row x₂ ≤ 1 follows x₂
    return data, sc, units, settings, dataclasses.replace(st, v=v, status=torch.full_like(st.status, int(QPStatus.INACCURATE)))


@pytest.mark.parametrize("p1", [2.1, -2.1])
def test_an_iterate_far_out_on_a_ray_of_multipliers_ends_solved_with_small_ones(p1):
    """The solution far out on a ray of its multipliers, INACCURATE (``_far_out_on_the_ray``), as the
    solve leaves an iterate that stopped progressing: the dual residual is then the rounding
    of terms of 1e10 (above 1e-8; the control), and the end of the solve
    (``ipm._smaller_multipliers_of_unsolved``) brings the multipliers back to small ones (where
    p₁ > 0 the least-norm ones, both positive; where p₁ < 0 the least-norm λ₁ is negative and λ₁
    stops just above zero, ν₁ near −p₁/3), SOLVED, x and s untouched."""
    data, sc, units, settings, far = _far_out_on_the_ray(p1)
    far_res = ipm.residuals(data, units, far, settings)
    assert far_res.met[0, 0] and not far_res.met[0, 1], far_res.measured  # control: only the dual residual fails

    back, res, changed, again = ipm._smaller_multipliers_of_unsolved(data, units, far, far_res, settings, resume=True)
    assert changed and not again and back.status.item() == QPStatus.SOLVED and res.converged.item(), res.measured
    assert torch.equal(back.x, far.x) and torch.equal(back.s, far.s)
    nu1 = (back.nu[0, 0] * sc.e[0, 0] / sc.c[0]).item()
    lam1 = (back.lam[0, 0] * sc.f[0, 0] / sc.c[0]).item()
    assert lam1 > 0 and abs(3 * nu1 - lam1 + p1) <= 1e-8, (nu1, lam1)
    if p1 > 0:
        assert nu1 < 0 and lam1 <= abs(p1), (nu1, lam1)
    else:
        assert lam1 <= 1e-2 and abs(nu1 + p1 / 3) <= 1e-2, (nu1, lam1)


def test_the_end_of_the_solve_leaves_problems_whose_dual_residual_passes():
    """Only unsolved problems with the dual residual as the failing test are candidates: a solved
    batch, and the same marked INACCURATE with its residuals within tolerance, come back unchanged."""
    torch.manual_seed(0)
    d = random_qp((3,), 8, 6, 2)
    data, sc = _scaled(d)
    settings = dataclasses.replace(ipm.default_settings(torch.float64, 1e-8, 0.0, 100), compiled=False)
    units = ipm.Units.of(sc, data, settings)
    result = ipm.solve_scaled(data, sc, settings, with_factor=False)
    for st in (result.state, dataclasses.replace(result.state, status=torch.full_like(result.state.status, int(QPStatus.INACCURATE)))):
        back, res, changed, again = ipm._smaller_multipliers_of_unsolved(data, units, st, result.residuals, settings, True)
        assert not changed and not again and back is st and res is result.residuals


def test_smaller_multipliers_without_inequalities_take_the_least_norm_nu():
    """No inequality rows: the move goes all the way (t = 1) to the least-norm ν."""
    torch.manual_seed(2)
    d = random_qp((2,), 6, 0, 3)
    d["A"][:, 2] = d["A"][:, 0]
    data, sc = _scaled(d)
    settings = dataclasses.replace(ipm.default_settings(torch.float64, 1e-8, 0.0, 100), compiled=False)
    st = ipm.solve_scaled(data, sc, settings, with_factor=False).state
    nu_star, _ = least_norm_multipliers(data, st)
    assert torch.equal(smaller_multipliers(data, st).nu, nu_star)


def test_a_problem_that_still_fails_after_the_move_runs_again_from_there():
    """As above, with x₂ also 1e-6 off its optimum: the smaller multipliers do not pass the test
    (the dual residual is then 1e-6). Without ``resume`` the problem stays as it was; with it, it
    runs again (RUNNING, its progress test restarted) from the smaller multipliers, and the method's
    loop from there ends SOLVED with small multipliers."""
    data, sc, units, settings, far = _far_out_on_the_ray(2.1, x2_error=1e-6)
    far_res = ipm.residuals(data, units, far, settings)
    unchanged = ipm._smaller_multipliers_of_unsolved(data, units, far, far_res, settings, resume=False)
    assert unchanged[0] is far and not any(unchanged[2:])
    back, res, solved, again = ipm._smaller_multipliers_of_unsolved(data, units, far, far_res, settings, resume=True)
    assert again and not solved and back.status.item() == RUNNING and back.counters[0, ipm._PROGRESS_COUNTER] == 0
    assert back.lam.abs().max() < 10 and torch.isinf(back.best).all() and torch.equal(back.best_v, back.v)
    step = lambda data, units, st, res: ipm.step(data, units, st, res, settings)  # noqa: E731
    out = ipm.iterate(data, units, back, res, step, settings, with_factor=False, first=int(back.iterations.max()), resume=False)
    assert out.state.status.item() == QPStatus.SOLVED and out.state.lam.abs().max() < 10, out.state.lam
