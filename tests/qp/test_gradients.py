"""Derivatives of the solution map: finite differences, forward vs reverse mode, batch sums."""
import numpy as np
import pytest
import torch

from optlayers import solve_qp
from qp_problems import random_qp

NAMES = ("Q", "p", "G", "h", "A", "b")


def solution_of():
    """A function of (M, p, G, h[, A, b]) with Q = (M + Mᵀ)/2, returning z, λ (and ν)."""

    def fn(M, p, G, h, A=None, b=None):
        sol = solve_qp(0.5 * (M + M.transpose(-1, -2)), p, G, h, A, b, tol=1e-13)
        return (sol.z, sol.lam, sol.nu) if A is not None else (sol.z, sol.lam)

    return fn


@pytest.mark.parametrize("with_equalities", [True, False])
def test_gradcheck_all_inputs_batched(with_equalities):
    data = random_qp((2,), 3, 4, 1 if with_equalities else 0, active=True)
    inputs = [data[k].clone().requires_grad_() for k in NAMES if data[k] is not None]
    assert torch.autograd.gradcheck(solution_of(), inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_shared_matrices():
    data = random_qp((2,), 3, 4, 1, active=True)
    inputs = [data["Q"][0], data["p"], data["G"][0], None, data["A"][0], data["b"]]
    z0 = torch.randn(3)
    inputs[3] = inputs[2] @ z0 + torch.rand(2, 4) + 0.1
    inputs[5] = inputs[4] @ z0 + torch.zeros(2, 1)
    inputs = [t.clone().requires_grad_() for t in inputs]
    assert torch.autograd.gradcheck(solution_of(), inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_shared_gradient_is_sum_of_per_element_gradients():
    data = random_qp((4,), 6, 8, 2, active=True)
    Q = data["Q"][0].clone().requires_grad_()
    G = data["G"][0].clone().requires_grad_()
    h = (data["G"][0] @ torch.randn(6)) + torch.rand(4, 8)
    weights = torch.randn(4, 6)
    (solve_qp(Q, data["p"], G, h, data["A"], data["b"]).z * weights).sum().backward()
    expected_Q, expected_G = torch.zeros_like(Q), torch.zeros_like(G)
    for i in range(4):
        Qi, Gi = data["Q"][0].clone().requires_grad_(), data["G"][0].clone().requires_grad_()
        (solve_qp(Qi, data["p"][i], Gi, h[i], data["A"][i], data["b"][i]).z * weights[i]).sum().backward()
        expected_Q += Qi.grad
        expected_G += Gi.grad
    np.testing.assert_allclose(Q.grad.numpy(), expected_Q.numpy(), atol=1e-9)
    np.testing.assert_allclose(G.grad.numpy(), expected_G.numpy(), atol=1e-9)


def _tangents(data):
    t = {k: torch.randn_like(v) for k, v in data.items() if v is not None}
    t["Q"] = 0.5 * (t["Q"] + t["Q"].transpose(-1, -2))
    return t


def _solution_vector(**data):
    sol = solve_qp(**data, tol=1e-13)
    return torch.cat([sol.z, sol.lam, sol.nu, sol.s], dim=-1)


def test_jvp_matches_central_finite_differences():
    data = random_qp((3,), 5, 7, 2, active=True)
    tang = _tangents(data)
    keys = list(tang)
    f = lambda *args: _solution_vector(**dict(zip(keys, args)))
    _, jvp = torch.func.jvp(f, tuple(data[k] for k in keys), tuple(tang[k] for k in keys))
    eps = 1e-6
    plus = f(*(data[k] + eps * tang[k] for k in keys))
    minus = f(*(data[k] - eps * tang[k] for k in keys))
    np.testing.assert_allclose(jvp.numpy(), ((plus - minus) / (2 * eps)).numpy(), atol=1e-6, rtol=1e-5)


def test_jvp_and_vjp_are_adjoint():
    data = random_qp((2,), 6, 9, 3, active=True)
    keys = [k for k in NAMES if data[k] is not None]
    tang = _tangents(data)
    f = lambda *args: _solution_vector(**dict(zip(keys, args)))
    primals = tuple(data[k] for k in keys)
    out, jvp = torch.func.jvp(f, primals, tuple(tang[k] for k in keys))
    v = torch.randn_like(out)
    _, vjp_fn = torch.func.vjp(f, *primals)
    cot = vjp_fn(v)
    lhs = float((jvp * v).sum())
    rhs = sum(float((c * tang[k]).sum()) for c, k in zip(cot, keys))
    assert lhs == pytest.approx(rhs, rel=1e-9, abs=1e-9)


def test_jacfwd_and_jacrev_agree():
    data = random_qp((), 4, 5, 1, active=True)
    f = lambda p: solve_qp(data["Q"], p, data["G"], data["h"], data["A"], data["b"], tol=1e-13).z
    np.testing.assert_allclose(torch.func.jacfwd(f)(data["p"]).numpy(), torch.func.jacrev(f)(data["p"]).numpy(), atol=1e-9)


def test_float32_gradients_match_finite_differences():
    data = {k: v.float() for k, v in random_qp((3,), 8, 10, 2, active=True).items()}
    leaves = {k: data[k].clone().requires_grad_() for k in ("p", "h")}
    solve_qp(**{**data, **leaves}).z.square().sum().backward()
    assert all(t.grad.dtype == torch.float32 for t in leaves.values())

    def loss(p, h):  # in float64, at the float32 data
        wide = {k: v.double() for k, v in data.items()}
        return solve_qp(**{**wide, "p": p, "h": h}, tol=1e-13).z.square().sum()

    eps = 1e-6
    for name in ("p", "h"):
        direction = torch.randn(data[name].shape, dtype=torch.float64)
        base = {k: data[k].double() for k in ("p", "h")}
        shifted = [loss(**{**base, name: base[name] + sign * eps * direction}) for sign in (1, -1)]
        fd = float((shifted[0] - shifted[1]) / (2 * eps))
        got = float((leaves[name].grad.double() * direction).sum())
        assert got == pytest.approx(fd, rel=1e-5, abs=1e-6), name


def test_vmap_matches_batched_solve():
    data = random_qp((3,), 5, 6, 1)
    keys = [k for k in NAMES if data[k] is not None]
    vmapped = torch.func.vmap(lambda *a: solve_qp(*a).z)(*(data[k] for k in keys))
    np.testing.assert_allclose(vmapped.numpy(), solve_qp(**data).z.numpy(), atol=1e-12)


@pytest.mark.parametrize("wrt", NAMES)
def test_gradient_of_one_input_from_one_output_matches_finite_differences(wrt):
    """The backward forms only what the inputs that need a gradient use, from the cotangents
    given (the others arrive as None): each input alone, from each output alone."""
    data = random_qp((3,), 5, 7, 2, active=True)
    direction = torch.randn_like(data[wrt])
    if wrt == "Q":
        direction = direction + direction.transpose(-1, -2)
    eps = 1e-6
    for out in ("z", "lam", "nu", "s"):
        weights = torch.randn_like(getattr(solve_qp(**data), out))

        def value(v):
            return (getattr(solve_qp(**{**data, wrt: v}, tol=1e-13), out) * weights).sum()

        leaf = data[wrt].clone().requires_grad_()
        grad, = torch.autograd.grad(value(leaf), leaf)
        fd = (value(data[wrt] + eps * direction) - value(data[wrt] - eps * direction)) / (2 * eps)
        assert float((grad * direction).sum()) == pytest.approx(float(fd), rel=1e-5, abs=1e-7), out
