"""The interior point loop's cost model and its compiled form.

Kernel and synchronisation counts are machine-independent (``benchmarks/kernels.py`` counts
them with a ``TorchDispatchMode``); the bounds below are pinned so that they cannot creep back.
"""
import contextlib
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from optlayers import host, linalg, solve_qp
from optlayers.engine import kkt
from optlayers.engine.kkt import MAX_FACTOR_RETRIES
from optlayers.qp import ipm
from optlayers.qp.problem import prepare_qp, qp_data
from optlayers.qp.scaling import equilibrate
from optlayers.status import Status
from tests import stand_in_graph
from tests.qp.qp_problems import random_qp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import kernels  # noqa: E402

# Measured on these problems (batch 8, n = 10, without and with 5 equalities; B = 128, n = 100 gives the
# same counts per iteration; where they go: ``kernels.py --phases``): 192 and 259 kernels per iteration,
# of which 2 and 3 the iterate's Farkas test (ipm._certificates), 6 and 7 the direction's certificate
# with its negative dλ dropped and its radius, 8 and 10 the iterate's recession test,
# 12 the progress test (IPMSettings.progress_limit), 4 the step fraction's test
# (ipm.BALANCED_STEP_FRACTION), 11 the complementarity by variable, 7 with equalities the
# factorisation of H + σAᵀA (IPMSettings.augment); forwards of 2976 and 3928 kernels (10 and 9
# iterations: with steps 0.999 of the way to the boundary six of the eight problems without equalities
# have converged at the look after iteration 8, and the working batch is compacted; a solve's own
# kernels include the value checks (Q's semidefiniteness), the scalings (sides far above the others left
# out, small and large data at unit size, the objective's size), the derivative checks read with
# the final statuses (qp.derivative_checks) and, with equalities, the test for nearly dependent rows
# (82, qp.equalities); 6 synchronisations at most (validation, the start's
# factorisation, the looks after iterations 8, 12 and 16, the final read; 5 here, where the look
# after iteration 12 finds every problem finished); a backward of 57 kernels, 60 with equalities
# (with the loss's sum and its ones: z.sum().backward()).
MAX_KERNELS_PER_ITERATION = {0: 192, 5: 259}
MAX_FORWARD_KERNELS = {0: 2976, 5: 3928}
MAX_FORWARD_SYNCS = 6
MAX_BACKWARD_KERNELS = {0: 57, 5: 60}
# Views launch no kernel, but an eager iteration dispatches each like a kernel (about 1 µs of the
# host's time at batch 1, n = 10): measured 192 + 153 views and 259 + 268 (the same at B = 128, n = 100).
MAX_DISPATCHES_PER_ITERATION = {0: 345, 5: 527}


@pytest.mark.parametrize("m", [0, 5])
def test_kernels_per_iteration_and_syncs_stay_bounded(m):
    counts = kernels.qp_counts(batch=8, n=10, n_ineq=10, n_eq=m)
    assert counts.kernels_per_iteration <= MAX_KERNELS_PER_ITERATION[m], counts
    assert counts.forward_kernels <= MAX_FORWARD_KERNELS[m], counts
    assert counts.forward_syncs <= MAX_FORWARD_SYNCS, counts
    assert counts.backward_kernels <= MAX_BACKWARD_KERNELS[m] and counts.backward_syncs == 0, counts


def test_the_counts_on_the_cpus_own_schedule_see_what_the_cpu_runs(monkeypatch):
    """``kernels.py --cpu-schedule``: the host looks after every iteration (a look's flags each time)
    and the certificates cast two rows, so an iteration dispatches more than the accelerators' count."""
    accelerator = kernels.qp_counts(batch=8, n=10, n_ineq=10, n_eq=0)
    monkeypatch.setattr(kernels, "CPU_SCHEDULE", True)
    cpu = kernels.qp_counts(batch=8, n=10, n_ineq=10, n_eq=0)
    assert cpu.iterations == accelerator.iterations
    assert cpu.kernels_per_iteration > accelerator.kernels_per_iteration, (cpu, accelerator)
    assert cpu.backward_kernels == accelerator.backward_kernels


@pytest.mark.parametrize("m", [0, 5])
def test_dispatches_per_iteration_views_included_stay_bounded(m):
    counts = kernels.qp_counts(batch=8, n=10, n_ineq=10, n_eq=m)
    assert counts.kernels_per_iteration + counts.views_per_iteration <= MAX_DISPATCHES_PER_ITERATION[m], counts


def test_the_phases_of_the_kernels_add_up_to_their_counts():
    """``benchmarks/kernels.py --phases`` charges every kernel of an iteration and of a forward to a
    phase of the solver's code (its markers are looked up in the source: a renamed statement fails here)."""
    per_iteration, forward = kernels.qp_phases(batch=8, n=10, n_ineq=10, n_eq=5)
    counts = kernels.qp_counts(batch=8, n=10, n_ineq=10, n_eq=5)
    assert sum(per_iteration.values()) == counts.kernels_per_iteration and sum(forward.values()) == counts.forward_kernels
    assert "other" not in per_iteration and "other" not in forward, (per_iteration, forward)
    assert per_iteration["newton_step: corrector / refinement"] > 0 and forward["equilibration"] > 0


def test_counter_sees_syncs_and_ignores_views():
    t = torch.arange(6.0)
    counter = kernels.count(lambda: (t.view(2, 3).T, bool(t.sum() > 0), t[t > 2], host.host_read(t[:1])))
    assert counter.kernels["sum"] == 1 and "view" not in counter.kernels and "t" not in counter.kernels
    assert counter.views == {"view": 1, "permute": 1, "slice": 1}, counter.views
    assert counter.syncs["_local_scalar_dense"] == 1 and counter.syncs["index"] == 1 and counter.syncs["_to_copy"] == 1


def _scaled_problem(m: int = 2):
    data = random_qp((4,), 6, 8, m, active=True)
    flat, _ = prepare_qp(*(data[k] for k in ("Q", "p", "G", "h", "A", "b")))
    scaled, sc = equilibrate(qp_data(*flat))
    settings = ipm.default_settings(torch.float64, None, None, None)
    return scaled, ipm.Units.of(sc, scaled, settings), settings


@pytest.mark.parametrize("inverted", [False, True])
def test_step_compiles_into_one_graph_with_the_eager_result(monkeypatch, inverted):
    """``fullgraph=True`` fails on any graph break; the traced step computes what eager does:
    bit for bit with the library's triangular solves and products, and to rounding where the
    traced step solves with the inverted factors (``kkt.INVERTED_MAX_N``; n = 8 here) and writes
    its small products elementwise (``linalg.SMALL_PRODUCT_MAX``)."""
    if not inverted:
        monkeypatch.setattr(kkt, "INVERTED_MAX_N", 0)
        monkeypatch.setattr(linalg, "SMALL_PRODUCT_MAX", 0)
        # every refinement step, as eagerly at this size (the early stop on the device is
        # test_refinement's)
        monkeypatch.setattr(kkt, "refines_on_device", lambda f, refine_steps: False)
    tol = 1e-12 if inverted else 0.0
    data, units, settings = _scaled_problem()
    st, res = ipm.start(data, units, settings)
    traced = torch.compile(ipm.step, fullgraph=True, dynamic=False, backend="eager")
    for _ in range(4):
        expected, expected_res = ipm.step(data, units, st, res, settings)
        got, got_res = traced(data, units, st, res, settings)
        torch.testing.assert_close(got.v, expected.v, rtol=tol, atol=tol)
        torch.testing.assert_close(got_res.r_d, expected_res.r_d, rtol=tol, atol=tol)
        assert torch.equal(got.status, expected.status) and torch.equal(got.reg, expected.reg)
        st, res = expected, expected_res


def test_failed_factorisation_is_retried_with_more_regularisation_then_given_up():
    """A problem whose KKT factorisation fails keeps its iterate and retries with the
    regularisation raised; after MAX_FACTOR_RETRIES raises in a row it is a numerical failure."""
    data, units, settings = _scaled_problem(m=0)
    st = ipm.initial_point(data, settings)
    res = ipm.residuals(data, units, st, settings)
    good = ipm.newton_iteration(data, units, st, res, settings)
    failed = dataclasses.replace(good, factor_ok=torch.tensor([True, False, True, True]))
    for attempt in range(MAX_FACTOR_RETRIES + 1):
        new = ipm.assess(data, st, res, failed, settings)
        assert torch.equal(new.v[1], st.v[1]) and not torch.equal(new.v[0], st.v[0])
        if attempt < MAX_FACTOR_RETRIES:
            assert new.status[1] == ipm.RUNNING
            assert new.reg[1] == pytest.approx(st.reg[1] * 100) and new.reg[0] == settings.reg
        else:
            assert new.status[1] == Status.NUMERICAL_ERROR
        st = dataclasses.replace(new, v=st.v)
    # a successful factorisation lowers a raised regularisation again, down to its floor
    raised = dataclasses.replace(st, reg=st.reg * 1e4, status=torch.full_like(st.status, ipm.RUNNING))
    assert torch.allclose(ipm.assess(data, raised, res, good, settings).reg, raised.reg / 100)


def test_no_synchronisation_inside_the_iteration():
    data, units, settings = _scaled_problem()
    st, res = ipm.start(data, units, settings)
    counter = kernels.count(lambda: ipm.step(data, units, st, res, settings))
    assert counter.sync_count == 0, counter.syncs


def test_no_synchronisation_in_what_graphed_calls_run(monkeypatch):
    """With ``graphed.GRAPHED_CALLS`` the equilibration, the start, the derivatives' factorisation and
    the backward run as ``GraphedCall``s, whose CUDA capture fails on a host synchronisation: each
    of them, called as a solve and its backward call it, makes none (counted on the CPU)."""
    from optlayers.engine import graphed

    called = []

    def recorded(self, *args):
        called.append((self.fn, args))
        return self.fn(*args)

    monkeypatch.setattr(graphed.GraphedCall, "__call__", recorded)
    monkeypatch.setattr(graphed, "replays_graphs", lambda device, compiled: True)
    monkeypatch.setattr(graphed, "GRAPHED_CALLS", True)
    data = random_qp((4,), 7, 9, 2, active=True)
    p = data.pop("p").requires_grad_(True)
    with host.accelerator_schedule():
        sol = solve_qp(p=p, **data)
        (sol.z ** 2).sum().backward()
    assert sorted(fn.__name__ for fn, _ in called) == ["_checked_scaling", "_compiled_vjp", "_derivative_factor_unretried",
                                                      "_start_unretried"]
    for fn, args in called:
        counter = kernels.count(lambda: fn(*args))
        assert counter.sync_count == 0, (fn.__name__, counter.syncs)
        assert counter.kernel_count > 0, fn.__name__


@pytest.mark.slow
def test_compiled_solve_matches_eager_with_gradients():
    """The opt-in compiled path (inductor) gives the eager answers and derivatives."""
    data = random_qp((3,), 5, 6, 2, active=True)
    p = data.pop("p").requires_grad_(True)
    solutions = []
    for compiled in (False, True):
        sol = solve_qp(p=p, **data, compile=compiled)
        (grad,) = torch.autograd.grad((sol.z ** 2).sum(), p)
        solutions.append((sol, grad))
    (eager, g_eager), (comp, g_comp) = solutions
    assert torch.equal(eager.status, comp.status)
    torch.testing.assert_close(comp.z, eager.z, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-8, atol=1e-9)


# Measured at (8, 20), 20 inequalities, AMD EPYC, torch 2.13: 34 launches per compiled iteration (15
# fused kernels, 19 library calls), a backward of 46, a backward that makes the derivatives'
# factorisation of 67 (issue 11's targets: 60 per iteration, 100 per backward).
MAX_COMPILED_LAUNCHES = {"total": 40, "backward_total": 55, "factorising_backward_total": 80}


@pytest.mark.slow
def test_compiled_launches_stay_bounded():
    """``benchmarks/kernels.py --compiled`` (``compiled_launches``) runs, finds both kinds of launch in
    the code inductor generates, and its counts stay within their bounds (three compilations, about a
    minute)."""
    launches = kernels.compiled_launches(8, 20, 20, 0)
    for prefix in ("", "backward_", "factorising_backward_"):
        assert launches[f"{prefix}fused"] > 0 and launches[f"{prefix}library"] > 0, launches
        assert launches[f"{prefix}total"] == launches[f"{prefix}fused"] + launches[f"{prefix}library"], launches
    for key, bound in MAX_COMPILED_LAUNCHES.items():
        assert launches[key] <= bound, (key, launches)


def test_compile_must_be_a_bool():
    data = random_qp((2,), 3, 2, 0)
    with pytest.raises(ValueError, match="compile must be True or False, got 1"):
        solve_qp(**data, compile=1)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.filterwarnings("error:optlayers on CUDA:RuntimeWarning")  # the step must be captured, not run uncaptured
@pytest.mark.parametrize("compile,calls", [(True, False), (False, True), (True, True)],
                         ids=["compiled", "eager-graphed-calls", "compiled-graphed-calls"])
def test_graphed_solve_on_cuda_matches_the_cpu(monkeypatch, compile, calls):
    """The solve on CUDA with its step replayed from a CUDA graph (``engine.graphed``; compiled, or
    eager with ``EAGER_GRAPHS``), and with ``calls`` the parts outside the iterations too
    (``GRAPHED_CALLS``), gives the CPU's answers and gradients, also when a second solve replays the
    graphs before the first one's backward."""
    from optlayers.engine import graphed

    monkeypatch.setattr(graphed, "EAGER_GRAPHS", True)
    monkeypatch.setattr(graphed, "GRAPHED_CALLS", calls)
    data = random_qp((16,), 8, 10, 3, active=True)
    expected = []
    for shift in (0.0, 1.0):
        p = (data["p"] + shift).requires_grad_(True)
        sol = solve_qp(p=p, **{k: v for k, v in data.items() if k != "p"})
        expected.append((sol.z.detach(), torch.autograd.grad((sol.z ** 2).sum(), p)[0]))
    cuda = {k: v.cuda() for k, v in data.items() if k != "p"}
    ps = [(data["p"] + shift).cuda().requires_grad_(True) for shift in (0.0, 1.0)]
    sols = [solve_qp(p=p, **cuda, compile=compile) for p in ps]  # both forwards first
    for p, sol, (z, grad) in zip(ps, sols, expected):
        torch.testing.assert_close(sol.z.detach().cpu(), z, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(torch.autograd.grad((sol.z ** 2).sum(), p)[0].cpu(), grad, rtol=1e-8, atol=1e-9)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.filterwarnings("error:optlayers on CUDA:RuntimeWarning")
def test_graphed_solves_on_two_streams_each_have_their_own_graphs(monkeypatch):
    """Two eager solves of one layout, each on a stream of its own (``engine.graphed``: the stream
    is part of a graph's key), give the CPU's answers: neither replays into the other's buffers."""
    from optlayers.engine import graphed

    monkeypatch.setattr(graphed, "EAGER_GRAPHS", True)
    monkeypatch.setattr(graphed, "_GRAPHS", graphed._Graphs())
    data = random_qp((16,), 8, 10, 3, active=True)
    shifts = (0.0, 1.0)
    expected = [solve_qp(**{**data, "p": data["p"] + shift}).z for shift in shifts]
    cuda = {k: v.cuda() for k, v in data.items()}
    streams = [torch.cuda.Stream() for _ in shifts]
    got = []
    for shift, stream in zip(shifts, streams):
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            got.append(solve_qp(**{**cuda, "p": cuda["p"] + shift}).z)
    torch.cuda.synchronize()
    for z, want in zip(got, expected):
        torch.testing.assert_close(z.cpu(), want, rtol=1e-9, atol=1e-10)
    assert len({key[1] for key in graphed._GRAPHS.captured if key[0] != "call"}) == 2  # one step graph per stream


def test_compiled_path_takes_more_shapes_than_torchs_default_limit(eager_backend, monkeypatch):
    """Each new batch size is a new specialisation of the compiled step; torch's limit (8 by
    default, 3 here, so that fewer shapes are traced) must not turn the next one into an error, nor
    a second call with a shape met before (which runs without raising the limit): such calls go
    through ``compiling._past_torchs_limit``. Traced with the eager backend (fast), one iteration
    per call (not ``qp.fused``'s whole solve: the same wrapper, more tracing)."""
    from optlayers import compiling
    from optlayers.qp import fused

    monkeypatch.setattr(fused, "pays", lambda data: False)
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 3)
    past = []
    real = compiling._past_torchs_limit
    monkeypatch.setattr(compiling, "_past_torchs_limit", lambda *args, **kwargs: past.append(1) or real(*args, **kwargs))
    for batch in [*range(1, 6), *range(1, 6)]:
        data = random_qp((batch,), 3, 2, 0)
        assert (solve_qp(**data, compile=True).status == 0).all()
    assert past, "no call met torch's limit"


def test_on_the_cpu_the_loop_stops_right_after_the_last_problem_converges(monkeypatch):
    """A read of the statuses costs nothing on the CPU: no step runs after every problem has a
    status. Under ``host.accelerator_schedule`` the host looks only after iterations 8, 12, ..."""
    from optlayers import host, solve_qp

    data = random_qp((3,), 5, 6, 2, active=True)
    steps = []
    real_step = ipm.step
    monkeypatch.setattr(ipm, "step", lambda *args: steps.append(1) or real_step(*args))
    sol = solve_qp(*(data[k] for k in ("Q", "p", "G", "h", "A", "b")))
    assert (sol.status == Status.SOLVED).all()
    assert len(steps) == int(sol.iterations.max())
    steps.clear()
    with host.accelerator_schedule():
        solve_qp(*(data[k] for k in ("Q", "p", "G", "h", "A", "b")))
    looks = [i for i in range(100) if host.is_check(i)]
    assert len(steps) == next(i for i in looks if i >= int(sol.iterations.max()))


def test_compiled_start_whose_factorisation_failed_is_retried(monkeypatch, eager_backend):
    """The compiled start factorises without retries (a retry needs a host look); where it failed,
    the start is redone with the retries, so the compiled path is as robust as the eager one."""
    real = ipm._start_unretried

    def failed_start(data, units, settings):
        st, res = real(data, units, settings)
        return dataclasses.replace(st, status=torch.full_like(st.status, int(Status.NUMERICAL_ERROR))), res

    monkeypatch.setattr(ipm, "_start_unretried", failed_start)
    data = random_qp((3,), 4, 5, 1, active=True)
    assert (solve_qp(**data, compile=True).status == Status.SOLVED).all()


def test_the_accelerator_schedule_holds_in_its_own_context_and_reaches_the_slices():
    """``host.accelerator_schedule`` is a context variable: another thread keeps the CPU schedule,
    and the pool threads that solve the slices of a batch follow the caller's."""
    import threading

    from optlayers import threads

    seen = {}
    with host.accelerator_schedule():
        other = threading.Thread(target=lambda: seen.setdefault("other", host.is_check(1, torch.device("cpu"))))
        other.start()
        other.join()
        seen["slices"] = threads.map_slices(lambda part: host.is_check(1, torch.device("cpu")), 4, 2)
    seen["slices after"] = threads.map_slices(lambda part: host.is_check(1, torch.device("cpu")), 4, 2)
    assert seen["other"] is True  # the CPU schedule: a look after every iteration
    assert seen["slices"] == [False, False]
    assert seen["slices after"] == [True, True]  # the pool threads do not keep an earlier caller's schedule


def test_solve_with_negated_rx_gives_the_same_bits():
    """solve_reduced(−rx given as rx, negated_rx=True) folds the negation into its first product:
    the same dx, dν, dλ bit for bit as negating first, with equalities and without, with v and without."""
    gen = torch.Generator().manual_seed(5)
    for m, with_v in [(0, True), (3, True), (3, False), (0, False)]:
        B, n, k = 6, 7, 9
        M = torch.randn(B, n, n, generator=gen, dtype=torch.float64)
        Q, G = M @ M.mT, torch.randn(B, k, n, generator=gen, dtype=torch.float64)
        A = torch.randn(B, m, n, generator=gen, dtype=torch.float64)
        w_inv = torch.rand(B, k, generator=gen, dtype=torch.float64) + 0.1
        reg = torch.full((B,), 1e-9, dtype=torch.float64)
        f = kkt.factor_kkt(Q, A, G, w_inv, reg, reg, retries=0)
        r_d, re = torch.randn(B, n, generator=gen, dtype=torch.float64), torch.randn(B, m, generator=gen, dtype=torch.float64)
        v = torch.randn(B, k, generator=gen, dtype=torch.float64) if with_v else None
        plain = kkt.solve_reduced(f, -r_d, re, v, 3)
        folded = kkt.solve_reduced(f, r_d, re, v, 3, negated_rx=True)
        assert all(torch.equal(a, b) for a, b in zip(plain, folded)), (m, with_v)



@pytest.mark.parametrize("traced", [False, True])
def test_factorising_into_a_handed_over_q_gives_the_same_bits_and_leaves_a_kept_q_alone(traced):
    """factor_kkt(overwrite_q=True) accumulates H = Q + GᵀW⁻¹G into Q itself: the same factor bit
    for bit as into a copy (eagerly torch's product, traced at n = 7 the elementwise one); without
    it Q is left as it was."""
    gen = torch.Generator().manual_seed(6)
    B, n, m, k = 5, 7, 2, 9
    M = torch.randn(B, n, n, generator=gen, dtype=torch.float64)
    Q, G = M @ M.mT, torch.randn(B, k, n, generator=gen, dtype=torch.float64)
    A = torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    w_inv = torch.rand(B, k, generator=gen, dtype=torch.float64) + 0.1
    reg = torch.full((B,), 1e-9, dtype=torch.float64)

    def factors(Q, overwrite_q):
        f = kkt.factor_kkt(Q, A, G, w_inv, reg, reg, retries=0, overwrite_q=overwrite_q)
        return f.H, f.chol_h, f.chol_s, f.Y

    run = torch.compile(factors, backend="eager", fullgraph=True, dynamic=False) if traced else factors
    kept = Q.clone()
    plain = run(kept, False)
    assert torch.equal(kept, Q)
    handed = Q.clone()
    overwritten = run(handed, True)
    assert all(torch.equal(a, b) for a, b in zip(plain, overwritten))
    assert torch.equal(handed, plain[0])  # H was formed in Q's storage
@pytest.mark.parametrize("accelerator", [False, True])
def test_inf_norm_is_the_largest_magnitude_nan_included(accelerator):
    """``linalg.inf_norm`` (the residuals' and certificates' norms): abs().amax() on the CPU's own
    schedule, one vector_norm on the accelerators'; the same values either way."""
    t = torch.tensor([[1.0, -3.0, 2.0], [float("nan"), 0.0, 1.0], [-float("inf"), 1.0, 0.0], [-0.0, 0.0, 5e-324]],
                     dtype=torch.float64)
    with host.accelerator_schedule() if accelerator else contextlib.nullcontext():
        got, along_0 = linalg.inf_norm(t), linalg.inf_norm(t[[0, 2]], 0)
    assert torch.equal(got[[0, 2, 3]], t.abs().amax(-1)[[0, 2, 3]]) and got[1].isnan()
    assert torch.equal(along_0, t[[0, 2]].abs().amax(0))


def test_the_failure_test_agrees_with_next_regularisation():
    """assess derives retry and give-up from running > factored and kkt.raisable: on every
    combination the same retry and reg as kkt.next_regularisation, and a failure exactly where a
    running problem neither stepped nor retries."""
    base = 1e-9
    flags = torch.tensor([[r, f] for r in (False, True) for f in (False, True)] * 2)
    running, factored = flags[:, 0], flags[:, 1]
    reg = torch.tensor([base] * 4 + [base * 1e8] * 4, dtype=torch.float64)  # raisable, then not
    sound = running & factored
    retry, new_reg = kkt.next_regularisation(reg, base, running, factored, sound)
    unsound, can_raise = running > factored, kkt.raisable(reg, base)
    assert torch.equal(unsound & can_raise, retry)
    assert torch.equal(kkt.regularisation_after(reg, base, unsound & can_raise, sound), new_reg)
    assert torch.equal(unsound > can_raise, running & ~sound & ~retry)
    # (running, factored) = 00, 01, 10, 11: a failure retries with 100 times more while it may, a step takes it back
    expected = torch.tensor([base, base, base * 100, base, base * 1e8, base * 1e8, base * 1e8, base * 1e6], dtype=torch.float64)
    torch.testing.assert_close(new_reg, expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("calls", [False, True], ids=["step", "step-and-calls"])
def test_a_graphed_step_solves_as_the_plain_one_and_its_results_outlive_the_next_solve(monkeypatch, calls):
    """``engine.graphed.GraphedStep`` in the real loop (its host looks, retries and the copy out of
    its buffers), run on the CPU with a stand-in graph (``tests/stand_in_graph.py``: its capture
    computes nothing, its replay runs the captured body): three
    solves of one shape give, to the bit, the plain step's answers and gradients (on a batch that
    keeps its shape, as a graphed one does), the first one's still intact after the later solves
    have replayed the same buffers. With ``calls`` the equilibration, the start and the
    derivatives' factorisation are ``GraphedCall``s too (``graphed.GRAPHED_CALLS``)."""
    from optlayers.engine import graphed

    problems = [random_qp((6,), 7, 9, 2, active=True) for _ in range(3)]
    run, compacts = ipm.loop.run, []

    def uncompacted(*args, **kwargs):  # the plain solves keep the batch's shape too, as the graphed ones do
        compacts.append(kwargs["compact"])
        return run(*args, **{**kwargs, "compact": False})

    monkeypatch.setattr(ipm.loop, "run", uncompacted)

    def solved(data):
        p = data["p"].clone().requires_grad_(True)
        sol = solve_qp(p=p, **{k: v for k, v in data.items() if k != "p"})
        return sol, p

    with host.accelerator_schedule():  # the branches a GPU takes (the stand-in capture refuses host reads)
        expected = []
        for data in problems:
            sol, p = solved(data)
            expected.append((sol.z.detach().clone(), torch.autograd.grad((sol.z ** 2).sum(), p)[0]))

        monkeypatch.setattr(graphed, "_GRAPHS", graphed._Graphs())
        monkeypatch.setattr(graphed, "warm_up", stand_in_graph.warm_up)
        monkeypatch.setattr(graphed, "capture", stand_in_graph.capture)  # records, computing nothing; a replay computes
        monkeypatch.setattr(ipm, "replays_graphs", lambda device, compiled: True)
        if calls:
            monkeypatch.setattr(graphed, "replays_graphs", lambda device, compiled: True)
            monkeypatch.setattr(graphed, "GRAPHED_CALLS", True)
        assert compacts and all(compacts)  # the plain CPU loop would compact
        compacts.clear()
        kept = [solved(data) for data in problems]
        assert compacts and not any(compacts)  # a graphed loop never does
        for (sol, p), (z, grad) in zip(kept, expected):
            assert torch.equal(sol.z.detach(), z)
            assert torch.equal(torch.autograd.grad((sol.z ** 2).sum(), p)[0], grad)
        captured_calls = [key[1][0].__name__ for key in graphed._GRAPHS.captured if key[0] == "call"]
        assert sorted(captured_calls) == (["_checked_scaling", "_compiled_vjp", "_derivative_factor_unretried", "_start_unretried"]
                                          if calls else [])
        assert all(entry.graph is not None for entry in graphed._GRAPHS.captured.values())  # none fell back
