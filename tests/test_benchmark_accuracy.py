"""The benchmark's judge of a solver's gradients: the reference derivative from Clarabel's active set
agrees with finite differences of Clarabel's own solutions, and a wrong backward is caught."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from benchmarks.accuracy import gradient_error, reference_gradients, reference_solutions
from benchmarks.problems import random_qp
from benchmarks.qp_benchmark import check
from benchmarks.solvers import Solver

pytest.importorskip("clarabel")

STEP = 1e-5


@pytest.mark.parametrize("n_eq", [0, 3])
def test_reference_gradients_match_finite_differences_of_the_reference(n_eq):
    qp = random_qp(3, 6, 8, n_eq, seed=4)
    weights = np.random.default_rng(0).standard_normal((qp.batch, qp.n))
    grad_p, grad_h, usable = reference_gradients(qp, reference_solutions(qp), weights)
    assert usable.all()

    def loss(perturbed) -> np.ndarray:
        return (reference_solutions(perturbed).z * weights).sum(axis=1)

    for name, grad in (("p", grad_p), ("h", grad_h)):
        data = getattr(qp, name)
        for j in range(data.shape[1]):
            bump = torch.zeros_like(data)
            bump[:, j] = STEP
            central = (loss(replace(qp, **{name: data + bump})) - loss(replace(qp, **{name: data - bump}))) / (2 * STEP)
            np.testing.assert_allclose(grad[:, j], central, atol=1e-4, err_msg=f"d/d{name}[{j}]")


def test_degenerate_elements_get_no_reference_derivative():
    qp = random_qp(2, 5, 5, seed=1)
    reference = reference_solutions(qp)
    lam = reference.lam.copy()
    lam[0, lam[0].argmax()] = 0.0  # element 0's most active constraint made weakly active: slack 0 and λ 0
    grad_p, _, usable = reference_gradients(qp, replace(reference, lam=lam), np.ones((2, 5)))
    assert not usable[0] and usable[1]
    assert np.isnan(grad_p[0]).all() and np.isfinite(grad_p[1]).all()


def _optlayers_solver(backward: str) -> Solver:
    """Our layer with its own backward ("exact"), with the identity as dz/dp and no dependence on h
    ("wrong"), or with no dependence on h at all ("missing"): the same forward in each."""
    from optlayers import QPFunction

    layer = QPFunction()

    def solve(qp):
        empty = torch.empty(0, dtype=qp.p.dtype)
        z = layer(*(empty if t is None else t for t in qp.tensors()))
        if backward == "exact":
            return z
        shift = qp.p - qp.p.detach()  # zero, with the identity as its derivative w.r.t. p
        if backward == "wrong":
            return z.detach() + shift + 0.0 * qp.h.sum(-1, keepdim=True)
        return z.detach() + 0.0 * shift

    return Solver(backward, solve, True, "test")


def test_check_measures_gradients_and_catches_a_wrong_backward():
    qp = random_qp(4, 6, 8, seed=2)
    reference = reference_solutions(qp)
    exact = check(_optlayers_solver("exact"), qp, reference)
    assert exact.gradient_checked == 4 and exact.gradient < 1e-6
    wrong = check(_optlayers_solver("wrong"), qp, reference)
    assert wrong.distance == exact.distance  # the same forward ...
    assert wrong.gradient_checked == 4 and wrong.gradient > 0.1  # ... and the wrong derivative is reported
    missing = check(_optlayers_solver("missing"), qp, reference)
    assert np.isnan(missing.gradient) and missing.gradient_checked == 0  # no gradient w.r.t. h: nothing to compare


def test_gradient_error_is_the_worst_entry_over_usable_finite_elements():
    ref_p, ref_h = np.zeros((3, 2)), np.zeros((3, 4))
    usable = np.array([True, True, False])
    grad_p, grad_h = ref_p.copy(), ref_h.copy()
    grad_h[1, 3] = 0.5
    grad_p[2, 0] = 9.0  # not usable: left out
    assert gradient_error((grad_p, grad_h), (ref_p, ref_h, usable)) == (0.5, 2)
    grad_p[0, 0] = np.nan  # not finite: left out
    assert gradient_error((grad_p, grad_h), (ref_p, ref_h, usable)) == (0.5, 1)
