"""Iterative refinement of the KKT solves stops early where the host reads for free (the CPU),
once the residual is at the level of roundoff, and reaches the accuracy of the fixed count."""
import pytest
import torch

from optlayers import host, solve_qp
from optlayers.engine import kkt
from tests.qp.qp_problems import random_qp

EPS = torch.finfo(torch.float64).eps


def _ill_conditioned_system(seed: int, n: int = 25, m: int = 4, k: int = 35):
    """A batch of 3 reduced KKT systems (n variables, m equalities, k inequalities) whose H spans
    ~16 orders of magnitude: Q with eigenvalues 1e-10…1 and W⁻¹ from 1e-8 to 1e8 (an interior
    point iterate near its solution)."""
    gen = torch.Generator().manual_seed(seed)
    B = 3
    U = torch.linalg.qr(torch.randn(B, n, n, generator=gen, dtype=torch.float64))[0]
    Q = U @ torch.diag_embed(torch.logspace(-10, 0, n, dtype=torch.float64).expand(B, n)) @ U.mT
    Q = (Q + Q.mT) / 2
    A = torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    G = torch.randn(B, k, n, generator=gen, dtype=torch.float64)
    w_inv = 10.0 ** (16 * torch.rand(B, k, generator=gen, dtype=torch.float64) - 8)
    rhs = [torch.randn(B, size, generator=gen, dtype=torch.float64) for size in (n, m, k)]
    return Q, A, G, w_inv, rhs


def _backward_error(Q, A, G, w_inv, rhs, solution):
    """Componentwise backward error of Q dx + Aᵀdν + Gᵀdλ = rx, A dx = re, G dx − W dλ = −v."""
    rx, re, v = rhs
    dx, dnu, dlam = solution
    mv = lambda M, x: (M @ x.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    parts = [
        (rx - mv(Q, dx) - mv(A.mT, dnu) - mv(G.mT, dlam),
         rx.abs() + mv(Q.abs(), dx.abs()) + mv(A.mT.abs(), dnu.abs()) + mv(G.mT.abs(), dlam.abs())),
        (re - mv(A, dx), re.abs() + mv(A.abs(), dx.abs())),
        (-v - mv(G, dx) + dlam / w_inv, v.abs() + mv(G.abs(), dx.abs()) + (dlam / w_inv).abs()),
    ]
    return max((r.abs() / t).max().item() for r, t in parts if r.numel())


def _count_residuals(monkeypatch) -> list[int]:
    calls = []
    original = kkt._extended_residual
    monkeypatch.setattr(kkt, "_extended_residual", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize("stiff", [False, True])
def test_adaptive_refinement_reaches_the_fixed_count_accuracy(monkeypatch, stiff):
    monkeypatch.setattr(kkt, "_LOOK_MIN_ENTRIES", 0)
    calls = _count_residuals(monkeypatch)
    for seed in range(3):
        Q, A, G, w_inv, rhs = _ill_conditioned_system(seed)
        reg = torch.full((Q.shape[0],), 1e-9, dtype=torch.float64)
        f = kkt.factor_kkt(Q, A, G, w_inv, reg, reg, stiff=(w_inv > 1.0) if stiff else None)
        assert bool(f.ok.all())
        calls.clear()
        adaptive = kkt.solve_reduced(f, *rhs, refine_steps=3)
        adaptive_steps = len(calls)
        with host.accelerator_schedule():  # no free host reads: every step is taken
            calls.clear()
            fixed = kkt.solve_reduced(f, *rhs, refine_steps=3)
            assert len(calls) == 3
        error_adaptive = _backward_error(Q, A, G, w_inv, rhs, adaptive)
        error_fixed = _backward_error(Q, A, G, w_inv, rhs, fixed)
        assert error_adaptive <= max(4 * error_fixed, 64 * EPS), (seed, adaptive_steps, error_adaptive, error_fixed)


def test_refinement_stops_once_the_residual_is_roundoff(monkeypatch):
    """A well-conditioned system needs one step to remove the regularisation; a second residual
    shows it is roundoff, and no further step is taken."""
    monkeypatch.setattr(kkt, "_LOOK_MIN_ENTRIES", 0)
    calls = _count_residuals(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    B, n, k = 4, 12, 9
    L = torch.randn(B, n, n, generator=gen, dtype=torch.float64)
    Q = L @ L.mT / n + torch.eye(n, dtype=torch.float64)
    G = torch.randn(B, k, n, generator=gen, dtype=torch.float64)
    w_inv = torch.rand(B, k, generator=gen, dtype=torch.float64) + 0.5
    reg = torch.full((B,), 1e-9, dtype=torch.float64)
    f = kkt.factor_kkt(Q, Q.new_zeros(B, 0, n), G, w_inv, reg, reg)
    rx, v = torch.randn(B, n, generator=gen, dtype=torch.float64), torch.randn(B, k, generator=gen, dtype=torch.float64)
    dx, _, dlam = kkt.solve_reduced(f, rx, None, v, refine_steps=3)
    assert len(calls) == 2
    exact = torch.linalg.solve(Q + G.mT @ (w_inv.unsqueeze(-1) * G), rx - (G.mT @ (w_inv * v).unsqueeze(-1)).squeeze(-1))
    assert torch.allclose(dx, exact, rtol=1e-13, atol=1e-13)


def test_small_factors_and_the_accelerator_schedule_take_every_step(monkeypatch):
    calls = _count_residuals(monkeypatch)
    Q, A, G, w_inv, rhs = _ill_conditioned_system(0)
    reg = torch.full((Q.shape[0],), 1e-9, dtype=torch.float64)
    f = kkt.factor_kkt(Q, A, G, w_inv, reg, reg)
    assert f.chol_h.numel() + f.chol_s.numel() < kkt._LOOK_MIN_ENTRIES
    kkt.solve_reduced(f, *rhs, refine_steps=3)
    assert len(calls) == 3
    monkeypatch.setattr(kkt, "_LOOK_MIN_ENTRIES", 0)
    with host.accelerator_schedule():
        calls.clear()
        kkt.solve_reduced(f, *rhs, refine_steps=3)
        assert len(calls) == 3


def test_adaptive_refinement_keeps_solutions_and_gradients(monkeypatch):
    """Whole solves with and without early stopping agree to the solver's accuracy."""
    torch.manual_seed(3)
    data = random_qp((6,), 15, 12, 3, active=True)

    def solve():
        leaves = {key: value.clone().requires_grad_() for key, value in data.items()}
        sol = solve_qp(**leaves)
        (sol.z.square().sum() + sol.lam.sum()).backward()
        return sol, {key: leaf.grad for key, leaf in leaves.items()}

    calls = _count_residuals(monkeypatch)
    with host.accelerator_schedule():
        fixed, fixed_grads = solve()
    fixed_count = len(calls)
    monkeypatch.setattr(kkt, "_LOOK_MIN_ENTRIES", 0)
    calls.clear()
    adaptive, adaptive_grads = solve()
    assert len(calls) < fixed_count
    assert bool((adaptive.status == 0).all()) and bool((fixed.status == 0).all())
    torch.testing.assert_close(adaptive.z, fixed.z, rtol=0, atol=1e-8)
    for key in data:
        torch.testing.assert_close(adaptive_grads[key], fixed_grads[key], rtol=1e-6, atol=1e-7)


def test_schur_complement_over_the_coupled_rows_only_matches_the_full_one(monkeypatch):
    """Where the host reads for free, S is factorised over the equalities and stiff rows alone
    (``kkt._coupled_rows``); the factor, expanded, is the full factorisation's."""
    monkeypatch.setattr(kkt, "_LOOK_MIN_ENTRIES", 0)
    Q, A, G, w_inv, rhs = _ill_conditioned_system(1)
    stiff = w_inv > 1.0
    stiff[0] = False  # an element with no stiff row: its part of S is the identity
    assert int(stiff.sum(-1).max()) + A.shape[-2] <= kkt._COMPACT_S_FRACTION * (A.shape[-2] + G.shape[-2])
    reg = torch.full((Q.shape[0],), 1e-9, dtype=torch.float64)
    compact = kkt.factor_kkt(Q, A, G, w_inv, reg, reg, stiff=stiff)
    assert kkt._coupled_rows(stiff, A.shape[-2]) is not None
    with host.accelerator_schedule():
        assert kkt._coupled_rows(stiff, A.shape[-2]) is None
        full = kkt.factor_kkt(Q, A, G, w_inv, reg, reg, stiff=stiff)
    assert bool(compact.ok.all()) and bool(full.ok.all())
    torch.testing.assert_close(compact.Y, full.Y, rtol=1e-12, atol=1e-12)
    scale = full.chol_s.abs().amax()  # S spans 16 orders of magnitude: compare at the factor's scale
    torch.testing.assert_close(compact.chol_s, full.chol_s, rtol=0, atol=1e-12 * float(scale))
    assert torch.equal(compact.chol_s, compact.chol_s.tril())
    with host.accelerator_schedule():
        for a, b in zip(kkt.solve_reduced(compact, *rhs, refine_steps=3), kkt.solve_reduced(full, *rhs, refine_steps=3)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def _well_conditioned_system(seed: int, n: int = 25, m: int = 4, k: int = 35):
    """A batch of 3 reduced KKT systems of ``_ill_conditioned_system``'s shape whose H and S are
    well conditioned: one refinement step leaves a residual at the level of roundoff."""
    gen = torch.Generator().manual_seed(seed)
    B = 3
    L = torch.randn(B, n, n, generator=gen, dtype=torch.float64)
    Q = L @ L.mT / n + torch.eye(n, dtype=torch.float64)
    A = torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    G = torch.randn(B, k, n, generator=gen, dtype=torch.float64)
    w_inv = torch.rand(B, k, generator=gen, dtype=torch.float64) + 0.5
    rhs = [torch.randn(B, size, generator=gen, dtype=torch.float64) for size in (n, m, k)]
    return Q, A, G, w_inv, rhs


@pytest.mark.parametrize("equalities", [True, False])
def test_compiled_refinement_skips_steps_on_the_device_at_the_fixed_count_accuracy(equalities):
    """Compiled on the CPU, the steps after the first are taken only where the residual after it is
    not negligible (``kkt.refines_on_device``, a ``torch.cond``). With a regularisation of 1e-4 one
    step leaves a residual of about 1e-8 and the others are needed; with 1e-9 it leaves roundoff on
    a well-conditioned system; the ill-conditioned one needs them again. In each the solve is as
    accurate as every step taken eagerly, and each problem's answer is the same in a batch with
    problems that need the steps (inductor)."""
    from optlayers.compiling import CPU_OPTIONS

    def solve(Q, A, G, w_inv, reg, rx, re, v):
        f = kkt.factor_kkt(Q, A, G, w_inv, reg, reg, retries=0)  # a retry is a host read
        on_device = torch.tensor(kkt.refines_on_device(f, 3))
        return on_device, kkt.solve_reduced(f, rx, re if equalities else None, v, refine_steps=3)

    torch._dynamo.reset()
    compiled = torch.compile(solve, fullgraph=True, dynamic=False, options=CPU_OPTIONS)
    solutions = []
    try:
        for make, rho in ((_well_conditioned_system, 1e-4), (_well_conditioned_system, 1e-9), (_ill_conditioned_system, 1e-9)):
            # the well-conditioned systems at sizes where MKL's batched solves do not depend on the batch (below)
            Q, A, G, w_inv, rhs = make(0, n=16, m=2, k=16) if make is _well_conditioned_system else make(0)
            if not equalities:
                A, rhs = A[:, :0], [rhs[0], rhs[1][:, :0], rhs[2]]
            reg = torch.full((Q.shape[0],), rho, dtype=torch.float64)
            on_device, solution = compiled(Q, A, G, w_inv, reg, *rhs)
            assert bool(on_device)
            with host.accelerator_schedule():  # every step, eagerly
                eager_on_device, fixed = solve(Q, A, G, w_inv, reg, *rhs)
            assert not bool(eager_on_device)
            error, error_fixed = _backward_error(Q, A, G, w_inv, rhs, solution), _backward_error(Q, A, G, w_inv, rhs, fixed)
            assert error <= max(4 * error_fixed, 64 * EPS), (make.__name__, rho, error, error_fixed)
            solutions.append(((Q, A, G, w_inv, reg, *rhs), solution))
        # a problem takes the steps its own residual asks for: in one batch with a problem that needs
        # them (the first system) the second's answers are the same to the bit
        (data_needs, solution_needs), (data_skips, solution_skips) = solutions[:2]
        both = compiled(*(torch.cat(pair) for pair in zip(data_needs, data_skips)))[1]
        for together, alone in zip(both, (torch.cat(pair) for pair in zip(solution_needs, solution_skips))):
            assert torch.equal(together, alone)
    finally:
        torch._dynamo.reset()


def test_adaptive_refinement_takes_each_problems_own_steps(monkeypatch):
    """Eagerly, where the host reads for free, a problem whose residual is at roundoff keeps its
    solution while the others take further steps: in one batch with problems that need them (a
    regularisation of 1e-4), those that need one step (1e-9) get their answers alone to the bit,
    so that a batch's slices give the whole batch's answers (at sizes where MKL's batched solves do
    not depend on the batch)."""
    monkeypatch.setattr(kkt, "_LOOK_MIN_ENTRIES", 0)
    calls = _count_residuals(monkeypatch)

    def solve(rho: float, Q, A, G, w_inv, rhs):
        reg = torch.full((Q.shape[0],), rho, dtype=torch.float64)
        return kkt.solve_reduced(kkt.factor_kkt(Q, A, G, w_inv, reg, reg), *rhs, refine_steps=3)

    (Q1, A1, G1, w1, rhs1), (Q2, A2, G2, w2, rhs2) = (_well_conditioned_system(seed, n=16, m=2, k=16) for seed in (0, 1))
    alone = solve(1e-9, Q2, A2, G2, w2, rhs2)
    assert len(calls) == 2  # one step, and the residual that shows it was enough
    cat = lambda a, b: torch.cat([a, b])  # noqa: E731
    reg = cat(torch.full((3,), 1e-4, dtype=torch.float64), torch.full((3,), 1e-9, dtype=torch.float64))
    calls.clear()
    together = kkt.solve_reduced(kkt.factor_kkt(cat(Q1, Q2), cat(A1, A2), cat(G1, G2), cat(w1, w2), reg, reg),
                                 *map(cat, rhs1, rhs2), refine_steps=3)
    assert len(calls) == 3  # every step, for the problems that need them
    for mixed, own in zip(together, alone):
        assert torch.equal(mixed[3:], own)
