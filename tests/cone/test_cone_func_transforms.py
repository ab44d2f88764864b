"""torch.func transforms of the cone layer (vmap, per-sample gradients, jacrev, jacfwd) against the
plain batched call or finite differences; second derivatives refused with a message."""
import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, vmap

from optlayers import ConeSpec, SolveError, solve_cone
from optlayers.cone.testing import random_program

SPEC = ConeSpec(zero=1, nonneg=2, soc=[3], exp=1)
N = 4
FD_STEP = 1e-6


def _shared(batch, seed=16, quadratic=False):
    return random_program(SPEC, N, batch=batch, quadratic=quadratic, shared_A=True, seed=seed)


def _central(f, x, direction):
    return (f(x + FD_STEP * direction) - f(x - FD_STEP * direction)) / (2 * FD_STEP)


def _jacobian_fd(f, x):
    cols = [_central(f, x, e.reshape(x.shape)) for e in torch.eye(x.numel())]
    return torch.stack(cols, dim=-1).reshape(*f(x).shape, *x.shape)


def test_vmap_over_b_and_c_with_a_shared_A():
    A, b, c, *_ = _shared(3)
    out = vmap(lambda b, c: solve_cone(A, b, c, SPEC).x)(b, c)
    torch.testing.assert_close(out, solve_cone(A, b, c, SPEC).x, atol=1e-10, rtol=0)


def test_vmap_of_a_function_returning_the_whole_solution():
    """``ConeSolution`` is a pytree node: a vmapped function may return it, every field batched."""
    A, b, c, *_ = _shared(3)
    out = vmap(lambda b, c: solve_cone(A, b, c, SPEC))(b, c)
    want = solve_cone(A, b, c, SPEC)
    assert type(out) is type(want)
    for name in ("x", "y", "s"):
        torch.testing.assert_close(getattr(out, name), getattr(want, name), atol=1e-10, rtol=0)
    torch.testing.assert_close(out.status, want.status)


def test_vmap_over_every_input_with_P_and_an_inner_batch():
    A, b, c, P, *_ = random_program(SPEC, N, batch=6, quadratic=True, seed=3)
    stacked = [t.reshape(3, 2, *t.shape[1:]) for t in (A, b, c, P)]
    out = vmap(lambda A, b, c, P: solve_cone(A, b, c, SPEC, P).y)(*stacked)
    torch.testing.assert_close(out.reshape(6, -1), solve_cone(A, b, c, SPEC, P).y, atol=1e-10, rtol=0)


def test_vmap_with_the_ipm_solver():
    A, b, c, *_ = _shared(3)
    out = vmap(lambda b: solve_cone(A, b, c[0], SPEC, solver="ipm").x)(b)
    torch.testing.assert_close(out, solve_cone(A, b, c[0].expand(3, N), SPEC).x, atol=1e-8, rtol=0)


def _loss(A, b, c):
    sol = solve_cone(A, b, c, SPEC)
    return (sol.x * torch.arange(1.0, N + 1)).sum() + sol.y.square().sum()


def test_per_sample_gradients_vmap_of_grad():
    A, b, c, *_ = _shared(3)
    per_sample = vmap(grad(_loss, argnums=(0, 1, 2)), in_dims=(None, 0, 0))(A, b, c)
    for i in range(3):
        leaves = [t.clone().requires_grad_() for t in (A, b[i], c[i])]
        expected = torch.autograd.grad(_loss(*leaves), leaves)
        for got, want in zip(per_sample, expected):
            torch.testing.assert_close(got[i], want, atol=1e-7, rtol=1e-6)


def test_grad_of_vmap_sums_a_shared_A():
    A, b, c, *_ = _shared(3)
    got = grad(lambda A: vmap(_loss, in_dims=(None, 0, 0))(A, b, c).sum())(A)
    leaf = A.clone().requires_grad_()
    want, = torch.autograd.grad(_loss(leaf, b, c), leaf)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("transform", [jacrev, jacfwd])
@pytest.mark.parametrize("wrt", ["A", "b", "c"])
def test_jacobians_match_finite_differences(transform, wrt):
    A, b, c, *_ = _shared(None)
    data = {"A": A, "b": b, "c": c}

    def out(x):
        sol = solve_cone(**dict(data, **{wrt: x}), cones=SPEC)
        return torch.cat([sol.x, sol.y, sol.s])

    torch.testing.assert_close(transform(out)(data[wrt]), _jacobian_fd(out, data[wrt]), atol=1e-6, rtol=1e-5)


def test_jacrev_in_lsqr_mode_matches_dense():
    A, b, c, *_ = _shared(None)
    f = {mode: (lambda b, mode=mode: solve_cone(A, b, c, SPEC, mode=mode).x) for mode in ("dense", "lsqr")}
    torch.testing.assert_close(jacrev(f["lsqr"])(b), jacrev(f["dense"])(b), atol=1e-7, rtol=0)


def test_failure_policy_under_vmap():
    spec = ConeSpec(nonneg=8)
    A, b, c, _, x, *_ = random_program(spec, 2, batch=3, seed=7)
    A, b = A.clone(), b.clone()
    A[1, :2] = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])  # x_0 <= -1 and -x_0 <= -1: infeasible
    b[1, :2] = -1
    with pytest.raises(SolveError, match="1 of 3 cone programs were not solved"):
        vmap(lambda A, b, c: solve_cone(A, b, c, spec).x)(A, b, c)
    out = vmap(lambda A, b, c: solve_cone(A, b, c, spec, on_failure="ignore").x)(A, b, c)
    assert torch.isnan(out[1]).all()
    torch.testing.assert_close(out[[0, 2]], x[[0, 2]], atol=1e-8, rtol=0)


A1, B1, C1, *_ = random_program(SPEC, N, batch=None, seed=5)


def _scalar(b):
    return solve_cone(A1, b, C1, SPEC).x.square().sum()


@pytest.mark.parametrize("transform", [hessian, lambda f: jacrev(jacrev(f)), lambda f: jacrev(jacfwd(f)),
                                       lambda f: jacfwd(jacfwd(f))])
def test_second_derivatives_are_refused(transform):
    with pytest.raises(NotImplementedError, match="second derivatives of the cone program"):
        transform(_scalar)(B1)


def test_double_backward_is_refused():
    leaf = B1.clone().requires_grad_()
    g, = torch.autograd.grad(_scalar(leaf), leaf, create_graph=True)
    with pytest.raises(NotImplementedError, match="second derivatives of the cone program"):
        torch.autograd.grad(g.sum(), leaf)


def test_forward_mode_around_a_plain_backward_is_refused():
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(B1.clone().requires_grad_(), torch.ones_like(B1))
        with pytest.raises(NotImplementedError, match="second derivatives of the cone program"):
            torch.autograd.grad(_scalar(dual), dual)


def test_per_sample_gradients_of_a_shared_P():
    A, b, c, P, *_ = random_program(SPEC, N, batch=3, quadratic=True, shared_A=True, seed=3)

    def loss(P, b, c):
        sol = solve_cone(A, b, c, SPEC, P)
        return (sol.x * torch.arange(1.0, N + 1)).sum() + sol.s.square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(P[0], b, c)
    for i in range(3):
        leaf = P[0].clone().requires_grad_()
        want, = torch.autograd.grad(loss(leaf, b[i], c[i]), leaf)
        torch.testing.assert_close(per_sample[i], want, atol=1e-7, rtol=1e-6)


def test_torchs_batched_gradients_are_refused_with_the_transforms_that_run():
    """The cone layer's backward reads its refinement's convergence on the host, which torch's
    prototype batched gradients cannot run: the error says so and names torch.func's transforms."""
    A, b, c, *_ = _shared(None)
    refusal = "cone layer's derivative rules cannot run under torch.autograd's batched gradients.*torch.func.jacrev"
    with pytest.raises(RuntimeError, match=refusal):
        torch.autograd.functional.jacobian(lambda c: solve_cone(A, b, c, SPEC).x, c, vectorize=True)
    with pytest.raises(RuntimeError, match=refusal):  # its jvp, under the forward-mode batched tangents
        torch.autograd.functional.jacobian(lambda c: solve_cone(A, b, c, SPEC).x, c, vectorize=True, strategy="forward-mode")
