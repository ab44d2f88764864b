"""The one interior point loop, shared by the QP (``qp/ipm.py``) and the cone method
(``cone/interior/solver.py``): start → [host look → step] × ``max_iter`` → finish.

A method hands the loop its working data (a tuple of dataclasses of (B, ...) tensors), a state
with a ``status`` field (``host.RUNNING`` while an element iterates) and the residuals at that
state, and a step ``(*data, state, residuals) -> (state, residuals)`` that makes no host
synchronisation and freezes finished elements by masks (or ``Steps``: several iterations per
call). The loop owns the host's looks (``host.is_check``, ``host.look``): it stops when nothing
runs, and drops finished elements from the working batch (``engine/batch.py``) once few run. A method with flags of its own to count at a
look (the QP's stiff split and accurate gap) passes a ``Look``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Protocol

import torch
from torch import Tensor

from optlayers.engine.batch import put, take
from optlayers.host import RUNNING, cpu_schedule, host_read, is_check, look

Step = Callable[..., tuple[Any, Any]]


@dataclass(frozen=True)
class Steps:
    """A step that runs several iterations per call (``qp/fused.py``): ``fn(*data, state, res,
    iteration)``, with ``iteration`` the first one's index as a 0-d tensor, returns the state, its
    residuals and how many iterations it ran (0-d), which the host reads to count them."""

    fn: Callable[..., tuple[Any, Any, Tensor]]


class Look(Protocol):
    """A method's part in the host's look: ``flags`` (F, B) masks (or None) whose counts are read
    in the look's one synchronisation; ``react`` acts on those counts and returns the state, the
    residuals and the step to run until the next look."""

    def flags(self, data: tuple, state: Any, res: Any, running: Tensor, iteration: int) -> Tensor | None: ...

    def react(self, data: tuple, state: Any, res: Any, flags: Tensor, counts: list[int], running: int,
              step: Step) -> tuple[Any, Any, Step]: ...


@dataclass(frozen=True)
class Run:
    """The loop's outcome: the whole batch's last ``state``, the residuals ``working_res`` of the
    working batch's elements, their indices ``index`` in the whole batch (None: all of them), and
    the index of the iteration the loop stopped before (``max_iter`` where it ran them all)."""

    state: Any
    working_res: Any
    index: Tensor | None
    iteration: int


def run(data: tuple, state: Any, res: Any, step: Step, max_iter: int, device: torch.device,
        hook: Look | None = None, compact: bool = True, first: int = 0) -> Run:
    """Steps ``first``, ``first`` + 1, ... (at most ``max_iter`` in all) from ``state`` (with
    residuals ``res``) on the batch ``data``.

    Before each iteration that ``host.is_check`` names, the host reads how many elements still
    run (with ``hook``'s flags, in the same read): it stops when none does, and with ``compact``
    keeps only the running ones in the working batch once few remain (``host.COMPACT_FRACTION``).

    An eager step on the CPU's own schedule (``_in_inference_mode``) runs under
    ``torch.inference_mode``, and the run is handed back in normal tensors (``_normal``)."""
    if not _in_inference_mode(step, device):
        return _run(data, state, res, step, max_iter, device, hook, compact, first)
    with torch.inference_mode():
        out = _run(data, state, res, step, max_iter, device, hook, compact, first)
    return _normal(out)


def _in_inference_mode(step: Step, device: torch.device) -> bool:
    """Whether the loop runs ``step`` under ``torch.inference_mode``: an eager step (a plain
    function, not ``Steps``, outside compilation) on the CPU's own schedule
    (``host.cpu_schedule``), where an iteration is hundreds of small operations whose autograd
    bookkeeping (version counters, records of views) inference mode skips. The compiled steps
    are left as they are (their guards would see the mode), and so is work on an accelerator
    (its eager step is replayed from a CUDA graph) or counted as one (``host.accelerator_schedule``),
    and work under a user's ``TorchDispatchMode`` (``allow_mutation_on_saved_tensors``, selective
    activation checkpointing), which sees every operation and fails on inference tensors
    ("Inference tensors do not track version counter")."""
    return (not torch.compiler.is_compiling() and not isinstance(step, Steps) and cpu_schedule(device)
            and not torch._C._len_torch_dispatch_stack())


def _normal(out: Run) -> Run:
    """``out`` in normal tensors, copies of those made under ``torch.inference_mode``: callers
    keep the state for the derivatives, whose tensors autograd must be able to save."""
    return Run(_copied(out.state), _copied(out.working_res),
               None if out.index is None else out.index.clone(), out.iteration)


def _copied(obj: Any) -> Any:
    """A dataclass of (B, ...) tensors (a method's state or residuals) with each of its inference
    tensors copied."""
    return replace(obj, **{f.name: t.clone() for f in fields(obj)
                           if isinstance(t := getattr(obj, f.name), Tensor) and t.is_inference()})


def _run(data: tuple, state: Any, res: Any, step: Step, max_iter: int, device: torch.device,
         hook: Look | None, compact: bool, first: int) -> Run:
    full, work, index = state, data, None
    iteration = first
    while iteration < max_iter:
        if is_check(iteration, device):
            running = state.status == RUNNING
            flags = None if hook is None else hook.flags(work, state, res, running, iteration)
            count, keep, *counts = look(running, flags)
            if flags is not None:
                state, res, step = hook.react(work, state, res, flags, counts[0], count, step)
            if count == 0:
                break
            if keep is not None and compact:
                full = state if index is None else put(full, index, state)
                index = keep if index is None else index[keep]
                work, state, res = tuple(take(d, index) for d in data), take(state, keep), take(res, keep)
        if isinstance(step, Steps):
            state, res, taken = step.fn(*work, state, res, torch.tensor(iteration, device=device))
            iteration += host_read(taken)
        else:
            state, res = step(*work, state, res)
            iteration += 1
    return Run(state if index is None else put(full, index, state), res, index, iteration)
