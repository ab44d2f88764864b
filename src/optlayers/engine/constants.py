"""Constant tensors of the interior point iterations, made once per value, device and dtype: a
Python number where an operation expects a tensor (``torch.where``, ``torch.fmin``, a stacked
row) would make a tensor on every call, which on an accelerator is a launch."""
from __future__ import annotations

import functools
import struct
from typing import Callable, TypeVar

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
        return self.results.setdefault(args, made)  # a thread that made it first wins

    def cache_clear(self) -> None:
        self.results.clear()


_CACHES: list[_Made] = []
"""Every ``made_once`` cache (``made_keys``, ``forget_made_since``)."""


def made_keys() -> list[set]:
    """The arguments that each ``made_once`` cache holds results for: a CUDA graph's capture checks
    that it made none (``engine.graphed``: a tensor first made while a graph is captured holds its
    values only in the graph's replays)."""
    return [set(cache.results) for cache in _CACHES]


def forget_made_since(keys: list[set]) -> int:
    """Drops the results made since ``made_keys`` returned ``keys``, and returns how many: the
    results made before stay (graphs captured earlier read them)."""
    dropped = 0
    for cache, before in zip(_CACHES, keys):
        for args in cache.results.keys() - before:  # one C-level pass: safe beside other threads' inserts
            cache.results.pop(args, None)
            dropped += 1
    return dropped


def made_once(make: F) -> F:
    """``make`` (a function of hashable arguments returning tensors: sizes, device, dtype) called
    once per arguments and its result kept, made as normal tensors even when first asked for under
    ``torch.inference_mode`` (an inference tensor kept would fail every later use that records
    gradients). Under compilation ``make`` is traced into the graph (where inductor folds it), as
    ``constant`` does: tensors kept outside would enter a compiled loop's body as inputs. ``kept``
    is the cache itself, for a caller that has already checked that it is not being compiled."""
    cached = _Made(make)
    _CACHES.append(cached)

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
