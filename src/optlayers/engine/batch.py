"""Select, write back and join batch elements of the solver's dataclasses of (B, ...) tensors, and join
the outputs of batch chunks as they come (``ChunkJoin``, ``map_chunks_joined``)."""
from __future__ import annotations

import threading
from dataclasses import fields, is_dataclass, replace
from typing import Callable, TypeVar

import torch
from torch import Tensor

from optlayers import threads

T = TypeVar("T")
Result = TypeVar("Result")


def _tensor_fields(obj: object) -> list[str]:
    return [f.name for f in fields(obj) if isinstance(getattr(obj, f.name), Tensor)]


def take(obj: T, index: Tensor | slice) -> T:
    """``obj`` restricted to the batch elements ``index`` (indices or a slice) of every tensor field."""
    return replace(obj, **{name: getattr(obj, name)[index] for name in _tensor_fields(obj)})


def put(full: T, index: Tensor, part: T) -> T:
    """``full`` with the batch elements ``index`` of every tensor field replaced by ``part``'s (out of place)."""
    return replace(full, **{name: getattr(full, name).index_copy(0, index, getattr(part, name)) for name in _tensor_fields(full)})


def concat(parts: list[T]) -> T:
    """Join dataclasses of consecutive batch slices (nested ones too; other fields from the first)."""
    first = parts[0]
    joined = {}
    for f in fields(first):
        values = [getattr(p, f.name) for p in parts]
        if isinstance(values[0], Tensor):
            joined[f.name] = torch.cat(values)
        elif is_dataclass(values[0]):
            joined[f.name] = concat(values)
        else:
            joined[f.name] = values[0]
    return replace(first, **joined)


class ChunkJoin:
    """The outputs of consecutive batch chunks joined into whole-batch tensors, each chunk's copied
    into its place as soon as ``place`` is given it, by the thread that computed it, while they are
    still in that core's cache. (A ``torch.cat`` after the last chunk reads every chunk's outputs
    back from memory, on one thread: at batch 128, n = 100 on two cores, 14 ms of a 250 ms forward
    and backward, for its eight (B, n, n) outputs.) The copies are made one chunk at a time (a lock): they are
    short beside a chunk's solve.

    Every chunk gives the same number of outputs, each a tensor (B_chunk, ...) or None (None in
    every chunk). Outputs that are the same data (storage, offset, shape, strides) in the first
    chunk are one whole-batch tensor, copied once, for as long as every chunk's are the same data.
    The outputs at ``ragged`` indices may differ in shape from chunk to chunk: they are kept as
    they are, and ``joined`` hands each back as the list of the chunks' tensors, in batch order,
    for the caller to join."""

    def __init__(self, batch: int, ragged: tuple[int, ...] = ()) -> None:
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        self._batch, self._ragged = batch, frozenset(ragged)
        self._lock = threading.Lock()
        self._full: list[Tensor | None] | None = None
        self._same_as: dict[int, int] = {}  # an output's index -> the earlier index whose whole tensor it shares
        self._kept: dict[int, dict[int, Tensor]] = {index: {} for index in self._ragged}

    def _allocate(self, outs: tuple[Tensor | None, ...]) -> None:
        self._full, first = [], {}
        for index, out in enumerate(outs):
            if out is None or index in self._ragged:
                self._full.append(None)
                continue
            key = _data(out)
            if key is not None and key in first:
                self._same_as[index] = first[key]
                self._full.append(self._full[first[key]])
                continue
            if key is not None:
                first[key] = index
            self._full.append(out.new_empty((self._batch, *out.shape[1:])))

    def place(self, part: slice, outs: tuple[Tensor | None, ...]) -> None:
        """Copy one chunk's outputs (the batch elements ``part``) into their place."""
        with self._lock:
            if self._full is None:
                self._allocate(outs)
            if len(outs) != len(self._full):
                raise RuntimeError(f"ChunkJoin: a chunk gave {len(outs)} outputs where the first gave {len(self._full)}")
            for index, earlier in list(self._same_as.items()):
                if _data(outs[index]) != _data(outs[earlier]):  # no longer the same data: a whole tensor of its own
                    self._full[index] = self._full[earlier].clone()
                    del self._same_as[index]
            for index, (out, whole) in enumerate(zip(outs, self._full)):
                if index in self._ragged:
                    self._kept[index][part.start] = out
                elif whole is not None and index not in self._same_as:
                    if out is None or (out.dim() > 0 and out.shape != whole[part].shape):
                        raise RuntimeError(f"ChunkJoin: output {index} of the chunk {part.start}:{part.stop} has shape "
                                           f"{None if out is None else tuple(out.shape)} where the first chunk's had "
                                           f"{tuple(whole.shape)} for the whole batch (a copy would broadcast it)")
                    whole[part].copy_(out)

    def joined(self) -> tuple[Tensor | list[Tensor] | None, ...]:
        """The whole-batch outputs; at a ``ragged`` index, the chunks' tensors in batch order."""
        if self._full is None:
            raise RuntimeError("ChunkJoin: no chunk was placed")
        return tuple([kept[start] for start in sorted(kept)] if (kept := self._kept.get(index)) is not None else whole
                     for index, whole in enumerate(self._full))


def map_chunks_joined(fn: Callable[[slice], tuple[tuple[Tensor | None, ...], Result]], batch: int, count: int, chunk: int,
                      ragged: tuple[int, ...] = ()) -> tuple[tuple[Tensor | list[Tensor] | None, ...], list[Result]]:
    """``threads.map_chunks`` of ``fn``, which gives a chunk's outputs and one more result: the
    outputs joined as they come (``ChunkJoin``, with its ``ragged`` indices), and the other results
    in batch order."""
    join = ChunkJoin(batch, ragged)

    def placed(part: slice) -> Result:
        outs, result = fn(part)
        join.place(part, outs)
        return result

    results = threads.map_chunks(placed, batch, count, chunk)
    return join.joined(), results


def _data(t: Tensor | None) -> tuple | None:
    """What makes two tensors the same data (None for no tensor or an empty one)."""
    if t is None or t.numel() == 0:
        return None
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype
