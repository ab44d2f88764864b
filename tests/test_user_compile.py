"""A user's ``torch.compile`` around the layers: each public entry is one graph break, called as
it is (not traced into), with the eager answers and gradients; the package's own ``compile=True``
still compiles inside it."""
import pytest
import torch
from torch._dynamo.testing import CompileCounter

from optlayers import ConeLayer, OptNet, OptNetTV, QPFunction, solve_cone, solve_qp
from optlayers.cone.testing import ALL_CONES, random_program
from optlayers.compiling import OPAQUE_REASON
from tests.qp.qp_problems import random_qp

from conftest import _compiling_with, eager_compile

USER_COMPILE = torch.compile  # before a fixture replaces it for the package's own compiled path


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """dynamo keeps what it compiled and its graph-break counters per process: cleared around each test."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _qp_data():
    """Q, G, h of three feasible QPs of 5 variables and 4 inequalities (``random_qp``)."""
    data = random_qp((3,), 5, 4, 0)
    return data["Q"], data["G"], data["h"]


def _user_graph_breaks() -> list[str]:
    return [reason for reason in torch._dynamo.utils.counters["graph_break"] if reason]


def _compare(model, inputs, params):
    """``model`` compiled (counting dynamo's graphs) against eager: value and the gradient of every
    tensor in ``params``; returns the counter."""
    expected = model(*inputs)
    expected_grads = torch.autograd.grad(expected.sum(), params)
    counter = CompileCounter()
    got = USER_COMPILE(model, backend=counter)(*inputs)
    got_grads = torch.autograd.grad(got.sum(), params)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)
    return counter


def _one_opaque_break():
    breaks = _user_graph_breaks()
    assert len(breaks) == 1 and OPAQUE_REASON in breaks[0], breaks


def test_optnet_in_a_compiled_model_is_one_graph_break():
    linear, layer = torch.nn.Linear(4, 6), OptNet(6, 5, 2, dtype=torch.float64)
    linear.double()
    x = torch.randn(3, 4, requires_grad=True)
    counter = _compare(lambda x: layer(linear(x)).tanh(), (x,), [x, linear.weight, *layer.parameters()])
    _one_opaque_break()
    assert counter.frame_count == 2  # the linear layer, then the tanh after the solve: nothing of the solver traced


@pytest.mark.parametrize("entry", ["QPFunction", "solve_qp"])
def test_qp_function_and_solve_qp_in_a_compiled_function(entry):
    Q, G, h = _qp_data()
    p = torch.randn(3, 5, requires_grad=True)
    h.requires_grad_()
    solve = QPFunction() if entry == "QPFunction" else (lambda *args: solve_qp(*args).z)
    counter = _compare(lambda p, h: solve(Q, 2 * p, G, h).square(), (p, h), [p, h])
    _one_opaque_break()
    assert counter.frame_count == 2


def test_optnet_tv_in_a_compiled_model():
    layer = OptNetTV(12, lam=0.5, learn_d=True, init="random", dtype=torch.float64)
    y = torch.randn(2, 12, requires_grad=True)
    _compare(lambda y: layer(y + 1), (y,), [y, *layer.parameters()])
    _one_opaque_break()


@pytest.mark.parametrize("entry", ["ConeLayer", "solve_cone"])
def test_cone_layer_and_solve_cone_in_a_compiled_function(entry):
    A, b, c, _, _, _, _ = random_program(ALL_CONES, 10, batch=2, seed=3)
    c.requires_grad_()
    layer = ConeLayer(ALL_CONES, solver="ipm")
    solve = layer if entry == "ConeLayer" else (lambda A, b, c: solve_cone(A, b, c, ALL_CONES, solver="ipm"))
    _compare(lambda c: solve(A, b, 1.5 * c).x, (c,), [c])
    _one_opaque_break()


@pytest.fixture
def package_compiled_calls(monkeypatch):
    """The package's own ``torch.compile`` (``compile=True``) as conftest's ``eager_backend`` makes it,
    with the calls of what it compiled counted."""
    calls = []

    def compile(fn, **kwargs):
        graph = eager_compile(fn, **kwargs)

        def counted(*args, **kw):
            calls.append(getattr(fn, "__name__", repr(fn)))
            return graph(*args, **kw)
        return counted
    yield from _compiling_with(monkeypatch, compile, calls)


def test_compile_true_still_compiles_inside_a_users_compiled_model(package_compiled_calls):
    Q, G, h = _qp_data()
    p = torch.randn(3, 5, requires_grad=True)
    layer = QPFunction(compile=True)
    _compare(lambda p: layer(Q, p.sin(), G, h), (p,), [p])
    assert package_compiled_calls  # the solve's compiled parts ran, under the user's compile
