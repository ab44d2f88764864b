"""The QP method's progress test (``IPMSettings.progress_limit``): a problem whose residuals stop
falling within 100 times their tolerances ends early, at its best iterate, INACCURATE; one farther
from them goes on."""
import dataclasses

import pytest
import torch

from optlayers import QPStatus, solve_qp
from optlayers.qp import ipm
from optlayers.qp.problem import prepare_qp, qp_data
from optlayers.qp.scaling import equilibrate
from tests.qp.qp_problems import random_qp

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _problems(batch: int = 6) -> dict:
    torch.manual_seed(0)
    return random_qp((batch,), 20, 15, 5)


def _solve(d: dict, tol: float, **kwargs):
    return solve_qp(d["Q"], d["p"], d["G"], d["h"], d["A"], d["b"], tol=tol, rel_tol=0.0, on_failure="ignore", **kwargs)


def test_a_tolerance_at_float64s_floor_ends_early_inaccurate_with_residuals_near_it():
    """Absolute tolerance 1e-15 on data of size 1-10 asks for residuals at their rounding: every
    problem stops progressing there, and ends INACCURATE well before the iteration limit, reporting
    residuals within 100 times the tolerance. The same problems at 1e-13 are SOLVED (the control:
    the problems are not hard, only the tolerance is)."""
    d = _problems()
    assert (_solve(d, 1e-13).status == QPStatus.SOLVED).all()
    sol = _solve(d, 1e-15, max_iter=200)
    assert (sol.status == QPStatus.INACCURATE).all(), sol.status
    assert (sol.iterations <= 100).all(), sol.iterations
    for residual in (sol.primal_residual, sol.dual_residual, sol.gap):
        assert (residual <= 100 * 1e-15).all(), residual


def test_a_problem_without_progress_ends_at_the_iterate_of_its_last_progress():
    """One problem (no batch effects on the rounding), stepped by the method itself: the final
    iterate's measures of progress are those recorded at its last progress (``State.best``; the
    restored iterate's residuals, recomputed), and no iterate on the way measured below 0.9 of them
    (``ipm._PROGRESS``: later ones made no progress, earlier ones were above it)."""
    d = _problems(1)
    flat, _ = prepare_qp(d["Q"], d["p"], d["G"], d["h"], d["A"], d["b"])
    data, sc = equilibrate(qp_data(*flat))
    settings = dataclasses.replace(ipm.default_settings(torch.float64, 2.5e-16, 0.0, 200), compiled=False)
    seen = []
    step = ipm.step

    def recording(*args, **kwargs):
        st, res = step(*args, **kwargs)
        seen.append(res.progress.clone())
        return st, res

    ipm.step = recording
    try:
        result = ipm.solve_scaled(data, sc, settings, with_factor=False)
    finally:
        ipm.step = step
    st, res = result.state, result.residuals
    assert int(st.status[0]) == QPStatus.INACCURATE and int(st.iterations[0]) < 200
    assert int(st.counters[0, 3]) == settings.progress_limit
    assert torch.equal(res.progress, st.best), (res.progress, st.best)
    lowest = torch.cat(seen).amin(0)
    assert (lowest >= ipm._PROGRESS * st.best[0]).all(), (lowest, st.best)
    # the last step moved away from the best iterate: returning to it is what the test checks
    assert not torch.equal(seen[-2], st.best), seen[-2:]


def test_a_problem_far_from_tolerance_when_it_stops_progressing_goes_on():
    """A problem that stops progressing with residuals above 100 times the tolerance
    (``ipm._REDUCED_ACCURACY``) is not stopped by the test (an infeasible or unbounded problem's
    certificate may still come): the problems scaled by 1e3 have residuals at a rounding floor of
    about 1e-12, against a tolerance of 1e-15, and run to the iteration limit."""
    d = {key: value * 1e3 for key, value in _problems().items()}
    sol = _solve(d, 1e-15, max_iter=120)
    worst = torch.stack([sol.primal_residual, sol.dual_residual, sol.gap]).amax(0)
    assert (sol.status == QPStatus.MAX_ITER).all() and (sol.iterations == 120).all(), (sol.status, sol.iterations)
    assert (worst > 100 * 1e-15).all(), worst
