"""Solve slices of a CPU batch in parallel Python threads, each running torch single-threaded.

On the CPU, torch runs batched factorisations and triangular solves one matrix after another
on a single core, and its element-wise kernels do not split small (B, n) tensors across cores.
The problems of a batch are independent, so the interior point methods (QP and cone) cut a
large batch into as many slices as torch has intra-op threads and solve them at once: torch
releases the GIL inside its kernels. A small batch runs in the caller's thread with that thread's
teams cut to one thread for the call (``small_work_threads``): its work is too small to share.

The slices run in one long-lived pool of threads, shared by every solve in the process (and by
several user threads solving at once: their slices queue for the same threads, so the cores are
never oversubscribed). Before each slice its thread limits both of its thread teams to one
thread, so that the cores are not oversubscribed either:

- OpenMP (torch's intra-op kernels): ``omp_set_num_threads(1)``, a per-thread setting, of the
  OpenMP runtime torch is linked against;
- MKL (torch's LAPACK and BLAS on MKL builds): ``mkl_set_num_threads_local(1)``, MKL's
  per-thread setting. torch starts every new thread with the count the user gave
  ``torch.set_num_threads``, in MKL as well as in OpenMP, so OpenMP alone is not enough.

It does not call ``torch.set_num_threads``: that also switches MKL's dynamic threading off for
the whole process, after which torch's batched LU (``linalg.lu_factor``, ``solve``, ``inv``)
runs MKL's ``getrf`` concurrently from several threads and returns invalid pivots or wrong
factors (pytorch/pytorch#142815, #141358; seen with torch 2.13 on two cores). Where the OpenMP
runtime cannot be found, batches are not sliced.

A slice that itself asks for slices (a solve called from inside a slice) runs them one after
another in its own thread, so the pool never waits on itself. A process forked while the pool
exists (DataLoader workers) starts a pool of its own on first use.
"""
from __future__ import annotations

import contextlib
import ctypes
import contextvars
import functools
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Callable, Iterator, TypeVar

import torch

from optlayers.validation.options import check_int

Result = TypeVar("Result")

# torch's CPU library, through whose handle ``omp_set_num_threads`` and MKL's service functions
# resolve to the OpenMP runtime and MKL torch itself is linked against (never a second copy).
_TORCH_CPU_LIBRARIES = ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll")
# torch's own thread query, kept before anyone (tests) replaces ``torch.get_num_threads``: a pool
# thread must run torch's per-thread start-up before it sets its limits, or torch would reset them.
_torch_thread_start_up = torch.get_num_threads


@functools.lru_cache(maxsize=1)
def _torch_cpu_library() -> ctypes.CDLL | None:
    folder = os.path.join(os.path.dirname(torch.__file__), "lib")
    for name in _TORCH_CPU_LIBRARIES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            try:
                return ctypes.CDLL(path)
            except OSError:
                continue
    return None


def _function(name: str, argtypes: list, restype) -> Callable | None:
    library = _torch_cpu_library()
    function = getattr(library, name, None) if library is not None else None
    if function is not None:
        function.argtypes, function.restype = argtypes, restype
    return function


@functools.lru_cache(maxsize=1)
def _omp_set_num_threads() -> Callable[[int], None] | None:
    """``omp_set_num_threads`` of the OpenMP runtime torch uses, or None if it cannot be found."""
    if not torch.backends.openmp.is_available():
        return None
    return _function("omp_set_num_threads", [ctypes.c_int], None)


@functools.lru_cache(maxsize=1)
def _mkl_set_num_threads_local() -> Callable[[int], int] | None:
    """MKL's per-thread count setter (its C interface, by value), or None without MKL."""
    if not torch.backends.mkl.is_available():
        return None
    return _function("MKL_Set_Num_Threads_Local", [ctypes.c_int], ctypes.c_int)


def thread_limits() -> dict[str, int | None]:
    """The calling thread's OpenMP and MKL thread counts (None where the runtime is not found);
    MKL's answer comes from MKL itself (``mkl_get_max_threads``)."""
    omp = _function("omp_get_max_threads", [], ctypes.c_int) if torch.backends.openmp.is_available() else None
    mkl = _function("MKL_Get_Max_Threads", [], ctypes.c_int) if torch.backends.mkl.is_available() else None
    return {"openmp": omp() if omp else None, "mkl": mkl() if mkl else None}


ALONE_MAX_ENTRIES = 10_000
"""The most matrix entries (a QP batch's problems × n², a cone batch's programs × (m + n)²) that a
solve and its derivatives run on with the calling thread's OpenMP and MKL teams cut to one thread
(``small_work_threads``): torch's Cholesky factorisation opens an OpenMP parallel region for any
batch (its ``triu_`` shares the rows out, however few), after which the second thread spins.
Measured on the AMD EPYC machine (two threads, forward + backward, process CPU time per call
against wall time, 2 ms pauses between calls): QP batch 1, n = 10, compiled 5.3-5.9 ms of CPU
against 1.5-1.8 ms alone, eager 43-47 against 22-24 ms; QP batch 1, n = 100, compiled 17 against
8 ms; cone program batch 1 (m = 16, n = 6, ``solver="ipm"``) 100-128 against 56-66 ms; wall times within
the machine's noise either way. A compiled QP batch of 128 with n = 10 (12,800 entries) took 5-10 %
longer alone: it keeps its threads."""


def small_work_threads(entries: int, device: torch.device) -> contextlib.AbstractContextManager:
    """The threads a solve of ``entries`` matrix entries on ``device`` runs with: the calling thread
    alone (``calling_thread_alone``) on the CPU up to ``ALONE_MAX_ENTRIES``, else as torch is set."""
    check_int("entries", entries, 0)
    if not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device, got {type(device).__name__}")
    return calling_thread_alone() if device.type == "cpu" and entries <= ALONE_MAX_ENTRIES else contextlib.nullcontext()


@contextlib.contextmanager
def calling_thread_alone() -> Iterator[None]:
    """Within: the calling thread's OpenMP and MKL teams are one thread, restored after (each slice
    of ``map_slices`` runs within, ``_run_slice``). torch's per-thread start-up runs first, since it
    would reset the limits. Also for work too small to share: a batch of
    tiny factorisations still opens an OpenMP parallel region in torch's kernels (the Cholesky
    factorisation's ``triu_`` shares its rows among the threads however few there are), which
    wakes a second thread that then spins (``ALONE_MAX_ENTRIES`` has the measurement).
    Without an OpenMP runtime found, nothing changes."""
    omp, mkl = _omp_set_num_threads(), _mkl_set_num_threads_local()
    if omp is None:
        yield
        return
    before = _torch_thread_start_up()  # the thread's own count, after torch's per-thread start-up
    omp(1)
    mkl_before = mkl(1) if mkl is not None else None
    try:
        yield
    finally:
        omp(before)
        if mkl is not None:
            mkl(mkl_before)


def slice_count(batch: int, entries_per_problem: int, device: torch.device, min_entries: int) -> int:
    """How many slices: one per intra-op thread, each with at least ``min_entries`` matrix entries
    (below that the threads' contention for the GIL eats the gain); 1 off the CPU or without a
    per-thread OpenMP setting."""
    if min_entries < 1:
        raise ValueError(f"min_entries must be >= 1, got {min_entries}")
    if device.type != "cpu" or _omp_set_num_threads() is None:
        return 1
    return max(1, min(torch.get_num_threads(), batch, batch * max(entries_per_problem, 1) // min_entries))


def equal_slice_count(batch: int, entries_per_problem: int, device: torch.device, min_entries: int,
                      max_slices: int | None = None) -> int:
    """How many slices a compiled solve of ``batch`` problems runs in: as ``slice_count`` (one per
    intra-op thread, at most ``max_slices``, each of at least ``min_entries`` matrix entries), and
    all of one size, so that the slices share one compiled specialisation (a batch that does not
    divide evenly into two or more such slices is solved whole). A compiled call releases the GIL
    for all of its work, so smaller slices pay than where eager ones would queue on it."""
    count = slice_count(batch, entries_per_problem, device, min_entries)
    count = min(count, max_slices or count)
    while batch % count:
        count -= 1
    return count


class _Pool:
    """The process's slice threads: created on first use, grown when more slices are asked for,
    started anew in a forked child."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.executor: ThreadPoolExecutor | None = None
        self.size = 0
        self.pid = os.getpid()

    def submit(self, fn: Callable, parts: list[slice]) -> list[Future]:
        """Submit fn(part) for each part, growing the pool to len(parts) threads if needed."""
        with self.lock:
            if self.executor is None or self.pid != os.getpid() or len(parts) > self.size:
                old = self.executor if self.pid == os.getpid() else None
                self.size = max(len(parts), self.size if old is not None else 0)
                self.executor = ThreadPoolExecutor(max_workers=self.size, thread_name_prefix="optlayers-slice")
                self.pid = os.getpid()
                if old is not None:
                    old.shutdown(wait=False)  # its threads end after the slices they hold
            return [self.executor.submit(fn, part) for part in parts]

    def reset_after_fork(self) -> None:
        """In a forked child: the parent's threads do not exist here, and its lock may be held."""
        self.lock = threading.Lock()
        self.executor, self.size, self.pid = None, 0, os.getpid()


_POOL = _Pool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOL.reset_after_fork)
_IN_SLICE = threading.local()


def _single_threaded(fn: Callable[[slice], Result], caller: contextvars.Context, part: slice) -> Result:
    """fn(part) in a pool thread whose OpenMP and MKL teams are one thread, under no_grad, in a
    copy of the caller's context (its context variables, e.g. ``host.accelerator_schedule``, and
    nothing a previous caller of the same pool thread set)."""
    return caller.copy().run(_run_slice, fn, part)


def _run_slice(fn: Callable[[slice], Result], part: slice) -> Result:
    _IN_SLICE.active = True
    try:
        with calling_thread_alone(), torch.no_grad():
            return fn(part)
    finally:
        _IN_SLICE.active = False


def map_slices(fn: Callable[[slice], Result], batch: int, count: int) -> list[Result]:
    """[fn(slice) for each of ``count`` contiguous slices of range(batch)], the slices in parallel
    threads of the shared pool under ``torch.no_grad()`` (with ``count`` 1, or when called from
    inside a slice, fn runs in the caller's thread; with ``count`` 1 also in its grad mode)."""
    if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= max(batch, 1):
        raise ValueError(f"count must be an int in [1, batch = {batch}], got {count!r}")
    if count == 1:
        return [fn(slice(0, batch))]
    bounds = [index * batch // count for index in range(count + 1)]
    slices = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    if getattr(_IN_SLICE, "active", False):
        with torch.no_grad():
            return [fn(part) for part in slices]
    futures = _POOL.submit(functools.partial(_single_threaded, fn, contextvars.copy_context()), slices)
    return _results(futures)


def _results(futures: list[Future]) -> list:
    """The futures' results in order, once every one has ended: where one raises, those not yet
    started are cancelled and the running ones waited for (they read the caller's tensors), then
    the first exception in order is raised; so is an interrupt of the wait, after the same."""
    try:
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        if pending and any(future.exception() is not None for future in done):
            for future in pending:
                future.cancel()
        wait(futures)
    except BaseException:
        for future in futures:
            future.cancel()
        wait(futures)
        raise
    failed = next((future for future in futures if not future.cancelled() and future.exception() is not None), None)
    if failed is not None:
        failed.result()  # raises its exception
    return [future.result() for future in futures]


def map_chunks(fn: Callable[[slice], Result], batch: int, count: int, chunk: int) -> list[Result]:
    """``map_slices`` with each of the ``count`` slices cut into consecutive chunks of ``chunk``
    problems, which its thread runs one after another: [fn(chunk) for each chunk of range(batch)],
    in order. ``chunk`` must divide the slices' size (batch / count, which ``count`` must divide)."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 1 or batch % count:
        raise ValueError(f"count must be an int >= 1 that divides batch = {batch}, got {count!r}")
    size = batch // count
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1 or size % chunk:
        raise ValueError(f"chunk must be an int >= 1 that divides the slices' size {size} (batch {batch} in {count}), got {chunk!r}")
    per_slice = map_slices(lambda part: [fn(slice(lo, lo + chunk)) for lo in range(part.start, part.stop, chunk)], batch, count)
    return [result for results in per_slice for result in results]
