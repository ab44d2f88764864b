"""What the interior point loop does late in a solve, where double precision runs out: a KKT
factorisation that fails (the stiff split takes over) and a duality gap whose plain evaluation
is rounding (``ipm.accurate_gap`` decides)."""
import dataclasses
from fractions import Fraction

import numpy as np
import pytest
import torch

from optlayers import solve_qp
from optlayers.engine import step as engine_step
from optlayers.qp import ipm
from optlayers.qp.problem import prepare_qp, qp_data
from optlayers.qp.scaling import equilibrate
from optlayers.status import Status
from tests.qp.qp_problems import clarabel_solve, random_qp


def _fail_plain_factorisations_after(monkeypatch, calls: int) -> dict:
    """From the ``calls``-th iteration factorisation on, every factorisation without stiff rows
    reports failure (as Cholesky does on an H whose condition exceeds 1/ε); stiff ones work."""
    real = ipm.factor_kkt
    seen = {"plain": 0, "stiff": 0}

    def factor(*args, stiff=None, retries=0, **kwargs):
        f = real(*args, stiff=stiff, retries=retries, **kwargs)
        if retries == 0 and stiff is None:  # an iteration's factorisation (the start's retries)
            seen["plain"] += 1
            if seen["plain"] >= calls:
                return dataclasses.replace(f, ok=torch.zeros_like(f.ok))
        elif retries == 0:
            seen["stiff"] += 1
        return f

    monkeypatch.setattr(ipm, "factor_kkt", factor)

    monkeypatch.setattr(engine_step, "factor_kkt", factor)  # the iterations' factorisations
    return seen


@pytest.mark.parametrize("m", [0, 3])
def test_a_late_failed_factorisation_switches_to_the_stiff_split(monkeypatch, m):
    torch.manual_seed(3)
    data = random_qp((1,), 12, 16, m, active=True)
    seen = _fail_plain_factorisations_after(monkeypatch, 6)
    sol = solve_qp(**data, on_failure="ignore")
    assert seen["stiff"] > 0
    assert int(sol.status) == Status.SOLVED
    z, lam, _ = clarabel_solve(*(data[key][0] if data[key] is not None else None for key in ("Q", "p", "G", "h", "A", "b")))
    np.testing.assert_allclose(sol.z[0].numpy(), z, atol=1e-7)
    np.testing.assert_allclose(sol.lam[0].numpy(), lam, atol=1e-7)


def test_a_problem_whose_stiff_factorisation_fails_too_is_a_numerical_failure(monkeypatch):
    torch.manual_seed(4)
    data = random_qp((1,), 8, 10, 0, active=True)
    real = ipm.factor_kkt
    calls = {"count": 0}

    def factor(*args, retries=0, **kwargs):
        f = real(*args, retries=retries, **kwargs)
        if retries == 0:
            calls["count"] += 1
            if calls["count"] >= 4:
                return dataclasses.replace(f, ok=torch.zeros_like(f.ok))
        return f

    monkeypatch.setattr(ipm, "factor_kkt", factor)

    monkeypatch.setattr(engine_step, "factor_kkt", factor)  # the iterations' factorisations
    sol = solve_qp(**data, on_failure="ignore")
    assert int(sol.status) == Status.NUMERICAL_ERROR


def _exact_gap(data, units, st) -> float:
    to = lambda t: [Fraction(v) for v in t[0].tolist()]
    x, lam, nu = to(st.x), to(st.lam), to(st.nu)
    Q = [[Fraction(v) for v in row] for row in data.Q[0].tolist()]
    qx = [sum(q * xi for q, xi in zip(row, x)) for row in Q]
    total = sum(a * c for a, c in zip(x, qx)) + sum(a * c for a, c in zip(to(data.p), x))
    total += sum(a * c for a, c in zip(to(data.h), lam)) + sum(a * c for a, c in zip(to(data.b), nu))
    return abs(float(total)) * float(units.cost[0])


def test_accurate_gap_matches_exact_arithmetic_where_the_plain_one_is_rounding():
    """Terms of 1e8 that cancel: the plain evaluation is off by about ε·1e8, the accurate one is
    exact to about ε times the result."""
    torch.manual_seed(5)
    n, k, m = 40, 30, 5
    raw = random_qp((1,), n, k, m)
    flat, _ = prepare_qp(*(raw[key] for key in ("Q", "p", "G", "h", "A", "b")))
    data, sc = equilibrate(qp_data(*flat))
    settings = ipm.default_settings(torch.float64, None, None, None)
    units = ipm.Units.of(sc, data, settings)
    st = ipm.initial_point(data, settings)
    # an iterate with huge x and multipliers whose terms nearly cancel
    x = torch.randn(1, n, dtype=torch.float64) * 1e4
    lam = torch.rand(1, k, dtype=torch.float64) * 1e4
    nu = torch.randn(1, m, dtype=torch.float64) * 1e4
    v = torch.cat([x, nu, lam, st.s], dim=-1)
    st = dataclasses.replace(st, v=v)
    # choose p so that xᵀQx + pᵀx + hᵀλ + bᵀν is 1e-6 of the largest term (about 1e8)
    plain_terms = [x @ data.Q[0] @ x[0], data.h[0] @ lam[0], data.b[0] @ nu[0]]
    target = -sum(float(t) for t in plain_terms)
    p = data.p.clone()
    p[0] = x[0] * (target / float(x[0] @ x[0]))
    data = dataclasses.replace(data, p=p)
    exact = _exact_gap(data, units, st)
    accurate = float(ipm.accurate_gap(data, units, st)[0])
    terms = ipm._pair_dots(st.x, torch.stack([ipm.mv(data.Q, st.x), data.p])).sum(0) + ipm._pair_dots(st.lam, data.h)
    plain = float((terms + ipm._pair_dots(st.nu, data.b)).abs()[0] * units.cost[0])  # as ``residuals`` sums
    assert abs(accurate - exact) <= 1e-12 * max(exact, 1.0)
    assert abs(plain - exact) > 1e3 * abs(accurate - exact)  # the test problem does need it


def test_a_stiff_problem_leaves_the_others_of_its_batch_unchanged(monkeypatch):
    """Element 0's plain factorisations fail from the sixth iteration on, element 1's never: the
    batch runs both forms ("mixed"), and element 1 gets bit for bit what it gets alone."""
    torch.manual_seed(6)
    data = random_qp((2,), 10, 14, 2, active=True)
    alone = solve_qp(**{key: None if t is None else t[1:] for key, t in data.items()})
    real = ipm.factor_kkt
    seen = {"plain": 0, "stiff": 0}

    def factor(*args, stiff=None, retries=0, **kwargs):
        f = real(*args, stiff=stiff, retries=retries, **kwargs)
        if retries == 0 and stiff is None and f.ok.shape[0] == 2:
            seen["plain"] += 1
            if seen["plain"] >= 6:
                return dataclasses.replace(f, ok=f.ok & torch.tensor([False, True]))
        elif retries == 0:
            seen["stiff"] += 1
        return f

    monkeypatch.setattr(ipm, "factor_kkt", factor)

    monkeypatch.setattr(engine_step, "factor_kkt", factor)  # the iterations' factorisations
    sol = solve_qp(**data, on_failure="ignore")
    assert seen["stiff"] > 0 and sol.status.tolist() == [Status.SOLVED, Status.SOLVED]
    assert torch.equal(sol.z[1], alone.z[0]) and torch.equal(sol.lam[1], alone.lam[0])
    z, _, _ = clarabel_solve(*(data[key][0] for key in ("Q", "p", "G", "h", "A", "b")))
    np.testing.assert_allclose(sol.z[0].numpy(), z, atol=1e-7)


def test_the_compiled_path_switches_a_late_failure_to_the_stiff_split(monkeypatch, eager_backend):
    """``compile=True`` (traced by dynamo's eager backend here: no inductor compilation) recovers
    like the eager path: plain factorisations fail once a weight λ/s passes 1e3 (late in the
    solve, as Cholesky does on an H too ill-conditioned for double precision), stiff ones work."""
    real = ipm.factor_kkt

    def factor(Q, A, G, w_inv, *args, stiff=None, retries=0, **kwargs):
        f = real(Q, A, G, w_inv, *args, stiff=stiff, retries=retries, **kwargs)
        if retries == 0 and stiff is None:
            return dataclasses.replace(f, ok=f.ok & (w_inv.amax(-1) < 1e3))
        return f

    torch.manual_seed(3)
    data = random_qp((2,), 12, 16, 2, active=True)
    monkeypatch.setattr(ipm, "factor_kkt", factor)
    monkeypatch.setattr(engine_step, "factor_kkt", factor)  # the iterations' factorisations
    sol = solve_qp(**data, compile=True, on_failure="ignore")
    assert (sol.status == Status.SOLVED).all(), sol.status
    for i in range(2):
        z, lam, _ = clarabel_solve(*(data[key][i] for key in ("Q", "p", "G", "h", "A", "b")))
        np.testing.assert_allclose(sol.z[i].numpy(), z, atol=1e-7)
        np.testing.assert_allclose(sol.lam[i].numpy(), lam, atol=1e-7)


def test_an_accepted_accurate_gap_is_what_the_residuals_report_and_judge():
    """``_accept_accurate_gaps`` replaces the measured gap where the accurate one passes, and the
    reported gap and the verdict read that measurement: they cannot disagree. Element 0's primal and
    dual residuals are within tolerance and its exact gap is 0 (x = λ = ν = 0); element 1's primal
    residual is not, so it stays unconverged with its plain gap."""
    raw = random_qp((2,), 6, 5, 2)
    flat, _ = prepare_qp(*(raw[key] for key in ("Q", "p", "G", "h", "A", "b")))
    data, sc = equilibrate(qp_data(*flat))
    units = ipm.Units.of(sc, data, ipm.default_settings(torch.float64, None, None, None))
    st = ipm.initial_point(data, ipm.default_settings(torch.float64, None, None, None))
    n, m, k = st.n, st.m, st.k
    st = dataclasses.replace(st, v=torch.cat([st.v[:, : n + m + k].mul(0.0), st.v[:, n + m + k :]], -1))
    # the primal and dual residuals, the gap, the complementarity by component (a ratio to its tolerance)
    measured = torch.tensor([[1e-10, 1e-10, 1.0, 0.5], [1.0, 1e-10, 1.0, 0.5]], dtype=torch.float64)
    limit = torch.tensor([[1e-8, 1e-8, 1e-8, 1.0]] * 2, dtype=torch.float64)
    zeros = torch.zeros(2, dtype=torch.float64)
    res = ipm.Residuals(st.x, st.nu, st.lam, zeros, zeros, measured, limit, zeros, st.x.unsqueeze(1), measured[:, :2])
    assert not res.converged.any()
    accepted = ipm._accept_accurate_gaps(data, units, st, res, torch.tensor([True, True]))
    assert accepted.converged.tolist() == [True, False]
    assert accepted.gap.tolist() == [0.0, 1.0] and torch.equal(accepted.gap, accepted.measured[:, 2])
    assert torch.equal(accepted.converged, (accepted.measured <= accepted.limit).all(-1))
