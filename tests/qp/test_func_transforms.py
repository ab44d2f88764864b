"""torch.func transforms of the QP layer (vmap with absent blocks, per-sample gradients, jacrev,
jacfwd) and its second derivatives, each against the plain batched call or finite differences."""
import pytest
import torch
from torch.func import grad, hessian, jacfwd, jacrev, vmap

from optlayers import solve_qp
from qp_problems import random_qp

NAMES = ("Q", "p", "G", "h", "A", "b")
EPS = 1e-6


def _blocks(data, ineq, eq):
    out = dict(data)
    if not ineq:
        out["G"] = out["h"] = None
    if not eq:
        out["A"] = out["b"] = None
    return out


def _central(f, x, direction, eps=EPS):
    return (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)


def _jacobian_fd(f, x):
    """Central finite differences of f at x, shaped like jacfwd's (f(x).shape + x.shape)."""
    cols = [_central(f, x, e.reshape(x.shape)) for e in torch.eye(x.numel())]
    return torch.stack(cols, dim=-1).reshape(*f(x).shape, *x.shape)


@pytest.mark.parametrize("ineq, eq", [(True, False), (False, True), (False, False), (True, True)])
def test_vmap_with_absent_blocks_matches_batched_call(ineq, eq):
    data = _blocks(random_qp((4,), 4, 3, 2, active=True), ineq, eq)
    present = [k for k in NAMES if data[k] is not None]
    f = lambda *a: solve_qp(**dict(zip(present, a)), tol=1e-13).z  # noqa: E731
    vmapped = vmap(f)(*(data[k] for k in present))
    torch.testing.assert_close(vmapped, solve_qp(**data, tol=1e-13).z, atol=1e-10, rtol=0)


def test_readme_example_under_vmap():
    Q = torch.eye(2)
    p = torch.randn(8, 2)
    G, h = torch.eye(2), torch.zeros(2)
    z = vmap(lambda p: solve_qp(Q, p, G, h).z)(p)
    torch.testing.assert_close(z, p.neg().clamp(max=0.0), atol=1e-9, rtol=0)  # argmin ½|z|² + pᵀz over z ≤ 0


def test_vmap_of_a_function_returning_the_whole_solution_matches_the_batched_call():
    """``QPSolution`` is a pytree node: a vmapped function may return it, every field batched."""
    data = random_qp((4,), 4, 5, 2, active=True)
    out = vmap(lambda p, h: solve_qp(data["Q"][0], p, data["G"][0], h, data["A"][0], data["b"][0], tol=1e-13))(data["p"], data["h"])
    want = solve_qp(data["Q"][0], data["p"], data["G"][0], data["h"], data["A"][0], data["b"][0], tol=1e-13)
    assert type(out) is type(want)
    for name in ("z", "lam", "nu", "s"):
        torch.testing.assert_close(getattr(out, name), getattr(want, name), atol=1e-10, rtol=0)
    for name in ("status", "iterations", "relaxed"):
        torch.testing.assert_close(getattr(out, name), getattr(want, name))


def test_vmap_over_a_batched_call_and_an_unbatched_shared_matrix():
    data = random_qp((3, 2), 4, 5, 1, active=True)
    Q = data["Q"][0, 0]
    out = vmap(lambda p, G, h, A, b: solve_qp(Q, p, G, h, A, b).z)(data["p"], data["G"], data["h"], data["A"], data["b"])
    torch.testing.assert_close(out, solve_qp(Q, data["p"], data["G"], data["h"], data["A"], data["b"]).z, atol=1e-10, rtol=0)


def _loss(Q, p, G=None, h=None, A=None, b=None):
    sol = solve_qp(Q, p, G, h, A, b, tol=1e-13)
    return (sol.z.sin() * torch.arange(1.0, sol.z.shape[-1] + 1)).sum() + sol.lam.square().sum()


def test_vmap_over_an_empty_dimension_gives_empty_outputs_as_torch_does():
    """vmap over a dimension of size 0 (torch's own operations allow it): empty solutions, and
    per-sample gradients, of the inner batch's shape."""
    eye = torch.eye(2, dtype=torch.float64)
    assert vmap(lambda p: solve_qp(eye, p).z)(torch.zeros(0, 2, dtype=torch.float64)).shape == (0, 2)
    assert vmap(lambda p: solve_qp(eye, p).z)(torch.zeros(0, 3, 2, dtype=torch.float64)).shape == (0, 3, 2)
    per_sample = vmap(grad(lambda p: solve_qp(eye, p, eye, torch.ones(2, dtype=torch.float64)).z.sum()))(
        torch.zeros(0, 2, dtype=torch.float64))
    assert per_sample.shape == (0, 2)

def test_under_vmap_a_failure_is_named_as_in_the_batched_call():
    """An infeasible element at (1, 2) of data vmapped over its first dimension (the inner call
    batched over 3) is named (1, 2), as the batched call names it, not by its flattened index 5."""
    import warnings

    n = 2
    Q = torch.eye(n, dtype=torch.float64)
    G = torch.cat([torch.eye(n), -torch.eye(n)]).to(torch.float64)
    h = torch.ones(2, 3, 2 * n, dtype=torch.float64)
    h[1, 2, 0] = h[1, 2, n] = -1.0  # z₀ ≤ −1 and z₀ ≥ 1
    p = torch.zeros(2, 3, n, dtype=torch.float64)
    messages = []
    for call in (lambda: vmap(lambda p_, h_: solve_qp(Q, p_, G, h_, on_failure="warn").z)(p, h),
                 lambda: solve_qp(Q, p, G, h, on_failure="warn")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call()
        messages.append([str(w.message) for w in caught])
    assert len(messages[0]) == 1 and "primal_infeasible (elements (1, 2))" in messages[0][0]
    assert messages[0] == messages[1]

@pytest.mark.parametrize("eq", [False, True])
def test_per_sample_gradients_vmap_of_grad(eq):
    data = _blocks(random_qp((5,), 4, 3, 1, active=True), True, eq)
    Q = data["Q"][0]
    rest = {k: data[k] for k in ("G", "h", "A", "b")}
    per_sample = vmap(grad(lambda Q, p, h: _loss(Q, p, rest["G"][0], h, *(None if v is None else v[0] for v in (rest["A"], rest["b"]))),
                           argnums=(0, 1, 2)), in_dims=(None, 0, 0))(Q, data["p"], data["h"])
    for i in range(5):  # the same with plain autograd, one element at a time
        leaves = [t.clone().requires_grad_() for t in (Q, data["p"][i], data["h"][i])]
        args = [leaves[0], leaves[1], rest["G"][0], leaves[2]] + [None if v is None else v[0] for v in (rest["A"], rest["b"])]
        expected = torch.autograd.grad(_loss(*args), leaves)
        for got, want in zip(per_sample, expected):
            torch.testing.assert_close(got[i], want, atol=1e-9, rtol=1e-7)


def test_grad_of_vmap_matches_backward_of_the_batched_call():
    data = random_qp((4,), 4, 3, 0, active=True)
    Q, G = data["Q"][0], data["G"][0]
    g = grad(lambda Q, p: vmap(lambda p, h: _loss(Q, p, G, h))(p, data["h"]).sum(), argnums=(0, 1))(Q, data["p"])
    leaves = [Q.clone().requires_grad_(), data["p"].clone().requires_grad_()]
    expected = torch.autograd.grad(_loss(leaves[0], leaves[1], G, data["h"]), leaves)
    for got, want in zip(g, expected):
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("transform", [jacrev, jacfwd])
@pytest.mark.parametrize("wrt", ["p", "h", "Q"])
def test_jacobians_match_finite_differences(transform, wrt):
    data = random_qp((), 4, 4, 1, active=True)

    def z(x):
        args = dict(data, **{wrt: x})
        if wrt == "Q":
            args["Q"] = 0.5 * (x + x.mT)
        return solve_qp(**args, tol=1e-13).z

    torch.testing.assert_close(transform(z)(data[wrt]), _jacobian_fd(z, data[wrt]), atol=1e-6, rtol=1e-5)


def _diag_problem(q):
    """The issue's case: ‖z‖² with Q = diag(q) and the first coordinate held by z₁ ≤ ½, so that
    ‖z‖² = ¼ + 1/q₂² and its Hessian in q is diag(0, 6/q₂⁴)."""
    z = solve_qp(torch.diag(q), torch.tensor([-1.0, 1.0]), torch.tensor([[1.0, 0.0]]), torch.tensor([0.5])).z
    return z.square().sum()


def test_hessian_with_an_active_constraint_is_exact():
    q = torch.tensor([1.0, 2.0])
    expected = torch.diag(torch.tensor([0.0, 6.0 / q[1] ** 4]))
    torch.testing.assert_close(hessian(_diag_problem)(q), expected, atol=1e-8, rtol=0)
    torch.testing.assert_close(jacrev(jacrev(_diag_problem))(q), expected, atol=1e-8, rtol=0)
    torch.testing.assert_close(jacrev(jacfwd(_diag_problem))(q), expected, atol=1e-8, rtol=0)
    leaf = q.clone().requires_grad_()
    g, = torch.autograd.grad(_diag_problem(leaf), leaf, create_graph=True)
    rows = torch.stack([torch.autograd.grad(g[i], leaf, retain_graph=True)[0] for i in range(2)])
    torch.testing.assert_close(rows, expected, atol=1e-8, rtol=0)
    with torch.autograd.forward_ad.dual_level():  # forward AD around a plain (create_graph=False) backward
        dual = torch.autograd.forward_ad.make_dual(q.clone().requires_grad_(), torch.tensor([0.0, 1.0]))
        g, = torch.autograd.grad(_diag_problem(dual), dual)
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(g).tangent, expected[1], atol=1e-8, rtol=0)


@pytest.mark.parametrize("wrt", NAMES)
def test_second_derivatives_match_finite_differences_of_the_gradient(wrt):
    data = random_qp((2,), 4, 4, 1, active=True)

    def f(x):
        args = dict(data, **{wrt: x})
        if wrt == "Q":
            args["Q"] = 0.5 * (x + x.mT)
        sol = solve_qp(**args, tol=1e-13)
        return sol.z.square().sum() + (sol.lam * sol.z[..., :1]).sum() + sol.nu.sin().sum() + sol.s.square().sum()

    x = data[wrt]
    direction = torch.randn_like(x)
    want = _central(grad(f), x, direction)
    hvp_fwd = jacfwd(grad(f))(x).reshape(x.numel(), x.numel()) @ direction.reshape(-1)
    hvp_rev = jacrev(grad(f))(x).reshape(x.numel(), x.numel()) @ direction.reshape(-1)
    scale = want.abs().max()
    torch.testing.assert_close(hvp_fwd.reshape(x.shape) / scale, want / scale, atol=1e-6, rtol=0)
    torch.testing.assert_close(hvp_rev.reshape(x.shape) / scale, want / scale, atol=1e-6, rtol=0)


def test_gradgradcheck_all_inputs():
    data = random_qp((), 3, 2, 1, active=True)
    leaves = [data[k].clone().requires_grad_() for k in NAMES]

    def f(M, p, G, h, A, b):
        sol = solve_qp(0.5 * (M + M.mT), p, G, h, A, b, tol=1e-13)
        return sol.z, sol.lam, sol.nu

    assert torch.autograd.gradgradcheck(f, leaves, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


def test_third_derivative_matches_finite_differences_of_the_hessian():
    q = torch.tensor([1.0, 2.0])
    third = jacrev(hessian(_diag_problem))(q)
    torch.testing.assert_close(third[1, 1, 1], -24.0 / q[1] ** 5, atol=1e-7, rtol=0)
    direction = torch.tensor([0.3, -0.7])
    want = _central(hessian(_diag_problem), q, direction)
    torch.testing.assert_close(third @ direction, want, atol=1e-6, rtol=0)


def test_second_derivatives_of_a_batch_with_a_failed_element_stay_finite_and_exact():
    data = random_qp((3,), 3, 2, 0, active=True)
    G, h = data["G"].clone(), data["h"].clone()
    G[1] = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
    h[1] = torch.tensor([-1.0, -1.0])  # z₁ ≤ −1 and z₁ ≥ 1: infeasible

    def f(p):
        sol = solve_qp(data["Q"], p, G, h, on_failure="ignore", tol=1e-13)
        return torch.nan_to_num(sol.z).square().sum()

    H = hessian(f)(data["p"])
    assert torch.isfinite(H).all()
    assert H[1].abs().max() == 0 and H[:, :, 1].abs().max() == 0
    direction = torch.zeros_like(data["p"])
    direction[2] = torch.randn(3)
    want = _central(grad(f), data["p"], direction)
    torch.testing.assert_close(torch.einsum("ijkl,kl->ij", H, direction), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("transform", [lambda f: jacfwd(jacfwd(f)), lambda f: jacfwd(hessian(f)),
                                       lambda f: lambda q: torch.func.jvp(lambda q: torch.func.jvp(f, (q,), (q,))[1], (q,), (q,))[1]])
def test_forward_over_forward_is_refused(transform):
    with pytest.raises(NotImplementedError, match="forward mode over forward mode"):
        transform(_diag_problem)(torch.tensor([1.0, 2.0]))


def test_optnet_per_sample_parameter_gradients():
    from optlayers import OptNet

    layer = OptNet(3, n_ineq=4, n_eq=1)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = torch.randn(4, 3)

    def loss(params, xi):
        return torch.func.functional_call(layer, params, (xi.unsqueeze(0),)).square().sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(4):
        alone = grad(loss)(params, x[i])
        for name, g in alone.items():
            torch.testing.assert_close(per_sample[name][i], g, atol=1e-9, rtol=1e-7, msg=name)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    total = torch.autograd.grad(sum(loss(leaves, xi) for xi in x), list(leaves.values()))
    for (name, g_sum) in zip(leaves, total):
        torch.testing.assert_close(per_sample[name].sum(0), g_sum, atol=1e-9, rtol=1e-7, msg=name)


@pytest.mark.parametrize("ineq, eq", [(True, False), (False, True), (False, False), (True, True)])
def test_torchs_batched_gradients_give_the_jacobian(ineq, eq):
    """torch.autograd's batched gradients (``jacobian(vectorize=True)``, ``is_grads_batched``,
    ``gradcheck(check_batched_grad=True)``: torch's prototype vmap, with batching rules for some
    operations only) run the backward, whichever blocks are absent (a slice over a whole tensor is an
    alias, which it has no rule for), and give the plain backward's Jacobian."""
    data = _blocks(random_qp((), 3, 4, 2, active=True), ineq, eq)
    present = [k for k in NAMES if data[k] is not None]
    for name in ("p", "Q", "G", "h", "b"):
        if name not in present:
            continue

        def z_of(x, name=name):
            return solve_qp(**{**data, name: x}).z
        vectorized = torch.autograd.functional.jacobian(z_of, data[name], vectorize=True)
        torch.testing.assert_close(vectorized, torch.autograd.functional.jacobian(z_of, data[name]), rtol=0, atol=0)
    p = data["p"].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda p: solve_qp(**{**data, "p": p}).z, (p,), check_batched_grad=True)
