"""Several interior point iterations in one compiled call, with the host's look in between
evaluated on the device (the compiled path on the CPU, ``IPMSettings.compiled``).

On the CPU the host looks at the statuses before every iteration (``host.is_check``); with one
compiled call per iteration, each call's fixed cost (the guards, the call, the look's own
operations and read) is a large part of an iteration of a small problem. ``steps`` runs up to ``STEPS_PER_CALL``
iterations of ``ipm.step``: before each but the first it evaluates what the host's look would
decide, and once the look would act (no problem running, a problem to switch to the stiff split
or back, a gap to test accurately: ``ipm._look_flags``; or the iteration limit) the remaining
iterations leave the state as it is. The host then looks as before, at the iteration where the
call stopped: the iterates are those of one call per iteration.
"""
from __future__ import annotations

from dataclasses import fields, replace
from typing import TypeVar

import torch
from torch import Tensor

from optlayers.engine.step import State
from optlayers.host import RUNNING, reads_are_free
from optlayers.qp import ipm
from optlayers.qp.ipm import IPMSettings, Residuals, Units
from optlayers.qp.scaling import QPData

T = TypeVar("T")

STEPS_PER_CALL = 4
"""Iterations per compiled call: enough that the calls' fixed cost is paid a few times per solve
(most problems take 10-17 iterations), few enough that a call that stops early wastes little
(and that its compilation, about twice the single step's, stays short)."""
MAX_ENTRIES = 50_000
"""Batches of at most this many matrix entries (batch × n × n) take several iterations per call;
in larger ones an iteration's arithmetic outweighs a call's fixed cost, and the iterations a
call runs after it stopped (leaving the state as it is) would cost as much as real ones."""


def pays(data: QPData) -> bool:
    """Whether ``steps`` runs the iterations of this batch (see ``MAX_ENTRIES``): on the CPU, where
    the host would look before every iteration (``host.reads_are_free``), and for small batches."""
    batch, n = data.p.shape
    return reads_are_free(data.p.device) and batch * n * n <= MAX_ENTRIES


def _keep(stop: Tensor, old: T, new: T) -> T:
    """``new`` (a dataclass of tensors), or ``old`` everywhere if ``stop`` (a 0-d bool tensor).
    Tensors the step passed through and empty ones stay ``new``'s as they are, so that their
    aliasing and strides, which the compiled function is specialised on, are those of one step."""
    return replace(new, **{f.name: torch.where(stop, o, t) for f in fields(new)
                           if isinstance(t := getattr(new, f.name), Tensor) and t is not (o := getattr(old, f.name))
                           and t.numel()})


def steps(data: QPData, units: Units, st: State, res: Residuals, settings: IPMSettings,
          iteration: Tensor) -> tuple[State, Residuals, Tensor]:
    """Iterations ``iteration``, ``iteration`` + 1, ... (a 0-d int64 tensor) of ``ipm.step``, up to
    ``STEPS_PER_CALL``, until the host's look would act (see the module docstring; the host has
    looked before the first). Returns the state, its residuals and how many iterations ran (0-d)."""
    st, res = ipm.step(data, units, st, res, settings)
    stopped = torch.zeros((), dtype=torch.bool, device=iteration.device)
    taken = torch.ones_like(iteration)
    for j in range(1, STEPS_PER_CALL):
        running = st.status == RUNNING
        flags = ipm._look_flags(st, res, units, running, iteration + j, settings)
        stopped = stopped | ~running.any() | flags[[0, 1, 3]].any() | (iteration + j >= settings.max_iter)
        new_st, new_res = ipm.step(data, units, st, res, settings)
        st, res = _keep(stopped, st, new_st), _keep(stopped, res, new_res)
        taken = taken + (~stopped).long()
    return st, res, taken
