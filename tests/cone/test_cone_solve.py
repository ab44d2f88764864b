"""solve_cone forward: solutions, statuses and policies, validation at the door."""
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from optlayers import ConeLayer, ConeSolution, ConeSolveError, ConeSpec, ConeStatus, solve_cone
from optlayers.cone.testing import ALL_CONES, n_range, random_program

SOLUTION_TOL = 1e-8  # refined solutions are accurate to ~1e-12; this leaves room for conditioning


@pytest.mark.parametrize("solver", ["clarabel", "scs"])
@pytest.mark.parametrize("quadratic", [False, True])
def test_recovers_known_solution(solver, quadratic):
    A, b, c, P, x, y, s = random_program(ALL_CONES, 15, batch=3, quadratic=quadratic, seed=1)
    sol = solve_cone(A, b, c, ALL_CONES, P, solver=solver)
    assert (sol.status == ConeStatus.SOLVED).all()
    for got, want in ((sol.x, x), (sol.y, y), (sol.s, s)):
        assert torch.allclose(got, want, atol=SOLUTION_TOL)


def test_unbatched_and_shared_inputs():
    A, b, c, _, x, _, _ = random_program(ALL_CONES, 14, batch=None, seed=2)
    sol = solve_cone(A, b, c, ALL_CONES)
    assert sol.x.shape == x.shape and sol.status.shape == ()
    assert torch.allclose(sol.x, x, atol=SOLUTION_TOL)
    A, b, c, _, x, _, _ = random_program(ALL_CONES, 14, batch=4, shared_A=True, seed=3)
    assert A.dim() == 2
    assert torch.allclose(solve_cone(A, b, c, ALL_CONES).x, x, atol=SOLUTION_TOL)


def test_sparse_A_scipy_and_torch():
    A, b, c, _, x, _, _ = random_program(ALL_CONES, 14, batch=2, shared_A=True, seed=4)
    for sparse in (sp.csc_matrix(A.numpy()), A.to_sparse_csr(), A.to_sparse_coo()):
        sol = solve_cone(sparse, b, c, ALL_CONES)
        assert torch.allclose(sol.x, x, atol=SOLUTION_TOL)


def test_float32_inputs_give_float32_outputs():
    A, b, c, _, x, _, _ = random_program(ALL_CONES, 14, batch=2, seed=5)
    sol = solve_cone(A.float(), b.float(), c.float(), ALL_CONES)
    assert sol.x.dtype == torch.float32
    assert torch.allclose(sol.x.double(), x, atol=1e-4)


def test_scs_warm_start_converges_in_fewer_iterations():
    A, b, c, _, x, _, _ = random_program(ALL_CONES, 14, batch=2, seed=6)
    cold = solve_cone(A, b, c, ALL_CONES, solver="scs")
    few = {"max_iters": 5}
    warm = solve_cone(A, b, c, ALL_CONES, solver="scs", warm_start=cold, solver_options=few)
    assert (warm.status == ConeStatus.SOLVED).all()
    assert torch.allclose(warm.x, x, atol=SOLUTION_TOL)
    unwarmed = solve_cone(A, b, c, ALL_CONES, solver="scs", solver_options=few, refine_steps=0, on_failure="ignore")
    assert (unwarmed.status == ConeStatus.INACCURATE).all()  # 5 cold iterations are far from accurate, and say so


def infeasible_batch():
    spec = ConeSpec(nonneg=8)
    lo, _ = n_range(spec)
    A, b, c, _, x, y, s = random_program(spec, lo, batch=3, seed=7)
    A, b = A.clone(), b.clone()
    A[1, 0], A[1, 1] = A[1, 0] * 0 + 1, A[1, 1] * 0 - 1  # x_0 <= -1 and -x_0 <= -1: infeasible
    A[1, :2, 1:] = 0
    b[1, :2] = -1
    return spec, A, b, c, x


@pytest.mark.parametrize("solver", ["clarabel", "scs"])
def test_infeasible_element_reported_others_correct(solver):
    spec, A, b, c, x = infeasible_batch()
    sol = solve_cone(A, b, c, spec, solver=solver, on_failure="ignore")
    assert sol.status[1] == ConeStatus.PRIMAL_INFEASIBLE
    assert torch.isnan(sol.x[1]).all() and torch.isnan(sol.y[1]).all()
    assert (sol.status[[0, 2]] == ConeStatus.SOLVED).all()
    assert torch.allclose(sol.x[[0, 2]], x[[0, 2]], atol=SOLUTION_TOL)


def test_failure_policies():
    spec, A, b, c, _ = infeasible_batch()
    with pytest.raises(ConeSolveError, match="primal_infeasible \\(elements 1\\)") as info:
        solve_cone(A, b, c, spec)
    assert info.value.status.tolist()[1] == ConeStatus.PRIMAL_INFEASIBLE
    with pytest.warns(RuntimeWarning, match="1 of 3 cone programs were not solved"):
        solve_cone(A, b, c, spec, on_failure="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve_cone(A, b, c, spec, on_failure="ignore")


def test_failed_element_gets_zero_gradient_and_others_finite():
    """A loss over every output, the failed element's included (its outputs hold failed_value 0):
    the backward, not the loss, gives it a zero gradient."""
    spec, A, b, c, _ = infeasible_batch()
    b = b.requires_grad_()
    sol = solve_cone(A, b, c, spec, on_failure="ignore", failed_value=0.0)
    (sol.x.sum() + sol.y.sum() + sol.s.sum()).backward()
    assert (b.grad[1] == 0).all()
    for i in (0, 2):  # the others' gradients as if each were solved alone
        alone = b[i].detach().clone().requires_grad_()
        one = solve_cone(A[i], alone, c[i], spec)
        (one.x.sum() + one.y.sum() + one.s.sum()).backward()
        assert torch.allclose(b.grad[i], alone.grad, atol=1e-9)


def test_an_inaccurate_element_beside_exponential_cones_leaves_the_batchs_derivatives_intact():
    """An element refined but left INACCURATE carries its own w and exponential roots; the backward
    and the forward-mode derivative clean it to w = 0, whose roots must be those at 0 (a root kept
    from its own w had made the projection's derivative NaN there and failed the whole batch). Its
    gradient is zero, and every SOLVED element's is the one it gets solved without it."""
    spec = ConeSpec(zero=1, nonneg=3, exp=2)
    A, b, c, *_ = random_program(spec, 4, batch=8, seed=1)
    options = dict(solver="scs", solver_options={"max_iters": 20}, on_failure="ignore", failed_value=0.0)
    A = A.clone().requires_grad_()
    sol = solve_cone(A, b, c, spec, **options)
    failed = sol.status != ConeStatus.SOLVED
    assert (sol.status[failed] == ConeStatus.INACCURATE).all() and 0 < int(failed.sum()) < 8
    sol.x.sum().backward()
    assert torch.isfinite(A.grad).all() and (A.grad[failed] == 0).all()
    solved = (~failed).nonzero().squeeze(-1)
    alone = A.detach()[solved].clone().requires_grad_()
    again = solve_cone(alone, b[solved], c[solved], spec, **options)
    assert (again.status == ConeStatus.SOLVED).all()
    again.x.sum().backward()
    torch.testing.assert_close(A.grad[solved], alone.grad, rtol=1e-9, atol=1e-12)
    tangent = torch.func.jvp(lambda b_: solve_cone(A.detach(), b_, c, spec, **options).x, (b,), (torch.ones_like(b),))[1]
    assert torch.isfinite(tangent).all() and (tangent[failed] == 0).all()


SPEC = ConeSpec(zero=1, nonneg=2)


_WRONG_WARM = ConeSolution(torch.zeros(5), torch.zeros(3), torch.zeros(3), torch.zeros((), dtype=torch.int64))


@pytest.mark.parametrize("args, error, message", [
    (dict(A=torch.zeros(4, 2), b=torch.zeros(4)), ValueError, "cones cover 3 rows .* A has m = 4 rows"),
    (dict(b=torch.zeros(4)), ValueError, r"b must end in shape \(3,\) to match A of shape \(3, 2\), got \(4,\)"),
    (dict(A=torch.zeros(4, 2)), ValueError, r"A must have shape \(\.\.\., 3, n\) to match b of shape \(3,\) and the cones' 3 rows"),
    (dict(A=torch.zeros(3, 3), P=torch.eye(2)), ValueError,
     r"A must have shape \(\.\.\., m, 2\) to match c of shape \(2,\) and P of shape \(2, 2\), got \(3, 3\)"),
    (dict(c=torch.zeros(2, 3)), ValueError, r"c must end in shape \(2,\)"),
    (dict(P=torch.zeros(3, 3)), ValueError, r"P must end in shape \(2, 2\)"),
    (dict(c=torch.tensor([0.0, float("nan")])), ValueError, "c contains NaN or Inf"),
    (dict(b=torch.tensor([0.0, float("-inf"), 1.0])), ValueError, "b contains NaN or Inf"),
    (dict(A=torch.tensor([[0.0, 1.0], [-float("inf"), 0.0], [0.0, 0.0]])), ValueError, "A contains NaN or Inf"),
    (dict(A=torch.sparse_coo_tensor([[0, 2], [1, 0]], [1.0, float("nan")], (3, 2))), ValueError, "A contains NaN or Inf"),
    (dict(P=torch.tensor([[1.0, 0.0], [0.0, float("inf")]])), ValueError, "P contains NaN or Inf"),
    (dict(A=torch.zeros(3, 2, dtype=torch.int64)), TypeError, "A must be a float32 or float64 tensor, got torch.int64"),
    (dict(A=torch.zeros(3, 2, dtype=torch.float16)), TypeError, "A must be a float32 or float64 tensor, got torch.float16"),
    (dict(b=torch.zeros(3, dtype=torch.float64)), TypeError, "all inputs must have one dtype, got .*'b': torch.float64"),
    (dict(A=[[0.0]]), TypeError, "A must be a torch.Tensor, numpy array or scipy sparse matrix, got list"),
    (dict(b=torch.zeros(3, device="meta")), ValueError, "all inputs must be on one device"),
    (dict(A=torch.zeros(2, 3, 2), b=torch.zeros(5, 3)), ValueError, "batched inputs must share one batch size"),
    (dict(A=torch.zeros(3)), ValueError, r"A must have 2 or 3 dimensions .* got shape \(3,\)"),
    (dict(cones=(1, 2)), TypeError, "cones must be a ConeSpec, got tuple"),
    (dict(solver="ecos"), ValueError, r"solver must be one of \('auto', 'ipm', 'clarabel', 'scs'\), got 'ecos'"),
    (dict(solver="ipm", solver_options={"eps": 1e-3}), ValueError, r"solver_options for solver='ipm' must be ConeIPMSettings fields .*got \['eps'\]"),
    (dict(mode="qr"), ValueError, "mode must be one of"),
    (dict(on_failure="explode"), ValueError, "on_failure must be one of"),
    (dict(refine_steps=-1), ValueError, "refine_steps must be an integer >= 0, got -1"),
    (dict(max_workers=0), ValueError, "max_workers must be an integer >= 1 or None, got 0"),
    (dict(warm_start=_WRONG_WARM), ValueError, "warm_start must be a solution of the same shapes"),
    (dict(warm_start=ConeSolution(torch.zeros(2, 1), torch.zeros(3), torch.zeros(3), torch.zeros((), dtype=torch.int64))),
     ValueError, r"warm_start must be a solution of the same shapes: x, y, s of \(\(1, 2\), \(1, 3\), \(1, 3\)\).*got \(\(2, 1\)"),
    (dict(warm_start=3), TypeError, "warm_start must be a ConeSolution .* got int"),
    (dict(solver="scs", solver_options={"eps": 1e-3}), ValueError, r"solver_options\['eps'\] = 0.001 is refused by SCS \(TypeError: 'eps' is an invalid keyword"),
    (dict(A=torch.zeros(0, 2), b=torch.zeros(0), cones=ConeSpec()), ValueError, "cones cover no rows"),
    (dict(A=torch.zeros(3, 0), c=torch.zeros(0)), ValueError, r"A has no columns \(shape \(3, 0\)\)"),
])
def test_bad_input_messages(args, error, message):
    kwargs = dict(A=torch.zeros(3, 2, dtype=torch.float32), b=torch.zeros(3, dtype=torch.float32),
                  c=torch.zeros(2, dtype=torch.float32), cones=SPEC)  # the dtype of the table's tensors
    kwargs.update(args)
    with pytest.raises(error, match=message):
        solve_cone(**kwargs)


def test_bad_cone_spec():
    with pytest.raises(ValueError, match="ConeSpec.nonneg must be a nonnegative int, got int -1"):
        ConeSpec(nonneg=-1)
    with pytest.raises(ValueError, match="ConeSpec.soc entries must be positive ints, got int 0"):
        ConeSpec(soc=[3, 0])
    with pytest.raises(TypeError, match=r"ConeSpec.psd must be a list or tuple of sizes .* got int 3; e.g. psd=\[3\]"):
        ConeSpec(psd=3)
    # the type is named: a float or a bool that prints like a size is not one
    with pytest.raises(ValueError, match="ConeSpec.zero must be a nonnegative int, got float 2.0"):
        ConeSpec(zero=2.0)
    with pytest.raises(TypeError, match=r"ConeSpec.soc must be a list or tuple .* got ndarray array\(\[3, 4\]\); e.g. soc=\[3, 4\]"):
        ConeSpec(soc=np.array([3, 4]))


def test_cone_spec_takes_numpy_integers_as_sizes():
    """Sizes computed with numpy (np.int64) were refused with "must be a nonnegative int, got 3"."""
    spec = ConeSpec(zero=np.int64(2), nonneg=np.int32(3), soc=list(np.array([3, 4])), exp=np.int64(1))
    assert spec == ConeSpec(zero=2, nonneg=3, soc=[3, 4], exp=1)
    assert all(type(v) is int for v in (spec.zero, spec.nonneg, spec.exp, *spec.soc))


def test_sparse_layouts_other_than_csr_and_coo_are_refused_at_the_door():
    """A CSC (or BSR, BSC) A failed inside torch ("Only batched sparse compressed (non-block) tensors are
    supported"); an integer scipy sparse A was refused as a dtype mismatch of all the inputs."""
    A, b, c = torch.randn(3, 2, dtype=torch.float64), torch.ones(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"A must be dense, sparse CSR or sparse COO, got layout torch.sparse_csc"):
        solve_cone(A.to_sparse_csc(), b, c, ConeSpec(nonneg=3))
    with pytest.raises(TypeError, match=r"A must be a float32 or float64 tensor, got torch.int64"):
        solve_cone(sp.csr_matrix(np.ones((3, 2), dtype=np.int64)), b, c, ConeSpec(nonneg=3))


def test_cone_spec_sizes_and_scs_dict():
    spec = ConeSpec(zero=2, nonneg=3, soc=[3, 3, 4], psd=[2, 3], exp=1, exp_dual=2)
    assert spec.size == 2 + 3 + 10 + 3 + 6 + 3 + 6
    assert spec.scs_cone() == {"z": 2, "l": 3, "q": [3, 3, 4], "s": [2, 3], "ep": 1, "ed": 2}
    blocks = list(spec.blocks())
    assert [b.start for b in blocks] == [0, 2, 5, 11, 15, 18, 24, 27]
    assert blocks[-1].stop == spec.size and blocks[-1].dual
    assert np.array_equal([b.count for b in blocks], [2, 3, 2, 1, 1, 1, 1, 2])


def test_cone_layer_module():
    from optlayers.cone import ConeLayer

    A, b, c, _, x, _, _ = random_program(ALL_CONES, 14, batch=2, seed=8)
    layer = ConeLayer(ALL_CONES, solver="scs")
    assert "solver='scs'" in repr(layer)
    b = b.clone().requires_grad_()
    sol = layer(A, b, c)
    assert torch.allclose(sol.x, x, atol=SOLUTION_TOL)
    sol.x.sum().backward()
    direction = torch.randn(b.shape, generator=torch.Generator().manual_seed(0))
    step = 1e-6
    fd = (layer(A, b.detach() + step * direction, c).x.sum() - layer(A, b.detach() - step * direction, c).x.sum()) / (2 * step)
    assert float((b.grad * direction).sum()) == pytest.approx(float(fd), rel=1e-5, abs=1e-7)
    with pytest.raises(TypeError, match="unknown option 'tol'"):
        ConeLayer(ALL_CONES, tol=1e-3)


def test_a_p_that_is_not_semidefinite_is_refused_naming_its_elements():
    """min −x²/2 + cx over −1 ≤ x ≤ 1 (P = −1) was taken and reported SOLVED at x = 0, the maximum, by
    the interior point method and Clarabel. A P that is not positive semidefinite is refused, for every
    solver, batched (its elements named) or shared; a semidefinite P is taken."""
    A, b = torch.tensor([[1.0], [-1.0]], dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    c = torch.tensor([[0.1], [0.2], [0.3]], dtype=torch.float64)
    P = torch.tensor([[[1.0]], [[-1.0]], [[0.0]]], dtype=torch.float64)
    for solver in ("ipm", "clarabel", "scs"):
        with pytest.raises(ValueError, match=r"P must be positive semidefinite .* at batch elements 1;"):
            solve_cone(A, b, c, ConeSpec(nonneg=2), P, solver=solver)
    with pytest.raises(ValueError, match=r"P must be positive semidefinite .* a P formed as L Lᵀ is$"):
        solve_cone(A, b, c, ConeSpec(nonneg=2), -torch.eye(1, dtype=torch.float64))
    sol = solve_cone(A, b, c[:2], ConeSpec(nonneg=2), P[[0, 2]])  # P = 1 and P = 0: min ½x² + cx, min cx
    torch.testing.assert_close(sol.x, torch.tensor([[-0.1], [-1.0]], dtype=torch.float64), rtol=0, atol=1e-7)


@pytest.mark.parametrize("layout", ["scipy", "coo", "csr"])
def test_sparse_A_solves_and_differentiates_without_warnings(layout):
    """torch's notices about its sparse constructors (invariant checks implicitly disabled; CSR in
    beta) came from inside the layer, which fails under warnings as errors. (torch gives each once
    per process: this fails when run alone without the fix.)"""
    A, b, c, _, x, _, _ = random_program(ALL_CONES, 14, batch=2, shared_A=True, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the user's own conversion's notices are not the layer's
        sparse = {"scipy": lambda: sp.csr_matrix(A.numpy()), "coo": lambda: A.to_sparse().requires_grad_(),
                  "csr": lambda: A.to_sparse_csr().requires_grad_()}[layout]()
    b = b.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = solve_cone(sparse, b, c, ALL_CONES)
        sol.x.sum().backward()
    assert torch.allclose(sol.x, x, atol=SOLUTION_TOL) and b.grad is not None
    if layout != "scipy":
        assert sparse.grad is not None and sparse.grad.layout == sparse.layout


@pytest.mark.parametrize("solver", ["scs", "clarabel"])
def test_checking_a_verbose_option_prints_nothing(solver, capfd):
    """The options are checked by building the solver on a one-row program; verbose=True printed
    SCS's banner for that program when the layer was made. A verbose solve still prints its own."""
    pytest.importorskip(solver)
    ConeLayer(ConeSpec(nonneg=3), solver=solver, solver_options={"verbose": True})
    assert capfd.readouterr().out == ""
    with pytest.raises(ValueError, match="verbose"):
        ConeLayer(ConeSpec(nonneg=3), solver=solver, solver_options={"verbose": "loud"})
