"""Run the QP interior point method on slices of a CPU batch in parallel threads (threads.py).

The slices give the same iterates as the whole batch. The eager method is sliced here
(``solve_scaled_parallel``); a compiled solve whose iterations run in one call, and its compiled
backward, are sliced where they are called (``qp.forward._compiled_forward``,
``qp.autograd._sliced_compiled_vjp``) in ``compiled_slice_count`` slices, each in chunks of the
size ``compiled_slices`` chooses.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from optlayers import threads
from optlayers.engine.batch import concat, take
from optlayers.engine.step import QPData
from optlayers.qp.ipm import IPMResult, IPMSettings, solve_scaled
from optlayers.qp.scaling import Scaling

# A slice should hold at least this many matrix entries (batch × n × n). Measured on two cores:
# batch 128 × n = 50 (320 000 entries) ran as fast whole as in two slices, 64 × 100 (640 000)
# ~15 % faster in two, 128 × 100 ~20 %.
_MIN_SLICE_ENTRIES = 300_000
# A compiled solve (``fused.pays``: its iterations in one call, which releases the GIL) is cut into
# slices of at least this many matrix entries (problems × n²). Measured on two cores, quiet, two
# threads, compiled forward + backward against the whole batch (ab_trees): 64 × n = 100 in two
# slices 0.84 of the time, 128 × n = 10 in two slices of 6,400 entries 0.93, 16 × n = 10 in two of
# 800 1.38 (each slice pays the call's fixed cost, part of it under the GIL); and in the sweep's
# harness, where eager work runs between the calls, the sliced (128, 10) forward spread over
# 4.7-8.1 ms between runs (whole: 5.8 ms), its slices competing with the caller's OpenMP threads.
# Slices pay where each holds tens of milliseconds of work.
_MIN_COMPILED_SLICE_ENTRIES = 50_000


def slice_count(batch: int, n: int, device: torch.device) -> int:
    """How many slices a batch of ``batch`` problems with ``n`` variables is solved in."""
    return threads.slice_count(batch, n * n, device, _MIN_SLICE_ENTRIES)


def compiled_slice_count(batch: int, n: int, device: torch.device) -> int:
    """How many slices a compiled solve of ``batch`` problems with ``n`` variables is cut into
    (``threads.equal_slice_count``, slices of at least ``_MIN_COMPILED_SLICE_ENTRIES`` entries)."""
    return threads.equal_slice_count(batch, n * n, device, _MIN_COMPILED_SLICE_ENTRIES)


# A compiled solve on the CPU runs each slice in chunks of at most this many matrix entries
# (problems × n²), one compiled call after another, so that a chunk's matrices stay in the cache
# through the call's iterations (a pass over a (B, n, n) tensor that is not there reads memory at
# 5.7 GB/s on the AMD EPYC machine, one thread, against 30 GB/s from the cache). Measured there
# (``benchmarks/compiled_chunks.py``), compiled forward + backward of 128 problems with n = 100: one
# thread, chunks of 32, 16, 8, 4 and 2 against the whole batch 0.72, 0.58, 0.55, 0.57 and 0.61 of the
# time; two threads, chunks of 8 and 4 against slices of 64 whole 0.67 and 0.67 (docs/qp.md). On the
# Intel Xeon machine (2 MB of L2 per core against the AMD's 512 KB; 2026-12-06, one thread, 5 rounds,
# medians) chunks of 8 stay the fastest: 16, 32 and 4 took 1.07, 1.09 and 1.03 times as long.
_CHUNK_ENTRIES = 80_000
# Smaller chunks pay their calls' fixed cost: a slice that has no divisor of at least this many
# entries (and at most ``_CHUNK_ENTRIES``) runs whole.
_MIN_CHUNK_ENTRIES = 20_000


def compiled_slices(batch: int, n: int, device: torch.device) -> tuple[int, int]:
    """How a compiled solve of ``batch`` problems with ``n`` variables is cut: ``compiled_slice_count``
    slices side by side, each in chunks of the second number of problems, all of one size (one
    compiled specialisation): the largest divisor of the slices' size within ``_CHUNK_ENTRIES``
    on the CPU (the slice whole where it is within that already or no divisor has
    ``_MIN_CHUNK_ENTRIES``; one problem where n² alone exceeds ``_CHUNK_ENTRIES``); elsewhere
    the slice whole."""
    count = compiled_slice_count(batch, n, device)
    size = batch // count
    entries = max(n * n, 1)
    if device.type != "cpu" or size * entries <= _CHUNK_ENTRIES:
        return count, size
    if entries > _CHUNK_ENTRIES:
        return count, 1
    chunk = max(d for d in range(1, _CHUNK_ENTRIES // entries + 1) if size % d == 0)
    return count, chunk if chunk * entries >= _MIN_CHUNK_ENTRIES else size


def solve_scaled_parallel(data: QPData, sc: Scaling, settings: IPMSettings, with_factor: bool = True) -> IPMResult:
    """``ipm.solve_scaled`` on ``slice_count`` slices of the batch at once; same result. (A compiled
    solve whose iterations run in one call, ``fused.pays``, is compiled with the forward's own work
    instead: ``qp.forward``.)"""
    batch, n = data.p.shape
    # compiled functions are specialised to the batch's shape: one slice, the batch whole
    count = 1 if settings.compiled else slice_count(batch, n, data.p.device)
    if count == 1:
        return solve_scaled(data, sc, settings, with_factor)
    parts = threads.map_slices(lambda part: solve_scaled(take(data, part), take(sc, part), settings, with_factor), batch, count)
    return replace(concat(parts), all_solved=all(part.all_solved for part in parts), inexact=any(part.inexact for part in parts))
