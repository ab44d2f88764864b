"""Select, write back and join batch elements of the solver's dataclasses of (B, ...) tensors."""
from __future__ import annotations

from dataclasses import fields, is_dataclass, replace
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def take(obj: T, index: Tensor | slice) -> T:
    """``obj`` restricted to the batch elements ``index`` (indices or a slice) of every field."""
    return replace(obj, **{f.name: getattr(obj, f.name)[index] for f in fields(obj)})


def put(full: T, index: Tensor, part: T) -> T:
    """``full`` with the batch elements ``index`` replaced by ``part``'s (out of place)."""
    return replace(full, **{f.name: getattr(full, f.name).index_copy(0, index, getattr(part, f.name)) for f in fields(full)})


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
