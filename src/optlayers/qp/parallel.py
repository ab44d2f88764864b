"""Run the interior point method on slices of a CPU batch in parallel threads.

On the CPU, torch runs the batched triangular solves and Cholesky factorisations of the
solver one matrix after another on a single core, and its element-wise work on (B, n) vectors
is too small to be split across cores. Slicing the batch and solving the slices in as many
Python threads as torch has intra-op threads puts every core to work (torch releases the GIL
inside its kernels); each slice's thread runs torch single-threaded, so that the cores are
not oversubscribed. The problems of a batch are independent, so the slices give the same
iterates as the whole batch.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from optlayers.qp.batch import concat, take
from optlayers.qp.ipm import IPMResult, IPMSettings, solve_scaled
from optlayers.qp.scaling import QPData, Scaling

# A slice should hold at least this many matrix entries (batch × n × n). Measured on two cores:
# batch 128 × n = 50 (320 000 entries) ran as fast whole as in two slices, 64 × 100 (640 000)
# ~15 % faster in two, 128 × 100 ~20 %; below, the Python threads' contention for the GIL
# eats what the parallel linear algebra gains.
_MIN_SLICE_ENTRIES = 300_000


def slice_count(batch: int, n: int, device: torch.device) -> int:
    """How many slices a batch of ``batch`` problems with ``n`` variables is solved in."""
    if device.type != "cpu":
        return 1
    per_problem = max(n * n, 1)
    return max(1, min(torch.get_num_threads(), batch, batch * per_problem // _MIN_SLICE_ENTRIES))


def _solve_slice(data: QPData, sc: Scaling, settings: IPMSettings, with_factor: bool) -> IPMResult:
    """One slice on one core. Under OpenMP torch's thread count is per thread, copied from a
    process-wide value when a thread first asks for it: asking before setting 1 keeps a sibling
    slice's setting from leaking in (the caller restores the process-wide value afterwards)."""
    torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        return solve_scaled(data, sc, settings, with_factor)


def solve_scaled_parallel(data: QPData, sc: Scaling, settings: IPMSettings, with_factor: bool = True) -> IPMResult:
    """``ipm.solve_scaled`` on ``slice_count`` slices of the batch at once; same result."""
    batch, n = data.p.shape
    count = slice_count(batch, n, data.p.device)
    if count == 1:
        return solve_scaled(data, sc, settings, with_factor)
    bounds = torch.linspace(0, batch, count + 1).round().to(torch.int64).tolist()
    slices = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    threads = torch.get_num_threads()
    try:
        with ThreadPoolExecutor(max_workers=count) as pool:
            parts = list(pool.map(lambda s: _solve_slice(take(data, s), take(sc, s), settings, with_factor), slices))
    finally:
        torch.set_num_threads(threads)
    return concat(parts)
