"""``optlayers.functions.applied_as_given``: a Function's apply without binding its arguments to
forward's signature, with forward's results and derivatives unchanged."""
import inspect

import pytest
import torch

from optlayers.functions import applied_as_given


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(x: torch.Tensor, factor: float, shift: torch.Tensor | None) -> torch.Tensor:
        return x * factor + (0.0 if shift is None else shift)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.factor = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None, grad


@applied_as_given
class _HeldScale(_Scale):
    @staticmethod
    def forward(x: torch.Tensor, factor: float, shift: torch.Tensor | None) -> torch.Tensor:
        return _Scale.forward(x, factor, shift)


def test_apply_takes_the_arguments_as_given_with_the_same_results_and_gradients(monkeypatch):
    x, shift = torch.randn(4, requires_grad=True), torch.randn(4, requires_grad=True)
    want = _Scale.apply(x, 3.0, shift)
    (want_x, want_shift) = torch.autograd.grad(want.sum(), (x, shift))
    binds = []
    real_bind = inspect.Signature.bind
    monkeypatch.setattr(inspect.Signature, "bind", lambda self, *a, **k: binds.append(str(self)) or real_bind(self, *a, **k))
    got = _HeldScale.apply(x, 3.0, shift)
    assert binds == []
    assert torch.equal(got, want)
    for g, w in zip(torch.autograd.grad(got.sum(), (x, shift)), (want_x, want_shift)):
        assert torch.equal(g, w)
    with pytest.raises(TypeError):  # a wrong number of arguments still fails
        _HeldScale.apply(x, 3.0)


def test_under_torch_func_transforms_apply_is_torchs(monkeypatch):
    """Under ``torch.func`` transforms the call goes through torch's ``apply`` (which binds the
    arguments and hands them to the transforms): the same gradients."""
    x, shift = torch.randn(4), torch.randn(4)
    want = torch.func.grad(lambda x: _Scale.apply(x, 3.0, shift).square().sum())(x)
    binds = []
    real_bind = inspect.Signature.bind
    monkeypatch.setattr(inspect.Signature, "bind", lambda self, *a, **k: binds.append(str(self)) or real_bind(self, *a, **k))
    got = torch.func.grad(lambda x: _HeldScale.apply(x, 3.0, shift).square().sum())(x)
    assert binds and torch.equal(got, want)


def test_refuses_what_it_cannot_hold():
    class _Defaults(torch.autograd.Function):
        @staticmethod
        def forward(x, factor=2.0):
            return x * factor

    with pytest.raises(TypeError, match=r"_Defaults.forward must take positional parameters without defaults; factor"):
        applied_as_given(_Defaults)
    with pytest.raises(TypeError, match="function must be a torch.autograd.Function subclass, got 3"):
        applied_as_given(3)
