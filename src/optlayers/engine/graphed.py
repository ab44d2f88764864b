"""The compiled interior point step on CUDA, replayed from a CUDA graph: one launch per iteration.

A step ``fn(data, units, state, res) -> (state, res)`` (each a dataclass of tensors) is captured
once per layout (every tensor's shape, dtype and device, every other field's value, and a key such
as the solver's settings) into a ``torch.cuda.CUDAGraph`` that reads static input buffers and, at
its end, copies the new state and residuals into the buffers it read them from. A call copies in
only the tensors that are not already those buffers (a solve's data once, a state the host's look
replaced), replays the graph, and returns the state and residuals as views of the buffers: the next
replay overwrites them, so that whoever keeps them past the loop copies them out
(``compiling.owned``, as ``qp.ipm.iterate`` does).

Each thread keeps its own graphs (two threads solving problems of one layout would otherwise share
buffers), at most ``MAX_GRAPHS`` of them. A step that cannot be captured (an operation that
synchronises with the host, or an output whose layout differs from its input's) runs uncaptured
for that layout, with a warning.
"""
from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Hashable

import torch
from torch import Tensor

from optlayers.engine.constants import forget_made, made_count

MAX_GRAPHS = 16
"""Captured layouts kept per thread (the oldest is dropped past this); each holds its buffers and
the graph's memory pool."""

WARM_UP_CALLS = 2
"""Uncaptured calls on a side stream before a capture (compilation, library handles, workspaces
and the step's cached constants are made there, as torch's CUDA-graph guide asks)."""


EAGER_GRAPHS = False
"""Whether the eager step (``compile=False``) on CUDA is replayed from a CUDA graph too: it makes
no host synchronisation, so it can be captured, and one replay would replace its ~220 launches per
iteration (the eager forward is host-bound on a GPU: 70-125 ms at every size on an H200). Off
until ``benchmarks/cuda_variants.py`` has measured it on a GPU."""


def replays_graphs(device: torch.device, compiled: bool) -> bool:
    """Whether the interior point step on ``device`` runs as a ``GraphedStep``: on CUDA, compiled
    (or eager, with ``EAGER_GRAPHS``)."""
    return device.type == "cuda" and (compiled or EAGER_GRAPHS)


def _layout(obj: Any) -> tuple[list[Tensor], tuple]:
    """The tensors of the dataclass ``obj``, and its layout: its class, each tensor's shape, dtype
    and device and each other field's value."""
    tensors, layout = [], [type(obj)]
    for f in fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, Tensor):
            tensors.append(value)
            layout.append((f.name, tuple(value.shape), value.dtype, value.device))
        else:
            layout.append((f.name, value))
    return tensors, tuple(layout)


def _rebuilt(obj: Any, tensors: list[Tensor]) -> Any:
    """``obj`` with its tensors, in field order, replaced by ``tensors``."""
    names = [f.name for f in fields(obj) if isinstance(getattr(obj, f.name), Tensor)]
    return replace(obj, **dict(zip(names, tensors)))


@dataclass
class _Captured:
    graph: Any  # a torch.cuda.CUDAGraph (``capture``); None: the layout could not be captured
    buffers: list[list[Tensor]]  # per argument, its static tensors
    outputs: tuple[Any, Any]  # the state and residuals built on their buffers


class _Graphs(threading.local):
    def __init__(self) -> None:
        self.captured: OrderedDict[Hashable, _Captured] = OrderedDict()


_GRAPHS = _Graphs()


class GraphedStep:
    """``fn`` (a step of ``(data, units, state, res)``) replayed from a CUDA graph per layout; ``key``
    (hashable) names what else ``fn`` depends on. Made per solve: it copies the solve's data into
    the graph's buffers at its first call."""

    def __init__(self, fn: Callable[[Any, Any, Any, Any], tuple[Any, Any]], key: Hashable) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn, self.key = fn, key

    def __call__(self, data: Any, units: Any, st: Any, res: Any) -> tuple[Any, Any]:
        args = (data, units, st, res)
        parts = [_layout(arg) for arg in args]
        key = (self.key, *(layout for _, layout in parts))
        entry = _GRAPHS.captured.get(key)
        if entry is None:
            entry = self._capture(args, parts)  # compiles fn where it is new
            _GRAPHS.captured[key] = entry
            while len(_GRAPHS.captured) > MAX_GRAPHS:
                _GRAPHS.captured.popitem(last=False)
        else:
            _GRAPHS.captured.move_to_end(key)
        if entry.graph is None:
            return self.fn(*args)
        for (tensors, _), buffers in zip(parts, entry.buffers):
            for tensor, buffer in zip(tensors, buffers):
                if tensor is not buffer:
                    buffer.copy_(tensor)
        entry.graph.replay()
        return entry.outputs

    def _capture(self, args: tuple, parts: list[tuple[list[Tensor], tuple]]) -> _Captured:
        buffers = [[t.clone() for t in tensors] for tensors, _ in parts]
        static = [_rebuilt(arg, b) for arg, b in zip(args, buffers)]

        def warm() -> None:  # the next call's state and residuals must fit their buffers
            for arg, new in zip(static[2:], self.fn(*static)):
                if _layout(new)[1] != _layout(arg)[1]:
                    raise ValueError(f"the step's output layout {_layout(new)[1]} differs from its input's {_layout(arg)[1]}")

        def body() -> None:  # one step, its state and residuals written back into the buffers they were read from
            for new, targets in zip(self.fn(*static), buffers[2:]):
                for tensor, target in zip(_layout(new)[0], targets):
                    target.copy_(tensor)

        try:
            warm_up(warm)
            made = made_count()
            graph = capture(body)
            if made_count() != made:  # such a tensor holds its values only in the graph's replays: made again
                forget_made()
                raise RuntimeError("the step made a cached constant tensor while it was captured")
        except Exception as error:  # noqa: BLE001 — any failure to capture leaves the step uncaptured, with a warning
            warnings.warn(f"optlayers on CUDA: the interior point step could not be captured in a CUDA graph "
                          f"({type(error).__name__}: {error}); it runs uncaptured, one launch per kernel",
                          RuntimeWarning, stacklevel=3)
            graph = None
        return _Captured(graph, buffers, (static[2], static[3]))


def warm_up(warm: Callable[[], None]) -> None:
    """``WARM_UP_CALLS`` calls of ``warm`` on a side stream, before a capture (torch's CUDA graphs
    guide: the library handles, workspaces and compiled code are made there)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARM_UP_CALLS):
            warm()
    torch.cuda.current_stream().wait_stream(side)


def capture(body: Callable[[], None]) -> Any:
    """``body`` captured in a ``torch.cuda.CUDAGraph`` (returned; its ``replay()`` runs it)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph
