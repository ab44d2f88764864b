"""solve_cone's default forward solver, solver="auto": which solver it runs (choose_solver's rule,
and the backend that actually ran), its answers and gradients against Clarabel's on a batch of each
cone kind, and its options."""
import math
import warnings

import pytest
import torch

from optlayers.cone import ConeLayer, ConeSpec, ConeStatus, autograd, backends, solve_cone
from optlayers.cone import solve as solve_module
from optlayers.cone.testing import n_range, random_program
from tests.cone.programs import two_variable_program

KINDS = {  # one batch of each cone kind, with the zero cone's equality rows where a program needs them
    "nonneg": ConeSpec(zero=2, nonneg=10),
    "soc": ConeSpec(zero=1, nonneg=2, soc=[4, 3]),
    "psd": ConeSpec(zero=1, nonneg=2, psd=[6]),
    "exp": ConeSpec(zero=1, nonneg=2, exp=3),
    "exp_dual": ConeSpec(zero=1, nonneg=2, exp_dual=3),
}
REFINED_TOL = 1e-9  # both solvers' answers are refined to ~1e-13 by the same Newton steps
GRAD_TOL = 1e-7  # and share the backward pass


def test_rule_picks_ipm_for_large_cpu_batches_of_larger_programs():
    """On either side of the rule's threshold, for small and large programs."""
    for rows in (20, 96, 192):
        least = math.ceil(solve_module.AUTO_CPU_WORK / rows ** solve_module.AUTO_CPU_POWER)
        assert solve_module.choose_solver(rows, least, "cpu") == "ipm"
        assert solve_module.choose_solver(rows, max(least - 1, 1), "cpu") == ("ipm" if least == 1 else "clarabel")
    assert solve_module.choose_solver(96, 128, "cpu") == "ipm"  # the cone benchmark's batch
    assert solve_module.choose_solver(96, 16, "cpu") == "clarabel"
    assert solve_module.choose_solver(20, 1, "cpu") == "clarabel"


def test_rule_does_not_depend_on_the_thread_count(monkeypatch):
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        assert solve_module.choose_solver(96, 128, "cpu") == "ipm"


def test_rule_on_a_gpu_takes_ipm_from_a_larger_batch_and_ipm_without_clarabel(monkeypatch):
    cuda = torch.device("cuda")  # a device object only: no GPU needed
    assert solve_module.choose_solver(96, 512, cuda) == "ipm"
    assert solve_module.choose_solver(96, 511, cuda) == "clarabel"
    assert solve_module.choose_solver(96, 128, cuda) == "clarabel"  # the cone benchmark's batch (ipm 1.9x slower on an H200)
    assert solve_module.choose_solver(96, 128, "cpu") == "ipm"  # where the CPU's rule takes ipm
    assert solve_module.choose_solver(1, 1, cuda) == "clarabel"
    monkeypatch.setattr(autograd, "_clarabel_available", lambda: False)
    assert solve_module.choose_solver(1, 1, "cpu") == "ipm"
    assert solve_module.choose_solver(1, 1, cuda) == "ipm"


@pytest.mark.parametrize("args, message", [
    (dict(rows=0, batch=1, device="cpu"), "rows must be an integer >= 1, got 0"),
    (dict(rows=3, batch=1.5, device="cpu"), "batch must be an integer >= 1, got 1.5"),
])
def test_rule_input_messages(args, message):
    with pytest.raises(ValueError, match=message):
        solve_module.choose_solver(**args)


def _record_backends(monkeypatch) -> list[str]:
    """Wrap both forward backends so that the test sees which one ran."""
    ran = []
    ipm, batch = autograd.interior_solver.solve, backends.solve_batch

    def ipm_solve(*args, **kwargs):
        ran.append("ipm")
        return ipm(*args, **kwargs)

    def solve_batch(problems, spec, solver, *args, **kwargs):
        ran.append(solver)
        return batch(problems, spec, solver, *args, **kwargs)

    monkeypatch.setattr(autograd.interior_solver, "solve", ipm_solve)
    monkeypatch.setattr(backends, "solve_batch", solve_batch)
    return ran


def test_default_runs_the_solver_of_the_rule(monkeypatch):
    spec = KINDS["soc"]
    n = sum(n_range(spec)) // 2
    ran = _record_backends(monkeypatch)
    # the rule's threshold moved to this small program: ipm from batch 3 on
    monkeypatch.setattr(solve_module, "AUTO_CPU_WORK", 3 * spec.size ** solve_module.AUTO_CPU_POWER)
    for batch, expected in ((2, "clarabel"), (3, "ipm")):
        ran.clear()
        A, b, c, *_ = random_program(spec, n, batch=batch, seed=batch)
        sol = solve_cone(A, b, c, spec)
        assert ran == [expected] and bool((sol.status == 0).all())
        ran.clear()
        ConeLayer(spec)(A, b, c)
        assert ran == [expected]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_auto_agrees_with_clarabel(kind, monkeypatch):
    """The default picks ipm here (thresholds moved to the batch) and its x, y, s and gradients are
    Clarabel's."""
    spec = KINDS[kind]
    lo, hi = n_range(spec)
    n, batch = (lo + hi) // 2, 6
    monkeypatch.setattr(solve_module, "AUTO_CPU_WORK", batch)
    ran = _record_backends(monkeypatch)
    A, b, c, _, x_true, _, _ = random_program(spec, n, batch=batch, seed=len(kind))
    g = torch.Generator().manual_seed(5)
    v, w = torch.randn(batch, n, generator=g, dtype=torch.float64), torch.randn(batch, spec.size, generator=g,
                                                                                 dtype=torch.float64)
    out = {}
    for solver in ("auto", "clarabel"):
        leaves = [t.clone().requires_grad_() for t in (A, b, c)]
        sol = solve_cone(*leaves, spec, solver=solver)
        ((sol.x * v).sum() + (sol.y * w).sum()).backward()  # (at an LP's vertex x does not move with c)
        out[solver] = (sol, [t.grad for t in leaves])
    assert ran[0] == "ipm" and ran[-1] == "clarabel"
    (auto, auto_grads), (ref, ref_grads) = out["auto"], out["clarabel"]
    assert bool((auto.status == 0).all()) and bool((ref.status == 0).all())
    assert torch.allclose(auto.x, x_true, atol=REFINED_TOL)
    for mine, theirs in ((auto.x, ref.x), (auto.y, ref.y), (auto.s, ref.s)):
        assert torch.allclose(mine, theirs, atol=REFINED_TOL)
    for mine, theirs in zip(auto_grads, ref_grads):
        assert mine.abs().max() > 0
        assert torch.allclose(mine, theirs, rtol=1e-6, atol=GRAD_TOL)


def test_auto_refuses_solver_options_with_the_fix():
    A, b, c, *_ = random_program(KINDS["nonneg"], 7, batch=2, seed=1)
    message = r"solver_options belong to one solver.*solver='clarabel' or solver='ipm'.*\['max_iter'\]"
    with pytest.raises(ValueError, match=message):
        solve_cone(A, b, c, KINDS["nonneg"], solver_options={"max_iter": 50})
    with pytest.raises(ValueError, match=message):
        ConeLayer(KINDS["nonneg"], solver_options={"max_iter": 50})
    for solver in ("clarabel", "ipm"):  # named, the options go to that solver
        sol = solve_cone(A, b, c, KINDS["nonneg"], solver=solver, solver_options={"max_iter": 50})
        assert bool((sol.status == 0).all())


@pytest.mark.parametrize("beta", [1e4, 1e10])
def test_auto_hands_what_clarabel_leaves_unsolved_to_the_interior_point_method(beta):
    """For one small program "auto" runs Clarabel, which at its defaults ends this program INACCURATE at
    β = 1e4 and 1e10; "auto" hands it to the batched interior point method, which solves it: x₁ = −0.5
    and dx₁/dc₁ = 0, no warning (it raised SolveError on a704e6f). Named explicitly, Clarabel's status
    stands."""
    pytest.importorskip("clarabel", reason="clarabel not installed")
    A, b, c, P = two_variable_program(beta)
    assert solve_module.choose_solver(2, 1, "cpu") == "clarabel"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = solve_cone(A, b, c, ConeSpec(nonneg=2), P)
        dx0, = torch.autograd.grad(sol.x[0], c, retain_graph=True)
        dx1, = torch.autograd.grad(sol.x[1], c)
    x = sol.x.detach()
    assert int(sol.status) == ConeStatus.SOLVED
    assert abs(float(x[1]) + 0.5) < 1e-9 and abs(float(x[0]) - beta) < 1e-9 * beta
    # x₀ = −c₀ and x₁ on its bound: dx₀/dc = (−1, 0), dx₁/dc = 0
    torch.testing.assert_close(dx0, torch.tensor([-1.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(dx1, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-9)
    explicit = solve_cone(A, b, c.detach(), ConeSpec(nonneg=2), P, solver="clarabel", on_failure="ignore")
    assert int(explicit.status) == ConeStatus.INACCURATE


def test_auto_keeps_clarabels_infeasibility_certificate():
    """x ≥ 1 and x ≤ 0: Clarabel certifies it infeasible, and "auto" reports that, without a second solve."""
    pytest.importorskip("clarabel", reason="clarabel not installed")
    A = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    b = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    c = torch.tensor([1.0], dtype=torch.float64)
    sol = solve_cone(A, b, c, ConeSpec(nonneg=2), on_failure="ignore")
    assert int(sol.status) == ConeStatus.PRIMAL_INFEASIBLE
