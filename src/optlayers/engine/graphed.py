"""The interior point step on CUDA (compiled, or eager with ``EAGER_GRAPHS``), replayed from a CUDA
graph: one launch per iteration; and, with ``GRAPHED_CALLS``, the solve's other parts.

``GraphedStep``: a step ``fn(data, units, state, res) -> (state, res)`` (each a dataclass of
tensors) is captured once per layout (every tensor's shape, dtype and device, every other field's
value, and a key such as the solver's settings) into a ``torch.cuda.CUDAGraph`` that reads static
input buffers and, at its end, copies the new state and residuals into the buffers it read them
from. A call copies in only the tensors that are not already those buffers (a solve's data once,
a state the host's look replaced), replays the graph, and returns the state and residuals as
views of the buffers: the next replay overwrites them, so that whoever keeps them past the loop
copies them out (``compiling.owned``, as ``qp.ipm.iterate`` does).

``GraphedCall``: a function without host synchronisation of nested arguments, captured per layout
likewise; a call copies every argument in and the outputs out (they are the caller's).

Each thread keeps its own graphs (two threads solving problems of one layout would otherwise share
buffers), and each stream its own (a replay on one stream would otherwise overwrite buffers that a
replay on another is still reading), at most ``MAX_GRAPHS`` per thread (``clear()`` drops every
thread's, the autograd engine's device threads', which run the backward, included); captures are made one at a time
in the process (torch allows no more), each on a stream of its own on the data's device, the
caller's stream restored after it, other threads' CUDA calls allowed meanwhile. A step or call
that cannot be captured (an operation that synchronises with the host, an output whose layout
differs from its input's, an empty graph, a cached constant made during the capture) runs
uncaptured for that layout, with a warning.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Callable, Hashable, Iterator

import torch
from torch import Tensor

from optlayers.engine import kkt
from optlayers.engine.constants import made_unkept

MAX_GRAPHS = 64
"""Captured graphs kept per thread (the least recently used is dropped past this), steps' and
calls' together: a problem layout takes one for its step and, with ``GRAPHED_CALLS``, three more
(equilibration, start, derivatives' factorisation) in the thread that solves, and one for the
backward in the thread autograd runs it on (one per device), so 64 keep about 16 layouts in turn
(a training loop's few batch shapes) without capturing again. Each holds copies of its inputs and
the graph's memory pool; ``clear()`` drops them."""

WARM_UP_CALLS = 2
"""Uncaptured calls on a side stream before a capture (compilation, library handles, workspaces
and the step's cached constants are made there, as torch's CUDA-graph guide asks)."""


EAGER_GRAPHS = True
"""Whether the eager step (``compile=False``) on CUDA is replayed from a CUDA graph too: it makes
no host synchronisation, so it can be captured, and one replay replaces its ~220 launches per
iteration. On an H200 (``benchmarks/cuda_variants.py``, float64, forward + backward, 2026-12-04,
420e505) it took the eager solve from 111.4 to 36.6 ms at batch 128, n = 100 and from 78.9 to
15.2 ms at batch 1, n = 10, with the same iterations and solutions (to 4e-10; to the bit at
batch 1). False launches the eager step operation by operation."""


GRAPHED_CALLS = False
"""Whether, where the step is replayed from a CUDA graph (``replays_graphs``), the solve's other
host-synchronisation-free parts are too (``GraphedCall``: the equilibration, the start, the
derivatives' factorisation): outside the iterations an eager solve at batch 1, n = 10 runs about
420 operations (``benchmarks/kernels.py --phases``), each a launch, where the H200 took ~24 µs per
eager launch. Off until ``benchmarks/cuda_variants.py`` has measured it on a GPU."""


def replays_graphs(device: torch.device, compiled: bool) -> bool:
    """Whether the interior point step on ``device`` runs as a ``GraphedStep``: on CUDA, compiled
    (or eager, with ``EAGER_GRAPHS``)."""
    return device.type == "cuda" and (compiled or EAGER_GRAPHS)


def linalg_key() -> tuple:
    """What a captured step's or call's linear algebra reads where it is captured, beyond its
    arguments: the inversion limit on CUDA (``kkt.CUDA_INVERTED_MAX_N``) and torch's CUDA linear
    algebra library. Part of every graph's key."""
    return (kkt.CUDA_INVERTED_MAX_N, torch.backends.cuda.preferred_linalg_library())


def graphs_calls(device: torch.device, compiled: bool) -> bool:
    """Whether the solve's parts outside the iterations run as ``GraphedCall``s on ``device``."""
    return GRAPHED_CALLS and replays_graphs(device, compiled)


def _layout(obj: Any) -> tuple[list[Tensor], Hashable]:
    """The tensors of ``obj`` and its layout (``_flatten``)."""
    tensors: list[Tensor] = []
    return tensors, _flatten(obj, tensors)


def _value_key(value: Any) -> Hashable:
    """A non-tensor value as part of a layout: with its type (1, 1.0 and True are equal keys), a
    float by its bits (0.0 == -0.0)."""
    return (type(value), value.hex() if isinstance(value, float) else value)


@dataclass
class _Captured:
    graph: Any  # a torch.cuda.CUDAGraph (``capture``); None: the layout could not be captured
    buffers: list[list[Tensor]]  # per argument, its static tensors
    outputs: tuple[Any, Any]  # the state and residuals built on their buffers
    sources: list[list[tuple[weakref.ref, int] | None]]  # per buffer: the tensor it holds a copy of, and its version
    replayed_by: object = None  # the token of the GraphedStep that replayed it last (not the step: no reference cycle)
    transient: bool = False  # uncaptured for a reason that may pass (out of memory): not cached, tried again next call


class _Cache(OrderedDict):
    """One thread's graphs by key (an ``OrderedDict`` that a weak reference can name)."""


_EVERY_THREADS: dict[int, weakref.ref] = {}
"""Each thread's ``_Cache`` (weakly: a thread's goes with it), for ``clear()``."""
_EVERY_THREADS_LOCK = threading.Lock()


class _Graphs(threading.local):
    def __init__(self) -> None:
        self.captured: _Cache = _Cache()
        with _EVERY_THREADS_LOCK:
            _EVERY_THREADS[id(self.captured)] = weakref.ref(self.captured)


_GRAPHS = _Graphs()
_CAPTURING = threading.Lock()


def clear() -> None:
    """Drops every thread's captured graphs, their buffers and memory pools (torch's caching
    allocator keeps the freed memory until ``torch.cuda.empty_cache()``): the calling thread's,
    and those of the threads autograd runs backward passes on. A solve that is running goes on
    with the graphs it holds."""
    with _EVERY_THREADS_LOCK:
        caches = [ref() for ref in _EVERY_THREADS.values()]
        for key in [key for key, ref in _EVERY_THREADS.items() if ref() is None]:
            del _EVERY_THREADS[key]
    for cache in caches:
        if cache is not None:
            cache.clear()


def _stream_key(tensors: list[Tensor]) -> Hashable:
    """The CUDA stream that the calling thread runs on, on the device of ``tensors`` (the first
    one's), as part of a graph's key; None off CUDA."""
    device = tensors[0].device if tensors else None
    if device is None or device.type != "cuda":
        return None
    return torch.cuda.current_stream(device).cuda_stream


def _cached(key: Hashable, capture: Callable[[], Any]) -> Any:
    """The calling thread's graph for ``key``, made by ``capture()`` where it has none (the least
    recently used one dropped past ``MAX_GRAPHS``); one that failed for a reason that may pass
    (``_Captured.transient``: out of memory) is not kept, and the next call tries again."""
    entry = _GRAPHS.captured.get(key)
    if entry is None:
        entry = capture()
        if entry.transient:
            return entry
        _GRAPHS.captured[key] = entry
        while len(_GRAPHS.captured) > MAX_GRAPHS:
            _GRAPHS.captured.popitem(last=False)
    else:
        _GRAPHS.captured.move_to_end(key)
    return entry


def _version(t: Tensor) -> int | None:
    """``t``'s version counter (bumped by every in-place change); None for an inference tensor, which has none."""
    try:
        return t._version
    except RuntimeError:
        return None


class GraphedStep:
    """``fn`` (a step of ``(data, units, state, res)``) replayed from a CUDA graph per layout; ``key``
    (hashable) names what else ``fn`` depends on. Made per solve: it copies the solve's data into
    the graph's buffers at its first call. A call with the data and units of the last one and the
    state and residuals it returned (the loop's next step), its data unchanged (their version
    counters), only replays."""

    def __init__(self, fn: Callable[[Any, Any, Any, Any], tuple[Any, Any]], key: Hashable) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn, self.key = fn, key
        self._token = object()  # what a graph it replayed names it by (``_Captured.replayed_by``)
        self._last: tuple[Any, Any, _Captured, list] | None = None  # the last call's data, units, graph, data versions

    def __call__(self, data: Any, units: Any, st: Any, res: Any) -> tuple[Any, Any]:
        last = self._last
        if (last is not None and last[0] is data and last[1] is units and last[2].outputs[0] is st and last[2].outputs[1] is res
                and last[2].replayed_by is self._token and all(t._version == version for t, version in last[3])):
            last[2].graph.replay()  # the next step of the loop: its inputs are the buffers already
            return st, res
        args = (data, units, st, res)
        parts = [_layout(arg) for arg in args]
        key = (self.key, _stream_key(parts[0][0] or parts[2][0]), *(layout for _, layout in parts))
        entry = _cached(key, lambda: self._capture(args, parts))  # compiles fn where it is new
        if entry.graph is None:
            return self.fn(*args)
        if (last is not None and last[2] is entry and entry.replayed_by is not self._token
                and any(t is b for (tensors, _), buffers in zip(parts[2:], entry.buffers[2:]) for t, b in zip(tensors, buffers))):
            raise RuntimeError("GraphedStep: the state passed is the buffers of this step's graph, which another step of "
                               "the same layout has replayed since: they hold that step's state now. Copy a state out "
                               "(compiling.owned) before another solve of the same layout runs in this thread.")
        for (tensors, _), buffers, sources in zip(parts, entry.buffers, entry.sources):
            for i, (tensor, buffer) in enumerate(zip(tensors, buffers)):
                if tensor is buffer:
                    continue
                version, last = _version(tensor), sources[i]
                if last is not None and version is not None and last[0]() is tensor and last[1] == version:
                    continue  # a solve's data: copied at its first step
                buffer.copy_(tensor)
                sources[i] = None if version is None else (weakref.ref(tensor), version)
        entry.graph.replay()
        for sources in entry.sources[2:]:  # the state and residuals' buffers now hold the new ones
            sources[:] = [None] * len(sources)
        versioned = [(t, v) for tensors, _ in parts[:2] for t in tensors if (v := _version(t)) is not None]
        entry.replayed_by = self._token  # another step replaying these buffers in between (same key, same thread) takes this off the fast path
        self._last = (data, units, entry, versioned)  # (an inference tensor has no version: nothing changes it in a loop)
        return entry.outputs

    def _capture(self, args: tuple, parts: list[tuple[list[Tensor], tuple]]) -> _Captured:
        device = next(t.device for tensors, _ in parts for t in tensors)
        with torch.inference_mode(False):  # kept for later calls, which may record gradients
            buffers = [[t.clone() for t in tensors] for tensors, _ in parts]
        sources: list[list] = [[None] * len(b) for b in buffers]
        static: list = []
        fn = self.fn  # not the step: what the graph keeps must not keep the solve's step (and its data) alive

        def warm() -> None:  # the next call's state and residuals must fit their buffers
            outputs = fn(*static)
            written = {b.untyped_storage().data_ptr(): (i, j) for i, targets in enumerate(buffers[2:])
                       for j, b in enumerate(targets) if b.numel()}
            for i, (arg, new) in enumerate(zip(static[2:], outputs)):
                (tensors, layout), expected = _layout(new), _layout(arg)[1]
                if layout != expected:
                    raise ValueError(f"the step's output layout {layout} differs from its input's {expected}")
                for j, tensor in enumerate(tensors):  # the body writes all buffers back at once
                    owner = written.get(tensor.untyped_storage().data_ptr()) if tensor.numel() else None
                    if owner not in (None, (i, j)):
                        raise ValueError("an output of the step views the buffer of another field, which the "
                                         "graph writes before it reads the output")

        def body() -> None:  # one step, its state and residuals written back into the buffers they were read from
            news = [tensor for new in fn(*static) for tensor in _layout(new)[0]]
            copy_all([target for targets in buffers[2:] for target in targets], news)

        try:
            static.extend(_unflatten(arg, iter(b)) for arg, b in zip(args, buffers))
            graph = _warmed_capture(warm, body, device)
        except Exception as error:  # noqa: BLE001 — any failure to capture leaves the step uncaptured, with a warning
            warnings.warn(f"optlayers on CUDA: the interior point step could not be captured in a CUDA graph "
                          f"({type(error).__name__}: {error}); it runs uncaptured, one launch per kernel",
                          RuntimeWarning, stacklevel=3)
            # nothing kept for a layout that runs uncaptured; out of memory may pass: tried again next call
            return _Captured(None, [], (None, None), [], transient=isinstance(error, torch.OutOfMemoryError))
        return _Captured(graph, buffers, (static[2], static[3]), sources)


def copy_all(targets: list[Tensor], sources: list[Tensor]) -> None:
    """``target.copy_(source)`` for each pair, one ``torch._foreach_copy_`` per dtype (its fused
    kernel takes lists of one dtype only, and falls back to one copy per tensor otherwise)."""
    groups: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
    for target, source in zip(targets, sources, strict=True):
        group = groups.setdefault(target.dtype, ([], []))
        group[0].append(target)
        group[1].append(source)
    for group_targets, group_sources in groups.values():
        torch._foreach_copy_(group_targets, group_sources)


def _warmed_capture(warm: Callable[[], None], body: Callable[[], None], device: torch.device) -> Any:
    """``warm_up(warm)``, then ``capture(body)``, one capture at a time in the process. A cached
    constant that the capturing thread first makes during the capture would hold its values only
    in the graph's replays: it is not kept (``constants.made_unkept``), and the capture is refused.
    Other threads' constants, made meanwhile, are theirs."""
    with _CAPTURING:
        warm_up(warm, device)
        with made_unkept() as made:
            graph = capture(body, device)
        if made:
            raise RuntimeError("the code captured made a cached constant tensor while it was captured")
        return graph


def warm_up(warm: Callable[[], None], device: torch.device) -> None:
    """``WARM_UP_CALLS`` calls of ``warm`` on a side stream of ``device``, before a capture (torch's
    CUDA graphs guide: the library handles, workspaces and compiled code are made there)."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARM_UP_CALLS):
                warm()
        torch.cuda.current_stream(device).wait_stream(side)


def capture(body: Callable[[], None], device: torch.device) -> Any:
    """``body`` captured in a ``torch.cuda.CUDAGraph`` (returned; its ``replay()`` runs it) on a
    stream of its own on ``device``; the caller's stream is restored also where the capture fails
    (torch leaves it on the capture stream then). An empty graph (work that ran on another device
    than the capture's: torch's warning ``_EMPTY_GRAPH``) is a failure. The warnings caught meanwhile
    (``warnings.catch_warnings`` is process-wide: other threads' too) are shown again, but torch's
    about the empty graph."""
    previous = torch.cuda.current_stream(device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.device(device), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # thread_local: CUDA calls of other threads (another solve, autograd's device thread) go on
            # during the capture; only this thread's unsafe calls fail it
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(device), capture_error_mode="thread_local"):
                body()
    finally:
        torch.cuda.set_stream(previous)
    empty = [str(w.message) for w in caught if _EMPTY_GRAPH in str(w.message)]
    for w in caught:
        if _EMPTY_GRAPH not in str(w.message):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    if empty:
        raise RuntimeError(f"the captured graph is empty ({empty[0]})")
    return graph


_EMPTY_GRAPH = "CUDA Graph is empty"
"""The start of torch's warning at the end of a capture that recorded no work (``CUDAGraph::capture_end``)."""


def _flatten(obj: Any, tensors: list[Tensor]) -> Hashable:
    """The layout of ``obj`` (tensors, tuples, named tuples, lists, dataclasses and hashable values
    nested), its tensors appended to ``tensors`` in order."""
    if isinstance(obj, Tensor):
        tensors.append(obj)
        return (Tensor, tuple(obj.shape), obj.dtype, obj.device)
    if is_dataclass(obj) and not isinstance(obj, type):
        return (type(obj), tuple((f.name, _flatten(getattr(obj, f.name), tensors)) for f in fields(obj)))
    if isinstance(obj, (tuple, list)):
        return (type(obj), tuple(_flatten(item, tensors) for item in obj))
    hash(obj)  # a value in the layout must be hashable (TypeError where not)
    return ("value", *_value_key(obj))


def _unflatten(obj: Any, tensors: Iterator[Tensor]) -> Any:
    """``obj`` with its tensors, in ``_flatten``'s order, replaced by ``tensors``' next ones."""
    if isinstance(obj, Tensor):
        return next(tensors)
    if is_dataclass(obj) and not isinstance(obj, type):
        return replace(obj, **{f.name: _unflatten(getattr(obj, f.name), tensors) for f in fields(obj)})
    if isinstance(obj, tuple):
        items = [_unflatten(item, tensors) for item in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return [_unflatten(item, tensors) for item in obj]
    return obj


@dataclass
class _CapturedCall:
    graph: Any  # a torch.cuda.CUDAGraph; None: the layout could not be captured
    buffers: list[Tensor]  # the arguments' static tensors
    outputs: Any  # what the captured call returned, on the graph's memory
    output_tensors: list[Tensor]
    transient: bool = False  # as ``_Captured.transient``


_PLAIN_VALUES = (type(None), bool, int, float, str, torch.dtype, torch.device)
"""The non-tensor values a ``GraphedCall``'s outputs may hold (kept from the capture: they may
depend on the layout only)."""


def _plain_values_only(obj: Any) -> bool:
    """Whether every non-tensor value in ``obj`` (``_flatten``'s nesting) is of ``_PLAIN_VALUES``."""
    if isinstance(obj, Tensor):
        return True
    if is_dataclass(obj) and not isinstance(obj, type):
        return all(_plain_values_only(getattr(obj, f.name)) for f in fields(obj))
    if isinstance(obj, (tuple, list)):
        return all(_plain_values_only(item) for item in obj)
    return isinstance(obj, _PLAIN_VALUES)


class GraphedCall:
    """``fn(*args)``, a function that makes no host synchronisation and changes none of its
    arguments, replayed from a CUDA graph per layout of its arguments (tensors, tuples, lists,
    dataclasses and hashable values, nested; the values, with their types, are part of the layout);
    ``key`` (hashable) names ``fn`` and what else it depends on. A call copies its arguments'
    tensors into the graph's static buffers (all of them, every call: a caller's tensor may change
    in ways its version counter does not see, through ``.data``), replays the graph and returns the
    outputs copied out of its memory: they are the caller's to keep. Non-tensor outputs are those
    of the capture, so they must be plain values (``_PLAIN_VALUES``) that depend on the layout
    only. A layout that cannot be captured runs uncaptured, with a warning, as a ``GraphedStep``
    does."""

    def __init__(self, fn: Callable[..., Any], key: Hashable) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn, self.key = fn, key

    def __call__(self, *args: Any) -> Any:
        tensors: list[Tensor] = []
        try:
            layout = _flatten(args, tensors)
        except TypeError:  # an argument that cannot be part of a layout: no graph
            return self.fn(*args)
        if len({t.device for t in tensors}) != 1:  # a graph runs on one device: none (or mixed) here
            return self.fn(*args)
        key = ("call", self.key, _stream_key(tensors), layout)
        entry = _cached(key, lambda: self._capture(args, tensors))
        if entry.graph is None:
            return self.fn(*args)
        copy_all(entry.buffers, tensors)
        entry.graph.replay()
        fresh = [torch.empty_like(t) for t in entry.output_tensors]
        copy_all(fresh, entry.output_tensors)
        return _unflatten(entry.outputs, iter(fresh))

    def _capture(self, args: tuple, tensors: list[Tensor]) -> _CapturedCall:
        device = tensors[0].device
        result: list = []
        try:
            with torch.inference_mode(False):  # kept for later calls, which may record gradients
                buffers = [t.clone() for t in tensors]
            static = _unflatten(args, iter(buffers))

            def body() -> None:  # a capture runs it once; a replay reruns its kernels, into the same outputs
                outputs = self.fn(*static)
                if not result:
                    result.append(outputs)
                    return
                copy_all(_layout(result[0])[0], _layout(outputs)[0])  # run again (a stand-in graph's replay, in tests)

            graph = _warmed_capture(lambda: self.fn(*static), body, device)
            output_tensors = _layout(result[0])[0]
            if not _plain_values_only(result[0]):
                raise TypeError("the call returned a value that is neither a tensor nor a plain value, which a replay would "
                                "return unchanged")
        except Exception as error:  # noqa: BLE001 — any failure to capture leaves the call uncaptured, with a warning
            warnings.warn(f"optlayers on CUDA: {getattr(self.fn, '__name__', 'a call')} could not be captured in a "
                          f"CUDA graph ({type(error).__name__}: {error}); it runs uncaptured, one launch per kernel",
                          RuntimeWarning, stacklevel=3)
            return _CapturedCall(None, [], None, [], transient=isinstance(error, torch.OutOfMemoryError))
        return _CapturedCall(graph, buffers, result[0], output_tensors)
