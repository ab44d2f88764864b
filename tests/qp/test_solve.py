"""Solutions and multipliers against Clarabel; special problem classes; batching and dtypes."""
import numpy as np
import pytest
import torch

from benchmarks.problems import with_a_large_variable
from optlayers import QPFunction, QPStatus, solve_qp
from qp_problems import clarabel_solve, generic_qps, random_qp

TIGHT = 1e-12


def assert_matches_clarabel(data, sol, atol=1e-7):
    batch = sol.z.shape[:-1]
    for index in np.ndindex(*batch):
        pick = lambda t, tail: None if t is None else t.expand(*batch, *t.shape[t.dim() - tail:])[index]
        z, lam, nu = clarabel_solve(pick(data["Q"], 2), pick(data["p"], 1), pick(data["G"], 2), pick(data["h"], 1), pick(data["A"], 2), pick(data["b"], 1))
        np.testing.assert_allclose(sol.z[index].numpy(), z, atol=atol, rtol=0)
        if data["G"] is not None:
            np.testing.assert_allclose(sol.lam[index].numpy(), lam, atol=atol * 10, rtol=0)
        if data["A"] is not None:
            np.testing.assert_allclose(sol.nu[index].numpy(), nu, atol=atol * 10, rtol=0)


@pytest.mark.parametrize("n,k,m", [(10, 15, 3), (30, 30, 0), (20, 0, 5), (25, 40, 10), (8, 0, 0)])
def test_random_qps_match_clarabel(n, k, m):
    data = random_qp((4,), n, k, m)
    sol = solve_qp(**data, tol=TIGHT)
    assert (sol.status == QPStatus.SOLVED).all()
    assert_matches_clarabel(data, sol)


def test_many_active_constraints_match_clarabel():
    data = random_qp((3,), 12, 16, 4, active=True)
    sol = solve_qp(**data, tol=TIGHT)
    assert_matches_clarabel(data, sol)
    assert int((sol.lam > 0.4).sum()) == 3 * 8


def test_linear_program_with_zero_q():
    data = random_qp((3,), 10, 25, 2)
    data["Q"] = torch.zeros(10, 10)
    G = data["G"]
    data["G"] = torch.cat([G, torch.eye(10).expand(3, 10, 10), -torch.eye(10).expand(3, 10, 10)], dim=-2)
    data["h"] = torch.cat([data["h"], torch.full((3, 20), 5.0) + 10], dim=-1)
    sol = solve_qp(**data, tol=TIGHT)
    assert (sol.status == QPStatus.SOLVED).all()
    assert_matches_clarabel(data, sol, atol=1e-6)


def test_singular_q_rank_deficient():
    data = random_qp((3,), 15, 30, 3, rank=4)
    sol = solve_qp(**data, tol=TIGHT)
    assert (sol.status == QPStatus.SOLVED).all()
    assert (sol.primal_residual < 1e-9).all() and (sol.dual_residual < 1e-9).all()
    ref = [clarabel_solve(data["Q"][i], data["p"][i], data["G"][i], data["h"][i], data["A"][i], data["b"][i])[0] for i in range(3)]
    obj = lambda Q, p, z: 0.5 * z @ Q @ z + p @ z
    for i in range(3):
        assert obj(data["Q"][i].numpy(), data["p"][i].numpy(), sol.z[i].numpy()) == pytest.approx(obj(data["Q"][i].numpy(), data["p"][i].numpy(), ref[i]), abs=1e-7)


def test_redundant_equality_rows():
    data = random_qp((2,), 8, 6, 3)
    data["A"] = torch.cat([data["A"], data["A"][:, :1] * 2.0], dim=1)
    data["b"] = torch.cat([data["b"], data["b"][:, :1] * 2.0], dim=1)
    sol = solve_qp(**data, tol=TIGHT)
    assert (sol.status == QPStatus.SOLVED).all()
    assert (sol.primal_residual < 1e-9).all() and (sol.dual_residual < 1e-9).all()
    data_without = dict(data, A=data["A"][:, :3], b=data["b"][:, :3])
    np.testing.assert_allclose(sol.z.numpy(), solve_qp(**data_without, tol=TIGHT).z.numpy(), atol=1e-8)


def test_unbatched_and_batch_of_one_agree():
    data = random_qp((1,), 6, 8, 2)
    batched = solve_qp(**data)
    single = solve_qp(**{k: v[0] for k, v in data.items()})
    assert single.z.shape == (6,) and single.status.shape == ()
    np.testing.assert_allclose(single.z.numpy(), batched.z[0].numpy(), atol=1e-12)


def test_shared_arguments_broadcast():
    data = random_qp((5,), 7, 9, 2)
    shared = dict(data, Q=data["Q"][0], G=data["G"][0], A=data["A"][0])
    shared["h"] = (shared["G"] @ torch.randn(7)) + torch.rand(5, 9)
    shared["b"] = shared["A"] @ torch.randn(7)
    sol = solve_qp(**shared)
    assert sol.z.shape == (5, 7) and sol.nu.shape == (5, 2)
    for i in range(5):
        one = solve_qp(shared["Q"], shared["p"][i], shared["G"], shared["h"][i], shared["A"], shared["b"])
        np.testing.assert_allclose(sol.z[i].numpy(), one.z.numpy(), atol=1e-9)


def test_multiple_batch_dimensions():
    data = random_qp((2, 3), 5, 6, 1)
    sol = solve_qp(**data)
    assert sol.z.shape == (2, 3, 5) and sol.status.shape == (2, 3)
    np.testing.assert_allclose(sol.z[1, 2].numpy(), solve_qp(**{k: v[1, 2] for k, v in data.items()}).z.numpy(), atol=1e-10)


def test_float32_follows_input_dtype():
    data = random_qp((4,), 20, 20, 2, dtype=torch.float32)
    sol = solve_qp(**data)
    assert sol.z.dtype == torch.float32 and (sol.status == QPStatus.SOLVED).all()
    ref = solve_qp(**{k: v.double() for k, v in data.items()}).z
    np.testing.assert_allclose(sol.z.numpy(), ref.numpy(), atol=1e-4)


def test_qpfunction_accepts_qpth_style_empty_tensors():
    data = random_qp((3,), 6, 8, 0)
    empty = torch.empty(0)
    z = QPFunction()(data["Q"], data["p"], data["G"], data["h"], empty, empty)
    np.testing.assert_allclose(z.numpy(), solve_qp(**data).z.numpy(), atol=1e-12)
    assert "on_failure='warn'" in repr(QPFunction())


def test_slacks_and_complementarity():
    data = random_qp((3,), 10, 12, 2, active=True)
    sol = solve_qp(**data)
    np.testing.assert_allclose(sol.s.numpy(), (data["h"] - (data["G"] @ sol.z.unsqueeze(-1)).squeeze(-1)).numpy(), atol=1e-9)
    assert (sol.lam >= 0).all() and (sol.s >= 0).all()
    assert float((sol.lam * sol.s).abs().max()) < 1e-8


def test_interior_solution_without_cycling():
    """A 2-variable QP from the hard-constraints experiment on which the predictor-corrector
    iterates once cycled (μ rising along long steps) until max_iter; its solution is interior."""
    p = torch.tensor([-0.878325257767833, 1.9849861214967168])
    G = torch.tensor([[1.174723041230297, 0.10975902501676328], [-0.0860091439893235, 0.8208068909560391],
                      [0.3610868742606234, 0.5287874785890546], [-0.5256061544172994, -0.5524558979497846],
                      [-0.09902974001766027, -0.16181663342110642], [-0.4903990698922889, -0.26712662350529603]])
    h = torch.tensor([1.5635055421403032, 0.8944707546868136, 1.0127603069782412, 1.0183714627829419,
                      1.1781420721028864, 1.1578303219421])
    sol = solve_qp(torch.eye(2), p, G, h)
    assert (G @ -p < h).all(), "the unconstrained minimiser -p is feasible"
    np.testing.assert_allclose(sol.z.numpy(), -p.numpy(), atol=1e-10)
    np.testing.assert_allclose(sol.lam.numpy(), 0.0, atol=1e-10)
    assert sol.iterations.item() < 30


def test_many_small_feasible_qps_all_solve_quickly():
    """2000 small strictly convex feasible QPs (the shape of OptNet layers in the experiments)."""
    gen = torch.Generator().manual_seed(3)
    B, n, k = 2000, 3, 8
    G = torch.randn(B, k, n, generator=gen) * torch.rand(B, k, 1, generator=gen)
    z0 = torch.randn(B, n, generator=gen)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + torch.rand(B, k, generator=gen)
    p = 3 * torch.randn(B, n, generator=gen)
    Q = torch.eye(n) * (torch.rand(B, 1, 1, generator=gen) + 0.1)
    sol = solve_qp(Q, p, G, h)
    assert (sol.status == QPStatus.SOLVED).all()
    assert sol.iterations.max().item() <= 30


def test_a_solve_under_inference_mode_leaves_later_solves_unaffected():
    """A solve inside ``torch.inference_mode`` (large enough for every CPU fast path) keeps no
    inference tensors that a later ordinary solve, with gradients, would have to write."""
    data = random_qp((64,), 40, 50, 0)
    with torch.inference_mode():
        z_inference = solve_qp(**data).z
    p = data["p"].clone().requires_grad_(True)
    z = solve_qp(**{**data, "p": p}).z
    torch.testing.assert_close(z.detach(), z_inference, rtol=0, atol=1e-10)
    z.sum().backward()
    assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("scale", [1e-3, 1e-6, 1e-12, 1e7, 1e9])
def test_data_far_from_unit_size_are_solved_as_accurately_as_unit_data(scale):
    """A QP is homogeneous in (p, h, b): z(αp, αh, αb) = αz(p, h, b), with dz/dp, dz/dh, dz/db the
    same at every α. Data far from unit size are solved at unit size (``qp.scaling._sizes``), and
    small ones tested with the default tolerance's absolute part following them, the gap's as their
    square (``ipm.absolute_tolerance``). At α = 1e-6 a fixed 1e-12 was met with z 6 % off and
    gradients 1 % to 60 % off, SOLVED; the residuals' tolerance on the gap and no scaling left them
    1e-4 off, and at 1e-12 the iteration limit was reached. At α = 1e7 and 1e9 unscaled, seven and
    eight of the eight feasible problems were reported PRIMAL_INFEASIBLE."""
    torch.manual_seed(0)
    B, n, k, m = 8, 6, 10, 2
    L = torch.randn(B, n, n)
    Q, G, A = L @ L.mT + 0.1 * torch.eye(n), torch.randn(B, k, n), torch.randn(B, m, n)
    z0 = torch.randn(B, n, 1)
    h = (G @ z0).squeeze(-1) + 0.1 + torch.rand(B, k)  # z0 strictly feasible: a generic, non-degenerate optimum
    b, p, w = (A @ z0).squeeze(-1), torch.randn(B, n), torch.randn(B, n)

    def solve(alpha):
        data = [(alpha * t).requires_grad_() for t in (p, h, b)]
        sol = solve_qp(Q, data[0], G, data[1], A, data[2])
        grads = torch.autograd.grad((w * sol.z).sum(), data)
        return sol, grads
    unit, unit_grads = solve(1.0)
    small, small_grads = solve(scale)
    assert (small.status == 0).all()
    accuracy = 1e-7
    torch.testing.assert_close(small.z / scale, unit.z, rtol=accuracy, atol=accuracy * float(unit.z.abs().max()))
    for got, want in zip(small_grads, unit_grads):
        torch.testing.assert_close(got, want, rtol=10 * accuracy, atol=accuracy * float(want.abs().max()))


@pytest.mark.parametrize("seed", [1, 2])
def test_fixed_variables_of_large_size_beside_a_singular_q_are_solved_at_every_objective_scale(seed):
    """Every variable fixed at z0 by two opposite bounds (no interior: z0 is the one feasible point),
    four equalities through it, a rank-three Q, and p and z0 of size 3e4, with Q and p scaled by ω.
    Left unscaled (``qp.scaling.LARGE_DATA`` 2^20), variables of this size left the dual residual at
    the rounding of Q's cancelling product, above the default relative tolerance: 2 and 1 of these
    40 solves (seeds 1 and 2) ended unsolved. Scaled to unit size, each is SOLVED at z0."""
    g = torch.Generator().manual_seed(seed)
    B, n, m, rank, size = 10, 9, 4, 3, 3e4
    L = torch.randn(B, n, rank, generator=g, dtype=torch.float64)
    Q = L @ L.mT
    p, z0 = (size * torch.randn(B, n, generator=g, dtype=torch.float64) for _ in range(2))
    A = torch.randn(B, m, n, generator=g, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    G, h, b = torch.cat([eye, -eye]), torch.cat([z0, -z0], -1), (A @ z0.unsqueeze(-1)).squeeze(-1)
    for omega in (1.0, 0.1, 1e-3, 1e-5):
        sol = solve_qp(omega * Q, omega * p, G, h, A, b, on_failure="ignore")
        assert (sol.status == QPStatus.SOLVED).all(), (omega, sol.status.tolist())
        torch.testing.assert_close(sol.z, z0, rtol=0, atol=1e-9 * size)


@pytest.mark.parametrize("bounds", ["one", "box"])
@pytest.mark.parametrize("beta", [1e8, 1e12, 1e20])
def test_bounds_far_above_the_other_sides_cost_neither_iterations_nor_accuracy(bounds, beta):
    """A bound far above a QP's other sides (a large number that stands for an absent bound) is never
    active: the solution and the gradients are those without it, and its own gradient is zero. The
    variables' scale and the start leave such sides out (``sides.far_sides``). Before, the
    start's least-squares fit followed the far side: with z₀ ≤ 1e12 five of eight problems reached
    the iteration limit, and with −1e12 ≤ z ≤ 1e12 every problem was scaled by 1e-12; at 1e8 they
    took 17 to 30 iterations against 6 to 10."""
    Q, p, G, h, A, b, w = generic_qps()
    B, n, k = p.shape[0], p.shape[1], h.shape[1]
    eye = torch.eye(n, dtype=torch.float64).expand(B, n, n)
    far_rows = eye[:, :1] if bounds == "one" else torch.cat([eye, -eye], 1)
    far_h = torch.full((B, far_rows.shape[1]), beta, dtype=torch.float64)

    def solve(G, h):
        data = [t.clone().requires_grad_() for t in (p, h, b)]
        sol = solve_qp(Q, data[0], G, data[1], A, data[2])
        return sol, torch.autograd.grad((w * sol.z).sum(), data)
    plain, plain_grads = solve(G, h)
    bounded, bounded_grads = solve(torch.cat([G, far_rows], 1), torch.cat([h, far_h], 1))
    assert (bounded.status == 0).all()
    assert int(bounded.iterations.max()) <= int(plain.iterations.max()) + 3
    torch.testing.assert_close(bounded.z, plain.z, rtol=1e-8, atol=1e-8 * float(plain.z.abs().max()))
    grad_p, grad_h, grad_b = bounded_grads
    assert float(grad_h[:, k:].abs().max()) <= 1e-12
    for got, want in zip((grad_p, grad_h[:, :k], grad_b), plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7 * float(want.abs().max()))


@pytest.mark.parametrize("beta", [1e4, 1e8])
def test_a_side_far_below_the_others_sets_the_variables_size(beta):
    """z₀ ≥ β (the row −z₀ ≤ −β) among unit bounds: the solution is as large as β, so the side is no
    far one (``sides.far_sides``) and the variables' scale follows it. Taken for a far side, the
    start left it out and the solve ended MAX_ITER at 1e4 and PRIMAL_INFEASIBLE at 1e8."""
    Q, p = torch.eye(3, dtype=torch.float64), torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    G = torch.tensor([[-1.0, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=torch.float64)
    sol = solve_qp(Q, p, G, torch.tensor([-beta, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64))
    assert sol.status == QPStatus.SOLVED
    assert abs(float(sol.z[0]) - beta) <= 1e-10 * beta


@pytest.mark.parametrize("beta", [1e6, 1e8, 1e12])
def test_a_far_side_the_objective_pushes_on_is_active(beta):
    """z₀ ≤ β among unit bounds, with p₀ = −100β: the far side is active, z₀ = β and dz₀/dβ = 1. The
    start takes such a row (violated by its least-squares fit) at its own scale (``ipm._start_row_scales``);
    scaled as an absent bound, the solve ended MAX_ITER at 1e6 and NUMERICAL_ERROR at 1e8 and 1e12."""
    Q, p = torch.eye(3, dtype=torch.float64), torch.tensor([-100 * beta, 1.0, -1.0], dtype=torch.float64)
    G = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=torch.float64)
    h = torch.tensor([beta, 0.5, 0.5, 0.5, 0.5], dtype=torch.float64, requires_grad=True)
    sol = solve_qp(Q, p, G, h)
    assert sol.status == QPStatus.SOLVED
    assert abs(float(sol.z[0]) - beta) <= 1e-10 * beta
    grad, = torch.autograd.grad(sol.z[0], h)
    torch.testing.assert_close(grad, torch.tensor([1.0, 0, 0, 0, 0], dtype=torch.float64), rtol=0, atol=1e-9)


def test_far_sides_are_those_above_a_gap_between_nonzero_sides():
    """``far_sides``: the positive sides from the first gap of ``FAR_SIDE`` between nonzero sides up,
    and the largest other side; zero sides below spread ones (Maros–Meszaros QGROW7: zeros, then 3e3
    to 9e6) are no gap, nor are sides spread in smaller steps, nor a single row, and a side far below
    the others (−1e30) is never far."""
    from optlayers.sides import FAR_SIDE, far_sides
    h = torch.tensor([[0.0, -2.0, 1.0, 3.0 * FAR_SIDE * 4, 1e20, -1e30],  # 1.2e4 is above 1e3 · (1 + 3)
                      [0.0, 0.0, 3e3, 4e4, 5e5, 9e6],
                      [1e-9, 1e-6, 1e-3, 1.0, 1e3, 1e6]], dtype=torch.float64)
    far, typical = far_sides(h)
    assert far.tolist() == [[False, False, False, True, True, False], [False] * 6, [False] * 6]  # −1e30: not far
    assert typical.tolist() == [1e30, 9e6, 1e6]
    far, typical = far_sides(torch.tensor([[1e20]], dtype=torch.float64))
    assert far.tolist() == [[False]] and typical.tolist() == [1e20]


@pytest.mark.parametrize("omega", [1e-6, 1e-10])
def test_a_small_objective_is_solved_as_accurately_as_a_unit_one(omega):
    """A QP is homogeneous in (Q, p): at (ωQ, ωp) z is the same, dz/dh and dz/db are the same and
    dz/dQ, dz/dp are 1/ω times theirs. An objective small beside the constraints is solved at unit
    size (``qp.scaling._sizes``) and the default tolerance of the dual residual and the gap follows
    it (``ipm.absolute_tolerance``). With a fixed cost scale and tolerance, ω = 1e-6 gave gradients
    8e-5 off and ω = 1e-10 26 % off, SOLVED."""
    Q, p, G, h, A, b, w = generic_qps()

    def solve(scale):
        data = [t.clone().requires_grad_() for t in (scale * Q, scale * p, h, b)]
        sol = solve_qp(data[0], data[1], G, data[2], A, data[3])
        grads = torch.autograd.grad((w * sol.z).sum(), data)
        return sol, [grads[0] * scale, grads[1] * scale, grads[2], grads[3]]
    unit, unit_grads = solve(1.0)
    small, small_grads = solve(omega)
    assert (small.status == 0).all()
    accuracy = 1e-7
    torch.testing.assert_close(small.z, unit.z, rtol=accuracy, atol=accuracy * float(unit.z.abs().max()))
    torch.testing.assert_close(small.lam / omega, unit.lam, rtol=accuracy, atol=accuracy * float(unit.lam.abs().max()))
    for got, want in zip(small_grads, unit_grads):
        torch.testing.assert_close(got, want, rtol=10 * accuracy, atol=accuracy * float(want.abs().max()))


@pytest.mark.parametrize("beta", [1e4, 1e8, 1e12])
def test_a_large_variable_leaves_the_small_ones_as_accurate(beta):
    """A variable pushed to β beside a unit QP (decoupled: ``with_a_large_variable``) leaves the
    QP's own solution, multipliers and gradients as they are without it: each variable's rows are
    resolved on its own scale (``ipm._complementarity_by_component``). With the gap's tolerance
    alone (relative to its largest term, β²) the small variables' rows kept a complementarity up to
    1e-12 β²: z came out 5.5e-4 off at β = 1e4 and 1.8e-2 off at 1e8 and 1e12 (|z| up to 1.8), all
    SOLVED (Clarabel and OSQP answer such problems as loosely; qpth and QPLayer do not)."""
    Q, p, G, h, A, b, w = generic_qps()
    n = p.shape[1]

    def solve(Q, p, G, h, A, b):
        data = [t.clone().requires_grad_() for t in (p, h, b)]
        sol = solve_qp(Q, data[0], G, data[1], A, data[2])
        return sol, torch.autograd.grad((w * sol.z[:, :n]).sum(), data)
    unit, unit_grads = solve(Q, p, G, h, A, b)
    big, big_grads = solve(*with_a_large_variable(Q, p, G, h, A, b, beta))
    assert (big.status == 0).all()
    torch.testing.assert_close(big.z[:, n], torch.full_like(big.z[:, n], beta), rtol=1e-12, atol=0)
    torch.testing.assert_close(big.z[:, :n], unit.z, rtol=0, atol=1e-9)
    torch.testing.assert_close(big.lam, unit.lam, rtol=0, atol=1e-9)
    torch.testing.assert_close(big.nu, unit.nu, rtol=0, atol=1e-9)
    for got, want in zip((big_grads[0][:, :n], *big_grads[1:]), unit_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


@pytest.mark.parametrize("beta", [1e4, 1e8, 1e12])
def test_a_bound_beside_a_large_variable_is_met_to_its_own_scale(beta):
    """min ½‖z‖² − βz₀ + z₁ with |z₁| ≤ 0.5: z₁ = −0.5 whatever β (separable). It came out
    −0.4999958 at β = 1e4, −0.42 at 1e6 and −6e-5 at 1e8 (at the start: 0 iterations), SOLVED;
    Clarabel's answers are as loose (−0.38 at 1e4, −4e-4 at 1e6)."""
    Q = torch.eye(2, dtype=torch.float64)
    G = torch.tensor([[0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    sol = solve_qp(Q, torch.tensor([-beta, 1.0], dtype=torch.float64), G, torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert int(sol.status) == 0
    assert abs(float(sol.z[1]) + 0.5) < 1e-10 and abs(float(sol.lam[1]) - 0.5) < 1e-10 and abs(float(sol.lam[0])) < 1e-10


@pytest.mark.parametrize("alpha,omega", [(1.0, 1e-10), (1e-6, 1e-6), (1e-9, 1.0)])
def test_a_linear_program_of_small_data_is_solved_as_accurately_as_a_unit_one(alpha, omega):
    """A linear program (Q = 0) with p scaled by αω and h, b by α has the solution αz: its
    variables follow h and b alone (``qp.scaling._sizes``). With a fixed cost scale, p of 1e-10
    left z 7 % off, SOLVED, and p, h, b of 1e-6 (p of 1e-12) 2e-6 off."""
    torch.manual_seed(1)
    B, n, k, m = 8, 6, 16, 2
    eye = torch.eye(n, dtype=torch.float64).expand(B, n, n)
    G = torch.cat([torch.randn(B, k, n, dtype=torch.float64), eye, -eye], 1)  # a box: every program is bounded
    A = torch.randn(B, m, n, dtype=torch.float64)
    z0 = 0.3 * torch.randn(B, n, 1, dtype=torch.float64)
    h = (G @ z0).squeeze(-1) + 0.1 + torch.rand(B, G.shape[1], dtype=torch.float64)
    b, p = (A @ z0).squeeze(-1), torch.randn(B, n, dtype=torch.float64)
    Q = torch.zeros(B, n, n, dtype=torch.float64)
    unit = solve_qp(Q, p, G, h, A, b)
    small = solve_qp(Q, alpha * omega * p, G, alpha * h, A, alpha * b)
    assert (small.status == 0).all() and (unit.status == 0).all()
    torch.testing.assert_close(small.z / alpha, unit.z, rtol=1e-8, atol=1e-8 * float(unit.z.abs().max()))
