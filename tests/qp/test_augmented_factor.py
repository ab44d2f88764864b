"""The factorisation of H + σAᵀA in place of H (``kkt.factor_kkt``'s ``augment``): the same
Newton systems, solved as exactly, and an H that stays positive definite where equality rows alone
hold a direction that Q and the inequalities leave free."""
import pytest
import torch

from optlayers.engine import kkt
from tests.qp.test_refinement import _backward_error, _ill_conditioned_system


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("stiff", [False, True])
def test_the_augmented_factor_solves_the_same_system(stiff, seed):
    """Reduced KKT systems whose H spans 16 orders of magnitude, solved with the factor of H and
    with that of H + AᵀA (three refinement steps each): the augmented solve's componentwise
    backward error is within a few times the plain one's, and both give the same solution to the
    accuracy the system allows."""
    Q, A, G, w_inv, rhs = _ill_conditioned_system(seed)
    reg = torch.full((3,), 1e-9, dtype=torch.float64)
    mask = (w_inv > 1.0) if stiff else None
    errors, solutions = [], []
    for augment in (False, True):
        f = kkt.factor_kkt(Q, A, G, w_inv, reg, reg, stiff=mask, augment=augment)
        assert f.ok.all() and f.augment.shape == ((3, 1) if augment else (3, 0))
        solution = kkt.solve_reduced(f, rhs[0], rhs[1], rhs[2], refine_steps=3)
        errors.append(_backward_error(Q, A, G, w_inv, rhs, solution))
        solutions.append(solution)
    assert errors[1] <= max(4 * errors[0], 64 * torch.finfo(torch.float64).eps), errors
    dx_plain, dx_augmented = solutions[0][0], solutions[1][0]
    assert torch.allclose(dx_plain, dx_augmented, rtol=1e-6, atol=1e-6 * float(dx_plain.abs().max())), errors
