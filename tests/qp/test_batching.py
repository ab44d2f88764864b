"""The batch is an implementation detail: slices on parallel threads and a working batch that
sheds finished problems give every element the answer it gets alone."""
import pytest
import torch

from optlayers import QPStatus, solve_qp, threads
from optlayers.qp import forward, parallel
from optlayers.engine import loop
from tests.qp.qp_problems import random_qp


def _with_threads(monkeypatch, count: int) -> None:
    """Make the slicing see ``count`` intra-op threads without torch.set_num_threads, which would
    leave torch's batched LU broken for the rest of the test process (pytorch/pytorch#142815)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: count)


def _solve(data: dict) -> tuple:
    leaves = {k: v.clone().requires_grad_() for k, v in data.items() if v is not None}
    sol = solve_qp(**leaves, on_failure="ignore")
    loss = torch.nan_to_num(sol.z).square().sum() + torch.nan_to_num(sol.lam).sum()
    loss.backward()
    return sol, {k: v.grad for k, v in leaves.items()}


@pytest.mark.skipif(threads._omp_set_num_threads() is None, reason="no per-thread OpenMP setting: batches are not sliced")
def test_slices_reproduce_the_whole_batch(monkeypatch):
    torch.manual_seed(0)
    data = random_qp((7,), 6, 5, 2, active=True)
    data["G"][3, 1] = -data["G"][3, 0]
    data["h"][3, :2] = -1.0  # gᵀz ≤ −1 and gᵀz ≥ 1: element 3 is infeasible
    monkeypatch.setattr(parallel, "_MIN_SLICE_ENTRIES", 1)
    _with_threads(monkeypatch, 1)
    whole, whole_grads = _solve(data)
    _with_threads(monkeypatch, 3)
    assert parallel.slice_count(7, 6, torch.device("cpu")) == 3
    sliced_calls = []
    original = threads.map_slices
    monkeypatch.setattr(threads, "map_slices", lambda fn, batch, count: sliced_calls.append(count) or original(fn, batch, count))
    sliced, sliced_grads = _solve(data)
    assert sliced_calls == [3]
    assert whole.status[3] != QPStatus.SOLVED and (whole.status != QPStatus.SOLVED).sum() == 1
    for name in ("z", "lam", "nu", "s", "status", "iterations", "primal_residual", "dual_residual", "gap"):
        torch.testing.assert_close(getattr(sliced, name), getattr(whole, name), rtol=0, atol=0, equal_nan=True, msg=name)
    for name, g in whole_grads.items():
        torch.testing.assert_close(sliced_grads[name], g, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.skipif(threads._omp_set_num_threads() is None, reason="no per-thread OpenMP setting: batches are not sliced")
def test_small_batches_and_other_devices_are_not_sliced(monkeypatch):
    _with_threads(monkeypatch, 2)
    assert parallel.slice_count(128, 100, torch.device("cpu")) == 2
    assert parallel.slice_count(128, 10, torch.device("cpu")) == 1
    assert parallel.slice_count(1, 500, torch.device("cpu")) == 1
    assert parallel.slice_count(128, 100, torch.device("meta")) == 1
    _with_threads(monkeypatch, 1)
    assert parallel.slice_count(128, 100, torch.device("cpu")) == 1


def test_finished_problems_leave_the_working_batch(monkeypatch):
    """Problems that need few iterations are dropped from the batch; every element still gets
    exactly the answer it gets alone, including the infeasible and the slow ones."""
    torch.manual_seed(1)
    data = random_qp((8,), 5, 6, 1, active=True)
    data["Q"][:4] = torch.eye(5, dtype=torch.float64)  # easy: a few iterations
    data["p"][:4] = 0.1 * data["p"][:4].sign()
    data["G"][5, 1] = -data["G"][5, 0]
    data["h"][5, :2] = -1.0  # infeasible
    compactions = []
    original_take = loop.take
    monkeypatch.setattr(loop, "take", lambda obj, index: compactions.append(len(index)) or original_take(obj, index))
    batch = solve_qp(**data, on_failure="ignore")
    assert compactions, "the working batch was never compacted"
    assert len(set(batch.iterations.tolist())) > 2
    for i in range(8):
        alone = solve_qp(**{k: None if v is None else v[i] for k, v in data.items()}, on_failure="ignore")
        assert alone.status == batch.status[i] and alone.iterations == batch.iterations[i], i
        for name in ("z", "lam", "nu", "gap"):
            torch.testing.assert_close(getattr(batch, name)[i], getattr(alone, name), rtol=1e-12, atol=1e-12, equal_nan=True)


def _six_with_an_infeasible_one() -> dict:
    """Six small QPs (n = 5, 6 inequalities, 2 equalities), the fifth infeasible."""
    torch.manual_seed(2)
    data = random_qp((6,), 5, 6, 2, active=True)
    data["G"][4, 1] = -data["G"][4, 0]
    data["h"][4, :2] = -1.0
    return data


def _compiled_answer(data: dict) -> tuple:
    """The compiled solve of ``data`` and the gradients of a loss of its solution and multipliers
    with respect to every input (failed elements' NaN outputs read as zero)."""
    leaves = {k: v.clone().requires_grad_() for k, v in data.items() if v is not None}
    sol = solve_qp(**leaves, on_failure="ignore", compile=True)
    (torch.nan_to_num(sol.z).square().sum() + torch.nan_to_num(sol.lam).sum()).backward()
    return sol, {k: v.grad for k, v in leaves.items()}


def _assert_same_answer(answer: tuple, reference: tuple) -> None:
    """Every element's statuses, iterations, solution and gradients equal, bit for bit."""
    (sol, grads), (ref, ref_grads) = answer, reference
    for name in ("z", "lam", "nu", "s", "status", "iterations", "primal_residual", "dual_residual", "gap"):
        torch.testing.assert_close(getattr(sol, name), getattr(ref, name), rtol=0, atol=0, equal_nan=True, msg=name)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=0, atol=0, msg=name)


@pytest.mark.slow
@pytest.mark.skipif(threads._omp_set_num_threads() is None, reason="no per-thread OpenMP setting: batches are not sliced")
def test_compiled_slices_reproduce_the_whole_batch(eager_backend, monkeypatch):
    """A compiled solve and its compiled backward cut into equal slices on parallel threads give
    every element the answer (statuses, iterations, solution, gradients) of the whole batch's.
    Slow: dynamo traces the whole fused solve once for the batch and once for a slice (two shapes
    at several seconds each, whatever the problem size); the eager slices are checked by
    test_slices_reproduce_the_whole_batch in the default suite."""
    data = _six_with_an_infeasible_one()
    monkeypatch.setattr(parallel, "_MIN_COMPILED_SLICE_ENTRIES", 1)
    sliced_calls = []
    original = threads.map_slices
    monkeypatch.setattr(threads, "map_slices", lambda fn, batch, count: sliced_calls.append(count) or original(fn, batch, count))
    results = []
    for count in (1, 3):
        _with_threads(monkeypatch, count)
        assert parallel.compiled_slice_count(6, 5, torch.device("cpu")) == count
        results.append(_compiled_answer(data))
    whole, sliced = results
    assert sliced_calls == [3, 3]  # the forward, then the compiled backward
    assert whole[0].status[4] != QPStatus.SOLVED and (whole[0].status != QPStatus.SOLVED).sum() == 1
    _assert_same_answer(sliced, whole)


@pytest.mark.skipif(threads._omp_set_num_threads() is None, reason="no per-thread OpenMP setting: batches are not sliced")
def test_compiled_slices_are_equal_and_not_too_small(monkeypatch):
    _with_threads(monkeypatch, 2)
    cpu = torch.device("cpu")
    assert parallel.compiled_slice_count(128, 50, cpu) == 2
    assert parallel.compiled_slice_count(127, 50, cpu) == 1  # unequal slices would be two compiled shapes
    assert parallel.compiled_slice_count(128, 10, cpu) == 1  # slices of 64 × 10²: too little work each
    assert parallel.compiled_slice_count(16, 100, cpu) == 2
    assert parallel.compiled_slice_count(128, 50, torch.device("meta")) == 1
    _with_threads(monkeypatch, 3)
    assert parallel.compiled_slice_count(96, 50, cpu) == 3 and parallel.compiled_slice_count(64, 50, cpu) == 2
    _with_threads(monkeypatch, 1)
    assert parallel.compiled_slice_count(128, 100, cpu) == 1


@pytest.mark.slow
@pytest.mark.skipif(threads._omp_set_num_threads() is None, reason="no per-thread OpenMP setting: batches are not sliced")
def test_compiled_chunks_reproduce_the_whole_batch(eager_backend, monkeypatch):
    """A compiled solve and its compiled backward run in chunks one after another, in one slice and
    in two side by side (``parallel.compiled_slices``, ``threads.map_chunks``; the chunks' size
    lowered to these small problems), give every element the answer (statuses, iterations,
    solution, gradients) of the whole batch's. Slow: a compiled specialisation per chunk size."""
    data = _six_with_an_infeasible_one()
    monkeypatch.setattr(parallel, "_MIN_COMPILED_SLICE_ENTRIES", 1)
    monkeypatch.setattr(parallel, "_MIN_CHUNK_ENTRIES", 1)
    chunked_calls = []
    original = threads.map_chunks
    monkeypatch.setattr(threads, "map_chunks", lambda fn, batch, count, chunk: chunked_calls.append((count, chunk))
                        or original(fn, batch, count, chunk))
    results = []
    for count, chunk_entries in ((1, 80_000), (1, 50), (2, 25)):  # whole; chunks of 2; two slices in chunks of 1
        _with_threads(monkeypatch, count)
        monkeypatch.setattr(parallel, "_CHUNK_ENTRIES", chunk_entries)
        results.append(_compiled_answer(data))
    assert chunked_calls == [(1, 2), (1, 2), (2, 1), (2, 1)]  # the forward, then the compiled backward
    whole, *chunked = results
    assert whole[0].status[4] != QPStatus.SOLVED and (whole[0].status != QPStatus.SOLVED).sum() == 1
    for answer in chunked:
        _assert_same_answer(answer, whole)


@pytest.mark.skipif(threads._omp_set_num_threads() is None, reason="no per-thread OpenMP setting: batches are not sliced")
def test_compiled_chunks_fit_the_cache_in_one_size(monkeypatch):
    """Each slice of a compiled CPU solve runs in chunks of the largest divisor of its size within
    ``_CHUNK_ENTRIES`` matrix entries, whole where it fits already or has no divisor of at least
    ``_MIN_CHUNK_ENTRIES``, one problem at a time where n² alone is larger; off the CPU, whole."""
    _with_threads(monkeypatch, 2)
    cpu = torch.device("cpu")
    assert parallel.compiled_slices(128, 100, cpu) == (2, 8)
    assert parallel.compiled_slices(128, 50, cpu) == (2, 32)
    assert parallel.compiled_slices(100, 100, cpu) == (2, 5)
    assert parallel.compiled_slices(128, 10, cpu) == (1, 128)  # 128 × 10² entries fit whole
    assert parallel.compiled_slices(127, 100, cpu) == (1, 127)  # prime: chunks of 1 problem pay their calls
    assert parallel.compiled_slices(4, 300, cpu) == (2, 1)
    assert parallel.compiled_slices(128, 100, torch.device("meta")) == (1, 128)
    _with_threads(monkeypatch, 1)
    assert parallel.compiled_slices(64, 100, cpu) == (1, 8)


def test_map_chunks_runs_every_chunk_once_in_order_and_checks_its_sizes():
    seen = []
    out = threads.map_chunks(lambda part: seen.append(part) or (part.start, part.stop), 12, 2, 3)
    assert out == [(0, 3), (3, 6), (6, 9), (9, 12)] and sorted(seen, key=lambda s: s.start) == [slice(a, a + 3) for a in (0, 3, 6, 9)]
    with pytest.raises(ValueError, match="chunk must be an int >= 1 that divides the slices' size 6"):
        threads.map_chunks(lambda part: part, 12, 2, 4)
    with pytest.raises(ValueError, match="count must be an int >= 1 that divides batch = 12"):
        threads.map_chunks(lambda part: part, 12, 5, 1)


@pytest.mark.skipif(threads._omp_set_num_threads() is None, reason="no per-thread OpenMP setting: batches are not sliced")
@pytest.mark.parametrize("n", [3, 32])  # the chunk's solve is one call; its structure is looked at first (DIAGONAL_MIN_N)
def test_a_bad_value_in_a_compiled_chunk_is_named_by_its_place_in_the_batch(eager_backend, monkeypatch, n):
    monkeypatch.setattr(parallel, "_MIN_COMPILED_SLICE_ENTRIES", 1)
    monkeypatch.setattr(parallel, "_CHUNK_ENTRIES", n * n)
    monkeypatch.setattr(parallel, "_MIN_CHUNK_ENTRIES", 1)
    _with_threads(monkeypatch, 2)
    assert parallel.compiled_slices(4, n, torch.device("cpu")) == (2, 1)
    data = random_qp((4,), n, 4, 0)
    data["h"][3, 0] = float("nan")  # in the second slice's second chunk
    with pytest.raises(ValueError, match=r"h contains NaN or -inf at batch elements \[?3\b"):
        solve_qp(**data, compile=True)



@pytest.mark.skipif(threads._omp_set_num_threads() is None, reason="no per-thread OpenMP setting: batches are not sliced")
@pytest.mark.parametrize("diagonal_first", [False, True])
def test_compiled_chunks_of_diagonal_and_dense_h_take_the_whole_batchs_structure(eager_backend, monkeypatch, diagonal_first):
    """Where the structure is looked at (n ≥ ``DIAGONAL_MIN_N``), chunks whose H is diagonal beside
    chunks whose H is not must factorise alike (the whole batch's verdict): a diagonal chunk's factor
    (B, n) beside a dense one's (B, n, n) could not be joined, or broadcast into it and gave wrong
    gradients. Answers and gradients are the eager solve's."""
    n = 32
    monkeypatch.setattr(parallel, "_MIN_COMPILED_SLICE_ENTRIES", 1)
    monkeypatch.setattr(parallel, "_CHUNK_ENTRIES", 2 * n * n)
    monkeypatch.setattr(parallel, "_MIN_CHUNK_ENTRIES", 1)
    _with_threads(monkeypatch, 1)
    assert parallel.compiled_slices(4, n, torch.device("cpu")) == (1, 2)
    g = torch.Generator().manual_seed(0)
    L = torch.randn(4, n, n, generator=g, dtype=torch.float64)
    dense = L @ L.mT / n + torch.eye(n, dtype=torch.float64)
    diagonal = torch.diag_embed(1 + torch.rand(4, n, generator=g, dtype=torch.float64))
    Q = torch.cat([diagonal[:2], dense[2:]]) if diagonal_first else torch.cat([dense[:2], diagonal[2:]])
    p = torch.randn(4, n, generator=g, dtype=torch.float64)
    G, h = torch.eye(n, dtype=torch.float64).expand(4, n, n), torch.ones(4, n, dtype=torch.float64)
    w = torch.linspace(-1, 1, n, dtype=torch.float64)
    answers = []
    for compile in (False, True):
        leaf = p.clone().requires_grad_()
        z = solve_qp(Q, leaf, G, h, compile=compile).z
        answers.append((z.detach(), torch.autograd.grad((z * w).sum(), leaf)[0]))
    (z, grad), (z_compiled, grad_compiled) = answers
    torch.testing.assert_close(z_compiled, z, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_compiled, grad, rtol=1e-8, atol=1e-9)

def test_joined_chunks_drop_inverses_only_where_the_chunks_disagree():
    """A chunk whose derivatives' factorisation was retried eagerly has no inverses ((b, 0, 0));
    the joined batch then has none; where every chunk has them, they are the chunks' end to end."""
    first, second = torch.full((2, 3, 3), 1.0), torch.full((1, 3, 3), -1.0)
    assert forward._inverses([first, torch.empty(1, 0, 0)]).shape == (3, 0, 0)
    assert torch.equal(forward._inverses([first, second]), torch.cat([first, second]))


def test_a_compiled_solve_compiles_once_more_for_every_other_batch_size(eager_backend):
    """compile=True on the CPU (``compiling.BATCH_DYNAMIC``): the first batch size (6) is compiled
    as it is, a second (4, a smaller last batch) once more with the batch size a symbol, and a
    third (5) and the first again compile nothing. Each has an infeasible element, and each
    element's answer is the one it gets from the eager solve."""
    data = _six_with_an_infeasible_one()
    _compiled_answer(data)
    _compiled_answer({k: v[2:] for k, v in data.items()})
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for first in (1, 0):
        part = {k: v[first:] for k, v in data.items()}
        sol, grads = _compiled_answer(part)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
        assert sol.status[4 - first] != QPStatus.SOLVED and (sol.status != QPStatus.SOLVED).sum() == 1
        leaves = {k: v.clone().requires_grad_() for k, v in part.items()}
        ref = solve_qp(**leaves, on_failure="ignore")
        (torch.nan_to_num(ref.z).square().sum() + torch.nan_to_num(ref.lam).sum()).backward()
        for name in ("z", "lam", "nu", "s"):
            torch.testing.assert_close(getattr(sol, name), getattr(ref, name), rtol=1e-9, atol=1e-9, equal_nan=True, msg=name)
        assert torch.equal(sol.status, ref.status)
        for name, leaf in leaves.items():
            torch.testing.assert_close(grads[name], leaf.grad, rtol=1e-7, atol=1e-8, msg=name)
