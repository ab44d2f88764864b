"""threads.py: slices cover the batch exactly once and the caller's thread count survives."""
import os
import subprocess
import sys

import pytest
import torch

from optlayers import threads

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


@pytest.mark.parametrize("batch, count", [(7, 3), (2049, 2), (5, 5), (1, 1)])
def test_slices_cover_the_batch_once(batch, count):
    parts = threads.map_slices(lambda part: list(range(batch))[part], batch, count)
    assert len(parts) == count
    assert sum(parts, []) == list(range(batch))


def test_slices_with_a_half_precision_default_dtype():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        parts = threads.map_slices(lambda part: (part.start, part.stop), 2049, 2)
    finally:
        torch.set_default_dtype(previous)
    assert parts[0][0] == 0 and parts[-1][1] == 2049 and parts[0][1] == parts[1][0]


needs_openmp = pytest.mark.skipif(threads._omp_set_num_threads() is None,
                                  reason="no per-thread OpenMP setting found: batches are not sliced")


@needs_openmp
def test_workers_run_single_threaded_and_the_caller_keeps_its_threads():
    before = torch.get_num_threads()
    inside = threads.map_slices(lambda part: torch.get_num_threads(), 4, 2)
    assert inside == [1, 1]
    assert torch.get_num_threads() == before


_LU_AFTER_SLICES = """
import torch
from optlayers import threads
threads.map_slices(lambda part: torch.linalg.cholesky(torch.eye(50, dtype=torch.float64).expand(8, 50, 50)), 4, 2)
A = torch.randn(8, 200, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
lu, pivots, _ = torch.linalg.lu_factor_ex(A)
assert bool(((pivots >= 1) & (pivots <= 200)).all()), "invalid pivots"
P, L, U = torch.lu_unpack(lu, pivots)
assert torch.allclose(P @ L @ U, A, atol=1e-10), "wrong factors"
"""


@needs_openmp
def test_batched_lu_stays_valid_after_sliced_solves():
    """torch.set_num_threads (which the slicing must not call) breaks torch's batched LU for the
    whole process on MKL builds: invalid pivots, wrong factors (pytorch/pytorch#142815). A fresh
    interpreter, because other tests set thread counts themselves."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _LU_AFTER_SLICES], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


_WORKERS_AFTER_SET = """
import torch
from optlayers import threads
torch.set_num_threads(2)
assert threads.map_slices(lambda part: torch.get_num_threads(), 4, 2) == [1, 1]
"""


@needs_openmp
def test_workers_stay_single_threaded_after_the_caller_set_a_count():
    """torch's per-thread start-up resets a new thread's team to the process count once one was set."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _WORKERS_AFTER_SET], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("count", [0, -1, 5])
def test_map_slices_refuses_bad_counts(count):
    with pytest.raises(ValueError, match="count must be an int in"):
        threads.map_slices(lambda part: part, 4, count)

