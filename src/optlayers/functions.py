"""What this package's ``torch.autograd.Function`` classes share: an ``apply`` that does not bind
its arguments to ``forward``'s signature on every call."""
from __future__ import annotations

import inspect
from typing import TypeVar

import torch

F = TypeVar("F", bound=type)

_AS_GIVEN = inspect.Signature([inspect.Parameter("args", inspect.Parameter.VAR_POSITIONAL)])


def applied_as_given(function: F) -> F:
    """``function`` (a ``torch.autograd.Function`` subclass) with ``apply`` passing its arguments to
    ``forward`` as they are given.

    ``Function.apply`` of a Function with ``setup_context`` binds its arguments to ``forward``'s
    signature on every call, to fill in defaults (``inspect.signature(forward).bind``: about eight
    Python calls per parameter, 80 for ten). A ``forward`` whose parameters have no defaults and
    are passed by position needs no binding, so its signature is held as ``(*args)``, which takes
    them as they come: ``apply`` must then be called with positional arguments (a wrong number of
    them fails in ``forward``'s own call)."""
    if not (isinstance(function, type) and issubclass(function, torch.autograd.Function)):
        raise TypeError(f"function must be a torch.autograd.Function subclass, got {function!r}")
    parameters = inspect.signature(function.forward).parameters.values()
    refused = [p.name for p in parameters
               if p.default is not p.empty or p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD)]
    if refused:
        raise TypeError(f"{function.__name__}.forward must take positional parameters without defaults; "
                        f"{', '.join(refused)} are not")
    function.forward.__signature__ = _AS_GIVEN
    return function
