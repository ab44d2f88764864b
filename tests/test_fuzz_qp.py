"""Property-based fuzzing of solve_qp: random batches whose right outcome is known by construction
(tests/fuzz_qp_cases.py). Every element must be SOLVED with small KKT residuals (measured here,
not taken from the solver) or carry the right failure status, whatever else is in its batch.

The default suite runs a few hundred derandomised cases; ``-m slow`` runs 10,000 and, with
``FUZZ_SUMMARY=path.json`` in the environment, writes the tally and every failing case there.
"""
from __future__ import annotations

import collections
import datetime
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from optlayers import QPStatus, solve_qp
from tests.fuzz_qp_cases import KKT_TOL, build_case, describe, draw_case, kkt_residuals, outcomes, worst_residual


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@st.composite
def cases(draw):
    return draw_case(draw)


_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# Wrong answers the fuzzing found in the solver (qp/ipm.py), tolerated here so that the property
# keeps guarding everything else; each has concrete cases below marked xfail(strict=True) (once such
# a case passes, it is tested plainly), and the entry goes when the 10,000-case run no longer finds it.
# No 10,000-case run has left a solvable element at NUMERICAL_ERROR, so that pair is not tolerated.
KNOWN_BUGS = {
    ("SOLVED", "MAX_ITER"): "a solvable element scaled by 1e5 to 1e6 with duplicated rows left at MAX_ITER "
                            "(test_solvable_scaled_elements_once_left_unsolved)",
    # the same elements where their residuals stop within 100 times the tolerance (the progress test,
    # ``IPMSettings.progress_limit``): test_solvable_scaled_elements_once_left_unsolved's lp-seed-214011
    # until ``qp/multipliers.py`` (seeds 829 and 939999 of the 10,000-case run on the AMD EPYC machine
    # ended so until the factorisation of H + σAᵀA)
    ("SOLVED", "INACCURATE"): "a solvable element scaled by 1e5 to 1e6 with duplicated rows stopped INACCURATE "
                              "(test_solvable_scaled_elements_once_left_unsolved)",
}


def _acceptable(outcome: dict) -> bool:
    """Right answers, and MAX_ITER / NUMERICAL_ERROR on an infeasible or unbounded element: an
    honest failure status that misses the certificate. Never a
    wrong claim: SOLVED with large residuals, a wrong certificate, a solvable element left
    unsolved, or an element whose answer depends on the rest of its batch (except KNOWN_BUGS)."""
    if outcome["verdict"] == "ok" or (outcome["verdict"] == "gave_up" and outcome["expected"] != "SOLVED"):
        return True
    return outcome["verdict"] in ("wrong_status", "gave_up") and (outcome["expected"], outcome["got"]) in KNOWN_BUGS


@settings(max_examples=400, **_SETTINGS)
@given(case=cases())
def test_every_element_is_solved_or_correctly_refused(case):
    for outcome in outcomes(case):
        assert _acceptable(outcome), f"{outcome} in case {describe(case)}"


def _judged_ok(case: dict, element: int) -> dict:
    """The outcome of element ``element`` of the regression ``case`` (solved in its batch), asserted
    to be judged "ok": solved to the KKT tolerance, or certified as what it is."""
    outcome = outcomes(case, compare_alone=False)[element]
    assert outcome["verdict"] == "ok", outcome
    return outcome


# Found by the fuzzing: infeasible elements whose iterates diverged (gap 1e11-1e23) without the
# certificate test firing; they ended at MAX_ITER instead of PRIMAL_INFEASIBLE until the
# equilibration's scalings were powers of two. Element ``index`` of each batch.
_MISSED_CERTIFICATES = [
    ({"seed": 1881, "n": 3, "k": 7, "m": 3, "objective_decades": -0.051846580988950564,
      "row_decades": 0.39459114905530746, "column_decades": 0.2284775047490149,
      "elements": [{"kind": "solvable", "rank": 3, "duplicate_rows": True, "redundant_eq": False},
                   {"kind": "infeasible_ineq", "rank": 0, "duplicate_rows": True, "redundant_eq": True},
                   {"kind": "infeasible_eq", "rank": 2, "duplicate_rows": True, "redundant_eq": False},
                   {"kind": "solvable", "rank": 1, "duplicate_rows": False, "redundant_eq": False}]}, 1),
    ({"seed": 1, "n": 5, "k": 8, "m": 4, "objective_decades": 5.217857785179273, "row_decades": 2.0,
      "column_decades": 1.45264925822242,
      "elements": [{"kind": "infeasible_ineq", "rank": 5, "duplicate_rows": False, "redundant_eq": False}]}, 0),
]


def test_no_false_unboundedness_certificate_on_an_infeasible_element():
    """z >= -15 (twice), z <= -15, z >= 1, minimise -z/16: infeasible, and its dual is feasible
    (no direction d != 0 has Gd <= 0); once reported DUAL_INFEASIBLE (the certificate inferred
    G dx from the Newton equations instead of measuring it)."""
    case = {"seed": 924525, "n": 1, "k": 4, "m": 0, "objective_decades": 0.0, "row_decades": 0.0, "column_decades": 1.0,
            "elements": [{"kind": "solvable", "rank": 0, "duplicate_rows": False, "redundant_eq": False},
                         {"kind": "infeasible_ineq", "rank": 0, "duplicate_rows": True, "redundant_eq": False},
                         {"kind": "solvable", "rank": 0, "duplicate_rows": False, "redundant_eq": False}]}
    _judged_ok(case, 1)


def test_no_false_unboundedness_certificate_where_both_certificates_pass():
    """A linear program with inconsistent equalities (rows 0 and 2 parallel), rows and columns
    scaled over 5 decades: infeasible, and its dual feasible by construction. Its Newton direction
    passed the recession test by rounding (‖A dx‖ = 7.6e-8 ‖dx‖, pᵀdx = −1.3e-7 ‖dx‖ against
    ε = 1e-7) in the same iterations as the Farkas test, and the dual certificate won: reported
    DUAL_INFEASIBLE (the 10,000-case run on the AMD EPYC machine, 2026-12-07). Where both hold, the
    primal one is reported (``ipm.assess``)."""
    case = {"seed": 13, "n": 6, "k": 1, "m": 3, "objective_decades": -2.00001, "row_decades": 5.2236472056555225,
            "column_decades": 5.2236472056555225,
            "elements": [{"kind": "infeasible_eq", "rank": 2, "duplicate_rows": True, "redundant_eq": False},
                         {"kind": "infeasible_eq", "rank": 6, "duplicate_rows": False, "redundant_eq": True},
                         {"kind": "unbounded", "rank": 1, "duplicate_rows": True, "redundant_eq": True},
                         {"kind": "infeasible_eq", "rank": 0, "duplicate_rows": True, "redundant_eq": True}]}
    for element in range(4):
        _judged_ok(case, element)


def test_no_false_unboundedness_certificate():
    """min -1.875 z s.t. -0.75 z <= -1.3125, 1.5 z = 2.625: z = 1.75 is the only feasible point; its
    vanishing last steps once passed the relative recession tests by rounding."""
    case = {"seed": 1421, "n": 1, "k": 1, "m": 1, "objective_decades": 0.0, "row_decades": 0.0, "column_decades": 0.0,
            "elements": [{"kind": "solvable", "rank": 0, "duplicate_rows": False, "redundant_eq": False},
                         {"kind": "solvable", "rank": 1, "duplicate_rows": False, "redundant_eq": False},
                         {"kind": "solvable", "rank": 0, "duplicate_rows": False, "redundant_eq": False}]}
    _judged_ok(case, 2)


def test_no_false_infeasibility_certificate():
    case = {"seed": 644771, "n": 8, "k": 8, "m": 4, "objective_decades": 0.3, "row_decades": 4.364419996003051,
            "column_decades": 0.9266029504216198,
            "elements": [{"kind": "infeasible_eq", "rank": 4, "duplicate_rows": False, "redundant_eq": False},
                         {"kind": "unbounded", "rank": 8, "duplicate_rows": True, "redundant_eq": True}]}
    _judged_ok(case, 1)


def test_no_false_unboundedness_certificate_on_a_scaled_bounded_element():
    """A bounded element scaled by up to 1e6 that is solved (it once got a false recession
    certificate; whether it does depends on the rounding of the iteration)."""
    case = {"seed": 9508, "n": 6, "k": 1, "m": 0, "objective_decades": 5.851210697323356,
            "row_decades": 4.682839697954082, "column_decades": 5.851210697323356,
            "elements": [{"kind": "unbounded", "rank": 5, "duplicate_rows": False, "redundant_eq": True},
                         {"kind": "solvable", "rank": 3, "duplicate_rows": False, "redundant_eq": True}]}
    _judged_ok(case, 1)


def test_no_false_unboundedness_certificate_on_a_degenerate_scaled_bounded_element():
    case = {"seed": 178, "n": 7, "k": 1, "m": 2, "objective_decades": 4.571648658474247,
            "row_decades": 3.991723946104168, "column_decades": 4.571648658474247,
            "elements": [{"kind": "solvable", "rank": 3, "duplicate_rows": False, "redundant_eq": True},
                         {"kind": "infeasible_eq", "rank": 7, "duplicate_rows": False, "redundant_eq": False},
                         {"kind": "solvable", "rank": 5, "duplicate_rows": True, "redundant_eq": True}]}
    _judged_ok(case, 2)


# Bounded elements with rows scaled by up to 1e4.6-1e5.8 that got a false recession certificate in the
# 10,000-case runs (at b319737 and ca5e026): their Q is singular to working precision along a direction
# with Gd < 0, pᵀd < 0 (curvature 1e-13 of ‖Q‖ in the original units, below 1e-7 in the scaled ones, whose
# column scaling is clamped), and the objective's curvature stops the descent within the iterate's reach.
_SCALED_BOUNDED = {
    "seed-4421": ({"seed": 4421, "n": 3, "k": 2, "m": 0, "objective_decades": 2.8000500076933825,
                   "row_decades": 5.363089984393653, "column_decades": 3.5183498851686483,
                   "elements": [{"kind": "solvable", "rank": 2, "duplicate_rows": False, "redundant_eq": True},
                                {"kind": "solvable", "rank": 2, "duplicate_rows": True, "redundant_eq": True}]}, 1),
    "seed-29507": ({"seed": 29507, "n": 3, "k": 6, "m": 3, "objective_decades": 5.817982821518971,
                    "row_decades": 5.817982821518971, "column_decades": 5.817982821518971,
                    "elements": [{"kind": "infeasible_ineq", "rank": 1, "duplicate_rows": False, "redundant_eq": False},
                                 {"kind": "infeasible_eq", "rank": 3, "duplicate_rows": True, "redundant_eq": True},
                                 {"kind": "infeasible_ineq", "rank": 1, "duplicate_rows": False, "redundant_eq": False},
                                 {"kind": "solvable", "rank": 3, "duplicate_rows": True, "redundant_eq": True}]}, 3),
}


def test_no_false_unboundedness_certificate_on_a_scaled_bounded_element_that_is_solved():
    case, element = _SCALED_BOUNDED["seed-4421"]
    _judged_ok(case, element)


def test_no_false_unboundedness_certificate_on_a_slowly_converging_scaled_bounded_element():
    """Its first steps are short (α 1e-7 to 1e-2) along a direction that passed the recession tests; without
    the certificate it converges linearly: honest MAX_ITER at the default 100 iterations, solved with 200."""
    case, element = _SCALED_BOUNDED["seed-29507"]
    outcome = outcomes(case, compare_alone=False)[element]
    assert outcome["got"] != "DUAL_INFEASIBLE" and outcome["verdict"] in ("ok", "gave_up"), outcome
    batch = build_case(case)
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x[element : element + 1]))  # noqa: E731
    sol = solve_qp(t(batch.Q), t(batch.p), t(batch.G), t(batch.h), t(batch.A), t(batch.b), on_failure="ignore",
                   max_iter=200)
    assert QPStatus(int(sol.status[0])) == QPStatus.SOLVED, sol.status
    z, lam, nu, s = (getattr(sol, name)[0].numpy() for name in ("z", "lam", "nu", "s"))
    assert max(kkt_residuals(batch, element, z, lam, nu, s).values()) <= KKT_TOL


def test_no_false_infeasibility_certificate_from_a_step_at_rounding_level():
    """A linear program (rows scaled by up to 1e0.9, a duplicated inequality) whose duals had
    converged: its steps dy of 1e-17 (λ ≈ 0.5) passed the relative Farkas tests by rounding
    (bᵀdν + hᵀdλ = -2e-16 < -ε‖dy‖ = -4e-24) and it was certified PRIMAL_INFEASIBLE (the
    10,000-case run at dd895a0, and at b40d458)."""
    case = {"seed": 2042226988, "n": 3, "k": 2, "m": 1, "objective_decades": 0.6300511117834071,
            "row_decades": 0.9161148129444376, "column_decades": 0.9161148129444376,
            "elements": [{"kind": "solvable", "rank": 0, "duplicate_rows": True, "redundant_eq": False},
                         {"kind": "solvable", "rank": 2, "duplicate_rows": False, "redundant_eq": True}]}
    _judged_ok(case, 0)


def test_a_solution_is_judged_against_its_terms_before_they_cancel():
    """An LP with optimal value 0: pᵀz sums terms of 1e5 to 6e-11. Judged against |pᵀz| itself the
    (rounding-level) gap looked like 6e-7; against |p|ᵀ|z| it is 1e-16."""
    case = {"seed": 98168716, "n": 2, "k": 1, "m": 0, "objective_decades": 4.365125496284071,
            "row_decades": 0.0, "column_decades": 4.365125496284071,
            "elements": [{"kind": "solvable", "rank": 0, "duplicate_rows": True, "redundant_eq": True},
                         {"kind": "solvable", "rank": 1, "duplicate_rows": False, "redundant_eq": True}]}
    outcome = _judged_ok(case, 0)
    assert outcome["residuals"]["gap"] < 1e-12, outcome


def test_a_degenerate_solvable_element_is_solved():
    """Unscaled (factors within 2^±0.4), duplicated rows: with the plain factorisation alone its
    residuals stalled at 1e-9 (MAX_ITER); its failed factorisations switch it to the stiff split."""
    case = {"seed": 0, "n": 8, "k": 7, "m": 0, "objective_decades": 0.108895916041293,
            "row_decades": 0.108895916041293, "column_decades": 0.108895916041293,
            "elements": [{"kind": "solvable", "rank": 6, "duplicate_rows": False, "redundant_eq": True},
                         {"kind": "solvable", "rank": 4, "duplicate_rows": True, "redundant_eq": False},
                         {"kind": "solvable", "rank": 6, "duplicate_rows": False, "redundant_eq": False}]}
    _judged_ok(case, 2)


# Solvable elements the 10,000-case run at cbdde26 left at MAX_ITER: a linear program in one variable,
# minimise -32.5 z subject to ten inequality rows (one duplicated) with coefficients 2^-24 to 2^-7. Its
# residuals stopped within 100 times the tolerance (INACCURATE after 35 iterations), the dual residual
# held at 2e-10 by multipliers of 4e4 (scaled); it is solved since the end of the solve moves them to
# the least-norm ones of the active rows (``qp/multipliers.py``: 0.36). (The run's other one, seed
# 223, is solved since the factorisation of H + σAᵀA:
# test_an_equality_constrained_element_held_by_its_equalities_alone_is_solved.)
_LEFT_AT_MAX_ITER = {
    "lp-seed-214011": ({"seed": 214011, "n": 1, "k": 10, "m": 0, "objective_decades": 5.573681729895656,
                        "row_decades": 3.01271444833188, "column_decades": 5.0,
                        "elements": [{"kind": "solvable", "rank": 0, "duplicate_rows": True, "redundant_eq": False}]}, 0),
}


@pytest.mark.parametrize("name", list(_LEFT_AT_MAX_ITER))
def test_solvable_scaled_elements_once_left_unsolved(name):
    case, element = _LEFT_AT_MAX_ITER[name]
    _judged_ok(case, element)


@pytest.mark.parametrize("case, index", _MISSED_CERTIFICATES, ids=["infeasible-unscaled", "infeasible-scaled"])
def test_once_missed_infeasibility_certificates(case, index):
    """Certified PRIMAL_INFEASIBLE since the equilibration's scalings are powers of two (MAX_ITER before)."""
    _judged_ok(case, index)


# Unbounded elements whose iterates diverged with no Newton direction passing the recession test
# three iterations in a row (MAX_ITER in the 10,000-case run on the AMD EPYC machine); the iterate's
# own recession test certifies them (the first two since the factorisation of H + σAᵀA). Element
# ``index`` of each batch.
_MISSED_UNBOUNDEDNESS = [
    ({"seed": 1333, "n": 8, "k": 2, "m": 4, "objective_decades": -5.0,
      "row_decades": 4.849193843021865, "column_decades": 1.3552068559849748,
      "elements": [{"kind": "unbounded", "rank": 2, "duplicate_rows": False, "redundant_eq": True},
                   {"kind": "infeasible_ineq", "rank": 8, "duplicate_rows": True, "redundant_eq": False},
                   {"kind": "infeasible_eq", "rank": 7, "duplicate_rows": True, "redundant_eq": True},
                   {"kind": "infeasible_ineq", "rank": 3, "duplicate_rows": True, "redundant_eq": True}]}, 0),
    ({"seed": 4, "n": 8, "k": 7, "m": 4, "objective_decades": 6.0,
      "row_decades": 1.192092896e-07, "column_decades": 8.989286374085866e-66,
      "elements": [{"kind": "unbounded", "rank": 3, "duplicate_rows": False, "redundant_eq": True},
                   {"kind": "unbounded", "rank": 3, "duplicate_rows": True, "redundant_eq": False},
                   {"kind": "unbounded", "rank": 3, "duplicate_rows": False, "redundant_eq": True}]}, 0),
    ({"seed": 409, "n": 7, "k": 9, "m": 2, "objective_decades": 1.5,
      "row_decades": 0.30426836833620163, "column_decades": 5.694353812974392,
      "elements": [{"kind": "unbounded", "rank": 0, "duplicate_rows": True, "redundant_eq": True},
                   {"kind": "infeasible_eq", "rank": 5, "duplicate_rows": False, "redundant_eq": False},
                   {"kind": "solvable", "rank": 6, "duplicate_rows": False, "redundant_eq": False}]}, 0),
    ({"seed": 99999, "n": 8, "k": 10, "m": 2, "objective_decades": -0.0,
      "row_decades": 1e-12, "column_decades": 5.256379584536814,
      "elements": [{"kind": "unbounded", "rank": 2, "duplicate_rows": True, "redundant_eq": True}]}, 0),
    ({"seed": 0, "n": 4, "k": 6, "m": 0, "objective_decades": -3.3431041409497917,
      "row_decades": 0.0, "column_decades": 0.0,
      "elements": [{"kind": "unbounded", "rank": 0, "duplicate_rows": True, "redundant_eq": True}]}, 0),
    ({"seed": 120176, "n": 8, "k": 6, "m": 2, "objective_decades": -8.011640564304698e-84,
      "row_decades": 1.9, "column_decades": 4.960799898162997,
      "elements": [{"kind": "unbounded", "rank": 2, "duplicate_rows": False, "redundant_eq": False}]}, 0),
]


@pytest.mark.parametrize("case, index", _MISSED_UNBOUNDEDNESS, ids=[f"seed-{c['seed']}" for c, _ in _MISSED_UNBOUNDEDNESS])
def test_once_missed_unboundedness_certificates(case, index):
    """Certified DUAL_INFEASIBLE by the iterate's recession test (MAX_ITER before)."""
    assert _judged_ok(case, index)["got"] == "DUAL_INFEASIBLE"


def test_no_false_unboundedness_certificate_from_a_large_iterate_of_an_infeasible_element():
    """Inconsistent equalities (with a feasible dual, so not unbounded), scaled by 1e5.7: the
    iterate stops at ‖x‖ = 1.5e6 (scaled) with ‖Ax‖ and Gx within 1e-7‖x‖ and a descent slope;
    the iterate's recession test needs the iterate to have diverged, and the element is certified
    PRIMAL_INFEASIBLE."""
    case = {"seed": 967, "n": 6, "k": 5, "m": 3, "objective_decades": 5.656085100894902,
            "row_decades": 5.656085100894902, "column_decades": 5.656085100894902,
            "elements": [{"kind": "infeasible_eq", "rank": 4, "duplicate_rows": True, "redundant_eq": True},
                         {"kind": "infeasible_eq", "rank": 0, "duplicate_rows": False, "redundant_eq": True},
                         {"kind": "infeasible_eq", "rank": 2, "duplicate_rows": True, "redundant_eq": True}]}
    assert _judged_ok(case, 1)["got"] == "PRIMAL_INFEASIBLE"


def test_an_equality_constrained_element_held_by_its_equalities_alone_is_solved(monkeypatch):
    """No inequalities, Q of rank 5 of 7 with eigenvalues up to 6e14, redundant equality rows of
    entries up to 8e4 that hold Q's two free directions: with H = Q + ρI factorised alone the
    refined Newton step barely moves the dual residual and the element ends MAX_ITER; the
    factorisation of H + σAᵀA (``IPMSettings.augment``) solves it in 8 iterations."""
    import dataclasses

    from optlayers.qp import solve as qp_solve

    case = {"seed": 223, "n": 7, "k": 0, "m": 3, "objective_decades": 5.444262239418732,
            "row_decades": 0.5610642456755272, "column_decades": 5.285863740779894,
            "elements": [{"kind": "solvable", "rank": 5, "duplicate_rows": True, "redundant_eq": True},
                         {"kind": "unbounded", "rank": 1, "duplicate_rows": False, "redundant_eq": True},
                         {"kind": "unbounded", "rank": 7, "duplicate_rows": True, "redundant_eq": True},
                         {"kind": "unbounded", "rank": 4, "duplicate_rows": False, "redundant_eq": True}]}
    assert _judged_ok(case, 0)["got"] == "SOLVED"
    plain = qp_solve.default_settings
    monkeypatch.setattr(qp_solve, "default_settings", lambda *a, **k: dataclasses.replace(plain(*a, **k), augment=False))
    assert outcomes(case, compare_alone=False)[0]["got"] != "SOLVED"  # the control: H alone


def test_no_false_unboundedness_certificate_from_a_stuck_iterate_of_an_infeasible_element():
    """Infeasible inequalities (the dual feasible, but only with multipliers beyond 1/ε), scaled by
    1e1.7: the iterate stops at ‖x‖ = 1.3e14 (scaled) with every relative test of the iterate's
    recession test passed; the test also needs the iterate to be still moving, and the element is
    not reported unbounded (it ends without a certificate)."""
    case = {"seed": 7, "n": 7, "k": 5, "m": 1, "objective_decades": 1.7025823469429393,
            "row_decades": 1.7025823469429393, "column_decades": 1.7025823469429393,
            "elements": [{"kind": "unbounded", "rank": 6, "duplicate_rows": False, "redundant_eq": False},
                         {"kind": "solvable", "rank": 1, "duplicate_rows": False, "redundant_eq": True},
                         {"kind": "infeasible_ineq", "rank": 2, "duplicate_rows": False, "redundant_eq": True},
                         {"kind": "solvable", "rank": 6, "duplicate_rows": False, "redundant_eq": False}]}
    outcome = outcomes(case, compare_alone=False)[2]
    assert outcome["expected"] == "PRIMAL_INFEASIBLE" and outcome["got"] != "DUAL_INFEASIBLE", outcome
    assert _acceptable(outcome), outcome


def test_unboundedness_certificate_of_a_degenerate_unbounded_element():
    """A degenerate unbounded element (duplicated rows, redundant equalities) that is certified."""
    case = {"seed": 81271, "n": 4, "k": 7, "m": 3, "objective_decades": -5.0, "row_decades": 2.3615445048989656,
            "column_decades": 0.0,
            "elements": [{"kind": "unbounded", "rank": 3, "duplicate_rows": False, "redundant_eq": True},
                         {"kind": "unbounded", "rank": 0, "duplicate_rows": True, "redundant_eq": True},
                         {"kind": "unbounded", "rank": 4, "duplicate_rows": True, "redundant_eq": True}]}
    _judged_ok(case, 1)


def test_a_slack_within_the_absolute_tolerance_of_the_stacked_primal_residual_passes():
    """n = 1: a zero row 0·z ≤ 0 beside an equality whose right-hand side is 1e4. The solver's primal
    residual is one norm over both blocks (1e-8 against terms of 1e4: within tolerance); the check
    measures it so too, where a measure of the inequality block alone would call the slack of 1e-8 on
    a row with no terms a residual of 1e-4."""
    case = {"seed": 1025402, "n": 1, "k": 1, "m": 1, "objective_decades": 5.048038044717596,
            "row_decades": 5.048038044717596, "column_decades": 5.048038044717596,
            "elements": [{"kind": "solvable", "rank": 1, "duplicate_rows": False, "redundant_eq": False}]}
    from tests.fuzz_qp_cases import kkt_residuals, solve

    _judged_ok(case, 0)
    batch = build_case(case)
    z, lam, nu, s = (getattr(solve(batch), name)[0].numpy() for name in ("z", "lam", "nu", "s"))
    assert kkt_residuals(batch, 0, z, lam, nu, s)["inequality"] <= KKT_TOL
    assert kkt_residuals(batch, 0, z, lam, nu, s + 1e-2)["inequality"] > KKT_TOL


def test_the_check_is_independent_and_can_fail():
    """A correct answer passes the residual check, a perturbed one fails it; a wrong status is caught."""
    case = {"seed": 3, "n": 4, "k": 5, "m": 2, "objective_decades": 0.0, "row_decades": 0.0, "column_decades": 0.0,
            "elements": [{"kind": "solvable", "rank": 4, "duplicate_rows": False, "redundant_eq": False}]}
    from tests.fuzz_qp_cases import kkt_residuals, solve

    batch = build_case(case)
    sol = solve(batch)
    z, lam, nu, s = (getattr(sol, name)[0].numpy() for name in ("z", "lam", "nu", "s"))
    assert max(kkt_residuals(batch, 0, z, lam, nu, s).values()) < 1e-9
    assert max(kkt_residuals(batch, 0, z + 1e-4, lam, nu, s).values()) > 1e-6
    assert max(kkt_residuals(batch, 0, z, lam + 1e-3, nu, s).values()) > 1e-6
    assert max(kkt_residuals(batch, 0, z, lam, nu, s, rowwise=True).values()) < 1e-9
    infeasible = dict(case, elements=[dict(case["elements"][0], kind="infeasible_ineq")])
    assert build_case(infeasible).expected == ["PRIMAL_INFEASIBLE"]
    assert outcomes(infeasible)[0]["verdict"] == "ok"


_TEN_THOUSAND_SEED = 20261203


@pytest.mark.slow
def test_ten_thousand_cases():
    """10,000 cases (``FUZZ_CASES`` in the environment: that many); every element judged (no early stop), the tally and failures summarised (and,
    with FUZZ_SUMMARY set, written every 100 cases, so a cut run leaves its figures)."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    tally = collections.Counter()
    kinds = collections.Counter()
    failures = []
    rowwise = []  # SOLVED within tolerance normwise, but some row's residual above KKT_TOL relative to its terms
    cases_run = [0]
    path = os.environ.get("FUZZ_SUMMARY")

    def summary(done: bool) -> dict:
        return {
            "started": started, "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "finished": done, "commit": commit, "cases": cases_run[0], "elements": sum(tally.values()),
            "verdicts": dict(tally), "expected_vs_got": {f"{e} -> {g}": c for (e, g), c in sorted(kinds.items())},
            "failures": failures, "rowwise_above_tol": rowwise,
        }

    def write(done: bool) -> None:
        if path:
            with open(path + ".tmp", "w") as f:
                json.dump(summary(done), f, indent=1, default=str)
            os.replace(path + ".tmp", path)

    # A fixed seed (it overrides ``derandomize``, whose seed is a digest of this function's source):
    # the same cases in every run until the strategy ``cases()`` changes, so that runs before and
    # after an edit of the check compare case by case.
    @seed(_TEN_THOUSAND_SEED)
    @settings(max_examples=int(os.environ.get("FUZZ_CASES", 10_000)), **_SETTINGS)
    @given(case=cases())
    def run(case):
        for outcome in outcomes(case):
            tally[outcome["verdict"]] += 1
            kinds[(outcome["expected"], outcome["got"])] += 1
            if outcome["verdict"] != "ok":
                failures.append({"case": case, "outcome": outcome, "worst_residual": worst_residual(outcome)})
            elif outcome.get("rowwise_worst", 0.0) > KKT_TOL:
                rowwise.append({"case": case, "outcome": outcome})
        cases_run[0] += 1
        if cases_run[0] % 100 == 0:
            write(False)

    run()
    write(True)
    wrong = [f for f in failures if not _acceptable(f["outcome"])]
    assert not wrong, f"{len(wrong)} wrong answers, first: {wrong[0]}"
