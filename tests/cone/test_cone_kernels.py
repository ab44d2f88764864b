"""Host synchronisations (and the interior point method's kernels) of the cone code, pinned so that they cannot creep back.

Counted with ``benchmarks/kernels.py`` (a ``TorchDispatchMode``): an ``item``, ``bool(tensor)``,
``nonzero`` or boolean-mask index makes the host wait for a GPU.
"""
import math
import sys
from pathlib import Path

import torch

from optlayers import solve_cone
from optlayers.cone import exp, product, refine
from optlayers.cone.testing import random_program
from optlayers.cone.spec import ConeSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import kernels  # noqa: E402

# The exponential cone's projection computes every row (regions merged by masks) and looks once,
# after exp.NEWTON_UNCHECKED Newton steps, whether every root has converged (1 on these points).
MAX_EXP_SYNCS = 1
# The exponential cone's derivative at a point whose projection's roots it is given (which also tell
# the rows' regions): 67 kernels measured.
MAX_EXP_DERIVATIVE_KERNELS = 70
# solve_cone(solver="ipm") on the cone benchmark's programs (all five cones), batch 8 (at batch 128 the
# interior point method looks once more, 16 in all: its looks follow its iterations, and the larger batch's
# slowest program takes more): 15 forward syncs (validation 1, the interior point method's looks 3, the
# refinement's 3 and its linear solves' 2, the exponential projections' root looks 3 (their
# derivatives take the projections' roots), the status 1), 1 for whether a nonnegative row's side is
# far above the others or +inf (scaling.far_row_scales, both read at once) and 1 for whether a
# program's rows or columns spread too far to be solved unequilibrated (scaling.equilibration); 2 in the adjoint
# (iterative refinement's; it takes the refined point's w and roots).
MAX_SOLVE_SYNCS, MAX_ADJOINT_SYNCS = 15, 2
# Kernels per iteration of the cone interior point method on those programs, on the accelerators'
# schedule (every exponential cone's dual scaling and every step trial formed: the count a GPU
# launches), counted after a warm-up solve (the cones' cached constants): 480 measured. What keeps it
# there: the scaled rows G = V A_K by one product with the scalings' block-diagonal matrix, from
# which H and the Newton directions' A_Kᵀ Vᵀ u and V A_K dx are formed; the PSD scaling's W and W⁻¹ by
# one congruence product each way; no zero Q for a program without P; the nonnegative rows as the KKT
# system's diagonal rows; the residuals' norms by one reduction and one pass over all rows each for
# A x and Aᵀy; the Wright omega solve in 3 Newton steps of 5 kernels; the exponential step search's
# points mapped by one product; the second-order and PSD cones' constants made once.
MAX_CONE_KERNELS_PER_ITERATION = 487
# The Newton refinement (and the KKT check after it) on those programs at batch 8, counted as the forward's
# kernels with refine_steps=6 less those with 0: 1,050 measured (the refined answer's KKT residual compared
# with the solver's answer's, which an element keeps where refinement went astray; the PSD derivatives
# taking their projections' eigendecompositions; -D written through strided views of its diagonal blocks;
# the small-pivot test carried with the factorization; the KKT check taking the refinement's products
# with A; the exponential root solves started from guesses and the derivatives taking the projections'
# regions with their roots); the adjoint 231 (the PSD and exponential derivatives taking the
# projections' eigendecompositions and roots).
MAX_REFINE_KERNELS, MAX_ADJOINT_KERNELS = 1_100, 245


def _points(count: int) -> torch.Tensor:
    """Points in all four regions of the exponential cone (about 40 % in the root region)."""
    return torch.randn(count, 3, generator=torch.Generator().manual_seed(0)) * 2


def test_exp_projection_and_derivative_look_once():
    v = _points(512)
    for dual in (False, True):
        project = kernels.count(lambda: exp.project(v, dual))
        derivative = kernels.count(lambda: exp.derivative(v, dual).dense())
        assert project.sync_count <= MAX_EXP_SYNCS, project.syncs
        assert derivative.sync_count <= MAX_EXP_SYNCS, derivative.syncs


def test_solve_and_adjoint_syncs_stay_bounded():
    counts = kernels.cone_counts(batch=8)
    assert counts.forward_syncs <= MAX_SOLVE_SYNCS, counts
    assert counts.backward_syncs <= MAX_ADJOINT_SYNCS, counts
    assert counts.kernels_per_iteration <= MAX_CONE_KERNELS_PER_ITERATION, counts
    assert counts.backward_kernels <= MAX_ADJOINT_KERNELS, counts


def test_refinement_kernels_stay_bounded():
    A, b, c, *_ = random_program(kernels.CONE_SPEC, 48, batch=8, seed=0)
    forward = lambda steps: kernels.count(lambda: solve_cone(A, b, c, kernels.CONE_SPEC, solver="ipm",  # noqa: E731
                                                               refine_steps=steps))
    forward(0)  # a warm-up: the cached constants
    refinement = forward(refine.MAX_STEPS).kernel_count - forward(0).kernel_count
    assert refinement <= MAX_REFINE_KERNELS, refinement


def test_exp_projection_of_a_row_does_not_depend_on_the_others():
    """Every row runs the same fixed multisection, and a converged root is frozen: a row's
    projection and derivative are those it has on its own (up to vectorised rounding)."""
    v = torch.cat([_points(40), torch.tensor([[1e-4, -1.5, 1.0], [-0.4, 1e-4, -0.5]])])  # slow roots too
    together, jac = exp.project(v), exp.derivative(v).dense()
    alone = torch.cat([exp.project(row.unsqueeze(0)) for row in v])
    jac_alone = torch.cat([exp.derivative(row.unsqueeze(0)).dense() for row in v])
    torch.testing.assert_close(together, alone, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(jac, jac_alone, rtol=1e-12, atol=1e-12)


def test_exp_projection_of_no_rows_and_no_root_rows():
    """The root region's stand-in rows never show: empty input, and a batch with no root row."""
    assert exp.project(torch.zeros(0, 3)).shape == (0, 3) and exp.derivative(torch.zeros(0, 3)).dense().shape == (0, 3, 3)
    inside = torch.tensor([[-1.0, 1.0, 1.0], [0.5, 2.0, 3.0], [0.0, 0.0, 0.0]])
    assert torch.equal(exp.project(inside), inside)
    assert torch.equal(exp.derivative(inside).dense(), torch.eye(3).expand(3, 3, 3))


def test_exp_derivative_with_the_projections_roots_equals_a_fresh_one_and_does_not_look():
    """The refinement hands the roots its projection solved for to the derivative at the same
    point: the same Jacobian as solving again (bitwise), without the root iteration's look."""
    v = torch.cat([_points(256), torch.tensor([[1e-4, -1.5, 1.0], [-0.4, 1e-4, -0.5]])]).reshape(-1, 2, 3)
    for dual in (False, True):
        projected, roots = exp.project_with_roots(v, dual)
        assert torch.equal(projected, exp.project(v, dual)) and roots.shape == v.shape[:-1]
        shared = kernels.count(lambda: exp.derivative(v, dual, roots).dense())
        assert shared.sync_count == 0, shared.syncs
        assert torch.equal(exp.derivative(v, dual, roots).dense(), exp.derivative(v, dual).dense())


def test_product_derivative_with_roots_equals_a_fresh_one():
    spec = ConeSpec(zero=1, nonneg=2, soc=[3], psd=[3], exp=2, exp_dual=1)
    v = torch.randn(5, spec.size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for dual in (False, True):
        projected, roots = product.project_with_roots(spec, v, dual)
        assert torch.equal(projected, product.project(spec, v, dual))
        # the exponential blocks' roots and the PSD block's eigendecomposition, of their widths
        assert [0 if r is None else r.shape[-1] for r in roots] == [product.state_width(block) for block in spec.blocks()]
        assert sum(r is not None for r in roots) == 3
        assert torch.equal(product.derivative(spec, v, dual, roots).dense(), product.derivative(spec, v, dual).dense())


class _LargestOutput(kernels.TorchDispatchMode):
    """The most entries of any tensor an operation writes (views and in-place ops' whole inputs aside)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        if not func.is_view and not func.overloadpacket.__name__.endswith("_"):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.largest = max(self.largest, t.numel())
        return out


def test_the_adjoint_writes_no_matrix_of_the_derivative_s_size():
    """The backward reuses the forward's factorization of the (B, N, N) residual map derivative
    (N = n + m): it writes nothing of that size (no zero cotangent for the factorization, no
    dense matrix), for a loss on x alone and on x, y and s, on the cone benchmark's programs."""
    from optlayers import solve_cone
    from optlayers.cone.testing import random_program

    A, b, c, *_ = random_program(kernels.CONE_SPEC, 48, batch=8, seed=0)
    batch, m, n = A.shape
    for outputs in (("x",), ("x", "y", "s")):
        A_ = A.clone().requires_grad_(True)
        sol = solve_cone(A_, b, c, kernels.CONE_SPEC, solver="ipm")
        loss = sum(getattr(sol, name).sum() for name in outputs)
        with _LargestOutput() as mode:
            loss.backward()
        assert A_.grad is not None and mode.largest < batch * (n + m) ** 2 / 2, (outputs, mode.largest)


def test_exp_roots_from_a_guess_equal_the_robust_ones_and_fall_back_where_the_guess_is_bad():
    """Started from guesses (a nearby point's roots, or ``root_guess`` of the projection), the root
    solve takes a few plain Newton steps and one look, far fewer kernels than the bracket,
    multisection and safeguarded Newton; a guess that does not converge inside the bracket (NaN,
    or far off) falls back to that robust solve for its row, with the same answer."""
    v = torch.cat([_points(512), torch.tensor([[1e-4, -1.5, 1.0], [-0.4, 1e-4, -0.5]])])
    for dual in (False, True):
        projected, roots = exp.project_with_roots(v, dual)
        nearby = v * (1 + 1e-6 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2)))
        cold = kernels.count(lambda: exp.project_with_roots(nearby, dual))
        warm = kernels.count(lambda: exp.project_with_roots(nearby, dual, roots))
        assert warm.sync_count <= MAX_EXP_SYNCS and warm.kernel_count < 0.6 * cold.kernel_count, (warm.kernel_count, cold.kernel_count)
        expected, expected_roots = exp.project_with_roots(nearby, dual)
        got, got_roots = exp.project_with_roots(nearby, dual, roots)
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
        root_rows = exp.regions(-nearby if dual else nearby) == exp.REGION_ROOT
        torch.testing.assert_close(got_roots[root_rows], expected_roots[root_rows], rtol=1e-13, atol=1e-13)
        guess = exp.root_guess(v, projected, dual)  # from the projection itself: its own roots (NaN: no guess)
        rows = (exp.regions(-v if dual else v) == exp.REGION_ROOT) & ~guess.isnan()
        assert rows.sum() > 0.3 * len(v)
        torch.testing.assert_close(guess[rows], roots[rows], rtol=1e-3, atol=1e-3)  # the heuristic points: not on the ray
        bad = roots.clone()
        bad[::3], bad[1::3] = math.nan, 1e3
        got, _ = exp.project_with_roots(nearby, dual, bad)
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)


def test_exp_roots_tell_the_regions():
    """Off the root region ``project_with_roots`` returns the row's region (+inf inside the cone
    projected on, -inf in its polar, NaN on the analytic face), so that the derivative at the same
    point need not classify the rows again (``regions``: three exponentials and a dozen tests)."""
    v = torch.cat([_points(512), torch.tensor([[-1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, 3.0]])])
    for dual in (False, True):
        _, roots = exp.project_with_roots(v, dual)
        code = exp.regions(-v if dual else v)
        assert set(code.tolist()) == {exp.REGION_INSIDE, exp.REGION_POLAR, exp.REGION_ANALYTIC, exp.REGION_ROOT}
        expected = {exp.REGION_INSIDE: math.inf, exp.REGION_POLAR: -math.inf}
        for region, value in expected.items():
            assert (roots[code == region] == value).all()
        assert roots[code == exp.REGION_ANALYTIC].isnan().all() and roots[code == exp.REGION_ROOT].isfinite().all()
        shared = kernels.count(lambda: exp.derivative(v, dual, roots).dense())
        assert shared.kernel_count <= MAX_EXP_DERIVATIVE_KERNELS, shared.kernels


def test_product_derivative_applies_the_matrix_a_dense_solve_built():
    """Once its matrix is built (the refinement's dense solve), the product cone's derivative applies
    the second-order and PSD blocks by one product each instead of their formulas: same values."""
    spec = ConeSpec(zero=1, nonneg=2, soc=[3, 4], psd=[3], exp=2)
    g = torch.Generator().manual_seed(3)
    v, d = (torch.randn(6, spec.size, generator=g, dtype=torch.float64) for _ in range(2))
    D = product.derivative(spec, v, dual=True)
    before = kernels.count(lambda: (D.matvec(d), D.rmatvec(d)))
    formula = D.matvec(d), D.rmatvec(d)
    dense = D.dense()
    after = kernels.count(lambda: (D.matvec(d), D.rmatvec(d)))
    assert after.kernel_count < before.kernel_count, (after.kernel_count, before.kernel_count)
    for got, want in zip((D.matvec(d), D.rmatvec(d)), formula):
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(D.matvec(d), (dense @ d.unsqueeze(-1)).squeeze(-1), rtol=1e-13, atol=1e-13)


def test_the_interior_point_step_makes_no_synchronisation():
    """On CUDA the eager step of a program without PSD cones is captured in a CUDA graph
    (``engine.graphed.GraphedStep``; ``solver._graphed``), which a host synchronisation would make
    fail: one step on such programs makes none. (PSD cones are left out there: torch's ``svd`` and
    ``eigvalsh`` read their error codes on the host inside their CUDA kernels' calls, below what
    this counter sees.)"""
    from optlayers.cone.interior import solver

    spec = ConeSpec(zero=14, nonneg=30, soc=[10, 10, 10], exp=4)  # the benchmark's cones but PSD
    A, b, c, P, *_ = random_program(spec, 48, batch=8, quadratic=True, seed=0)
    settings = solver.ConeIPMSettings()
    parts = tuple(solver.parts_of(spec))
    assert solver._graphed(torch.device("cuda"), settings, parts) == solver.replays_graphs(torch.device("cuda"), False)
    program, step_parts = solver._setup(A, b, c, P, spec, parts, workspace=False)  # as when graphed
    degree = max(program.nonneg + solver.cone_parts.degree(step_parts), 1)
    st, res = solver._start(program, step_parts, degree, settings)
    for _ in range(3):  # a few iterations in: every part of the step active
        counter = kernels.count(lambda: solver._step(program, st, res, step_parts, degree, settings))
        assert counter.sync_count == 0, counter.syncs
        assert counter.kernel_count > 100
        st, res = solver._step(program, st, res, step_parts, degree, settings)
