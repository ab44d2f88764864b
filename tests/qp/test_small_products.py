"""Under compilation, the small matrix products of the QP iteration and its derivatives are written
as a broadcast multiply and a sum (``linalg.elementwise``), so that inductor fuses them instead of
calling the library: the same values as torch's products to rounding, and an iteration whose only
library calls are its factorisations. Traced by dynamo (eager backend, no inductor compilation:
fast), except the slow test, which compiles with inductor."""
import pytest
import torch

from optlayers import compiling, linalg, solve_qp
from optlayers.engine import kkt, lapack
from tests.qp.qp_problems import random_qp

EPS = torch.finfo(torch.float64).eps


def _traced(fn):
    return torch.compile(fn, backend="eager", fullgraph=True, dynamic=False)


def _products(a, b, c, M, v, w):
    return (linalg.product(a, b), linalg.add_product(c, a, b, beta=-1.0, alpha=0.5), linalg.mv(M, v),
            linalg.mtv(M, w), linalg.add_mv(w, M, v, alpha=-1.0), linalg.add_mtv(v, M, w, beta=-1.0))


@pytest.mark.parametrize("r, k, c", [(10, 12, 10), (1, 16, 7), (16, 1, 16), (17, 3, 4), (4, 20, 4)])
def test_products_agree_with_torchs_traced_or_not(r, k, c):
    """Elementwise (every size ≤ 16, or an inner size of 1) or not, traced products give torch's
    values to rounding: within a few units of |a||b| per entry."""
    gen = torch.Generator().manual_seed(r * 100 + k)
    args = [torch.randn(3, *shape, generator=gen, dtype=torch.float64)
            for shape in ((r, k), (k, c), (r, c), (r, k), (k,), (r,))]
    a, b, _, M, v, w = args
    expected = (a @ b, -args[2] + 0.5 * (a @ b), (M @ v.unsqueeze(-1)).squeeze(-1), (M.mT @ w.unsqueeze(-1)).squeeze(-1),
                w - (M @ v.unsqueeze(-1)).squeeze(-1), -v + (M.mT @ w.unsqueeze(-1)).squeeze(-1))
    scales = (a.abs() @ b.abs(), args[2].abs() + a.abs() @ b.abs(), (M.abs() @ v.abs().unsqueeze(-1)).squeeze(-1),
              (M.abs().mT @ w.abs().unsqueeze(-1)).squeeze(-1), w.abs() + (M.abs() @ v.abs().unsqueeze(-1)).squeeze(-1),
              v.abs() + (M.abs().mT @ w.abs().unsqueeze(-1)).squeeze(-1))
    for got in (_products(*args), _traced(_products)(*args)):
        for g, e, s in zip(got, expected, scales):
            assert g.shape == e.shape
            assert bool(((g - e).abs() <= 4 * (k + 2) * EPS * s).all())


def test_the_rule_is_elementwise_under_compilation_only_and_for_small_sizes_or_outer_products():
    small, large, outer = torch.ones(2, 16, 16), torch.ones(2, 17, 16), (torch.ones(2, 40, 1), torch.ones(2, 1, 40))
    assert not linalg.elementwise(small, small)  # eager: torch's products
    seen = _traced(lambda: (linalg.elementwise(small, small), linalg.elementwise(large, small),
                            linalg.elementwise(small, large.mT), linalg.elementwise(*outer)))()
    assert seen == (True, False, False, True)


def _vector_products(M, v, w):
    return linalg.mv(M, v), linalg.mtv(M, w), linalg.product(v.unsqueeze(-2), M.mT), linalg.product(M, v.unsqueeze(-1))


@pytest.mark.parametrize("batch, r, c", [(3, 40, 40), (3, 5, 63), (1, 40, 32), (2, 64, 17)])
def test_vector_products_from_the_library_agree_with_torchs(batch, r, c):
    """A row or a column times a matrix traced with an inner size in ``VECTOR_LIBRARY_SIZES``
    (``baddbmm`` with beta = 0), or eagerly (``bmm``), gives torch's product to rounding."""
    gen = torch.Generator().manual_seed(batch * 1000 + r + c)
    M = torch.randn(batch, r, c, generator=gen, dtype=torch.float64)
    v, w = torch.randn(batch, c, generator=gen, dtype=torch.float64), torch.randn(batch, r, generator=gen, dtype=torch.float64)
    expected = ((M @ v.unsqueeze(-1)).squeeze(-1), (M.mT @ w.unsqueeze(-1)).squeeze(-1), v.unsqueeze(-2) @ M.mT, M @ v.unsqueeze(-1))
    scales = ((M.abs() @ v.abs().unsqueeze(-1)).squeeze(-1), (M.abs().mT @ w.abs().unsqueeze(-1)).squeeze(-1),
              v.abs().unsqueeze(-2) @ M.abs().mT, M.abs() @ v.abs().unsqueeze(-1))
    for got in (_vector_products(M, v, w), _traced(_vector_products)(M, v, w)):
        for g, e, s in zip(got, expected, scales):
            assert g.shape == e.shape
            assert bool(((g - e).abs() <= 4 * (max(r, c) + 2) * EPS * s).all())


def test_vector_products_are_taken_from_the_library_for_inner_sizes_in_bounds_under_compilation_on_the_cpu():
    """``vector_in_library``: under compilation on the CPU, a product with one row or one column whose
    inner size is in ``VECTOR_LIBRARY_SIZES`` (at batch 1, every size from ``VECTOR_LIBRARY_MIN_ONE``); never
    eagerly, nor for a product with more rows and columns."""
    first, last = linalg.VECTOR_LIBRARY_SIZES
    one = linalg.VECTOR_LIBRARY_MIN_ONE

    def rule(batch: int, rows: int, inner: int, cols: int) -> bool:
        return linalg.vector_in_library(torch.ones(batch, rows, inner), torch.ones(batch, inner, cols))

    assert not rule(2, 1, first, 30)  # eagerly: torch's product
    cases = [(2, 1, first, 30), (2, 1, first - 1, 30), (2, 30, last, 1), (2, 30, last + 1, 1), (1, 1, one, 5),
             (1, 1, one - 1, 5), (1, 30, last + 1, 1), (1, 1, 200, 5), (2, 4, 40, 4)]
    seen = _traced(lambda: tuple(rule(*case) for case in cases))()
    assert seen == (True, False, True, False, True, False, True, True, False)


def _library_calls_per_iteration(monkeypatch, data: dict) -> dict[str, int]:
    """The library operations (products, factorisations, triangular solves) in the body of the
    compiled solve's loop (``qp.fused.steps``), as dynamo traces it: each is a library call of its
    own in inductor's code, where everything else fuses."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiling.compiled.cache_clear()
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: torch._dynamo.optimize(
        backend, nopython=True, dynamic=False, guard_filter_fn=kwargs.get("options", {}).get("guard_filter_fn"))(fn))
    try:
        solve_qp(**data, compile=True)
    finally:
        compiling.compiled.cache_clear()
        torch._dynamo.reset()
    bodies = [module for gm in graphs for name, module in gm.named_modules() if name.startswith("body_fn")]
    bodies = [body for body in bodies if any("cholesky" in str(node.target) for node in body.graph.nodes)]
    assert len(bodies) == 1  # the interior point loop's (the equilibration's loop factorises nothing)
    names = ("matmul", "bmm", "baddbmm", "addmm", "einsum", "linalg_cholesky_ex", "linalg_solve_triangular",
             "cholesky_inverse_lower")
    counts = {name: 0 for name in names}
    for node in bodies[0].graph.nodes:
        target = getattr(node.target, "__name__", str(node.target))
        target = "cholesky_inverse_lower" if "cholesky_inverse_lower" in str(node.target) else target
        if node.op in ("call_function", "call_method") and target in counts:
            counts[target] += 1
    return counts


def _one_call_factorises_and_inverts() -> bool:
    """Whether compiled small factors are factorised and inverted by one operator call here
    (``lapack.factors_inverted``'s machine conditions, the operator loaded)."""
    return bool(lapack.FACTORED_DTYPES and lapack.INVERTED_DTYPES and lapack.load_operator())


@pytest.mark.parametrize("m", [0, 3])
def test_a_small_problems_iteration_calls_the_library_only_to_factorise(monkeypatch, m):
    """n = 10, 10 inequalities (and m equalities): no product in the loop's body is left to the
    library; its library calls are a Cholesky factorisation and the factor's inversion, for H and
    (with equalities) for S: torch's two, or one call of the operator that does both where
    ``engine.lapack`` factorises (``lapack.factors_inverted``)."""
    counts = _library_calls_per_iteration(monkeypatch, random_qp((4,), 10, 10, m))
    factors = 2 if m else 1
    fused = _one_call_factorises_and_inverts()
    assert counts == {"matmul": 0, "bmm": 0, "baddbmm": 0, "addmm": 0, "einsum": 0,
                      "linalg_cholesky_ex": 0 if fused else factors, "linalg_solve_triangular": 0 if fused else factors,
                      "cholesky_inverse_lower": factors if fused else 0}, counts


def test_traced_kkt_solves_give_the_eager_ones(eager_backend):
    """A factorisation and a refined solve of the reduced KKT system at n = 10 (3 equalities, 12
    inequalities, stiff rows), traced (elementwise products) and eager (torch's): the same to 1e-12."""
    gen = torch.Generator().manual_seed(0)
    B, n, m, k = 5, 10, 3, 12
    L = torch.randn(B, n, n, generator=gen, dtype=torch.float64)
    Q = L @ L.mT / n + 1e-3 * torch.eye(n, dtype=torch.float64)
    A = torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    G = torch.randn(B, k, n, generator=gen, dtype=torch.float64)
    w_inv = 10.0 ** (4 * torch.rand(B, k, generator=gen, dtype=torch.float64) - 2)
    rx, re, v = (torch.randn(B, size, generator=gen, dtype=torch.float64) for size in (n, m, k))
    reg = torch.full((B,), 1e-9, dtype=torch.float64)

    def solve(Q, A, G, w_inv, reg, rx, re, v):
        f = kkt.factor_kkt(Q, A, G, w_inv, reg, reg, stiff=w_inv > 1.0, retries=0)
        return (f.H, f.Y, *kkt.solve_reduced(f, rx, re, v, refine_steps=2),
                *kkt.solve_reduced(f, rx, re, v, refine_steps=1, use_y=True))

    from optlayers import host
    with host.accelerator_schedule():  # every refinement step taken, as under compilation
        eager = solve(Q, A, G, w_inv, reg, rx, re, v)
        traced = torch.compile(solve, fullgraph=True)(Q, A, G, w_inv, reg, rx, re, v)
    for e, t in zip(eager, traced):
        torch.testing.assert_close(t, e, rtol=1e-12, atol=1e-12 * float(e.abs().max()))


def _loop_body(lines: list[str]) -> str:
    """The body of the interior point loop in inductor's C++ wrapper (the loop that factorises): from
    its subgraph's comment to the loop's closing brace (the first line that is a brace at the loop's
    indentation)."""
    starts = [i for i, line in enumerate(lines) if "subgraph: while_loop_body_graph" in line]
    bodies = ["\n".join(lines[start:next(i for i in range(start, len(lines)) if lines[i] == "    }")]) for start in starts]
    bodies = [body for body in bodies if "cholesky" in body]  # torch's factorisation or the operator's
    assert len(bodies) == 1
    return bodies[0]


@pytest.mark.slow
def test_inductors_loop_body_calls_the_library_only_to_factorise():
    """With inductor (compiles: a minute or two): the generated loop body of a compiled solve at
    (B, n) = (8, 10) calls the library twice per iteration (Cholesky, the factor's inversion), or
    once where one operator does both (``lapack.factors_inverted``), and the solve gives the eager
    answer to the rounding of the two factorisations."""
    from torch._inductor.utils import run_and_get_code

    data = random_qp((8,), 10, 10, 0)
    compiling.compiled.cache_clear()
    torch._dynamo.reset()
    try:
        compiled, codes = run_and_get_code(lambda: solve_qp(**data, compile=True))
    finally:
        compiling.compiled.cache_clear()
        torch._dynamo.reset()
    eager = solve_qp(**data)
    torch.testing.assert_close(compiled.z, eager.z, rtol=1e-10, atol=1e-10)
    assert torch.equal(compiled.iterations, eager.iterations)
    body = _loop_body([line for code in codes for line in code.split("\n")])
    library = body.count("aoti_torch_call_dispatcher(") + body.count("aoti_torch_proxy_executor_call_function(")
    products = sum(body.count(f"aoti_torch_cpu_{op}_out(") for op in ("bmm", "baddbmm", "mm", "addmm"))
    fused = _one_call_factorises_and_inverts()
    assert products == 0 and library == (1 if fused else 2), (products, library)


def test_mid_sized_vector_products_of_an_iteration_are_the_librarys(monkeypatch):
    """n = 30 (batch 4, 30 inequalities): every product of a row or a column in the loop's body is a
    library call (``baddbmm``, ``linalg.vector_in_library``), none is left as a ``bmm`` that inductor
    would write as its own sum; at n = 70, above ``VECTOR_LIBRARY_SIZES``, they are ``bmm`` again."""
    mid = _library_calls_per_iteration(monkeypatch, random_qp((4,), 30, 30, 0))
    assert mid["bmm"] == 0 and mid["baddbmm"] > 0, mid
    large = _library_calls_per_iteration(monkeypatch, random_qp((4,), 70, 70, 0))
    assert large["bmm"] > 0, large
