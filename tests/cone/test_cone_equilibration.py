"""solve_cone on programs whose variables and rows differ in size: each program is solved
equilibrated (``scaling.equilibration``: x = Dx̄, y = Eȳ, s = s̄/E, powers of two), so that the
variables of a program scaled by D and its rows by E (one number per cone) are D⁻¹x, E⁻¹y, Es of
the program's own solution, and its derivatives those of the program's own, carried by the
scalings. Unequilibrated, with variables and rows scaled by 10^±4, most such programs came out
SOLVED up to 7 % off (at 10^±6 up to 1,000 times), with the interior point method and Clarabel alike."""
import pytest
import torch

from optlayers import ConeSpec, ConeStatus, solve_cone, solve_qp
from optlayers.cone import nonneg, zero
from optlayers.cone import solve as solve_module
from optlayers.cone.qp import solve_qp_cone
from optlayers.cone.scaling import UNIT_RANGE, equilibration
from optlayers.cone.testing import random_program, random_scalings, scaled

SPEC = ConeSpec(zero=2, nonneg=6, soc=[4, 3], psd=[3], exp=2, exp_dual=1)
N = 15  # within testing.n_range(SPEC) = (11, 19): a unique solution (x, y, s)


@pytest.mark.parametrize("solver", ["ipm", "clarabel"])
@pytest.mark.parametrize("quadratic", [False, True])
def test_programs_with_variables_and_rows_of_every_size_are_solved_as_the_unscaled_ones(solver, quadratic):
    A, b, c, P, x, y, s = random_program(SPEC, N, batch=16, seed=2, quadratic=quadratic)
    d, e = random_scalings(SPEC, N, 16, 4.0, seed=3)
    A2, b2, c2, P2 = scaled(A, b, c, P, d, e)
    sol = solve_cone(A2, b2, c2, SPEC, P2, solver=solver)
    assert (sol.status == ConeStatus.SOLVED).all()
    # the programs' known solutions, carried by the scalings: every variable and row to its own size
    torch.testing.assert_close(sol.x * d, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sol.y * e, y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(sol.s / e, s, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("solver", ["ipm", "clarabel"])
def test_derivatives_of_a_scaled_program_are_the_unscaled_ones_carried_by_the_scalings(solver):
    A, b, c, P, _, _, _ = random_program(SPEC, N, batch=6, seed=4, quadratic=True)
    d, e = random_scalings(SPEC, N, 6, 3.0, seed=5)
    w = torch.linspace(-1.0, 2.0, N, dtype=torch.float64)

    def gradients(A, b, c, P, d, e):
        b, c = b.clone().requires_grad_(), c.clone().requires_grad_()
        sol = solve_cone(A, b, c, SPEC, P, solver=solver)
        assert (sol.status == ConeStatus.SOLVED).all()
        return torch.autograd.grad((w * sol.x * d).sum(), (b, c))
    gb, gc = gradients(A, b, c, P, torch.ones_like(d), torch.ones_like(e))
    A2, b2, c2, P2 = scaled(A, b, c, P, d, e)
    gb2, gc2 = gradients(A2, b2, c2, P2, d, e)
    # w·x with x = d·x'(Eb, Dc): d/db' = (d/db)/e, d/dc' = (d/dc)/d
    torch.testing.assert_close(gb2 * e, gb, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(gc2 * d, gc, rtol=1e-7, atol=1e-9)


def test_qps_with_variables_of_every_size_agree_with_the_qp_layer():
    """The finding: random QPs as cone programs with their variables scaled by 10^±2 came out SOLVED
    up to 1e-4 off; by 10^±6 a fifth SOLVED up to 200 % off (both solvers)."""
    gen = torch.Generator().manual_seed(6)
    B, n, k, m = 32, 8, 12, 2
    L = torch.randn(B, n, n, generator=gen, dtype=torch.float64)
    Q = L @ L.mT / n + 1e-2 * torch.eye(n, dtype=torch.float64)
    G, A = torch.randn(B, k, n, generator=gen, dtype=torch.float64), torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    z0 = torch.randn(B, n, 1, generator=gen, dtype=torch.float64)
    h = (G @ z0).squeeze(-1) + torch.rand(B, k, generator=gen, dtype=torch.float64)
    b, p = (A @ z0).squeeze(-1), torch.randn(B, n, generator=gen, dtype=torch.float64)
    d = 10.0 ** ((2 * torch.rand(B, n, generator=gen, dtype=torch.float64) - 1) * 6)
    D = torch.diag_embed(d)
    z = solve_qp(Q, p, G, h, A, b).z
    sol = solve_qp_cone(D @ Q @ D, d * p, G @ D, h, A @ D, b, solver="ipm")
    assert (sol.status == ConeStatus.SOLVED).all()
    torch.testing.assert_close(sol.z * d, z, rtol=1e-8, atol=1e-8)


def test_balanced_programs_are_solved_as_given():
    A, _, _, P, _, _, _ = random_program(SPEC, N, batch=8, seed=0, quadratic=True)
    assert equilibration(A, P, SPEC) is None
    assert equilibration(A[0], None, SPEC) is None


def test_scalings_are_powers_of_two_one_per_cone_and_shared_with_a_shared_a():
    A, _, _, P, _, _, _ = random_program(SPEC, N, batch=4, seed=0, quadratic=True)
    d, e = random_scalings(SPEC, N, 4, 4.0, seed=1)
    A2, _, _, P2 = scaled(A, A[:, :, 0], A[:, 0], P, d, e)
    A2[1], P2[1] = A[1], P[1]  # one balanced program among scaled ones
    columns, rows = equilibration(A2, P2, SPEC)
    assert columns.shape == (4, N) and rows.shape == (4, SPEC.size)
    for t in (columns, rows):
        assert torch.equal(t, torch.exp2(torch.round(torch.log2(t))))
    assert (columns[1] == 1).all() and (rows[1] == 1).all()  # within 2^UNIT_RANGE: solved as given
    assert (columns[0].amax() / columns[0].amin()) > 2.0 ** UNIT_RANGE
    for block in SPEC.blocks():
        if block.module not in (zero, nonneg):  # one number per cone: a positive multiple stays in it
            piece = rows[:, block.start:block.stop].reshape(4, block.count, block.size)
            assert (piece == piece[..., :1]).all()
    shared = equilibration(A2[0], P2, SPEC)  # a shared A: one scaling for every program (P at its largest)
    assert shared[0].shape == (1, N) and shared[1].shape == (1, SPEC.size)


def test_a_shared_a_stays_shared_and_its_programs_are_solved(monkeypatch):
    A, b, c, _, x, _, _ = random_program(SPEC, N, batch=5, seed=7, shared_A=True)
    d, e = random_scalings(SPEC, N, 1, 3.0, seed=8)
    A2 = A * e[0].unsqueeze(-1) * d[0]
    shapes = []
    apply = solve_module.ConeProgram.apply
    monkeypatch.setattr(solve_module.ConeProgram, "apply", lambda A, *rest: shapes.append(A.shape) or apply(A, *rest))
    sol = solve_cone(A2, b * e, c * d, SPEC, solver="ipm")
    assert shapes == [A.shape]  # equilibrated, and still one matrix for every program
    assert (sol.status == ConeStatus.SOLVED).all()
    torch.testing.assert_close(sol.x * d, x, rtol=1e-9, atol=1e-9)


def test_vmap_and_jacrev_over_an_equilibrated_program_match_the_batched_solve():
    """Under torch.func's transforms the scalings are computed without a host read and applied to every
    program (``scaling.equilibration``): the vmapped solve and its jacobian are the batched ones."""
    A, b, c, _, _, _, _ = random_program(SPEC, N, batch=3, seed=9)
    d, e = random_scalings(SPEC, N, 3, 3.0, seed=10)
    A2, b2, c2, _ = scaled(A, b, c, None, d, e)
    batched = solve_cone(A2, b2, c2, SPEC, solver="ipm").x
    mapped = torch.func.vmap(lambda A, b, c: solve_cone(A, b, c, SPEC, solver="ipm").x)(A2, b2, c2)
    torch.testing.assert_close(mapped, batched, rtol=1e-10, atol=1e-12)
    jacobian = torch.func.jacrev(lambda b: solve_cone(A2[0], b, c2[0], SPEC, solver="ipm").x)(b2[0])
    b_leaf = b2[0].clone().requires_grad_()
    x = solve_cone(A2[0], b_leaf, c2[0], SPEC, solver="ipm").x
    rows = torch.stack([torch.autograd.grad(x[i], b_leaf, retain_graph=True)[0] for i in range(N)])
    torch.testing.assert_close(jacobian, rows, rtol=1e-8, atol=1e-10)
