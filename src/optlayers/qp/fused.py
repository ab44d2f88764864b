"""A solve's interior point iterations in one compiled call, with the host's look evaluated on the
device (the compiled path on the CPU, ``IPMSettings.compiled``).

On the CPU the host looks at the statuses before every iteration (``host.is_check``); with one
compiled call per iteration, each call's fixed cost (the guards, the call, the look's own
operations and read) is most of an iteration of a small problem. ``steps`` runs ``ipm.step`` in a
``torch.while_loop`` whose condition is what the host's look would decide: it
returns as soon as the look would act (no problem running, a problem to switch to the stiff split
or back, a gap to test accurately: ``ipm._look_flags``) or at the iteration limit. The host then
looks as before, at the iteration where the call stopped: the iterates are those of one call per
iteration. ``whole`` is the start, ``steps`` and the derivatives' factorisation as one function,
which the QP's forward compiles together with what comes before it (the data's checks and
equilibration) and after it (the solution mapped back: ``qp.forward``): a solve that needs no
reaction of the host is one compiled call and one read; ``go_on`` goes on where it does.

The loop carries the state packed in three fresh tensors (``Packed``): a higher-order operator
refuses carried tensors that alias each other or an input, and inductor's loop assumes carried
buffers of its own (a view at an offset, such as a residual's flag row, failed its alignment
check, and crashed its C++ wrapper). ``steps`` takes and returns the state packed, so that it sees
inputs of one layout whatever produced the state (the start or an earlier call) and is compiled
once per shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor
from torch import while_loop

from optlayers.compiling import compiled, pointwise_cats
from optlayers.engine import loop
from optlayers.engine.step import State
from optlayers.host import RUNNING, reads_are_free
from optlayers.qp import ipm
from optlayers.qp.derivatives import factor_from, factor_tensors
from optlayers.qp.ipm import IPMResult, IPMSettings, Residuals, Units
from optlayers.qp.scaling import QPData, Scaling
from optlayers.qp.status import QPStatus


def pays(device: torch.device) -> bool:
    """Whether a compiled solve on ``device`` runs its iterations in one call (``whole``): on the
    CPU, where the host would look before every iteration (``host.reads_are_free``). (On an
    accelerator the host looks every few iterations, and a loop's condition is a read of the device
    every iteration.)"""
    return reads_are_free(device)


@dataclass(frozen=True)
class Packed:
    """A ``State`` and its ``Residuals`` in three (B, ·) tensors of their own, their fields side by
    side in the order of a ``layout``: ``real`` (the floating-point ones), ``counts`` (the integer
    ones) and ``flags`` (the boolean ones)."""

    real: Tensor
    counts: Tensor
    flags: Tensor


Layout = tuple
"""Where ``pack`` put each field of a ``State`` and its ``Residuals``: one entry per field, in
their order, (0 for the state or 1 for the residuals, name, group (0 real, 1 counts, 2 flags),
first column, last column + 1, shape after the batch) for a tensor, (0 or 1, name, -1, value)
for another field (the state's sizes). Plain Python values: a compiled function is specialised
on them like on constants."""


def _group(t: Tensor) -> int:
    return 0 if t.is_floating_point() else 2 if t.dtype == torch.bool else 1


def layout(st: State, res: Residuals) -> Layout:
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


def pack(st: State, res: Residuals) -> Packed:
    """``st`` and ``res`` packed (see ``Packed``), in the order of ``layout(st, res)``."""
    parts: list[list[Tensor]] = [[], [], []]
    for obj in (st, res):
        for f in fields(obj):
            if isinstance(t := getattr(obj, f.name), Tensor):
                parts[_group(t)].append(t.reshape(t.shape[0], -1))
    return Packed(*(torch.cat(group, -1) for group in parts))


def unpack(packed: Packed, where: Layout, kinds: tuple[type, type] = (State, Residuals)) -> tuple:
    """The ``State`` and ``Residuals`` of ``packed`` laid out as ``where``, as views of its tensors
    (``kinds``: the classes of the state and the residuals, for a method with residuals of its own)."""
    groups, kwargs = (packed.real, packed.counts, packed.flags), ({}, {})
    for which, name, group, *rest in where:
        if group < 0:
            kwargs[which][name] = rest[0]
            continue
        first, stop, shape = rest
        t = groups[group]
        kwargs[which][name] = t[:, first] if shape == () else t[:, first:stop].unflatten(-1, shape)
    return kinds[0](**kwargs[0]), kinds[1](**kwargs[1])


def _own(obj):
    """``obj`` (a dataclass of tensors) with its tensors copied: tensors the loop's body reads from
    the enclosing function enter it as inputs, and a view of one (``.mT``) would enter as a second
    input aliasing the first, which higher-order operators refuse; copied in the body, the views are
    the body's own."""
    return replace(obj, **{f.name: t.clone() for f in fields(obj) if isinstance(t := getattr(obj, f.name), Tensor)})


def steps(data: QPData, units: Units, packed: Packed, where: Layout, settings: IPMSettings, iteration: Tensor,
          looked: bool = True, halt: Tensor | None = None) -> tuple[Packed, Tensor]:
    """Iterations ``iteration``, ``iteration`` + 1, ... (a 0-d int64 tensor) of ``ipm.step`` from the
    state packed as ``where``, until the host's look would act (see the module docstring);
    ``looked``: the host has looked before the first, which runs whatever the look would say;
    ``halt`` (0-d bool): where it holds, none runs. Returns the packed state and how many
    iterations ran (0-d)."""

    def go_on(j: Tensor, real: Tensor, counts: Tensor, flags: Tensor) -> Tensor:
        st, res = unpack(Packed(real, counts, flags), where)
        running = st.status == RUNNING
        look = ipm._look_flags(st, res, units, running, iteration + j, settings)
        stop = ~running.any() | look[[0, 1, 3]].any() | (iteration + j >= settings.max_iter)
        stop = stop if halt is None else stop | halt
        return ((j == 0) | ~stop) if looked else ~stop

    def iterate(j: Tensor, real: Tensor, counts: Tensor, flags: Tensor) -> tuple[Tensor, ...]:
        st, res = unpack(Packed(real, counts, flags), where)
        st, res = ipm.step(_own(data), _own(units), st, res, settings)
        out = pack(st, res)
        return j + 1, out.real, out.counts, out.flags

    taken, real, counts, flags = while_loop(go_on, iterate, (torch.zeros_like(iteration), packed.real.clone(),
                                                            packed.counts.clone(), packed.flags.clone()))
    return Packed(real, counts, flags), taken


def whole(data: QPData, sc: Scaling, settings: IPMSettings, with_factor: bool,
          halt: Tensor | None = None) -> tuple[Packed, Layout, Tensor, tuple[Tensor, ...], Tensor]:
    """The start (unretried), ``steps`` from it (none where a start failed: the host starts again;
    none where ``halt``, 0-d bool, holds), and with ``with_factor`` the derivatives' factorisation at
    the last iterate (unretried): the part of a solve that its caller compiles as one function (with
    what it makes of the result). Returns the state and its residuals packed as the layout returned
    second (the loop's own tensors), the statuses as the solve ends there (``RUNNING`` as
    ``MAX_ITER``), the factorisation's tensors (``derivatives.factor_tensors``; none without
    ``with_factor``), and (5,) int64 for the host: the iterations run, whether some start failed,
    whether the solve ends there (nothing runs, or the iteration limit), whether some problem is not
    solved, whether some factorisation failed. ``finished`` reads it; ``go_on`` goes on from there."""
    units = Units.of(sc)
    st, res = ipm._start_unretried(data, units, settings)
    start_failed = (st.status == int(QPStatus.NUMERICAL_ERROR)).any()
    where = layout(st, res)
    packed, taken = steps(data, units, pack(st, res), where, settings,
                          torch.zeros((), dtype=torch.int64, device=st.v.device), looked=False,
                          halt=start_failed if halt is None else start_failed | halt)
    st, res = unpack(packed, where)
    running = st.status == RUNNING
    status = st.status.masked_fill(running, int(QPStatus.MAX_ITER))
    factor, unfactored = (), torch.zeros((), dtype=torch.bool, device=st.v.device)
    if with_factor:
        f = ipm._derivative_factor_unretried(data.Q, data.A, data.G, st.lam, st.s, settings, data.diagonal)
        factor, unfactored = factor_tensors(f), ~f.ok.all()
    ends = ~running.any() | (taken >= settings.max_iter)
    info = torch.stack([taken, start_failed, ends, (status != int(QPStatus.SOLVED)).any(), unfactored])
    return packed, where, status, factor, info


def finished(info: list[int]) -> bool:
    """Whether the solve ends with ``whole``'s call, its ``info`` read: nothing runs or the iteration
    limit is reached, no start failed and the factorisation (if any) succeeded. Its outputs are
    then the result."""
    _, start_failed, ends, _, unfactored = info[:5]
    return bool(ends and not (start_failed or unfactored))


def go_on(data: QPData, sc: Scaling, packed: Packed, where: Layout, factor: tuple[Tensor, ...], info: list[int],
          settings: IPMSettings, with_factor: bool) -> IPMResult:
    """The solve from where ``whole``'s call ended (``packed`` as ``where``, the factorisation
    ``factor`` at that state, ``info`` read), where it did not finish it (``finished``): where the
    host's look reacts, the engine's loop goes on with ``steps``, one compiled call up to each
    reaction (and ``ipm.iterate`` ends the solve); where the start failed (its factorisation is
    retried behind a host look), it is ``ipm.solve_scaled`` with ``steps``."""
    taken, start_failed = info[:2]
    units = Units.of(sc)
    steps_fn = compiled(steps, data.p.device.type, pointwise_cat=pointwise_cats(*data.p.shape, data.p.device))

    def run_steps(data: QPData, units: Units, st: State, res: Residuals, iteration: Tensor) -> tuple[State, Residuals, Tensor]:
        where = layout(st, res)
        packed, taken = steps_fn(data, units, pack(st, res), where, settings, iteration)
        return (*unpack(packed, where), taken)

    if start_failed:
        st, res = ipm.start(data, units, settings)  # the start's factorisation retried with more regularisation
        return ipm.iterate(data, units, st, res, loop.Steps(run_steps), settings, with_factor)
    st, res = unpack(packed, where)
    f = factor_from(factor, data.A.shape[-2]) if factor else None
    return ipm.iterate(data, units, st, res, loop.Steps(run_steps), settings, with_factor, first=taken, factor=f)
