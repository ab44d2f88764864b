"""Sides of +inf on nonnegative rows of a cone program: absent bounds, as ``solve_qp`` takes them in h.
``solve_cone`` solves without those rows (``sides.without_absent``) and gives them y = 0 and s = +inf;
the reference is the same program without the rows, solved by the same solver."""
import math
import sys
from pathlib import Path

import pytest
import torch

from optlayers import ConeSpec, ConeStatus, solve_cone
from optlayers.cone.testing import random_program

SPEC = ConeSpec(zero=2, nonneg=10, soc=[4])
WITH_BOUNDS = ConeSpec(zero=2, nonneg=13, soc=[4])  # three more nonnegative rows after SPEC's ten
KEPT = list(range(12)) + list(range(15, 19))  # WITH_BOUNDS' rows that are SPEC's
EXTRA = [12, 13, 14]


def _programs(shared: bool, quadratic: bool):
    """SPEC's random programs (batch 4, n = 9: unique solutions, ``testing.n_range``) and the same with
    three more nonnegative rows: +inf sides in elements 1 and 3 (beside a side of 5 in 3), sides of 1e3
    and 2e3 (never active) in elements 0 and 2."""
    A, b, c, P, *_ = random_program(SPEC, 9, batch=4, seed=3, quadratic=quadratic, shared_A=shared)
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(3, 9, generator=gen, dtype=torch.float64)
    sides = torch.tensor([[1e3] * 3, [math.inf] * 3, [1e3, 1e3, 2e3], [math.inf, 5.0, math.inf]], dtype=torch.float64)
    if shared:
        A_more = torch.cat([A[:12], rows, A[12:]], 0)
    else:
        A_more = torch.cat([A[:, :12], rows.expand(4, 3, 9), A[:, 12:]], 1)
    b_more = torch.cat([b[:, :12], sides, b[:, 12:]], -1)
    return (A, b, c, P), (A_more, b_more, c, P)


@pytest.mark.parametrize("solver", ["ipm", "clarabel"])
@pytest.mark.parametrize("shared, quadratic", [(False, False), (False, True), (True, False)])
def test_absent_bounds_give_the_program_without_them_and_its_derivatives(solver, shared, quadratic):
    """x, and y and s on the other rows, are the program's without the absent rows (also beside a
    finite side of 5 in the same element, which binds nothing here); the absent rows hold y = 0 and
    s = +inf; the derivatives of x, y and s with respect to every input are the program's without them,
    and zero at the absent rows' A and b."""
    reduced, full = _programs(shared, quadratic)
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in reduced]
    more = [t.clone().requires_grad_(True) if t is not None else None for t in full]
    gen = torch.Generator().manual_seed(2)
    wx, wy, ws = (torch.randn(4, k, generator=gen, dtype=torch.float64) for k in (9, 16, 16))
    want = solve_cone(leaves[0], leaves[1], leaves[2], SPEC, leaves[3], solver=solver)
    got = solve_cone(more[0], more[1], more[2], WITH_BOUNDS, more[3], solver=solver)
    assert bool((got.status == ConeStatus.SOLVED).all())
    torch.testing.assert_close(got.x, want.x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.y[:, KEPT], want.y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.s[:, KEPT], want.s, rtol=1e-9, atol=1e-9)
    absent = torch.isposinf(full[1])
    assert bool((got.y[absent] == 0).all()) and bool(torch.isposinf(got.s[absent]).all())
    assert bool(torch.isfinite(got.s[~absent]).all())

    # the sides of 1e3 and 5 (elements 0, 2, 3) are inactive rows of those programs: their y is 0
    ((got.x * wx).sum() + (got.y[:, KEPT] * wy).sum() + (got.s[:, KEPT] * ws).sum()).backward()
    ((want.x * wx).sum() + (want.y * wy).sum() + (want.s * ws).sum()).backward()
    rows_axis = 0 if shared else 1
    torch.testing.assert_close(more[0].grad.index_select(rows_axis, torch.tensor(KEPT)), leaves[0].grad, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(more[1].grad[:, KEPT], leaves[1].grad, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(more[2].grad, leaves[2].grad, rtol=1e-7, atol=1e-8)
    if quadratic:
        torch.testing.assert_close(more[3].grad, leaves[3].grad, rtol=1e-7, atol=1e-8)
    assert bool((more[1].grad[absent] == 0).all())
    if not shared:
        assert bool((more[0].grad[absent] == 0).all())


def test_vmap_over_programs_with_absent_bounds_is_the_batched_solve():
    """torch.func.vmap over the programs one by one (each with its own A) gives the batched solve's
    answers, the absent rows' y = 0 and s = +inf included."""
    _, (A, b, c, _) = _programs(False, False)
    batched = solve_cone(A, b, c, WITH_BOUNDS, solver="ipm")
    mapped = torch.func.vmap(lambda A, b, c: solve_cone(A, b, c, WITH_BOUNDS, solver="ipm"))(A, b, c)
    torch.testing.assert_close(mapped.x, batched.x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mapped.y, batched.y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mapped.s, batched.s, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("row", [0, 16])
def test_a_side_of_inf_on_another_cone_is_refused(row):
    """+inf is an absent bound on a nonnegative row only: on an equality row (0) or a second-order
    cone's row (16) it is refused, naming b."""
    _, (A, b, c, _) = _programs(False, False)
    b = b.clone()
    b[0, row] = math.inf
    with pytest.raises(ValueError, match="b contains NaN or Inf"):
        solve_cone(A, b, c, WITH_BOUNDS, solver="ipm")


def test_forward_mode_derivatives_are_those_of_the_program_without_the_absent_rows():
    """torch.func.jvp with tangents of A, b and c: x's tangent is the program's without the absent rows
    (tangents on the absent rows change nothing)."""
    (A, b, c, _), (A_more, b_more, c_more, _) = _programs(False, False)
    gen = torch.Generator().manual_seed(4)
    dA, db, dc = (torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (A_more, b_more, c_more))
    rows = torch.tensor(KEPT)
    _, want = torch.func.jvp(lambda A, b, c: solve_cone(A, b, c, SPEC, solver="ipm").x, (A, b, c),
                             (dA[:, rows], db[:, rows], dc))
    _, got = torch.func.jvp(lambda A, b, c: solve_cone(A, b, c, WITH_BOUNDS, solver="ipm").x, (A_more, b_more, c_more),
                            (dA, db, dc))
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("solver", ["ipm", "clarabel"])
def test_programs_with_one_nonnegative_row_take_an_absent_bound(solver):
    """Programs of fewer than two nonnegative rows and second-order cones (which the far rows' check
    does not look at): min ½‖x‖² + cᵀx with an equality and one absent bound is the program with the
    equality alone."""
    A = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    c = torch.tensor([1.0, 2.0], dtype=torch.float64)
    P = torch.eye(2, dtype=torch.float64)
    got = solve_cone(A, torch.tensor([1.0, math.inf], dtype=torch.float64), c, ConeSpec(zero=1, nonneg=1), P,
                     solver=solver)
    want = solve_cone(A[:1], torch.tensor([1.0], dtype=torch.float64), c, ConeSpec(zero=1), P, solver=solver)
    torch.testing.assert_close(got.x, want.x, rtol=1e-9, atol=1e-9)
    assert float(got.y[1]) == 0 and math.isinf(float(got.s[1]))


def test_a_warm_start_from_a_solution_with_absent_bounds():
    """SCS warm-started from its own solution of a program with an absent bound (whose s is +inf
    there) solves it again (the infinite slack is started at the row's filled-in side); before, SCS
    failed (NUMERICAL_ERROR)."""
    pytest.importorskip("scs", reason="scs not installed")
    A = torch.eye(2, dtype=torch.float64)
    b = torch.tensor([1.0, math.inf], dtype=torch.float64)
    c = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    P = torch.eye(2, dtype=torch.float64)
    cold = solve_cone(A, b, c, ConeSpec(nonneg=2), P, solver="scs")
    warm = solve_cone(A, b, c, ConeSpec(nonneg=2), P, solver="scs", warm_start=cold)
    assert int(warm.status) == ConeStatus.SOLVED
    torch.testing.assert_close(warm.x, torch.tensor([1.0, -2.0], dtype=torch.float64), rtol=1e-9, atol=1e-9)


def test_composed_transforms_over_programs_with_absent_bounds():
    """vmap of grad over per-program A (wrapped by grad inside vmap), and jvp of one program, take the
    absent bounds: the gradients and tangents of the programs without the rows."""
    (A, b, c, _), (A_more, b_more, c_more, _) = _programs(False, False)

    def grad_c(spec):
        return lambda A, b, c: torch.func.grad(lambda c: solve_cone(A, b, c, spec, solver="ipm").x.sum())(c)
    want = torch.func.vmap(grad_c(SPEC))(A, b, c)
    got = torch.func.vmap(grad_c(WITH_BOUNDS))(A_more, b_more, c_more)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)
    tangent = torch.ones_like(c[1])
    _, want = torch.func.jvp(lambda c: solve_cone(A[1], b[1], c, SPEC, solver="ipm").x, (c[1],), (tangent,))
    _, got = torch.func.jvp(lambda c: solve_cone(A_more[1], b_more[1], c, WITH_BOUNDS, solver="ipm").x, (c_more[1],),
                            (tangent,))
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


def test_an_absent_bound_beside_a_sparse_a_is_refused():
    """A sparse A's rows are not zeroed: +inf in b is refused there, naming b and the limit."""
    A = torch.eye(2, dtype=torch.float64).to_sparse_csr()
    with pytest.raises(ValueError, match="not with a sparse A"):
        solve_cone(A, torch.tensor([1.0, math.inf], dtype=torch.float64), torch.tensor([-1.0, 2.0], dtype=torch.float64),
                   ConeSpec(nonneg=2), torch.eye(2, dtype=torch.float64), solver="clarabel")


class _Stop(Exception):
    """Raised in place of the solve: what ``solve_cone`` reads before it is counted alone."""


@pytest.mark.parametrize("shared", [False, True])
def test_far_rows_and_absent_bounds_take_no_read_of_their_own(shared, monkeypatch):
    """The far rows' check reads whether there are absent bounds in its own read (``scaling.FarRows``):
    programs with far rows (sides of 1e3) and absent bounds, and with far rows alone (the +inf sides
    made 1e3), make as many host reads before their solve as the same programs with neither (those
    sides made 2). Before, programs with far rows made one more (whether there were absent bounds)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks import kernels
    from optlayers import host
    from optlayers.cone import solve as solve_module

    def stop(*args):
        raise _Stop
    monkeypatch.setattr(solve_module.ConeProgram, "apply", stop)
    _, (A, b, c, P) = _programs(shared, False)
    extra = torch.zeros_like(b, dtype=torch.bool)
    extra[:, EXTRA] = True
    reads = []
    for sides in (b, torch.where(torch.isposinf(b), 1e3, b), torch.where(extra, 2.0, b)):
        with host.accelerator_schedule(), kernels.KernelCounter() as counter, pytest.raises(_Stop):
            solve_cone(A, sides, c, WITH_BOUNDS, P, solver="ipm")
        reads.append(counter.sync_count)
    assert reads[0] == reads[1] == reads[2], reads
