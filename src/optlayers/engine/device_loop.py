"""The interior point loop on the device: a method's step run in a ``torch.while_loop`` until a
condition on the state and its residuals, evaluated on the device, says stop. The host neither
looks nor synchronises inside; a compiled solve (``torch.compile(fullgraph=True)``) is one call.
The QP's compiled path (``qp/fused.py``: its condition is what the host's look would decide) and
the cone method's (``cone/interior/solver.py``: until no element runs or the iteration limit) run
their iterations here; ``loop.run`` is the loop with the host's looks.

The loop carries the state and its residuals packed in three fresh tensors (``Packed``): a
higher-order operator refuses carried tensors that alias each other or an input, and inductor's
loop assumes carried buffers of its own (a view at an offset, such as a residual's flag row,
failed its alignment check, and crashed its C++ wrapper). ``run`` takes and returns the state
packed, so that a compiled caller sees inputs of one layout whatever produced the state (a start
or an earlier call) and is compiled once per shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable

import torch
from torch import Tensor
from torch import while_loop

from optlayers.compiling import owned


@dataclass(frozen=True)
class Packed:
    """A state and its residuals in three (B, ·) tensors of their own, their fields side by side
    in the order of a ``layout``: ``real`` (the floating-point ones), ``counts`` (the integer
    ones) and ``flags`` (the boolean ones)."""

    real: Tensor
    counts: Tensor
    flags: Tensor


Layout = tuple
"""Where ``pack`` put each field of a state and its residuals: one entry per field, in their
order, (0 for the state or 1 for the residuals, name, group (0 real, 1 counts, 2 flags), first
column, last column + 1, shape after the batch) for a tensor, (0 or 1, name, -1, value) for
another field (the state's sizes). Plain Python values: a compiled function is specialised on
them like on constants."""


def _group(t: Tensor) -> int:
    return 0 if t.is_floating_point() else 2 if t.dtype == torch.bool else 1


def layout(st: Any, res: Any) -> Layout:
    """The ``Layout`` of ``pack(st, res)``."""
    entries, widths = [], [0, 0, 0]
    for which, obj in enumerate((st, res)):
        for f in fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, Tensor):
                group, shape = _group(value), tuple(int(d) for d in value.shape[1:])
                width = math.prod(shape)
                entries.append((which, f.name, group, widths[group], widths[group] + width, shape))
                widths[group] += width
            else:
                entries.append((which, f.name, -1, value))
    return tuple(entries)


def pack(st: Any, res: Any) -> Packed:
    """``st`` and ``res`` (dataclasses of (B, ...) tensors and plain values) packed (see
    ``Packed``), in the order of ``layout(st, res)``."""
    parts: list[list[Tensor]] = [[], [], []]
    for obj in (st, res):
        for f in fields(obj):
            if isinstance(t := getattr(obj, f.name), Tensor):
                parts[_group(t)].append(t.reshape(t.shape[0], -1))
    return Packed(*(torch.cat(group, -1) for group in parts))


def unpack(packed: Packed, where: Layout, kinds: tuple[type, type]) -> tuple[Any, Any]:
    """The state and residuals of ``packed`` laid out as ``where``, as views of its tensors;
    ``kinds``: the classes of the state and of the residuals (the method's own)."""
    groups, kwargs = (packed.real, packed.counts, packed.flags), ({}, {})
    for which, name, group, *rest in where:
        if group < 0:
            kwargs[which][name] = rest[0]
            continue
        first, stop, shape = rest
        t = groups[group]
        kwargs[which][name] = t[:, first] if shape == () else t[:, first:stop].unflatten(-1, shape)
    return kinds[0](**kwargs[0]), kinds[1](**kwargs[1])


def run(data: tuple, packed: Packed, where: Layout, kinds: tuple[type, type], step: Callable[..., tuple[Any, Any]],
        proceeds: Callable[[Tensor, Any, Any], Tensor]) -> tuple[Packed, Tensor]:
    """``step(*data, state, res) -> (state, res)`` from the state and residuals ``packed`` as
    ``where`` (of the classes ``kinds``) in a ``while_loop``, for as long as
    ``proceeds(j, state, res)`` (0-d bool) holds before the iteration ``j`` of this call (a 0-d
    int64 tensor, 0 for the first). Returns the state and residuals packed as ``where`` (tensors of
    the loop's own) and how many iterations ran (0-d int64).

    ``data`` (dataclasses of tensors) enter the loop's body copied (``compiling.owned``): tensors
    the body reads from the enclosing function enter it as inputs, and a view of one (``.mT``)
    would enter as a second input aliasing the first, which higher-order operators refuse; made in
    the body, the views are the body's own."""

    def go_on(j: Tensor, real: Tensor, counts: Tensor, flags: Tensor) -> Tensor:
        return proceeds(j, *unpack(Packed(real, counts, flags), where, kinds))

    def iterate(j: Tensor, real: Tensor, counts: Tensor, flags: Tensor) -> tuple[Tensor, ...]:
        st, res = unpack(Packed(real, counts, flags), where, kinds)
        out = pack(*step(*(owned(d) for d in data), st, res))
        return j + 1, out.real, out.counts, out.flags

    start = torch.zeros((), dtype=torch.int64, device=packed.real.device)
    taken, real, counts, flags = while_loop(go_on, iterate, (start, packed.real.clone(), packed.counts.clone(),
                                                             packed.flags.clone()))
    return Packed(real, counts, flags), taken
