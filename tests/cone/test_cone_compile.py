"""The compiled path of the cone interior point method (``solve_cone(compile=True)``): its option
refused where wrong, its device loop against the engine's host loop, and the compiled solve (traced
whole by dynamo; and, marked slow, compiled by inductor) against the eager one on programs of every
cone kind: statuses, solutions and gradients."""

import pytest
import torch

from optlayers import compiling, threads
from optlayers.cone import ConeLayer, ConeSpec, solve_cone
from optlayers.cone.interior import solver
from optlayers.cone.testing import ALL_CONES, random_program
from optlayers.engine import lapack, loop

PROGRAMS = [(ALL_CONES, 16, False), (ALL_CONES, 14, True), (ConeSpec(nonneg=5, soc=[3], exp_dual=2), 8, False)]
# Every cone kind with more than 12 equality rows and variables: under compilation the KKT solves invert
# Cholesky factors of order <= 12 (``engine.kkt``), which rounds differently from the eager path
WIDE = ConeSpec(zero=13, nonneg=6, soc=[4, 3], psd=[3], exp=2, exp_dual=1)
AGREE = 1e-10  # compiled code rounds differently from eager kernels; the refinement takes both to round-off


def _solved(spec, n, quadratic, seed=0, batch=6, **options):
    A, b, c, P, *_ = random_program(spec, n, batch=batch, seed=seed, quadratic=quadratic)
    leaves = [t.clone().requires_grad_() for t in (A, b, c)]
    sol = solve_cone(*leaves, spec, P, solver="ipm", on_failure="ignore", **options)
    v = torch.randn(sol.x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=sol.x.dtype)
    ((sol.x * v).sum() + sol.y.sum() + sol.s.sum()).backward()
    return sol, [t.grad for t in leaves]


def _assert_agree(compiled_run, eager_run, tol):
    (sol, grads), (ref, ref_grads) = compiled_run, eager_run
    assert torch.equal(sol.status, ref.status), (sol.status, ref.status)
    for got, want in [(sol.x, ref.x), (sol.y, ref.y), (sol.s, ref.s), *zip(grads, ref_grads)]:
        error = float((got - want).detach().abs().max())
        assert error <= tol * (1 + float(want.detach().abs().max())), error


@pytest.mark.parametrize("value", ["yes", 1, None, 0.0])
def test_compile_must_be_a_bool(value):
    A, b, c, *_ = random_program(ALL_CONES, 16, batch=2)
    with pytest.raises(ValueError, match=r"compile must be True or False, got " + repr(value).replace(".", r"\.")):
        solve_cone(A, b, c, ALL_CONES, solver="ipm", compile=value)
    with pytest.raises(ValueError, match="compile must be True or False"):
        ConeLayer(ALL_CONES, compile=value)


@pytest.mark.parametrize("other", ["clarabel", "scs"])
def test_compile_is_refused_with_a_solver_it_does_not_compile(other):
    A, b, c, *_ = random_program(ALL_CONES, 16, batch=2)
    with pytest.raises(ValueError, match=rf"compile=True .* needs solver='ipm' or 'auto', got solver='{other}'"):
        solve_cone(A, b, c, ALL_CONES, solver=other, compile=True)
    with pytest.raises(ValueError, match="needs solver='ipm' or 'auto'"):
        ConeLayer(ALL_CONES, solver=other, compile=True)


def test_compiled_is_set_by_the_compile_argument_only():
    A, b, c, *_ = random_program(ALL_CONES, 16, batch=2)
    with pytest.raises(ValueError, match=r"cannot set 'compiled': pass solve_cone's compile=True"):
        solve_cone(A, b, c, ALL_CONES, solver="ipm", solver_options={"compiled": True})
    with pytest.raises(ValueError, match=r"ConeIPMSettings.compiled must be True or False, got 'no'"):
        solver.ConeIPMSettings(compiled="no")


@pytest.mark.slow
@pytest.mark.parametrize("quadratic", [False, True])
def test_the_device_loop_takes_the_host_loops_iterates(quadratic, monkeypatch):
    """``_on_device`` (outside compilation ``while_loop`` traces its body with dynamo's eager
    backend, the same operations) against the engine's host loop. With the host loop's working
    batch kept whole (``compact=False``) the two run the same operations on the same batch: the
    same statuses, iteration counts and iterates bit for bit. With the working batch cut to the
    running elements (the eager default) an element's batched linear algebra runs in a smaller
    batch, which may round it differently (MKL on an AMD EPYC machine does: up to 6e-6 on this
    program's last iterates): the same statuses, iterates as close as the method's accuracy.
    Both loops factorise with torch: the compiled solves' LAPACK operators (``lapack.used_for``,
    from order ``lapack.COMPILED_MIN_N``) round differently from torch's eager factorisation."""
    monkeypatch.setattr(lapack, "FACTORED_DTYPES", frozenset())
    spec, n = WIDE, 24
    A, b, c, P, *_ = random_program(spec, n, batch=9, seed=3, quadratic=quadratic)
    parts = tuple(solver.parts_of(spec))

    def iterated(compiled):
        program, step_parts = solver._setup(A, b, c, P, spec, parts, workspace=not compiled)
        return solver._iterate(program, step_parts, solver.ConeIPMSettings(compiled=compiled))

    device, device_status = iterated(True)
    compacted, compacted_status = iterated(False)
    with monkeypatch.context() as patch:
        run = loop.run
        patch.setattr(loop, "run", lambda *args, **kwargs: run(*args, **{**kwargs, "compact": False}))  # whatever the caller asks
        host, host_status = iterated(False)
    assert torch.equal(device_status, host_status) and torch.equal(device.iterations, host.iterations)
    assert bool((host.iterations > 5).all())
    assert torch.equal(device.v, host.v)
    assert torch.equal(compacted_status, host_status)
    torch.testing.assert_close(compacted.v, host.v, rtol=0, atol=1e-4 * (1 + float(host.v.abs().max())))


@pytest.mark.parametrize("spec, n, quadratic", [PROGRAMS[1], *(pytest.param(*p, marks=pytest.mark.slow) for p in PROGRAMS[::2])])
def test_compiled_solve_traced_whole_equals_the_eager_one(eager_backend, spec, n, quadratic):
    """The compiled path traced by dynamo without graph breaks (``fullgraph``; run by its eager
    backend): one compiled call, and the eager solve's statuses, solutions and gradients."""
    calls = []
    original = compiling.compiled

    def counted(fn, device_type, graphs=False):
        calls.append(fn.__qualname__)
        return original(fn, device_type, graphs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(solver, "compiled", counted)
        run = _solved(spec, n, quadratic, compile=True)
    assert calls == ["_solved"]
    _assert_agree(run, _solved(spec, n, quadratic), 1e-12)


def test_a_compiled_solve_whose_backend_fails_gives_the_eager_answers(failing_backend):
    """Where torch's backend fails (no C++ compiler, a broken cache), the solve runs eagerly, with
    a warning: the eager statuses, solutions and gradients."""
    spec, n, quadratic = PROGRAMS[1]
    with pytest.warns(RuntimeWarning, match="failed to compile"):
        run = _solved(spec, n, quadratic, compile=True)
    assert failing_backend
    _assert_agree(run, _solved(spec, n, quadratic), 1e-12)


@pytest.mark.slow
def test_compiled_solve_equals_the_eager_one():
    """Compiled by inductor (minutes with a cold cache): the eager solve's statuses, and its
    solutions and gradients to ``AGREE``, on programs of every cone kind (with and without P)."""
    compiling.compiled.cache_clear()
    for spec, n, quadratic in PROGRAMS[:2]:  # every cone kind, without and with P
        _assert_agree(_solved(spec, n, quadratic, compile=True), _solved(spec, n, quadratic), AGREE)


@pytest.mark.skipif(threads._omp_set_num_threads() is None, reason="no per-thread OpenMP setting: batches are not sliced")
def test_compiled_slices_give_the_whole_batchs_answers(eager_backend, monkeypatch):
    """A compiled solve cut into equal slices on the pool's threads (each one compiled call) gives
    every program the statuses, solutions and gradients of the compiled solve of the whole batch."""
    monkeypatch.setattr(solver, "_MIN_COMPILED_SLICE", 1)
    spec, n, quadratic = PROGRAMS[1]
    runs, counts = [], []
    original = threads.map_slices
    monkeypatch.setattr(threads, "map_slices", lambda fn, batch, count: counts.append(count) or original(fn, batch, count))
    for workers in (1, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda workers=workers: workers)
        runs.append(_solved(spec, n, quadratic, compile=True))
    assert counts == [1, 3]
    _assert_agree(runs[1], runs[0], 0.0)
