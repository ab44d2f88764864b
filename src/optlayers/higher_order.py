"""A guard that turns a derivative the QP layer cannot give exactly into an error.

torch.func runs a Function's jvp rule with forward mode switched off, so forward mode over
forward mode (``jacfwd(jacfwd(f))``, nested ``jvp``) would miss the rule's dependence on the
solution and be silently wrong. Passing the rule's result through ``no_forward_over_forward``,
with the tensors it depends on as ``anchors``, makes that derivative raise instead: the outer
forward level differentiates the identity with respect to the anchors, and that is where the
error is raised. A first derivative never reaches it.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from optlayers.functions import applied_as_given


@applied_as_given
class _RefuseForwardOverForward(torch.autograd.Function):
    """(message, value, *anchors) -> value. Reverse mode passes the gradient to ``value`` (the
    rule's own operations carry its dependence on the anchors exactly); forward mode raises
    ``NotImplementedError(message)``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(message: str, value: Tensor, *anchors: Tensor | None) -> Tensor:
        return value.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.message, ctx.anchors = inputs[0], len(inputs) - 2

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return (None, grad, *([None] * ctx.anchors))

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Tensor:
        raise NotImplementedError(ctx.message)


def no_forward_over_forward(message: str, value: Tensor, *anchors: Tensor | None) -> Tensor:
    """``value``; a forward-mode derivative of it with respect to ``anchors`` raises with ``message``.

    The anchors must be tensors the rule received (saved tensors), not ones it computed: inside
    the rule, forward mode is off for every level, so a computed tensor carries no tangent.
    """
    return _RefuseForwardOverForward.apply(message, value, *anchors)
