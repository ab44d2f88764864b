"""Solve slices of a CPU batch in parallel Python threads, each running torch single-threaded.

On the CPU, torch runs batched factorisations and triangular solves one matrix after another
on a single core, and its element-wise kernels do not split small (B, n) tensors across cores.
The problems of a batch are independent, so the interior point methods (QP and cone) cut a
large batch into as many slices as torch has intra-op threads and solve them at once: torch
releases the GIL inside its kernels.

Each slice's thread limits its own OpenMP team to one thread (``omp_set_num_threads`` of the
OpenMP runtime torch is linked against, a per-thread setting) so that the cores are not
oversubscribed.
It does not call ``torch.set_num_threads``: that also switches MKL's dynamic threading off for
the whole process, after which torch's batched LU (``linalg.lu_factor``, ``solve``, ``inv``)
runs MKL's ``getrf`` concurrently from several threads and returns invalid pivots or wrong
factors (pytorch/pytorch#142815, #141358; seen here with torch 2.13 on two cores). Where that
runtime cannot be found, batches are not sliced.
"""
from __future__ import annotations

import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

import torch

Result = TypeVar("Result")

# torch's CPU library, through whose handle ``omp_set_num_threads`` resolves to the OpenMP runtime
# torch itself is linked against (never a second copy).
_TORCH_CPU_LIBRARIES = ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll")


@functools.lru_cache(maxsize=1)
def _omp_set_num_threads() -> Callable[[int], None] | None:
    """``omp_set_num_threads`` of the OpenMP runtime torch uses, or None if it cannot be found."""
    if not torch.backends.openmp.is_available():
        return None
    folder = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in _TORCH_CPU_LIBRARIES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            try:
                function = ctypes.CDLL(path).omp_set_num_threads
            except (OSError, AttributeError):
                continue
            function.argtypes = [ctypes.c_int]
            return function
    return None


def slice_count(batch: int, entries_per_problem: int, device: torch.device, min_entries: int) -> int:
    """How many slices: one per intra-op thread, each with at least ``min_entries`` matrix entries
    (below that the threads' contention for the GIL eats the gain); 1 off the CPU or without a
    per-thread OpenMP setting."""
    if min_entries < 1:
        raise ValueError(f"min_entries must be >= 1, got {min_entries}")
    if device.type != "cpu" or _omp_set_num_threads() is None:
        return 1
    return max(1, min(torch.get_num_threads(), batch, batch * max(entries_per_problem, 1) // min_entries))


def _single_threaded(fn: Callable[[slice], Result], part: slice) -> Result:
    """fn(part) in a pool thread whose OpenMP team (torch's intra-op threads and MKL's) is one thread
    (where the runtime is not found, ``slice_count`` does not slice; a direct caller gets plain threads)."""
    torch.get_num_threads()  # torch's per-thread start-up, which would reset the team size set below
    setter = _omp_set_num_threads()
    if setter is not None:
        setter(1)
    with torch.no_grad():
        return fn(part)


def map_slices(fn: Callable[[slice], Result], batch: int, count: int) -> list[Result]:
    """[fn(slice) for each of ``count`` contiguous slices of range(batch)], the slices in parallel
    threads under ``torch.no_grad()`` (with ``count`` 1, fn runs in the caller's thread and grad mode)."""
    if not isinstance(count, int) or not 1 <= count <= max(batch, 1):
        raise ValueError(f"count must be an int in [1, batch = {batch}], got {count!r}")
    if count == 1:
        return [fn(slice(0, batch))]
    bounds = [index * batch // count for index in range(count + 1)]
    slices = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(lambda part: _single_threaded(fn, part), slices))
