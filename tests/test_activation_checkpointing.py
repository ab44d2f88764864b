"""The layers under ``torch.utils.checkpoint`` (activation checkpointing): the backward recomputes the
forward and gives the gradients of a plain backward, in both of torch's modes (the non-reentrant
one lets each saved tensor be unpacked once)."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from optlayers import OptNet, QPFunction, solve_cone, solve_qp
from optlayers.cone.testing import ALL_CONES, random_program
from tests.qp.qp_problems import random_qp


def _qp():
    """(Q, p, G, h, A, b) of three feasible QPs (``random_qp``)."""
    data = random_qp((3,), 5, 4, 2)
    return tuple(data[key] for key in ("Q", "p", "G", "h", "A", "b"))


def _gradients(loss, inputs, reentrant=None):
    """d loss / d inputs, plainly (``reentrant`` None) or with ``loss`` checkpointed in that mode
    (the reentrant mode takes ``backward`` only, not ``autograd.grad``)."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    if reentrant is None:
        return torch.autograd.grad(loss(*inputs), inputs)
    checkpoint(loss, *inputs, use_reentrant=reentrant).backward()
    return tuple(t.grad for t in inputs)


def _assert_same_gradients(loss, inputs):
    plain = _gradients(loss, inputs)
    for reentrant in (False, True):
        for got, want in zip(_gradients(loss, inputs, reentrant), plain):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("equalities", [False, True])
def test_solve_qp_checkpointed(equalities):
    Q, p, G, h, A, b = _qp()
    if equalities:
        _assert_same_gradients(lambda Q, p, h, b: solve_qp(Q, p, G, h, A, b).z.square().sum(), (Q, p, h, b))
    else:
        _assert_same_gradients(lambda Q, p, G: solve_qp(Q, p, G, h).z.square().sum(), (Q, p, G))


def test_compiled_qp_function_checkpointed(eager_backend):
    Q, p, G, h, _, _ = _qp()
    layer = QPFunction(compile=True)
    _assert_same_gradients(lambda p, h: layer(Q, p, G, h).square().sum(), (p, h))


def test_optnet_layer_checkpointed():
    layer = OptNet(5, 4, 2)
    x = torch.randn(3, 5)
    plain = torch.autograd.grad(layer(x).square().sum(), list(layer.parameters()))
    checkpoint(lambda x: layer(x).square().sum(), x, use_reentrant=False).backward()
    for param, want in zip(layer.parameters(), plain):
        torch.testing.assert_close(param.grad, want, rtol=1e-12, atol=1e-12)


def test_solve_cone_checkpointed():
    A, b, c, _, _, _, _ = random_program(ALL_CONES, 10, batch=2, seed=3)
    _assert_same_gradients(lambda b, c: solve_cone(A, b, c, ALL_CONES, solver="ipm").x.square().sum(), (b, c))


def test_second_derivatives_through_a_checkpoint():
    Q, p, G, h, _, _ = _qp()
    loss = lambda p: solve_qp(Q, p, G, h).z.square().sum()  # noqa: E731

    def hessian_row_sums(checkpointed):
        q = p.clone().requires_grad_()
        out = checkpoint(loss, q, use_reentrant=False) if checkpointed else loss(q)
        g, = torch.autograd.grad(out, q, create_graph=True)
        return torch.autograd.grad(g.sum(), q)[0]
    torch.testing.assert_close(hessian_row_sums(True), hessian_row_sums(False), rtol=1e-12, atol=1e-12)


def test_a_solve_under_allow_mutation_on_saved_tensors():
    """torch's context for editing saved tensors in place runs a dispatch mode that sees every
    operation; the eager loop's inference tensors failed under it ("Inference tensors do not track
    version counter"), so the loop leaves inference mode off where a dispatch mode is active."""
    Q, p, G, h, _, _ = _qp()
    plain = _gradients(lambda p: solve_qp(Q, p, G, h).z.square().sum(), (p,))
    q = p.clone().requires_grad_()
    with torch.autograd.graph.allow_mutation_on_saved_tensors():
        z = solve_qp(Q, q, G, h).z
        z.square().sum().backward()
        z.relu_()  # allowed by the context
    torch.testing.assert_close(q.grad, plain[0], rtol=1e-12, atol=1e-12)
