"""Constant tensors of the interior point iterations, made once per value, device and dtype: a
Python number where an operation expects a tensor (``torch.where``, ``torch.fmin``, a stacked
row) would make a tensor on every call, which on an accelerator is a launch."""
from __future__ import annotations

import contextlib
import functools
import struct
import threading
from typing import Callable, Iterator, TypeVar

import torch
from torch import Tensor


def _key(value: float | tuple) -> bytes:
    """``value`` as a cache key that tells what ``==`` does not: 0.0 from −0.0 (−1/cap of an
    unbounded cap is −0.0) and a NaN from itself being unequal: the bytes of its float64 values,
    after one byte that tells a number (0-d) from a tuple (1-d). One call, however long the tuple:
    the QP step's stacked comparison asks for a hundred values at every iteration."""
    if isinstance(value, tuple):
        return b"t" + struct.pack(f"{len(value)}d", *value)
    return b"n" + struct.pack("d", value)


F = TypeVar("F", bound=Callable)


class _Made:
    """One ``made_once`` function's results, by their arguments."""

    def __init__(self, make: Callable) -> None:
        self.make, self.results = make, {}

    def __call__(self, *args: object) -> object:
        try:
            return self.results[args]
        except KeyError:
            pass
        with torch.inference_mode(False):
            made = self.make(*args)
        unkept = _UNKEPT.made
        if unkept is not None:  # this thread is capturing a CUDA graph (``made_unkept``)
            unkept.append(args)
            return made
        return self.results.setdefault(args, made)  # a thread that made it first wins

    def cache_clear(self) -> None:
        self.results.clear()


class _Unkept(threading.local):
    def __init__(self) -> None:
        self.made: list | None = None  # a list while this thread's results are not kept (``made_unkept``)


_UNKEPT = _Unkept()


@contextlib.contextmanager
def made_unkept() -> Iterator[list]:
    """Within: what the calling thread's ``made_once`` functions make afresh is returned but not
    kept, and its arguments are appended to the list yielded. For a CUDA graph's capture
    (``engine.graphed``), which must make none: a tensor first made while a graph is captured
    holds its values only in the graph's replays. Other threads' results are kept as usual
    meanwhile, and do not count."""
    previous = _UNKEPT.made
    _UNKEPT.made = made = []
    try:
        yield made
    finally:
        _UNKEPT.made = previous


def made_once(make: F) -> F:
    """``make`` (a function of hashable arguments returning tensors: sizes, device, dtype) called
    once per arguments and its result kept, made as normal tensors even when first asked for under
    ``torch.inference_mode`` (an inference tensor kept would fail every later use that records
    gradients). Under compilation ``make`` is traced into the graph (where inductor folds it), as
    ``constant`` does: tensors kept outside would enter a compiled loop's body as inputs. ``kept``
    is the cache itself, for a caller that has already checked that it is not being compiled."""
    cached = _Made(make)

    @functools.wraps(make)
    def once(*args: object) -> object:
        if torch.compiler.is_compiling():  # not through the cache, which dynamo would trace through with a warning
            return make(*args)
        return cached(*args)
    once.cache_clear, once.kept = cached.cache_clear, cached
    return once  # type: ignore[return-value]


@made_once
def _cached(key: bytes, device: torch.device, dtype: torch.dtype) -> Tensor:
    values = struct.unpack(f"{(len(key) - 1) // 8}d", key[1:])
    return torch.tensor(values if key[:1] == b"t" else values[0], dtype=dtype, device=device)


@made_once
def identity(size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The (size, size) identity, made once per size, device and dtype."""
    return torch.eye(size, dtype=dtype, device=device)


def constant(value: float | tuple[float, ...], like: Tensor) -> Tensor:
    """``value`` (a number: 0-d; a tuple: 1-d) as a tensor on ``like``'s device and of its dtype,
    made once; under compilation it is made in the graph (where inductor folds it)."""
    if not isinstance(like, Tensor):
        raise TypeError(f"constant: like must be a Tensor, got {type(like).__name__}")
    if torch.compiler.is_compiling():
        return torch.tensor(value, dtype=like.dtype, device=like.device)
    return _cached.kept(_key(value), like.device, like.dtype)
