"""Select, write back and join batch elements of the solver's dataclasses of (B, ...) tensors."""
from __future__ import annotations

from dataclasses import fields, is_dataclass, replace
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


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
