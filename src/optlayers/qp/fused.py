"""A solve's interior point iterations in one compiled call, with the host's look evaluated on the
device (the compiled path on the CPU, ``IPMSettings.compiled``).

On the CPU the host looks at the statuses before every iteration (``host.is_check``); with one
compiled call per iteration, each call's fixed cost (the guards, the call, the look's own
operations and read) is most of an iteration of a small problem. ``steps`` runs ``ipm.step`` on
the engine's device loop (``engine/device_loop.py``: a ``torch.while_loop``) whose condition is
what the host's look would decide: it returns as soon as the look would act (no problem running,
a problem to switch to the stiff split or back, a gap to test accurately: ``ipm._look_flags``) or
at the iteration limit. The host then looks as before, at the iteration where the call stopped:
the iterates are those of one call per iteration. ``whole`` is the start, ``steps`` and the
derivatives' factorisation as one function, which the QP's forward compiles together with what
comes before it (the data's checks and equilibration) and after it (the solution mapped back:
``qp.forward``): a solve that needs no reaction of the host is one compiled call and one read;
``go_on`` goes on where it does.

The loop carries the state and its residuals packed (``device_loop.Packed``); ``steps`` takes
and returns them packed, so that it sees inputs of one layout whatever produced the state (the
start or an earlier call) and is compiled once per shape.
"""
from __future__ import annotations

import torch
from torch import Tensor

from optlayers.compiling import compiled, pointwise_cats
from optlayers.engine import device_loop, loop
from optlayers.engine.device_loop import Layout, Packed, layout, pack, unpack
from optlayers.engine.step import QPData, State
from optlayers.host import RUNNING, reads_are_free
from optlayers.qp import ipm
from optlayers.qp.derivative_checks import inexact_derivatives
from optlayers.qp.derivatives import factor_from, factor_tensors
from optlayers.qp.ipm import IPMResult, IPMSettings, Residuals, Units
from optlayers.qp.scaling import Scaling
from optlayers.qp.status import QPStatus


def pays(device: torch.device) -> bool:
    """Whether a compiled solve on ``device`` runs its iterations in one call (``whole``): on the
    CPU, where the host would look before every iteration (``host.reads_are_free``). (On an
    accelerator the host looks every few iterations, and a loop's condition is a read of the device
    every iteration.)"""
    return reads_are_free(device)


KINDS = (State, Residuals)
"""The classes of the QP's state and residuals, as ``device_loop.unpack`` takes them."""


def steps(data: QPData, units: Units, packed: Packed, where: Layout, settings: IPMSettings, iteration: Tensor,
          looked: bool = True, halt: Tensor | None = None) -> tuple[Packed, Tensor]:
    """Iterations ``iteration``, ``iteration`` + 1, ... (a 0-d int64 tensor) of ``ipm.step`` from the
    state packed as ``where``, until the host's look would act (see the module docstring), on the
    engine's device loop (``engine.device_loop.run``); ``looked``: the host has looked before the
    first, which runs whatever the look would say; ``halt`` (0-d bool): where it holds, none runs.
    Returns the packed state and how many iterations ran (0-d)."""

    def proceeds(j: Tensor, st: State, res: Residuals) -> Tensor:
        running = st.status == RUNNING
        look = ipm._look_flags(st, res, units, running, iteration + j, settings)
        stop = ~running.any() | look[[0, 1, 3]].any() | (iteration + j >= settings.max_iter)
        stop = stop if halt is None else stop | halt
        return ((j == 0) | ~stop) if looked else ~stop

    def step(data: QPData, units: Units, st: State, res: Residuals) -> tuple[State, Residuals]:
        return ipm.step(data, units, st, res, settings)

    return device_loop.run((data, units), packed, where, KINDS, step, proceeds)


def whole(data: QPData, sc: Scaling, settings: IPMSettings, with_factor: bool,
          halt: Tensor | None = None) -> tuple[Packed, Layout, Tensor, tuple[Tensor, ...], Tensor]:
    """The start (unretried), ``steps`` from it (none where a start failed: the host starts again;
    none where ``halt``, 0-d bool, holds), and with ``with_factor`` the derivatives' factorisation at
    the last iterate (unretried): the part of a solve that its caller compiles as one function (with
    what it makes of the result). Returns the state and its residuals packed as the layout returned
    second (the loop's own tensors), the statuses as the solve ends there (``RUNNING`` as
    ``MAX_ITER``), the factorisation's tensors (``derivatives.factor_tensors``; none without
    ``with_factor``), and (6,) int64 for the host: the iterations run, whether some start failed,
    whether the solve ends there (nothing runs, or the iteration limit), whether some problem is not
    solved, whether some factorisation failed, whether some solved problem's derivative is inexact
    (``derivative_checks.inexact_derivatives``; only with ``with_factor``). ``finished`` reads it;
    ``go_on`` goes on from there."""
    units = Units.of(sc, data, settings)
    st, res = ipm._start_unretried(data, units, settings)
    start_failed = (st.status == int(QPStatus.NUMERICAL_ERROR)).any()
    where = layout(st, res)
    packed, taken = steps(data, units, pack(st, res), where, settings,
                          torch.zeros((), dtype=torch.int64, device=st.v.device), looked=False,
                          halt=start_failed if halt is None else start_failed | halt)
    st, res = unpack(packed, where, KINDS)
    running = st.status == RUNNING
    status = st.status.masked_fill(running, int(QPStatus.MAX_ITER))
    factor, unfactored = (), torch.zeros((), dtype=torch.bool, device=st.v.device)
    inexact = unfactored
    if with_factor:
        f = ipm._derivative_factor_unretried(data.Q, data.A, data.G, st.lam, st.s, settings, data.diagonal)
        factor, unfactored = factor_tensors(f), ~f.ok.all()
        inexact = inexact_derivatives(status, st.lam, st.s, f).any()
    ends = ~running.any() | (taken >= settings.max_iter)
    info = torch.stack([taken, start_failed, ends, (status != int(QPStatus.SOLVED)).any(), unfactored, inexact])
    return packed, where, status, factor, info


def finished(info: list[int]) -> bool:
    """Whether the solve ends with ``whole``'s call, its ``info`` read: nothing runs or the iteration
    limit is reached, every problem was solved, no start failed and the factorisation (if any)
    succeeded. Its outputs are then the result. A problem left unsolved goes on (``go_on``) to the
    end of ``ipm.iterate``, as on the eager path: an INACCURATE one's accurate gap, an unsolved
    one's smaller multipliers (which may solve it, or run it again)."""
    _, start_failed, ends, unsolved, unfactored = info[:5]
    return bool(ends and not (start_failed or unsolved or unfactored))


def go_on(data: QPData, sc: Scaling, packed: Packed, where: Layout, factor: tuple[Tensor, ...], info: list[int],
          settings: IPMSettings, with_factor: bool) -> IPMResult:
    """The solve from where ``whole``'s call ended (``packed`` as ``where``, the factorisation
    ``factor`` at that state, ``info`` read), where it did not finish it (``finished``): where the
    host's look reacts, the engine's loop goes on with ``steps``, one compiled call up to each
    reaction (and ``ipm.iterate`` ends the solve); where the start failed (its factorisation is
    retried behind a host look), it is ``ipm.solve_scaled`` with ``steps``."""
    taken, start_failed = info[:2]
    units = Units.of(sc, data, settings)
    steps_fn = compiled(steps, data.p.device.type, pointwise_cat=pointwise_cats(*data.p.shape, data.p.device),
                        batched=True)

    def run_steps(data: QPData, units: Units, st: State, res: Residuals, iteration: Tensor) -> tuple[State, Residuals, Tensor]:
        where = layout(st, res)
        packed, taken = steps_fn(data, units, pack(st, res), where, settings, iteration)
        return (*unpack(packed, where, KINDS), taken)

    if start_failed:
        st, res = ipm.start(data, units, settings)  # the start's factorisation retried with more regularisation
        return ipm.iterate(data, units, st, res, loop.Steps(run_steps), settings, with_factor)
    st, res = unpack(packed, where, KINDS)
    f = factor_from(factor, data.A.shape[-2]) if factor else None
    return ipm.iterate(data, units, st, res, loop.Steps(run_steps), settings, with_factor, first=taken, factor=f)
