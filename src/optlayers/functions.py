"""What this package's ``torch.autograd.Function`` classes share: an ``apply`` that does not bind
its arguments to ``forward``'s signature on every call, and a backward that says plainly where
torch's prototype batched gradients cannot run it."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, TypeVar

import torch
from torch._functorch.utils import unwrap_dead_wrappers

F = TypeVar("F", bound=type)


def _apply_as_given(cls: type, *args: Any) -> Any:
    """``Function.apply`` for a ``forward`` whose arguments need no binding: outside ``torch.func``
    transforms torch's own route without the binding (tensors of a finished transform unwrapped,
    then the C++ apply); under them torch's ``apply``, which binds and hands the call to the
    transforms."""
    if torch._C._are_functorch_transforms_active():
        return torch.autograd.Function.apply.__func__(cls, *args)
    return super(torch.autograd.Function, cls).apply(*unwrap_dead_wrappers(args))


def applied_as_given(function: F) -> F:
    """``function`` (a ``torch.autograd.Function`` subclass) with ``apply`` passing its arguments to
    ``forward`` as they are given.

    ``Function.apply`` of a Function with ``setup_context`` binds its arguments to ``forward``'s
    signature on every call, to fill in defaults (``inspect.signature(forward).bind``: about eight
    Python calls per parameter, 80 for ten). A ``forward`` whose parameters have no defaults and
    are passed by position needs no binding, so ``apply`` skips it outside ``torch.func``
    transforms (``_apply_as_given``): it must then be called with positional arguments (a wrong
    number of them fails in ``forward``'s own call)."""
    if not (isinstance(function, type) and issubclass(function, torch.autograd.Function)):
        raise TypeError(f"function must be a torch.autograd.Function subclass, got {function!r}")
    parameters = inspect.signature(function.forward).parameters.values()
    refused = [p.name for p in parameters
               if p.default is not p.empty or p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD)]
    if refused:
        raise TypeError(f"{function.__name__}.forward must take positional parameters without defaults; "
                        f"{', '.join(refused)} are not")
    function.apply = classmethod(_apply_as_given)
    return function


BATCHED_GRADIENTS_REFUSED = (
    "{name}'s derivative rules cannot run under torch.autograd's batched gradients (torch.autograd.grad(..., "
    "is_grads_batched=True), torch.autograd.functional.jacobian or hessian with vectorize=True, "
    "gradcheck(check_batched_grad=True or check_batched_forward_grad=True)): that prototype's batched tensors "
    "take only some operations, and they need others ({error}). Use torch.func.jacrev or jacfwd, or torch.func.vmap "
    "over torch.func.vjp or jvp, which run them batched, or leave vectorize and is_grads_batched False")
"""The error that replaces an internal one raised in a backward under torch's legacy batched
gradients (``refuses_batched_gradients``)."""


def refuses_batched_gradients(name: str) -> Callable[[Callable], Callable]:
    """A decorator for a ``torch.autograd.Function``'s ``backward`` or ``jvp`` (``name``: the layer's name in
    messages): where it fails under torch.autograd's batched gradients (its cotangents are the
    legacy vmap's batched tensors, which have batching rules for some operations only, so that a
    backward runs there or not by the operations its problem takes), the error says so and names
    the ``torch.func`` transforms that run it, instead of the prototype's internal one
    (``BATCHED_GRADIENTS_REFUSED``). Other errors, and every backward that runs, are left as they are."""
    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def run(ctx: Any, *grads: Any) -> Any:
            try:
                return backward(ctx, *grads)
            except RuntimeError as error:
                if not any(isinstance(g, torch.Tensor) and torch._C._functorch.is_legacy_batchedtensor(g) for g in grads):
                    raise
                first = next((line for line in str(error).splitlines() if line.strip()), "")
                raise RuntimeError(BATCHED_GRADIENTS_REFUSED.format(name=name, error=first[:200])) from error
        return run
    return decorate
