"""The compiled path's wrapper (``optlayers.compiling``): specialisations beyond torch's default
limit, recompilations for other reasons than a shape (requires_grad), keyword arguments, and the
eager fallback past its own limit.
Traced with dynamo's eager backend (no inductor compilation: fast)."""
from __future__ import annotations

import sys
import warnings

import pytest
import torch

from optlayers import compiling


def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_more_shapes_than_torchs_limit_and_a_recompilation_for_requires_grad(eager_backend):
    run = compiling.compiled(_double, "cpu")
    for n in range(1, 11):  # 10 specialisations: torch's default limit is 8
        assert torch.equal(run(torch.ones(n)), torch.full((n,), 2.0))
    # a shape met before, now requiring grad: dynamo recompiles, past its limit
    x = torch.ones(3, requires_grad=True)
    y = run(x)
    assert torch.equal(y.detach(), torch.full((3,), 2.0)) and y.requires_grad


def test_past_the_limit_calls_run_eagerly_with_a_warning(eager_backend, monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)  # torch's limit, which a call meets first
    monkeypatch.setattr(compiling, "COMPILED_SHAPES", 2)
    run = compiling.compiled(_double, "cpu")
    run(torch.ones(1))
    run(torch.ones(2))
    with pytest.warns(RuntimeWarning, match="2 compiled specialisations"):
        assert torch.equal(run(torch.ones(3)), torch.full((3,), 2.0))


def test_owned_copies_every_tensor():
    from optlayers.qp.scaling import Scaling

    sc = Scaling(d=torch.ones(2, 3), e=torch.ones(2, 0), f=torch.ones(2, 1), c=torch.ones(2))
    copy = compiling.owned(sc)
    for name in "defc":
        assert torch.equal(getattr(copy, name), getattr(sc, name))
        assert getattr(copy, name).data_ptr() != getattr(sc, name).data_ptr() or getattr(sc, name).numel() == 0


def test_arguments_are_checked():
    with pytest.raises(TypeError, match="fn must be callable, got int"):
        compiling.compiled(3, "cpu")
    with pytest.raises(ValueError, match="device_type must be a device type"):
        compiling.compiled(_double, "")
    with pytest.raises(TypeError, match="pointwise_cat must be True or False, got 1"):
        compiling.compiled(_double, "cpu", 1)
    with pytest.raises(TypeError, match="batched must be True or False, got 'yes'"):
        compiling.compiled(_double, "cpu", batched="yes")
    with pytest.raises(TypeError, match="obj must be a dataclass instance, got Tensor"):
        compiling.owned(torch.ones(2))


def _affine(x: torch.Tensor, scale: float = 1.0, shift: torch.Tensor | None = None) -> torch.Tensor:
    return x * scale + (0.0 if shift is None else shift)


def test_keyword_arguments_reach_the_compiled_function(eager_backend):
    run = compiling.compiled(_affine, "cpu")
    x = torch.ones(3)
    assert torch.equal(run(x, scale=3.0), torch.full((3,), 3.0))
    assert torch.equal(run(x, shift=torch.ones(3), scale=2.0), torch.full((3,), 3.0))
    assert torch.equal(run(x, scale=2.0, shift=torch.ones(3)), torch.full((3,), 3.0))  # another order, the same call
    assert torch.equal(run(x, scale=3.0), torch.full((3,), 3.0))


def test_only_inductors_c_shim_notices_are_dropped():
    import logging

    notice = logging.LogRecord("torch._inductor.ir", logging.WARNING, "ir.py", 1,
                               "%s is missing a c-shim implementation, using proxy executor as fallback",
                               ("aten.linalg_cholesky_ex.default",), None)
    other = logging.LogRecord("torch._inductor.ir", logging.WARNING, "ir.py", 1, "something else", (), None)
    shim_filter = compiling._NoShimNotices()
    assert not shim_filter.filter(notice) and shim_filter.filter(other)


def test_torchs_own_deprecation_notice_stays_hidden_under_a_later_error_filter(monkeypatch):
    """A user's ``filterwarnings("error", category=FutureWarning)`` added after the first compiled call
    went in front of the package's filter: inductor's lowering then raised torch's own notice as an
    exception, which the package took for a failed compilation (eager from then on)."""
    import warnings

    monkeypatch.setattr(compiling, "_OWN_FILTERS", [])
    text = "`torch._prims_common.check` is deprecated and will be removed in the future."
    with warnings.catch_warnings():
        compiling._hide_torch_own_deprecation()  # a first compiled call
        warnings.filterwarnings("error", category=FutureWarning)  # the user's, later
        compiling._hide_torch_own_deprecation()  # the next compiled call
        warnings.warn_explicit(text, FutureWarning, "lowering.py", 1, module="torch._inductor.lowering")  # not raised
        with pytest.raises(FutureWarning):
            warnings.warn_explicit("another notice", FutureWarning, "mine.py", 1, module="my_code")


def test_only_torchs_own_deprecation_notice_from_its_lowering_is_hidden(monkeypatch):
    import warnings

    monkeypatch.setattr(compiling, "_OWN_FILTERS", [])  # a filter an earlier compiled call left would be behind "always"

    text = ("`torch._prims_common.check` is deprecated and will be removed in the future. "
            "Please use `torch._check*` functions instead.")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        compiling._hide_torch_own_deprecation()
        warnings.warn_explicit(text, FutureWarning, "lowering.py", 1, module="torch._inductor.lowering")
        warnings.warn_explicit(text, FutureWarning, "mine.py", 1, module="my_code")
        warnings.warn_explicit("another notice", FutureWarning, "lowering.py", 2, module="torch._inductor.lowering")
    assert [(str(w.message)[:12], w.filename) for w in seen] == [(text[:12], "mine.py"), ("another noti", "lowering.py")]


def test_torchs_own_deprecation_stays_hidden_after_a_block_that_dropped_its_filter():
    """A ``warnings.catch_warnings`` block restores the filters it found: the filter that the first
    compiled call inside it added is gone after it, and the next compiled call (``_call``) adds it again."""
    import warnings

    text = "`torch._prims_common.check` is deprecated and will be removed in the future."
    with warnings.catch_warnings():  # the process's filters as they were after the test
        warnings.filters[:] = [f for f in warnings.filters if f[1] is None or "prims_common" not in f[1].pattern]
        with warnings.catch_warnings():  # a caller's block around the first compiled call
            compiling._hide_torch_own_deprecation()
            assert compiling._OWN_FILTERS[0] in warnings.filters
        assert compiling._OWN_FILTERS[0] not in warnings.filters
        assert compiling._call(lambda: "compiled", lambda: "eager", "f") == "compiled"
        assert compiling._OWN_FILTERS[0] in warnings.filters
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn_explicit(text, FutureWarning, "lowering.py", 1, module="torch._inductor.lowering")
            warnings.warn_explicit(text, FutureWarning, "mine.py", 1, module="my_code")
        assert [w.filename for w in seen] == ["mine.py"]


def test_recompile_limit_warnings_are_dropped_for_this_packages_functions_only(eager_backend):
    import logging

    from optlayers import linalg

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("torch._dynamo.convert_frame")
    logger.addHandler(handler)
    try:
        own, other = compiling.compiled(linalg.mv, "cpu"), compiling.compiled(_double, "cpu")
        for n in range(1, 11):  # past torch's limit of 8
            own(torch.ones(n, n), torch.ones(n))
            other(torch.ones(n))
    finally:
        logger.removeHandler(handler)
    hits = [r.getMessage() for r in records if "hit config.recompile_limit" in r.getMessage()]
    assert hits and all("_double" in m for m in hits), hits


_SCALE = 2.0


def _scaled(x: torch.Tensor) -> torch.Tensor:
    return x * _SCALE + _double(x)


def test_module_constants_stay_guarded(eager_backend, monkeypatch):
    """The guards on the code a compiled function reaches through globals are dropped, those on
    the modules' numbers are kept: a changed constant recompiles."""
    run = compiling.compiled(_scaled, "cpu")
    assert torch.equal(run(torch.ones(2)), torch.full((2,), 4.0))
    monkeypatch.setattr(sys.modules[__name__], "_SCALE", 3.0)
    assert torch.equal(run(torch.ones(2)), torch.full((2,), 5.0))


def test_which_guards_are_kept():
    from torch._dynamo.types import GuardFilterEntry

    def entry(value, guard_type="ID_MATCH", is_global=True, name="x"):
        return GuardFilterEntry(name=name, has_value=True, value=value, guard_type=guard_type, derived_guard_types=(),
                                is_global=is_global, orig_guard=None)

    for kept in (entry(torch.ones(1), "TENSOR_MATCH"), entry(2.0, "EQUALS_MATCH"), entry(-1, "CONSTANT_MATCH"),
                 entry(None, "CONSTANT_MATCH"), entry(_double, "CLOSURE_MATCH", is_global=False)):
        assert compiling.keeps_guard(kept), kept
    for dropped in (entry(_double.__code__), entry(_double, "CLOSURE_MATCH"), entry(torch, "MODULE_MATCH"),
                    entry(len, "BUILTIN_MATCH"), entry("dual", "CONSTANT_MATCH")):
        assert not compiling.keeps_guard(dropped), dropped
    # values reached through module globals: a module constant is kept, values that describe code are not
    assert compiling.keeps_guard(entry(3, "EQUALS_MATCH", name="G['__import_optlayers_dot_qp_dot_ipm']._CERTIFICATE_PERSISTENCE"))
    for code in ("G['__import_optlayers_dot_qp_dot_ipm'].State.__dataclass_fields__['v'].init",
                 "G['equilibrate'].__defaults__[0]", "G['__import_torch_dot_utils_dot__pytree']._LEAF_SPEC.num_nodes"):
        assert not compiling.keeps_guard(entry(True, "CONSTANT_MATCH", name=code)), code


def _loop_doubling_plus(step: float):
    """x ↦ three turns of y ↦ 2y + ``step``, as a ``while_loop``."""
    from torch._higher_order_ops.while_loop import while_loop

    def fn(x: torch.Tensor) -> torch.Tensor:
        start = (torch.zeros((), dtype=torch.int64), x.clone())
        return while_loop(lambda i, y: i < 3, lambda i, y: (i + 1, 2 * y + step), start)[1]
    return fn


def _branch_doubling_plus(step: float):
    """x ↦ three turns of y ↦ 2y + ``step`` where x sums to more than -1 (else x), as a ``cond``."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        def taken(y: torch.Tensor) -> torch.Tensor:
            for _ in range(3):
                y = 2 * y + step
            return y
        return torch.cond(x.sum() > -1, taken, lambda y: y.clone(), (x,))
    return fn


@pytest.mark.parametrize("make", [_loop_doubling_plus, _branch_doubling_plus], ids=["while_loop", "cond"])
def test_compiled_loops_are_cached_each_under_its_own_body(tmp_path, monkeypatch, make):
    """With ``CPU_OPTIONS`` a graph with a ``while_loop`` or a ``cond`` is stored in inductor's FX
    graph cache (torch bypasses it for such graphs by default), found again after dynamo forgets
    it, and a loop or branch that differs only in its body is compiled anew, with its own result
    (inductor, a fresh cache)."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x = torch.arange(4, dtype=torch.float64)

    def run(step: float) -> torch.Tensor:
        torch._dynamo.reset()
        fn = torch.compile(make(step), fullgraph=True, dynamic=False, options=compiling.CPU_OPTIONS)
        return fn(x)

    counters.clear()
    try:
        first = run(1.0)
        assert counters["inductor"]["fxgraph_cache_miss"] == 1 and not counters["inductor"]["fxgraph_cache_bypass"]
        again = run(1.0)
        assert counters["inductor"]["fxgraph_cache_hit"] == 1
        other = run(5.0)
        assert counters["inductor"]["fxgraph_cache_miss"] == 2
    finally:
        torch._dynamo.reset()
    assert torch.equal(first, 8 * x + 7) and torch.equal(again, first)
    assert torch.equal(other, 8 * x + 35)


def _stacked_tests(x: torch.Tensor) -> torch.Tensor:
    """Comparisons of a batch's norms stacked into one (as ``qp.ipm._certificates`` does), in a loop's
    body: each stacked row is a slice of the stack."""
    from torch._higher_order_ops.while_loop import while_loop

    def body(i: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.stack([y.abs().amax(-1), y.sum(-1), y.amin(-1), (y * y).sum(-1)])
        return i + 1, y + (rows < 1.0).all(0, keepdim=True).T.to(y.dtype) * y.roll(1, -1)
    return while_loop(lambda i, y: i < 3, body, (torch.zeros((), dtype=torch.int64), x.clone()))[1]


def test_pointwise_cats_leave_no_slice_handles_and_the_same_results(tmp_path, monkeypatch):
    """``POINTWISE_CAT_OPTIONS``: the C++ wrapper makes no tensor handle for the slices of a stack
    (``reinterpret_tensor``), which ``CPU_OPTIONS`` makes for each of its rows at every iteration of
    the loop; the results are the same to the bit (inductor, a fresh cache)."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x = torch.linspace(-0.3, 0.2, 10, dtype=torch.float64).reshape(2, 5)
    outputs, handles = [], []
    for options in (compiling.CPU_OPTIONS, compiling.POINTWISE_CAT_OPTIONS):
        torch._dynamo.reset()
        try:
            fn = torch.compile(_stacked_tests, fullgraph=True, dynamic=False, options=options)
            out, code = run_and_get_code(fn, x)
        finally:
            torch._dynamo.reset()
        outputs.append(out)
        handles.append(sum(source.count("reinterpret_tensor") for source in code))
    assert handles[0] >= 4 and handles[1] == 0
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], _stacked_tests(x))


def test_pointwise_cats_only_for_small_batches_on_the_cpu():
    cpu, limit = torch.device("cpu"), compiling.POINTWISE_CAT_MAX_ENTRIES
    assert compiling.pointwise_cats(1, limit, cpu) and compiling.pointwise_cats(limit // 10, 10, cpu)
    assert not compiling.pointwise_cats(limit + 1, 1, cpu) and not compiling.pointwise_cats(1, 10, torch.device("meta"))


def _frames_compiled() -> int:
    """How many frames dynamo has compiled since its counters were cleared."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_batched_functions_compile_the_first_batch_size_and_one_symbolic_batch_for_the_others(eager_backend):
    torch._dynamo.utils.counters.clear()
    run = compiling.compiled(_double, "cpu", batched=True)
    for batch, graphs in ((4, 1), (7, 2), (2, 2), (33, 2), (4, 2), (1, 3), (5, 3)):
        x = torch.arange(3.0).expand(batch, 3)
        assert torch.equal(run(x), 2 * x)
        assert _frames_compiled() == graphs, batch
    run(torch.ones(5, 4))  # another shape after the batch: its first batch size, static
    run(torch.ones(6, 4))  # and its symbolic batch, which the first shape's does not serve
    assert _frames_compiled() == 5
    run(torch.ones(9, 4, dtype=torch.float32))  # another dtype (the tests run in float64): its first batch size
    assert _frames_compiled() == 6


def test_unbatched_or_with_batch_dynamic_off_each_batch_is_compiled(eager_backend, monkeypatch):
    monkeypatch.setattr(compiling, "BATCH_DYNAMIC", False)
    torch._dynamo.utils.counters.clear()
    run = compiling.compiled(_double, "cpu", batched=True)
    for batch in (4, 7, 2):
        run(torch.ones(batch, 3))
    assert _frames_compiled() == 3
    monkeypatch.setattr(compiling, "BATCH_DYNAMIC", True)
    plain = compiling.compiled(_affine, "cpu")  # not batched
    for batch in (4, 7, 2):
        plain(torch.ones(batch, 3))
    assert _frames_compiled() == 6


def test_a_backend_failure_runs_the_function_eagerly_with_one_warning(failing_backend):
    run = compiling.compiled(_double, "cpu")
    with pytest.warns(RuntimeWarning, match=r"failed to compile _double \(RuntimeError: g\+\+: not found\)") as caught:
        assert torch.equal(run(torch.ones(3)), torch.full((3,), 2.0))
    assert len([w for w in caught if "failed to compile" in str(w.message)]) == 1
    tries = len(failing_backend)
    assert tries >= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert torch.equal(run(torch.ones(4)), torch.full((4,), 2.0))  # another shape: not compiled again
    assert len(failing_backend) == tries


def test_dynamos_own_errors_are_not_taken_for_backend_failures(eager_backend):
    def breaks(x: torch.Tensor) -> torch.Tensor:
        print("a graph break")  # fullgraph=True: dynamo raises
        return x

    run = compiling.compiled(breaks, "cpu")
    with pytest.raises(torch._dynamo.exc.Unsupported):
        run(torch.ones(2))


def test_a_qp_layer_whose_backend_fails_gives_the_eager_solution_and_gradient(failing_backend):
    from optlayers import solve_qp
    from tests.qp.qp_problems import random_qp

    data = random_qp((3,), 5, 4, 1, active=True)
    p = data["p"].clone().requires_grad_()
    eager = solve_qp(**{**data, "p": p})
    (g_eager,) = torch.autograd.grad(eager.z.sum(), p)
    with pytest.warns(RuntimeWarning, match="failed to compile"):
        sol = solve_qp(**{**data, "p": p}, compile=True)
        (g,) = torch.autograd.grad(sol.z.sum(), p)
    assert (sol.status == 0).all()
    torch.testing.assert_close(sol.z, eager.z, rtol=0, atol=1e-12)
    torch.testing.assert_close(g, g_eager, rtol=0, atol=1e-12)


def test_a_backend_failure_past_torchs_limit_runs_the_function_eagerly():
    """A new specialisation past torch's recompile limit is compiled again under the package's
    limit (``_past_torchs_limit``): a backend failure there gives up on the graph as in ``_call``."""
    def graph(x: torch.Tensor) -> torch.Tensor:
        raise torch._dynamo.exc.BackendCompilerFailed(graph, RuntimeError("cc1plus: out of memory"), None)

    with pytest.warns(RuntimeWarning, match=r"failed to compile _double \(RuntimeError: cc1plus: out of memory\)"):
        assert torch.equal(compiling._past_torchs_limit(graph, _double, "_double", torch.ones(2)), torch.full((2,), 2.0))
    assert graph in compiling._GAVE_UP
    assert torch.equal(compiling._call(graph, _double, "_double", torch.ones(3)), torch.full((3,), 2.0))  # eager now


@pytest.mark.slow
def test_a_batch_compiles_with_inductor_into_the_eager_answers():
    """inductor's own C++, vectorised over a batch of 64 (the other tests trace with dynamo's eager
    backend, which compiles nothing): a construct that inductor cannot compile makes the solve run
    eagerly with a RuntimeWarning, here an error. frexp's int32 exponent did, in the default
    tolerance's size ("no matching function for call to convert<double, 2, int32_t, 1>"). About a
    minute with a cold cache."""
    from optlayers import solve_qp
    from tests.qp.qp_problems import random_qp

    compiling.compiled.cache_clear()
    torch._dynamo.reset()
    data = random_qp((64,), 10, 10, 2)
    data["p"], data["h"], data["b"] = (1e-3 * data[key] for key in ("p", "h", "b"))  # small data: the tolerance's size
    eager = solve_qp(**data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled = solve_qp(**data, compile=True)
    assert torch.equal(compiled.status, eager.status) and torch.equal(compiled.iterations, eager.iterations)
    torch.testing.assert_close(compiled.z, eager.z, rtol=1e-9, atol=1e-12)
    compiling.compiled.cache_clear()
    torch._dynamo.reset()


@pytest.mark.slow
def test_far_sides_compile_with_inductor_into_solved_answers():
    """A box of ±1e20 beside a QP's unit sides (``sides.far_sides``: a sort and its gap in the
    compiled start and scale), compiled by inductor without a warning: every problem SOLVED, z as
    the eager solve's. About a minute with a cold cache."""
    from optlayers import solve_qp
    from tests.qp.qp_problems import random_qp

    compiling.compiled.cache_clear()
    torch._dynamo.reset()
    data = random_qp((8,), 6, 10, 2)
    eye = torch.eye(6, dtype=data["G"].dtype).expand(8, 6, 6)
    data["G"] = torch.cat([data["G"], eye, -eye], 1)
    data["h"] = torch.cat([data["h"], torch.full((8, 12), 1e20, dtype=data["h"].dtype)], 1)
    eager = solve_qp(**data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        compiled = solve_qp(**data, compile=True)
    assert (compiled.status == 0).all() and (eager.status == 0).all()
    torch.testing.assert_close(compiled.z, eager.z, rtol=1e-9, atol=1e-9)
    compiling.compiled.cache_clear()
    torch._dynamo.reset()
