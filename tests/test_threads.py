"""threads.py: slices cover the batch exactly once, run in one long-lived pool whose threads keep
one OpenMP and one MKL thread each, and give the single-threaded answer from several user threads
and from DataLoader workers."""
import os
import subprocess
import sys
import threading

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from optlayers import solve_qp, threads
from optlayers.cone.interior import solver as cone_solver
from optlayers.qp import parallel
from tests.qp.qp_problems import random_qp

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
caller = threads.thread_limits()
assert caller["openmp"] == 2, caller
inside = threads.map_slices(lambda part: threads.thread_limits(), 4, 2)
assert inside == [{"openmp": 1, "mkl": 1 if caller["mkl"] is not None else None}] * 2, inside
assert threads.thread_limits() == caller, threads.thread_limits()
assert torch.get_num_threads() == 2
"""


@needs_openmp
def test_workers_keep_one_openmp_and_one_mkl_thread_after_the_caller_set_a_count():
    """torch starts each new thread with the count given to torch.set_num_threads, in OpenMP and in
    MKL (mkl_set_num_threads_local); a slice must run with one of each, read back from the
    runtimes themselves, and leave the caller's counts alone. A fresh interpreter, since
    torch.set_num_threads must not run in the test process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _WORKERS_AFTER_SET], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_mkl_is_found_where_torch_uses_it():
    if torch.backends.mkl.is_available():
        assert threads._mkl_set_num_threads_local() is not None
        assert threads.thread_limits()["mkl"] >= 1


@needs_openmp
def test_one_pool_serves_every_solve():
    """The slices of successive calls run on the same, long-lived threads: no pool (and no thread)
    is created per solve."""
    def idents():
        barrier = threading.Barrier(2, timeout=30)  # both slices at once: two distinct threads
        return set(threads.map_slices(lambda part: barrier.wait() is None or threading.get_ident(), 4, 2))

    def slice_threads():
        return {t.ident for t in threading.enumerate() if t.name.startswith("optlayers-slice")}

    first = idents()
    assert len(first) == 2 and threading.get_ident() not in first
    executor, live = threads._POOL.executor, slice_threads()
    assert first <= live
    for _ in range(5):
        assert idents() <= live
    assert threads._POOL.executor is executor and slice_threads() == live


def test_slices_asked_for_inside_a_slice_run_in_that_thread():
    """A solve called from inside a slice must not wait for the pool it occupies."""
    inner = threads.map_slices(lambda part: (threading.get_ident(), threads.map_slices(
        lambda inner_part: threading.get_ident(), 4, 2)), 4, 2)
    for outer, inner_idents in inner:
        assert inner_idents == [outer, outer]


def _qp_batch(seed: int) -> dict:
    torch.manual_seed(seed)
    return random_qp((12,), 8, 10, 3, active=True)


def _sliced(monkeypatch, count: int) -> None:
    """Make every batch slice into ``count`` (no torch.set_num_threads: see the module notes)."""
    monkeypatch.setattr(parallel, "_MIN_SLICE_ENTRIES", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: count)


def _assert_same_solution(got, want) -> None:
    for name in ("z", "lam", "nu", "s", "status", "iterations"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0, equal_nan=True, msg=name)


@needs_openmp
def test_several_user_threads_solving_at_once_get_the_single_threaded_answers(monkeypatch):
    data = [_qp_batch(seed) for seed in range(6)]
    _sliced(monkeypatch, 1)
    alone = [solve_qp(**d) for d in data]
    _sliced(monkeypatch, 2)
    assert parallel.slice_count(12, 8, torch.device("cpu")) == 2
    results, errors = [None] * len(data), []
    start = threading.Barrier(len(data), timeout=60)

    def user(i):
        try:
            start.wait()
            for _ in range(3):
                results[i] = solve_qp(**data[i])
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    users = [threading.Thread(target=user, args=(i,)) for i in range(len(data))]
    for t in users:
        t.start()
    for t in users:
        t.join(timeout=300)
    assert not errors, errors
    for got, want in zip(results, alone):
        _assert_same_solution(got, want)


class _QPs(Dataset):
    """Each item solves one batch of QPs in the worker (sliced: two pool threads in the worker)."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        sol = solve_qp(**self.data[i])
        return sol.z, sol.lam, sol.nu, sol.status


@needs_openmp
def test_dataloader_workers_get_the_single_threaded_answers(monkeypatch):
    """Two forked DataLoader workers solve sliced batches after the parent's pool was started (a
    child must start its own: the parent's threads do not exist there)."""
    data = [_qp_batch(seed) for seed in range(4)]
    _sliced(monkeypatch, 1)
    alone = [solve_qp(**d) for d in data]
    _sliced(monkeypatch, 2)
    solve_qp(**data[0])  # the parent's pool exists before the fork
    loader = DataLoader(_QPs(data), batch_size=None, num_workers=2, timeout=240,
                        multiprocessing_context="fork" if sys.platform.startswith("linux") else None)
    for (z, lam, nu, status), want in zip(loader, alone):
        for got, name in ((z, "z"), (lam, "lam"), (nu, "nu"), (status, "status")):
            torch.testing.assert_close(got, getattr(want, name), rtol=0, atol=0, msg=name)


@needs_openmp
def test_cone_ipm_slices_through_the_same_pool(monkeypatch):
    """The cone interior point method's slices run on the shared pool too, with the same answer."""
    from optlayers.cone import ConeSpec
    from optlayers.cone.testing import random_program

    spec = ConeSpec(zero=2, nonneg=10, soc=[4])
    A, b, c, _, x, _, _ = random_program(spec, 6, batch=6, seed=1)
    monkeypatch.setattr(cone_solver, "_MIN_SLICE_ENTRIES", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    whole = cone_solver.solve(A, b, c, None, spec, max_slices=1)
    used = []
    original = threads._single_threaded
    monkeypatch.setattr(threads, "_single_threaded", lambda fn, caller, part: used.append(threading.current_thread().name)
                        or original(fn, caller, part))
    sliced = cone_solver.solve(A, b, c, None, spec)
    assert len(used) == 2 and all(name.startswith("optlayers-slice") for name in used)
    for got, want in zip(sliced, whole):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_failing_slice_raises_only_once_the_others_have_ended():
    """Where one slice raises, the others read the caller's tensors: the call returns (raising the
    first slice's error in order) only once every slice has ended or was cancelled before it began."""
    ended, started = [], threading.Event()

    def fn(part):
        if part.start == 0:
            started.wait(30)  # the other slice runs meanwhile
            raise ValueError("slice 0 failed")
        started.set()
        threading.Event().wait(0.3)
        ended.append(part.start)
        return part.start

    with pytest.raises(ValueError, match="slice 0 failed"):
        threads.map_slices(fn, 4, 2)
    assert ended == [2]
    assert threads.map_slices(lambda part: part.start, 4, 2) == [0, 2]  # the pool serves the next call


@pytest.mark.parametrize("count", [0, -1, 5])
def test_map_slices_refuses_bad_counts(count):
    with pytest.raises(ValueError, match="count must be an int in"):
        threads.map_slices(lambda part: part, 4, count)



@needs_openmp
def test_equal_slices_divide_the_batch(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    cpu = torch.device("cpu")
    assert threads.equal_slice_count(64, 1, cpu, 8) == 4
    assert threads.equal_slice_count(24, 1, cpu, 8) == 3  # at least 8 each, then as many as divide evenly
    assert threads.equal_slice_count(63, 1, cpu, 8) == 3 and threads.equal_slice_count(61, 1, cpu, 8) == 1
    assert threads.equal_slice_count(64, 1, cpu, 8, max_slices=3) == 2
    assert threads.equal_slice_count(64, 100, cpu, 1600) == 4 and threads.equal_slice_count(64, 100, cpu, 3200) == 2
    assert threads.equal_slice_count(64, 1, torch.device("meta"), 8) == 1


_ALONE = """
import torch
from optlayers import solve_qp, threads
from optlayers.qp import autograd
torch.set_num_threads(2)
caller = threads.thread_limits()
one = {"openmp": 1, "mkl": 1 if caller["mkl"] is not None else None}
with threads.calling_thread_alone():
    assert threads.thread_limits() == one, threads.thread_limits()
assert threads.thread_limits() == caller, threads.thread_limits()
try:
    with threads.calling_thread_alone():
        raise KeyError("inside")
except KeyError:
    pass
assert threads.thread_limits() == caller, threads.thread_limits()

seen = []
def recording(fn):
    def wrapped(*args, **kwargs):
        seen.append((fn.__name__, threads.thread_limits()))
        return fn(*args, **kwargs)
    return wrapped
autograd.forward_outputs = recording(autograd.forward_outputs)
autograd._vjp = recording(autograd._vjp)
autograd.solution_jvp = recording(autograd.solution_jvp)
g = torch.Generator().manual_seed(0)
for batch, n, alone in [(1, 10, True), (threads.ALONE_MAX_ENTRIES // 100 + 1, 10, False)]:
    seen.clear()
    M = torch.randn(batch, n, n, dtype=torch.float64, generator=g)
    p = torch.randn(batch, n, dtype=torch.float64, generator=g, requires_grad=True)
    z = solve_qp(M @ M.mT + torch.eye(n, dtype=torch.float64), p, G=torch.eye(n, dtype=torch.float64),
                 h=torch.ones(n, dtype=torch.float64)).z
    z.sum().backward()
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(p.detach(), torch.ones_like(p))
        solve_qp(M @ M.mT + torch.eye(n, dtype=torch.float64), dual, G=torch.eye(n, dtype=torch.float64),
                 h=torch.ones(n, dtype=torch.float64))
    assert [name for name, _ in seen] == ["outputs", "_vjp", "outputs", "solution_jvp"], seen
    assert all(limits == (one if alone else caller) for _, limits in seen), (batch, seen)
    assert threads.thread_limits() == caller, threads.thread_limits()
"""


@needs_openmp
def test_small_batches_run_on_the_calling_thread_alone():
    """A QP batch of at most ``threads.ALONE_MAX_ENTRIES`` entries is solved and differentiated (backward
    and forward mode) with
    the calling thread's OpenMP and MKL teams at one thread, read back from the runtimes, and the
    caller's counts are restored after it (and after an exception); a larger batch keeps them. A
    fresh interpreter, since torch.set_num_threads must not run in the test process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _ALONE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_small_work_threads_refuses_bad_arguments():
    with pytest.raises(ValueError, match="entries must be an integer >= 0, got -1"):
        threads.small_work_threads(-1, torch.device("cpu"))
    with pytest.raises(ValueError, match="entries must be an integer >= 0, got 2.5"):
        threads.small_work_threads(2.5, torch.device("cpu"))
    with pytest.raises(TypeError, match="device must be a torch.device, got str"):
        threads.small_work_threads(10, "cpu")
