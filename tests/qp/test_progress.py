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
    """Absolute tolerance 1e-15 on data of size 1-10 asks for residuals at their rounding: problems
    stop progressing there and end INACCURATE well before the iteration limit, reporting residuals
    within 100 times the tolerance (a problem may also be SOLVED, by its rounding). The same
    problems at 1e-13 are SOLVED (the control: the problems are not hard, only the tolerance is)."""
    d = _problems()
    assert (_solve(d, 1e-13).status == QPStatus.SOLVED).all()
    sol = _solve(d, 1e-15, max_iter=200)
    inaccurate = sol.status == QPStatus.INACCURATE
    assert inaccurate.any() and (inaccurate | (sol.status == QPStatus.SOLVED)).all(), sol.status
    assert (sol.iterations < 200).all(), sol.iterations
    for residual in (sol.primal_residual, sol.dual_residual, sol.gap):
        assert (residual[inaccurate] <= 100 * 1e-15).all(), residual


def _stepped(d: dict, tol: float, max_iter: int) -> tuple:
    """The method run on ``d`` (eager), with the measures of progress after every step."""
    flat, _ = prepare_qp(d["Q"], d["p"], d["G"], d["h"], d["A"], d["b"])
    data, sc = equilibrate(qp_data(*flat))
    settings = dataclasses.replace(ipm.default_settings(torch.float64, tol, 0.0, max_iter), compiled=False)
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
    return result, seen, settings


def _one_problem_each() -> list[dict]:
    """``_problems(1)``, then each problem of ``_problems(6)`` alone (batches of one)."""
    six = _problems(6)
    return [_problems(1)] + [{key: value[i:i + 1] for key, value in six.items()} for i in range(6)]


def test_a_problem_without_progress_ends_at_the_iterate_of_its_last_progress():
    """Problems alone (no batch effects on the rounding), stepped by the method itself: each that
    ends INACCURATE does so ``progress_limit`` iterations after its last progress, at that iterate:
    the final residuals' measures equal those recorded then (``State.best``; the restored iterate's
    residuals, recomputed), and none of the iterates after it measured below 0.9 of them
    (``ipm._PROGRESS``). Whether a problem's last step moves away from that iterate, so that the
    return to it is exercised, depends on the machine's rounding: of these seven problems at least
    one must (the first does on the AMD EPYC machine; on the Intel Xeon one the first does not, the
    six others do)."""
    inaccurate = returned = 0
    for d in _one_problem_each():
        result, seen, settings = _stepped(d, 2.5e-16, 200)
        st, res = result.state, result.residuals
        limit = settings.progress_limit
        assert int(st.iterations[0]) < 200
        if int(st.status[0]) != QPStatus.INACCURATE:
            assert int(st.status[0]) == QPStatus.SOLVED, st.status  # solved by its rounding
            continue
        inaccurate += 1
        assert int(st.counters[0, 3]) == limit and len(seen) > limit + 1
        assert torch.equal(res.progress, st.best), (res.progress, st.best)
        assert torch.equal(seen[-limit - 2], st.best), (seen[-limit - 2], st.best)
        assert (torch.cat(seen[-limit - 1 : -1]) >= ipm._PROGRESS * st.best).all(), (seen[-limit - 1 :], st.best)
        returned += not torch.equal(seen[-2], st.best)  # the last step had moved away from that iterate
    assert inaccurate >= 2 and returned >= 1, (inaccurate, returned)


def test_a_problem_far_from_tolerance_when_it_stops_progressing_goes_on():
    """A problem that stops progressing with residuals above 100 times the tolerance
    (``ipm._REDUCED_ACCURACY``) is not stopped by the test (an infeasible or unbounded problem's
    certificate may still come): the problems scaled by 1e3 have residuals at a rounding floor of
    about 1e-12, against a tolerance of 1e-15; those that went ``progress_limit`` iterations without
    progress, their measure above 100, run on to the iteration limit."""
    d = {key: value * 1e3 for key, value in _problems().items()}
    result, _, settings = _stepped(d, 1e-15, 120)
    st = result.state
    past = (st.counters[:, 3] >= settings.progress_limit) & (st.best[:, 0] > ipm._REDUCED_ACCURACY)
    assert past.sum() >= 2, (st.counters, st.best)
    assert (st.status[past] == QPStatus.MAX_ITER).all() and (st.iterations[past] == 120).all(), (st.status, st.iterations)
    sol = _solve(d, 1e-15, max_iter=120)
    assert (sol.status == QPStatus.MAX_ITER).all() and (sol.iterations == 120).all(), (sol.status, sol.iterations)


def test_no_problem_ends_inaccurate_where_its_accurate_gap_would_pass(monkeypatch):
    """On the accelerators' schedule the host looks every few iterations, and tests a gap that
    alone fails accurately only then (``ipm._look_flags``): a problem may stop progressing at an
    iterate that no look tested. The solve's end tests those gaps too, so that no problem ends
    INACCURATE at an iterate whose primal and dual residuals are within tolerance and whose gap
    passes with ``accurate_gap``. Compared with the same batch without that end test (more of it
    ends INACCURATE; control that the case is exercised)."""
    from optlayers.engine import loop
    from optlayers.host import is_check

    monkeypatch.setattr(loop, "is_check", lambda iteration, device=None: is_check(iteration, None))
    torch.manual_seed(1)
    d = random_qp((32,), 10, 10, 0)
    flat, _ = prepare_qp(d["Q"], d["p"], d["G"], d["h"], None, None)
    data, sc = equilibrate(qp_data(*flat))
    settings = dataclasses.replace(ipm.default_settings(torch.float64, 1e-15, 0.0, 100), compiled=False)

    def solved(result) -> tuple[torch.Tensor, torch.Tensor]:
        st, res = result.state, result.residuals
        inaccurate = st.status == QPStatus.INACCURATE
        accurate = ipm._accept_accurate_gaps(data, ipm.Units.of(sc, data, settings), st, res, inaccurate)
        return st.status == QPStatus.SOLVED, inaccurate & accurate.converged

    with_end_test, passing = solved(ipm.solve_scaled(data, sc, settings, with_factor=False))
    assert not passing.any(), passing
    monkeypatch.setattr(ipm, "_accurate_gaps_of_inaccurate", lambda data, units, st, res: (st, res))
    without, passing_without = solved(ipm.solve_scaled(data, sc, settings, with_factor=False))
    assert passing_without.any() and torch.equal(with_end_test, without | passing_without), (with_end_test, without)
