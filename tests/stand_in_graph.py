"""A stand-in for a CUDA graph on the CPU, for tests of ``engine.graphed``: ``capture(body, device)``
runs ``body`` as a CUDA graph capture does, recording but computing nothing (every tensor an
operation makes or writes is filled with garbage: NaN, or 0 for integers, True for booleans;
views and the inputs they view are left alone), and returns a graph whose ``replay()`` runs
``body`` for real, as the captured kernels would on the device."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _garble(t: torch.Tensor) -> None:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(0)  # an index made in the body must stay in range: the CPU checks it where a capture does not


class _CapturedComputesNothing(TorchDispatchMode):
    """Every operation's fresh outputs and the arguments it writes, garbled."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        with torch.utils._python_dispatch._disable_current_modes():
            schema = func._schema
            for argument, value in zip(schema.arguments, list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]):
                if argument.alias_info is not None and argument.alias_info.is_write:
                    for t in tree_leaves(value):
                        if isinstance(t, torch.Tensor):
                            _garble(t)
            returns = out if isinstance(out, (tuple, list)) else (out,)
            for ret, value in zip(schema.returns, returns):
                if ret.alias_info is None:  # a fresh tensor (not a view of an input, not an input written in place)
                    for t in tree_leaves(value):
                        if isinstance(t, torch.Tensor):
                            _garble(t)
        return out


class StandInGraph:
    def __init__(self, body: Callable[[], None]) -> None:
        self.body = body

    def replay(self) -> None:
        self.body()


def capture(body: Callable[[], None], device: Any) -> StandInGraph:
    with _CapturedComputesNothing():
        body()
    return StandInGraph(body)


def warm_up(warm: Callable[[], None], device: Any) -> None:
    warm()
