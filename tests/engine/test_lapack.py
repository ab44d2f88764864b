"""LAPACK's potf2 from scipy as the CPU's Cholesky factorisation (``engine.lapack``): the factors
and infos against torch's, its use from several threads, the rule that chooses it, the C++
operator that compiled code calls (built where a compiled factorisation first needs it, torch's
factorisation where it cannot be), and solves that take it against solves that do not; BLAS's trsv
as the compiled code's solves with those factors (the second operator): against torch's triangular
solves, the rule that chooses it, and a compiled solve with both operators against one without."""
import ctypes
import threading
import warnings

import pytest
import torch

from benchmarks.problems import random_qp
from optlayers import host, solve_qp, threads
from optlayers.engine import kkt, lapack
from optlayers.qp import parallel
from optlayers.status import Status
from tests.qp import qp_problems

needs_potf2 = pytest.mark.skipif(lapack._routine(torch.float64) is None or lapack._routine(torch.float32) is None,
                                 reason="scipy exports no potf2")


def _spd(shape: tuple[int, ...], n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(*shape, n, n, generator=g, dtype=torch.float64)
    return (X @ X.transpose(-2, -1) + n * torch.eye(n, dtype=torch.float64)).to(dtype)


@needs_potf2
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
@pytest.mark.parametrize("shape, n", [((5,), 50), ((), 64), ((2, 3), 41)])
def test_factors_and_infos_are_torchs(dtype, tol, shape, n):
    M = _spd(shape, n, dtype)
    before = M.clone()
    L, info = lapack.factor_lower(M)
    expected, expected_info = torch.linalg.cholesky_ex(M)
    assert L.shape == M.shape and L.is_contiguous() and info.dtype == torch.int32 and info.shape == shape
    assert torch.equal(info, expected_info)
    assert (L - expected).abs().max() <= tol * expected.abs().max()
    assert torch.equal(L.triu(1), torch.zeros_like(L))
    assert torch.equal(M, before)  # the input is not overwritten


@needs_potf2
def test_a_failing_minor_is_reported_with_its_order_and_a_transposed_input_is_read_as_given():
    M = _spd((3,), 45, torch.float64)
    M[1, 6, 6] = -1.0  # the leading minor of order 7 is not positive definite
    M[2] = M[2] + torch.triu(torch.ones(45, 45, dtype=torch.float64), 1)  # not symmetric: its transpose is another matrix
    view = M.transpose(-2, -1)
    L, info = lapack.factor_lower(view)
    expected, expected_info = torch.linalg.cholesky_ex(view)
    assert info.tolist() == [0, 7, 0] and torch.equal(info, expected_info)
    for k in (0, 2):  # torch reads the lower triangle of the view; so must potf2
        torch.testing.assert_close(L[k], expected[k], rtol=1e-12, atol=1e-12)


def test_compiled_code_without_the_operator_keeps_torchs_factorisation(monkeypatch):
    monkeypatch.setattr(lapack, "FACTORED_DTYPES", frozenset({torch.float64}))
    monkeypatch.setattr(lapack, "_operator_state", {"loaded": False, "tried": True})
    monkeypatch.setattr(lapack, "factor_lower", lambda M: pytest.fail("potf2 called from compiled code"))
    M = _spd((4,), 60, torch.float64, seed=1)
    compiled = torch.compile(lambda X: kkt.cholesky(2.0 * X)[0], fullgraph=True, options={"cpp_wrapper": True})
    torch.testing.assert_close(compiled(M), torch.linalg.cholesky(2.0 * M), rtol=1e-12, atol=1e-12)


def test_compiled_code_asks_for_the_operator_only_where_it_would_factorise_with_it(monkeypatch):
    """The operator is built where a compiled factorisation first needs it: tracing one of an order
    below ``COMPILED_MIN_N`` never asks; one in range asks once per trace and, told no, keeps torch's."""
    monkeypatch.setattr(lapack, "FACTORED_DTYPES", frozenset({torch.float64}))
    asked = []
    monkeypatch.setattr(lapack, "load_operator", lambda: asked.append(True) and False)
    for n, expected in ((lapack.COMPILED_MIN_N - 1, 0), (lapack.COMPILED_MIN_N, 1)):
        M = _spd((2,), n, torch.float64, seed=n)
        compiled = torch.compile(lambda X: kkt.cholesky(X)[0], fullgraph=True, options={"cpp_wrapper": True})
        torch.testing.assert_close(compiled(M), torch.linalg.cholesky(M), rtol=1e-12, atol=1e-12)
        assert len(asked) == expected, n


@pytest.fixture
def operator(monkeypatch):
    """The C++ operator loaded (built on first use), on any machine where the factorisation routine is
    found (``lapack._routine``), eager solves factorising by the same routine."""
    if lapack._routine(torch.float64) is None or lapack._routine(torch.float32) is None:
        pytest.skip("no LAPACK factorisation routine found")
    monkeypatch.setattr(lapack, "FACTORED_DTYPES", frozenset({torch.float64, torch.float32}))
    monkeypatch.setattr(lapack, "EAGER_FACTORED", True)
    if not lapack._operator_state["loaded"]:
        monkeypatch.setattr(lapack, "_operator_state", {"loaded": False, "tried": False})
        if not lapack.load_operator():
            pytest.skip("the potf2 operator could not be built here")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_code_factorises_with_the_operator_to_the_bit_of_the_eager_route(operator, dtype):
    M = _spd((5,), 60, dtype, seed=2)
    M[3, 9, 9] = -1.0
    compiled = torch.compile(lambda X: kkt.cholesky(X, check_finite=False), fullgraph=True, options={"cpp_wrapper": True})
    L, ok = compiled(M)
    eager, info = lapack.factor_lower(M)
    assert torch.equal(ok, info == 0) and ok.tolist() == [True, True, True, False, True]
    assert torch.equal(L, eager)


def test_the_operator_refuses_what_it_cannot_factorise(operator):
    with pytest.raises(RuntimeError, match="square matrices"):
        torch.ops.optlayers_lapack.cholesky_lower(torch.zeros(2, 3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="no factorisation routine for dtype"):
        torch.ops.optlayers_lapack.cholesky_lower(torch.eye(50, dtype=torch.float16))


def test_a_failed_build_warns_once_and_leaves_torchs_factorisation(monkeypatch):
    import torch.utils.cpp_extension

    def fail(**kwargs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch.utils.cpp_extension, "load", fail)
    monkeypatch.setattr(lapack, "FACTORED_DTYPES", frozenset({torch.float64}))
    monkeypatch.setattr(lapack, "_operator_state", {"loaded": False, "tried": False})
    with pytest.warns(RuntimeWarning, match="could not build its LAPACK operators, potf2, trsv and the masked product.*no compiler here"):
        assert not lapack.load_operator()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not tried again: no second warning
        assert not lapack.load_operator()


@needs_potf2
def test_threads_factorising_at_once_each_get_their_own_factors():
    batches = [_spd((16,), 80, torch.float64, seed=s) for s in range(4)]
    results = [None] * len(batches)

    def work(k):
        for _ in range(5):
            results[k] = lapack.factor_lower(batches[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for M, (L, info) in zip(batches, results):
        assert torch.equal(info, torch.zeros_like(info))
        torch.testing.assert_close(L @ L.transpose(-2, -1), M, rtol=1e-12, atol=1e-10)


def test_compiled_solves_take_the_operators_up_to_the_blocked_bound_where_mkl_factorises():
    """Where the routine is MKL's own blocked ``potrf`` the compiled bound is ``BLOCKED_MAX_N``;
    where it is scipy's unblocked ``potf2``, ``MAX_N`` (the eager bound)."""
    assert lapack.COMPILED_MAX_N == (lapack.BLOCKED_MAX_N if lapack._factor_source() == "potrf" else lapack.MAX_N)
    assert lapack.MAX_N <= lapack.COMPILED_MAX_N <= lapack.BLOCKED_MAX_N


def test_the_rule_takes_mid_sized_cpu_matrices_without_gradients_on_the_cpus_schedule(monkeypatch):
    monkeypatch.setattr(lapack, "FACTORED_DTYPES", frozenset({torch.float64, torch.float32}))
    monkeypatch.setattr(lapack, "EAGER_FACTORED", True)
    M = torch.eye(lapack.MIN_N, dtype=torch.float64)
    assert lapack.used_for(M) and lapack.used_for(torch.eye(lapack.MAX_N)) and lapack.used_for(M.expand(3, -1, -1))
    assert not lapack.used_for(torch.eye(lapack.MIN_N - 1, dtype=torch.float64))
    assert not lapack.used_for(torch.eye(lapack.MAX_N + 1, dtype=torch.float64))
    assert not lapack.used_for(M.to(torch.float16))
    assert not lapack.used_for(M.clone().requires_grad_(True))
    with torch.no_grad():
        assert lapack.used_for(M.clone().requires_grad_(True))
    with host.accelerator_schedule():
        assert not lapack.used_for(M)
    monkeypatch.setattr(lapack, "FACTORED_DTYPES", frozenset())
    assert not lapack.used_for(M)


def test_the_dtypes_and_the_routine_are_decided_by_the_machine():
    expected = torch.backends.mkl.is_available() and lapack._routine(torch.float64) is not None
    assert (torch.float64 in lapack.FACTORED_DTYPES) == expected
    assert lapack.EAGER_FACTORED == (torch.backends.mkl.is_available() and lapack._mkl_in_generic_code())
    if lapack._factor_source() == "potrf" and lapack._routine(torch.float64) is not None:  # MKL's own, from torch's library
        address = ctypes.cast(lapack._routine(torch.float64), ctypes.c_void_p).value
        assert address == lapack._torch_blas_address("dpotrf_")


def test_eager_solves_take_the_routine_only_where_eager_factored(monkeypatch):
    M = _spd((2,), 50, torch.float64)
    monkeypatch.setattr(lapack, "FACTORED_DTYPES", frozenset({torch.float64}))
    for eager in (False, True):
        monkeypatch.setattr(lapack, "EAGER_FACTORED", eager)
        assert lapack.used_for(M) == eager


@needs_potf2
@pytest.mark.parametrize("equalities", [0, 10])
def test_a_solve_with_potf2_agrees_with_one_with_torchs_factorisation(monkeypatch, equalities):
    monkeypatch.setattr(lapack, "EAGER_FACTORED", True)
    Q, p, G, h, A, b = random_qp(6, 50, 50, equalities, seed=3).tensors()
    p = p.clone().requires_grad_(True)
    seen = []
    factor_lower = lapack.factor_lower
    monkeypatch.setattr(lapack, "factor_lower", lambda M: seen.append(M.shape[-1]) or factor_lower(M))
    solutions = {}
    for route in ("potf2", "torch"):
        monkeypatch.setattr(lapack, "FACTORED_DTYPES", frozenset({torch.float64} if route == "potf2" else ()))
        sol = solve_qp(Q, p, G, h, A, b)
        grad, = torch.autograd.grad(sol.z.sum(), p)
        solutions[route] = (sol.z.detach(), grad, sol.status)
        assert (route == "potf2") == bool(seen)
        seen.clear()
    (z, grad, status), (z0, grad0, status0) = solutions["potf2"], solutions["torch"]
    assert torch.equal(status, status0)
    torch.testing.assert_close(z, z0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(grad, grad0, rtol=1e-7, atol=1e-7)


def test_the_kkt_factor_is_row_major_either_way(monkeypatch):
    M = _spd((3,), 50, torch.float64)
    for dtypes in (frozenset({torch.float64}) if lapack._routine(torch.float64) else frozenset(), frozenset()):
        monkeypatch.setattr(lapack, "FACTORED_DTYPES", dtypes)
        L, ok = kkt.cholesky(M)
        assert L.stride()[-1] == 1 and bool(ok.all())
        torch.testing.assert_close(L @ L.transpose(-2, -1), M, rtol=1e-12, atol=1e-10)


@needs_potf2
@pytest.mark.parametrize("n", [45, 64])
def test_a_matrix_gets_the_same_factor_in_any_place_of_its_batch(n):
    """potf2's factor of a matrix is the same bits wherever the matrix sits in a batch (each is
    factorised alone, in place in the batch's copy). torch's MKL factorisation on the AMD machine
    is not: at n = 45 the matrices in the odd places of a batch of six, whose addresses are 8 bytes
    off a multiple of 16, got other bits than alone (at n = 50, 64 and 100, all the same bits)."""
    M = _spd((6,), n, torch.float64, seed=4)
    batch, _ = lapack.factor_lower(M)
    for k in range(6):
        alone, _ = lapack.factor_lower(M[k:k + 1].clone())
        assert torch.equal(batch[k], alone[0]), k


@needs_potf2
@pytest.mark.skipif(threads._omp_set_num_threads() is None, reason="no per-thread OpenMP setting: batches are not sliced")
def test_with_potf2_slices_reproduce_the_whole_batch_and_a_problem_its_answer_alone(monkeypatch):
    """With the route, slices on parallel threads (each factorising its own problems by potf2) give
    the whole batch's answers, and a problem in a batch whose working batch shrinks gets its answer
    alone, to the solver's accuracy. Not to the bit: at this size the eager solve's slices differ
    from the whole batch by about 1e-13 with torch's factorisation as well (whose factors themselves
    depend on a matrix's place in its batch, see the test above), and such differences can move a
    problem's last iteration."""
    monkeypatch.setattr(lapack, "EAGER_FACTORED", True)
    monkeypatch.setattr(lapack, "FACTORED_DTYPES", frozenset({torch.float64}))
    torch.manual_seed(3)
    data = qp_problems.random_qp((6,), 45, 50, 5, active=True)
    data["Q"][:2] = torch.eye(45, dtype=torch.float64)  # easy: fewer iterations, so the working batch shrinks
    seen = []
    factor_lower = lapack.factor_lower
    monkeypatch.setattr(lapack, "factor_lower", lambda M: seen.append(M.shape[0]) or factor_lower(M))
    monkeypatch.setattr(parallel, "_MIN_SLICE_ENTRIES", 1)
    answers = {}
    for count in (1, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda: count)  # not torch.set_num_threads (pytorch#142815)
        answers[count] = solve_qp(**data)
    assert 2 in seen and 6 in seen  # slices of two and the whole batch, both by potf2
    assert torch.equal(answers[3].status, answers[1].status) and torch.equal(answers[3].iterations, answers[1].iterations)
    for name in ("z", "lam", "nu"):
        torch.testing.assert_close(getattr(answers[3], name), getattr(answers[1], name), rtol=1e-11, atol=1e-11, msg=name)
    whole = answers[1]
    assert len(set(whole.iterations.tolist())) > 1
    for i in (0, 5):
        alone = solve_qp(**{k: None if v is None else v[i] for k, v in data.items()})
        assert alone.status == whole.status[i]
        torch.testing.assert_close(alone.z, whole.z[i], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("signature, taken", [
    (b"void (char *, int *, __pyx_t_5scipy_6linalg_13cython_lapack_d *, int *, int *)", True),
    (b"void (char *, int64_t *, __pyx_t_5scipy_6linalg_13cython_lapack_d *, int64_t *, int64_t *)", False),
    (b"void (char *, int *, double *, int *, int *, int *)", False),
    (b"int (char *, int *, double *, int *, int *)", False),
])
def test_only_an_entry_point_with_potf2s_32_bit_signature_is_called(signature, taken):
    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.argtypes, new_capsule.restype = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p], ctypes.py_object
    name = ctypes.create_string_buffer(signature)  # the capsule keeps a pointer to its name: kept alive here
    capsule = new_capsule(ctypes.addressof(name), name, None)  # any non-null pointer: never called here
    assert (lapack._entry_point(capsule) is not None) == taken


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
@pytest.mark.parametrize("forward, backward", [(True, False), (False, True), (True, True)])
def test_the_solve_operator_solves_as_torchs_triangular_solves_do(operator, dtype, tol, forward, backward):
    M = _spd((2, 3), 60, dtype, seed=5)
    L, _ = torch.ops.optlayers_lapack.cholesky_lower(M)
    r = torch.randn(2, 3, 60, 1, generator=torch.Generator().manual_seed(6), dtype=dtype)
    x = lapack.solve_lower(L, r, forward, backward)
    expected = torch.linalg.solve_triangular(L, r, upper=False) if forward else r
    expected = torch.linalg.solve_triangular(L.mT, expected, upper=True) if backward else expected
    assert x.shape == r.shape and x.is_contiguous()
    torch.testing.assert_close(x, expected, rtol=tol, atol=tol)
    assert torch.equal(r, torch.randn(2, 3, 60, 1, generator=torch.Generator().manual_seed(6), dtype=dtype))  # r untouched


def test_the_solve_operator_refuses_what_it_cannot_solve(operator):
    L = torch.eye(50, dtype=torch.float64).expand(2, 50, 50)
    with pytest.raises(RuntimeError, match=r"r must be a \(\.\.\., n\) batch of vectors matching L's"):
        torch.ops.optlayers_lapack.trsv_lower(L, torch.ones(3, 50, dtype=torch.float64), True, False)
    with pytest.raises(RuntimeError, match="L and r must have one dtype"):
        torch.ops.optlayers_lapack.trsv_lower(L, torch.ones(2, 50, dtype=torch.float32), True, False)
    with pytest.raises(RuntimeError, match="no trsv routine for dtype"):
        torch.ops.optlayers_lapack.trsv_lower(L.half(), torch.ones(2, 50, dtype=torch.float16), True, False)


def _compiled_targets(fn, *args):
    """The operators in the graph that dynamo traces from ``fn(*args)``, and its result."""
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward
    torch._dynamo.reset()
    return targets, torch.compile(fn, backend=backend, fullgraph=True)(*args)


@pytest.mark.parametrize("n, taken", [(lapack.COMPILED_MIN_N - 1, False), (lapack.COMPILED_MIN_N, True),
                                      (lapack.MIN_N - 1, True), (lapack.COMPILED_MAX_N, True),
                                      (lapack.COMPILED_MAX_N + 1, False)])
def test_compiled_solves_with_a_potf2_factor_take_the_operator_and_agree_with_torchs(operator, n, taken):
    M = _spd((3,), n, torch.float64, seed=n)
    r = torch.randn(3, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    empty = M.new_empty(3, 0, 0)

    def solve(M, r):
        L, _ = kkt.cholesky(M)
        return kkt._chol_solve(L, empty, r), kkt._lower_solve(L, empty, r.unsqueeze(-1), transposed=True)
    targets, (x, y) = _compiled_targets(solve, M, r)
    assert any("trsv_lower" in t for t in targets) == taken, targets
    assert any("solve_triangular" in t for t in targets) == (not taken), targets
    L = torch.linalg.cholesky(M)
    torch.testing.assert_close(x, torch.cholesky_solve(r.unsqueeze(-1), L).squeeze(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, torch.linalg.solve_triangular(L.mT, r.unsqueeze(-1), upper=True), rtol=1e-12, atol=1e-12)


def test_compiled_solves_keep_torchs_where_a_gradient_flows_or_the_factor_is_not_row_major(operator):
    M = _spd((2,), 50, torch.float64)
    L = torch.linalg.cholesky(M)
    empty = M.new_empty(2, 0, 0)
    r = torch.ones(2, 50, 1, dtype=torch.float64)
    for factor, rhs in ((L, r.clone().requires_grad_(True)), (L.mT.contiguous().mT, r)):
        targets, _ = _compiled_targets(lambda A, b: kkt._lower_solve(A, empty, b), factor, rhs)
        assert not any("trsv_lower" in t for t in targets) and any("solve_triangular" in t for t in targets), targets


@pytest.mark.parametrize("signature, taken", [
    (b"void (char *, char *, char *, int *, __pyx_t_5scipy_6linalg_11cython_blas_d *, int *, "
     b"__pyx_t_5scipy_6linalg_11cython_blas_d *, int *)", True),
    (b"void (char *, char *, char *, int64_t *, double *, int64_t *, double *, int64_t *)", False),
    (b"void (char *, char *, int *, double *, int *, double *, int *)", False),
])
def test_only_an_entry_point_with_trsvs_32_bit_signature_is_called(signature, taken):
    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.argtypes, new_capsule.restype = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p], ctypes.py_object
    name = ctypes.create_string_buffer(signature)
    capsule = new_capsule(ctypes.addressof(name), name, None)  # any non-null pointer: never called here
    assert (lapack._trsv_entry(capsule) != 0) == taken


@pytest.mark.parametrize("equalities", [0, 10])
def test_a_compiled_solve_with_the_operators_agrees_with_one_without(operator, eager_backend, monkeypatch, equalities):
    """A compiled forward + backward (traced whole by dynamo, run by its eager backend) whose
    factorisations and vector solves take the operators (where ``FACTORED_DTYPES`` has float64: the
    test above shows the route) gives the solution and gradient of one that takes torch's, to the
    solver's accuracy."""
    Q, p, G, h, A, b = random_qp(4, 50, 50, equalities, seed=8).tensors()
    answers = {}
    for route in ("operators", "torch"):
        monkeypatch.setattr(lapack, "FACTORED_DTYPES", frozenset({torch.float64} if route == "operators" else ()))
        torch._dynamo.reset()
        leaf = p.clone().requires_grad_(True)
        sol = solve_qp(Q, leaf, G, h, A, b, compile=True)
        grad, = torch.autograd.grad((sol.z * torch.arange(50)).sum(), leaf)
        answers[route] = (sol.z.detach(), grad, sol.status)
    (z, grad, status), (z0, grad0, status0) = answers["operators"], answers["torch"]
    assert torch.equal(status, status0) and bool((status == 0).all())
    torch.testing.assert_close(z, z0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(grad, grad0, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_operators_skip_the_matrices_a_mask_leaves_out_and_give_the_others_bits(operator, dtype):
    """Factorisation: the marked matrices' factors and infos as without a mask (one not positive
    definite among them), the others the identity with info 0, eagerly and through the operator.
    Product: the marked matrices' C + A B as torch.baddbmm gives them, the others C."""
    M = _spd((5,), 48, dtype, seed=4)
    M[2, 7, 7] = -1.0
    active = torch.tensor([True, False, True, True, False])
    plain, plain_info = lapack.factor_lower(M)
    for L, info in (torch.ops.optlayers_lapack.cholesky_lower(M, active), lapack.factor_lower(M, active)):
        assert torch.equal(info, plain_info * active) and info.tolist() == [0, 0, 8, 0, 0]
        assert torch.equal(L[active], plain[active])
        assert torch.equal(L[~active], torch.eye(48, dtype=dtype).expand(2, 48, 48))
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(5, 48, 30, generator=g, dtype=dtype), torch.randn(5, 30, 48, generator=g, dtype=dtype)
    for A_ in (A, B.transpose(-2, -1)):  # a transposed operand, as the solver's Gᵀ diag(w) is
        out = lapack.add_product_where(M, A_, A_.transpose(-2, -1) if A_ is A else B, active)
        expected = torch.baddbmm(M, A_, A_.transpose(-2, -1) if A_ is A else B)
        assert torch.equal(out[active], expected[active]) and torch.equal(out[~active], M[~active])
        assert out.is_contiguous()


def test_the_product_operator_refuses_what_it_cannot_multiply(operator):
    C, A = torch.zeros(2, 4, 4, dtype=torch.float64), torch.zeros(2, 4, 3, dtype=torch.float64)
    on = torch.ones(2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"C, A, B must be \(B, r, d\), \(B, r, k\), \(B, k, d\)"):
        torch.ops.optlayers_lapack.add_product_where(C, A, A, on)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.optlayers_lapack.add_product_where(C, A, A.transpose(-2, -1).float(), on)
    with pytest.raises(RuntimeError, match=r"active must be a CPU bool tensor of one flag per matrix \(2\)"):
        torch.ops.optlayers_lapack.add_product_where(C, A, A.transpose(-2, -1), on[:1])
    with pytest.raises(RuntimeError, match="active must be a CPU bool tensor"):
        torch.ops.optlayers_lapack.cholesky_lower(C + torch.eye(4, dtype=torch.float64), on.int())
    with pytest.raises(RuntimeError, match=r"a mask needs a \(B, n, n\) batch"):
        torch.ops.optlayers_lapack.cholesky_lower(torch.eye(4, dtype=torch.float64).repeat(2, 1, 1, 1), on)
    with pytest.raises(ValueError, match=r"active must be a \(2,\) bool mask of a \(B, n, n\) batch"):
        lapack.factor_lower(C + torch.eye(4, dtype=torch.float64), on[:1])


@pytest.mark.parametrize("stiff", [False, True])
def test_a_compiled_factorisation_leaves_out_the_finished_problems_and_keeps_the_others_bits(operator, stiff):
    """``kkt.factor_kkt`` with ``active`` under compilation (``lapack.skips_inactive``): the
    running problems' factors are those of the factorisation without the mask, to the bit; the
    others' H is Q and their factor of H the identity (finite); eagerly the mask is ignored."""
    data = random_qp(6, 50, 60, 5, seed=3)
    g = torch.Generator().manual_seed(6)
    lam, s = torch.rand(6, 60, generator=g, dtype=torch.float64) + 0.1, torch.rand(6, 60, generator=g, dtype=torch.float64) + 0.1
    if stiff:
        s[:, :20] = 1e-9  # near-active rows: W⁻¹ = λ/s above STIFF_W_INV, kept out of H
    w_inv, reg = lam / s, torch.full((6,), 1e-8, dtype=torch.float64)
    mask = (w_inv > 1e6) if stiff else None
    active = torch.tensor([True, False, True, False, False, True])

    def factor(Q, A, G, w_inv, reg, active):
        f = kkt.factor_kkt(Q, A, G, w_inv, reg, reg, stiff=mask, retries=0, active=active)
        return f.H, f.chol_h, f.chol_s, f.Y, f.ok

    compiled = torch.compile(factor, fullgraph=True, options={"cpp_wrapper": True})
    args = (data.Q, data.A, data.G, w_inv, reg)
    skipped, plain, eager = compiled(*args, active), compiled(*args, None), factor(*args, active)
    for with_mask, without in zip(skipped, plain):
        assert torch.equal(with_mask[active], without[active])
    H, chol_h, chol_s, Y, ok = skipped
    assert torch.equal(H[~active], data.Q[~active]) and ok.all()
    assert torch.equal(chol_h[~active], torch.eye(50, dtype=torch.float64).expand(3, 50, 50))
    assert all(torch.isfinite(t).all() for t in (chol_s, Y))
    assert all(torch.equal(a, b) for a, b in zip(eager, factor(*args, None)))  # eagerly: no skipping


def test_without_torchs_gemm_the_product_operator_multiplies_with_addmm_to_the_same_bits(operator):
    """Where torch's library exports no gemm (``_gemm_address`` 0), the product is torch's addmm,
    matrix by matrix: the same bits."""
    dtypes = (torch.float64, torch.float32)
    factors = [ctypes.cast(lapack._routine(dtype), ctypes.c_void_p).value for dtype in dtypes]
    solves = [lapack._trsv_address(dtype) for dtype in dtypes]
    g = torch.Generator().manual_seed(7)
    C, A = torch.randn(3, 45, 45, generator=g, dtype=torch.float64), torch.randn(3, 45, 20, generator=g, dtype=torch.float64)
    active = torch.tensor([True, False, True])
    with_gemm = lapack.add_product_where(C, A, A.transpose(-2, -1), active)
    triangular = [lapack._trsm_address(dtype) for dtype in dtypes] + [lapack._trti2_address(dtype) for dtype in dtypes]
    torch.ops.optlayers_lapack.set_routines(*factors, *solves, 0, 0, *triangular)
    try:
        without = lapack.add_product_where(C, A, A.transpose(-2, -1), active)
    finally:
        torch.ops.optlayers_lapack.set_routines(*factors, *solves, *(lapack._gemm_address(dtype) for dtype in dtypes),
                                                *triangular)
    assert torch.equal(without, with_gemm) and torch.equal(without[1], C[1])
    assert lapack._gemm_address(torch.float64) != 0 or not torch.backends.mkl.is_available()  # MKL builds export it


def test_a_compiled_solve_that_leaves_finished_problems_out_gives_every_problem_its_bits(operator, eager_backend, monkeypatch):
    """A compiled forward + backward (dynamo's eager backend) on ``potf2``'s route, whose batch holds
    problems that finish at different iterations and a primal infeasible one that finishes early:
    with the finished problems left out of the factorisation (``skips_inactive``) and without, the
    same statuses, iterations, solutions and gradients, bit for bit."""
    Q, p, G, h, A, b = random_qp(5, 45, 45, 0, seed=9).tensors()
    G, h = G.clone(), h.clone()
    G[3, 0], h[3, 0] = -G[3, 1], -h[3, 1] - 1.0  # −g z ≤ −h₁ − 1 beside g z ≤ h₁: infeasible
    monkeypatch.setattr(lapack, "FACTORED_DTYPES", frozenset({torch.float64}))
    answers = {}
    for skipping in (True, False):
        if not skipping:
            monkeypatch.setattr(lapack, "skips_inactive", lambda M: False)
        torch._dynamo.reset()
        leaf = p.clone().requires_grad_(True)
        sol = solve_qp(Q, leaf, G, h, compile=True, on_failure="ignore")
        grad, = torch.autograd.grad((sol.z.nan_to_num() * torch.arange(45)).sum(), leaf)
        answers[skipping] = (sol.status, sol.iterations, sol.z, grad)
    skipped, plain = answers[True], answers[False]
    assert skipped[0].tolist()[3] == Status.PRIMAL_INFEASIBLE and len(set(skipped[1].tolist())) > 1
    for a, b in zip(skipped, plain):
        assert torch.equal(a.nan_to_num(), b.nan_to_num())


def _schur_case(dtype: torch.dtype, batch: int = 4, n: int = 50, m: int = 3, k: int = 40, seed: int = 9):
    """H's factor L, the rows C = [A; G ⊙ stiff] (the stiff rows of G, the others zero), the mask of
    the coupled rows (the equalities and the stiff rows) and S's diagonal shift, as ``kkt.factor_kkt``
    hands them over; the second problem couples every row, the third none but its equalities."""
    g = torch.Generator().manual_seed(seed)
    L = torch.linalg.cholesky(_spd((batch,), n, torch.float64, seed=seed)).to(dtype)
    stiff = torch.rand(batch, k, generator=g) < 0.5
    stiff[1], stiff[2] = True, False
    coupled = torch.cat([torch.ones(batch, m, dtype=torch.bool), stiff], dim=-1)
    C = (torch.randn(batch, m + k, n, generator=g, dtype=torch.float64) * coupled.unsqueeze(-1)).to(dtype)
    shift = torch.where(coupled, torch.rand(batch, m + k, generator=g, dtype=torch.float64) + 0.5, 1.0).to(dtype)
    return L, C, coupled, shift


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-4)])
def test_the_schur_operator_gives_the_whole_complements_y_and_factor(operator, dtype, tol):
    """``coupled_schur`` over the coupled rows only against Y = L⁻¹Cᵀ and the Cholesky factor of
    S = YᵀY + diag(shift) over every row (torch's, in float64): the uncoupled rows' columns of Y
    are exactly zero and their factor's rows √shift on the diagonal; info 0."""
    L, C, coupled, shift = _schur_case(dtype)
    Y, chol, info = lapack.coupled_schur(L, C, coupled, shift)
    wide = [t.double() for t in (L, C, shift)]
    expected_y = torch.linalg.solve_triangular(wide[0], wide[1].mT, upper=False)
    expected = torch.linalg.cholesky(expected_y.mT @ expected_y + torch.diag_embed(wide[2]))
    assert Y.shape == expected_y.shape and chol.shape == expected.shape and Y.dtype == chol.dtype == dtype
    assert info.dtype == torch.int32 and info.tolist() == [0, 0, 0, 0]
    torch.testing.assert_close(Y.double(), expected_y, rtol=tol, atol=tol)
    torch.testing.assert_close(chol.double(), expected, rtol=tol, atol=tol)
    assert torch.equal(Y.mT[~coupled], torch.zeros_like(Y.mT[~coupled]))
    off = chol.masked_fill(torch.eye(chol.shape[-1], dtype=torch.bool), 0.0)
    assert torch.equal(off[~coupled], torch.zeros_like(off[~coupled]))
    assert torch.equal(chol.diagonal(dim1=-2, dim2=-1)[~coupled], shift[~coupled].sqrt())


def test_the_schur_operator_reports_the_first_row_that_is_not_positive_definite(operator):
    """A coupled block that is not positive definite reports its failing row's position among all
    rows (potf2's report mapped back); an uncoupled row whose shift is not positive reports its own."""
    L, C, coupled, shift = _schur_case(torch.float64)
    rows = coupled[0].nonzero().flatten()
    shift[0, rows[4]] = -1e6  # the fifth coupled row of the first problem
    uncoupled = (~coupled[3]).nonzero().flatten()
    shift[3, uncoupled[1]] = 0.0
    _, _, info = lapack.coupled_schur(L, C, coupled, shift)
    assert info.tolist() == [int(rows[4]) + 1, 0, 0, int(uncoupled[1]) + 1]


def test_the_schur_operator_refuses_what_it_cannot_factorise(operator):
    L, C, coupled, shift = _schur_case(torch.float64, batch=3)
    with pytest.raises(RuntimeError, match=r"L and C must be \(B, n, n\) and \(B, r, n\)"):
        lapack.coupled_schur(L, C.mT, coupled, shift)
    with pytest.raises(RuntimeError, match=r"coupled and shift must be \(B, r\)"):
        lapack.coupled_schur(L, C, coupled[:, 1:], shift)
    with pytest.raises(RuntimeError, match="coupled must be a bool mask"):
        lapack.coupled_schur(L, C, coupled.int(), shift)
    with pytest.raises(RuntimeError, match="one dtype"):
        lapack.coupled_schur(L, C.float(), coupled, shift)
    with pytest.raises(RuntimeError, match="no potf2, gemm and trsm routines for dtype"):
        lapack.coupled_schur(L.half(), C.half(), coupled, shift.half())


@pytest.mark.parametrize("n, rows", [(50, 60), (lapack.COMPILED_MIN_N + 7, lapack.COMPILED_MIN_N + 2)])
@pytest.mark.parametrize("equalities", [0, 5])
def test_a_compiled_factorisation_with_stiff_rows_takes_the_schur_operator_and_agrees_with_the_eager_one(operator, equalities, n, rows):
    """``kkt.factor_kkt`` with stiff rows under compilation forms S over the coupled rows alone
    (``lapack.coupled_schur`` in the traced graph, in place of the triangular solve, the product and
    the factorisation of the whole S): its H is the eager one to the bit, and so is H's factor where
    the eager solve factorises by the same routine (order ``MIN_N`` and up; below it, torch's, to
    1e-12); Y and S's factor agree to 1e-12, and the factor solves the KKT system as the eager one does."""
    data = random_qp(5, n, rows, equalities, seed=11)
    g = torch.Generator().manual_seed(12)
    lam, s = torch.rand(5, rows, generator=g, dtype=torch.float64) + 0.1, torch.rand(5, rows, generator=g, dtype=torch.float64) + 0.1
    s[:, ::3] = 1e-9  # near-active rows, kept out of H
    s[3, :] = 1e-9  # every row of one problem
    w_inv, reg = lam / s, torch.full((5,), 1e-8, dtype=torch.float64)
    stiff = w_inv > 1e6

    def factor(Q, A, G, w_inv, reg, stiff):
        f = kkt.factor_kkt(Q, A, G, w_inv, reg, reg, stiff=stiff, retries=0)
        return f.H, f.chol_h, f.Y, f.chol_s, f.ok

    A = data.Q.new_zeros(5, 0, n) if data.A is None else data.A
    targets, compiled = _compiled_targets(factor, data.Q, A, data.G, w_inv, reg, stiff)
    assert sum("coupled_schur" in t for t in targets) == 1 and sum("cholesky_lower" in t for t in targets) == 1, targets
    assert not any("solve_triangular" in t for t in targets), targets
    eager = factor(data.Q, A, data.G, w_inv, reg, stiff)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[4], eager[4])
    if n >= lapack.MIN_N:
        assert torch.equal(compiled[1], eager[1])
    torch.testing.assert_close(compiled[1], eager[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(compiled[2], eager[2], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(compiled[3], eager[3], rtol=1e-12, atol=1e-12)
    assert bool(compiled[4].all())


@pytest.mark.parametrize("dtype, bound", [(torch.float64, 64 * torch.finfo(torch.float64).eps),
                                          (torch.float32, 64 * torch.finfo(torch.float32).eps)])
@pytest.mark.parametrize("shape, n", [((5,), 10), ((2, 3), 7), ((1,), 12)])
def test_the_factor_and_inverse_operator_gives_potf2s_factor_and_its_inverse(operator, dtype, bound, shape, n):
    """``factor_inverse_lower``: the factor is ``factor_lower``'s (the same ``potf2``, to the bit), the
    inverse as accurate as a substitution (|L⁻¹L − I| within a few units of roundoff of |L⁻¹||L|), a
    matrix that is not positive definite reported with its minor's order and given the identity."""
    M = _spd(shape, n, dtype, seed=n)
    M.view(-1, n, n)[0, 2, 2] = -1.0
    L, inverse, info = lapack.factor_inverse_lower(M)
    expected, expected_info = lapack.factor_lower(M)
    assert torch.equal(L, expected) and torch.equal(info, expected_info) and info.view(-1)[0] == 3
    assert L.is_contiguous() and inverse.is_contiguous() and inverse.dtype == dtype
    eye = torch.eye(n, dtype=dtype)
    assert torch.equal(inverse.view(-1, n, n)[0], eye)
    good, good_inverse = L.view(-1, n, n)[1:], inverse.view(-1, n, n)[1:]
    if good.shape[0]:
        residual = (good_inverse @ good - eye).abs()
        assert bool((residual <= bound * (good_inverse.abs() @ good.abs())).all()), residual.max()
        assert torch.equal(good_inverse, good_inverse.tril())


def test_the_factor_and_inverse_operator_refuses_what_it_cannot_factorise(operator):
    with pytest.raises(RuntimeError, match="square matrices"):
        torch.ops.optlayers_lapack.cholesky_inverse_lower(torch.zeros(2, 3, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="no factorisation and trti2 routines for dtype"):
        torch.ops.optlayers_lapack.cholesky_inverse_lower(torch.eye(5, dtype=torch.float16))


@pytest.mark.parametrize("equalities", [0, 3])
def test_a_compiled_factorisation_of_small_order_factorises_and_inverts_in_one_operator_call(operator, equalities):
    """``kkt.factor_kkt`` under compilation at orders up to ``kkt.INVERTED_MAX_N``: H and S are
    factorised and their factors inverted by ``cholesky_inverse_lower`` (no torch factorisation or
    triangular solve in the traced graph); the factors agree with the eager ones to 1e-12 and the
    inverses invert them."""
    data = random_qp(4, 10, 10, equalities, seed=13)
    g = torch.Generator().manual_seed(14)
    w_inv = torch.rand(4, 10, generator=g, dtype=torch.float64) + 0.1
    reg = torch.full((4,), 1e-8, dtype=torch.float64)
    A = data.Q.new_zeros(4, 0, 10) if data.A is None else data.A

    def factor(Q, A, G, w_inv, reg):
        f = kkt.factor_kkt(Q, A, G, w_inv, reg, reg, retries=0)
        return f.chol_h, f.inv_h, f.chol_s, f.inv_s, f.ok

    targets, (chol_h, inv_h, chol_s, inv_s, ok) = _compiled_targets(factor, data.Q, A, data.G, w_inv, reg)
    assert sum("cholesky_inverse_lower" in t for t in targets) == (2 if equalities else 1), targets
    assert not any("linalg_cholesky" in t or "cholesky_lower" in t or "solve_triangular" in t for t in targets), targets
    eager = factor(data.Q, A, data.G, w_inv, reg)
    assert bool(ok.all()) and torch.equal(ok, eager[4])
    torch.testing.assert_close(chol_h, eager[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inv_h @ chol_h, torch.eye(10, dtype=torch.float64).expand(4, 10, 10), rtol=0, atol=1e-12)
    if equalities:
        torch.testing.assert_close(chol_s, eager[2], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(inv_s @ chol_s, torch.eye(equalities, dtype=torch.float64).expand(4, 3, 3), rtol=0, atol=1e-12)
