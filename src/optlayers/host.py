"""When and how the interior point methods look at device state from the host.

Both solvers (QP and cone) run their iterations without synchronisation: converged or failed
problems are frozen by masks on the device. The host reads the statuses only at the iterations
``is_check`` names, with ``host_read`` (one device-to-host copy), to stop when nothing runs and
to drop finished problems from the working batch.

On an accelerator each read stalls the device's queue, so the host looks rarely (after
``FIRST_CHECK`` iterations, then every ``CHECK_EVERY``). On the CPU a read costs nothing, while
every iteration run after the last problem converged is wasted: there the host looks after every
iteration. ``accelerator_schedule`` makes the CPU follow the accelerator's schedule, so that
``benchmarks/kernels.py`` counts on the CPU what a GPU does.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
from torch import Tensor

# The status of a problem that is still iterating (no ``Status`` member: it never leaves a solver).
RUNNING = -1
# The first look comes after this many iterations, then every ``CHECK_EVERY``: most problems
# take 10-17 iterations, and each look stalls a GPU's queue.
FIRST_CHECK = 8
CHECK_EVERY = 4
# Once no more than this fraction of the working batch is still running, the finished problems
# are dropped from it, so that the iterations of the slowest problems cost only their own work.
COMPACT_FRACTION = 0.75


_CPU_LOOKS_EVERY_ITERATION: contextvars.ContextVar[bool] = contextvars.ContextVar("cpu_looks_every_iteration", default=True)


@contextlib.contextmanager
def accelerator_schedule() -> Iterator[None]:
    """Within the block (in this thread or context only), solves on the CPU look at the statuses
    on the accelerators' schedule, and run their steps as an accelerator does (``cpu_schedule``)."""
    token = _CPU_LOOKS_EVERY_ITERATION.set(False)
    try:
        yield
    finally:
        _CPU_LOOKS_EVERY_ITERATION.reset(token)


def cpu_schedule(device: torch.device | None) -> bool:
    """Whether work on ``device`` follows the CPU's own schedule: on the CPU, outside
    ``accelerator_schedule`` (None: an accelerator). Besides the host's looks (``reads_are_free``)
    that schedule may split a step for the CPU's caches (``qp.scaling.equilibrate``'s slices),
    which an accelerator would run as one kernel each."""
    return device is not None and device.type == "cpu" and _CPU_LOOKS_EVERY_ITERATION.get()


def reads_are_free(device: torch.device | None) -> bool:
    """Whether reading state of ``device`` on the host costs nothing: on the CPU's own schedule
    (``cpu_schedule``)."""
    return cpu_schedule(device)


def is_check(iteration: int, device: torch.device | None = None) -> bool:
    """Whether the host looks at the statuses before iteration ``iteration`` (0-based) of a solve
    on ``device`` (None: the accelerators' schedule)."""
    if reads_are_free(device):
        return True
    return iteration >= FIRST_CHECK and (iteration - FIRST_CHECK) % CHECK_EVERY == 0


def host_read(t: Tensor) -> list:
    """A small tensor's values on the host: the solvers' one kind of synchronisation (a
    device-to-host copy; ``benchmarks/kernels.py`` counts these)."""
    return t.to("cpu", copy=True).tolist()


def look(running: Tensor, flagged: Tensor | None = None) -> tuple[int, Tensor | None] | tuple[int, Tensor | None, list[int]]:
    """How many problems of the (B,) mask still run, read with one synchronisation; and, once
    no more than ``COMPACT_FRACTION`` of the batch does, the indices of those that do (in order,
    found without a further read), for the caller to keep as its working batch. Given (F, B)
    masks ``flagged``, their F counts are read in the same synchronisation and returned third."""
    sums = running.sum(0, keepdim=True) if flagged is None else torch.cat([running.sum(0, keepdim=True), flagged.sum(-1)])
    counts = host_read(sums)
    count = int(counts[0])
    keep = torch.argsort(~running, stable=True)[:count] if 0 < count <= COMPACT_FRACTION * running.shape[0] else None
    return (count, keep) if flagged is None else (count, keep, [int(c) for c in counts[1:]])
