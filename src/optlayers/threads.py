"""Solve slices of a CPU batch in parallel Python threads, each running torch single-threaded.

On the CPU, torch runs batched factorisations and triangular solves one matrix after another
on a single core, and its element-wise kernels do not split small (B, n) tensors across cores.
The problems of a batch are independent, so the interior point methods (QP and cone) cut a
large batch into as many slices as torch has intra-op threads and solve them at once: torch
releases the GIL inside its kernels. Each slice's thread runs torch with one thread, so that
the cores are not oversubscribed; the caller's thread count is restored afterwards.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

Result = TypeVar("Result")


def slice_count(batch: int, entries_per_problem: int, device: torch.device, min_entries: int) -> int:
    """How many slices: one per intra-op thread, each with at least ``min_entries`` matrix entries
    (below that the threads' contention for the GIL eats the gain); always 1 off the CPU."""
    if device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), batch, batch * max(entries_per_problem, 1) // min_entries))


def _single_threaded(fn: Callable[[slice], Result], part: slice) -> Result:
    """Under OpenMP torch's thread count is per thread, copied from a process-wide value when a
    thread first asks for it: asking before setting 1 keeps a sibling's setting from leaking in.
    Side effect: while the slices run, a thread of the caller's program that touches torch for
    the first time starts with one thread (the caller's own count is restored by ``map_slices``)."""
    torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        return fn(part)


def map_slices(fn: Callable[[slice], Result], batch: int, count: int) -> list[Result]:
    """[fn(slice) for each of ``count`` contiguous slices of range(batch)], the slices in parallel threads."""
    if count == 1:
        return [fn(slice(0, batch))]
    bounds = [index * batch // count for index in range(count + 1)]
    slices = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(max_workers=count) as pool:
            return list(pool.map(lambda part: _single_threaded(fn, part), slices))
    finally:
        torch.set_num_threads(threads)
