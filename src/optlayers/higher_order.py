"""Guards that turn a derivative the layers cannot give exactly into an error.

A derivative rule (a Function's ``backward`` or ``jvp``) that is not itself differentiable would
give a silently wrong second derivative. Passing the rule's result through one of these
identities, with the tensors it depends on as ``anchors``, makes the second derivative raise
instead: under double backward, ``torch.func.hessian`` and the like, autograd and torch.func
differentiate the identity with respect to the anchors, and that is where the error is raised.
A first derivative never reaches them (nothing differentiates the rule's result).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _RefuseSecondOrder(torch.autograd.Function):
    """(message, value, *anchors) -> value; backward and jvp raise ``NotImplementedError(message)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(message: str, value: Tensor, *anchors: Tensor | None) -> Tensor:
        return value.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, ...]:
        raise NotImplementedError(ctx.message)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Tensor:
        raise NotImplementedError(ctx.message)


class _RefuseForwardOverForward(_RefuseSecondOrder):
    """As ``_RefuseSecondOrder``, but reverse mode passes the gradient to ``value`` (the rule's own
    operations carry its dependence on the anchors exactly); only forward mode raises."""

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return (None, grad, *([None] * ctx.anchors))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.message, ctx.anchors = inputs[0], len(inputs) - 2


def first_order_only(message: str, value: Tensor, *anchors: Tensor | None) -> Tensor:
    """``value``; any derivative of it with respect to ``anchors`` raises with ``message``."""
    return _RefuseSecondOrder.apply(message, value, *anchors)


def no_forward_over_forward(message: str, value: Tensor, *anchors: Tensor | None) -> Tensor:
    """``value``; a forward-mode derivative of it with respect to ``anchors`` raises with ``message``.

    For jvp rules that are exact under reverse mode: torch.func runs a Function's jvp rule with
    forward mode switched off at its own level, so forward mode over forward mode
    (``jacfwd(jacfwd(f))``, nested ``jvp``) would miss the rule's dependence on the solution.
    The anchors must be tensors the rule received (saved tensors), not ones it computed: inside
    the rule, forward mode is off for every level, so a computed tensor carries no tangent.
    """
    return _RefuseForwardOverForward.apply(message, value, *anchors)
