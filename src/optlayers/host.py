"""When and how the interior point methods look at device state from the host.

Both solvers (QP and cone) run their iterations without synchronisation: converged or failed
problems are frozen by masks on the device. The host reads the statuses only at the iterations
``is_check`` names, with ``host_read`` (one device-to-host copy), to stop when nothing runs and
to drop finished problems from the working batch.
"""
from __future__ import annotations

from torch import Tensor

# The first look comes after this many iterations, then every ``CHECK_EVERY``: most problems
# take 10-17 iterations, and each look stalls a GPU's queue.
FIRST_CHECK = 8
CHECK_EVERY = 4
# Once no more than this fraction of the working batch is still running, the finished problems
# are dropped from it, so that the iterations of the slowest problems cost only their own work.
COMPACT_FRACTION = 0.75


def is_check(iteration: int) -> bool:
    """Whether the host looks at the statuses before iteration ``iteration`` (0-based)."""
    return iteration >= FIRST_CHECK and (iteration - FIRST_CHECK) % CHECK_EVERY == 0


def host_read(t: Tensor) -> list:
    """A small tensor's values on the host: the solvers' one kind of synchronisation (a
    device-to-host copy; ``benchmarks/kernels.py`` counts these)."""
    return t.to("cpu", copy=True).tolist()


def running_count(running: Tensor) -> int:
    """How many problems of the (B,) mask still run, read with one synchronisation."""
    return int(host_read(running.sum(0, keepdim=True))[0])
