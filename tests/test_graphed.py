"""``engine.graphed.GraphedStep``: the step's buffers, copies and fallbacks, checked on the CPU
with a stand-in for the CUDA graph (one whose replay runs the captured body); the capture itself
on CUDA in ``tests/qp/test_engine.py`` (skipped without a GPU)."""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass, replace
from typing import NamedTuple

import pytest
import torch
from torch import Tensor

from optlayers.engine import graphed
from tests import stand_in_graph


@dataclass(frozen=True)
class Data:
    a: Tensor
    diagonal: bool


@dataclass(frozen=True)
class Units:
    u: Tensor


@dataclass(frozen=True)
class State:
    x: Tensor
    status: Tensor
    n: int


@dataclass(frozen=True)
class Res:
    r: Tensor


def toy_step(data: Data, units: Units, st: State, res: Res) -> tuple[State, Res]:
    x = st.x / 2 + data.a * units.u + res.r.sum(-1, keepdim=True)
    return replace(st, x=x, status=st.status + 1), Res(r=x - st.x)


class FakeGraph:
    """A captured graph whose replay runs the body (what a CUDA graph's replay does on the device)."""

    def __init__(self, body) -> None:
        self.body = body

    def replay(self) -> None:
        self.body()


@pytest.fixture
def captures(monkeypatch):
    """Fresh per-thread graphs, and a capture that counts its calls and warms as torch's would."""
    made = []

    def fake_capture(body, device):
        made.append(body)
        return stand_in_graph.capture(body, device)  # records, computing nothing, as torch's capture

    monkeypatch.setattr(graphed, "_GRAPHS", graphed._Graphs())
    monkeypatch.setattr(graphed, "warm_up", lambda warm, device: [warm() for _ in range(graphed.WARM_UP_CALLS)])
    monkeypatch.setattr(graphed, "capture", fake_capture)
    return made


def problem(batch=3, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = Data(a=torch.randn(batch, n, generator=g, dtype=torch.float64), diagonal=False)
    units = Units(u=torch.rand(batch, n, generator=g, dtype=torch.float64))
    st = State(x=torch.randn(batch, n, generator=g, dtype=torch.float64), status=torch.zeros(batch, dtype=torch.int64), n=n)
    res = Res(r=torch.randn(batch, n, generator=g, dtype=torch.float64))
    return data, units, st, res


def iterate(step, data, units, st, res, times):
    for _ in range(times):
        st, res = step(data, units, st, res)
    return st, res


def test_replays_give_the_steps_own_iterates_and_capture_once(captures):
    data, units, st, res = problem()
    expected = iterate(toy_step, data, units, st, res, 6)
    step = graphed.GraphedStep(toy_step, key="settings")
    got = iterate(step, data, units, st, res, 6)
    assert torch.equal(got[0].x, expected[0].x) and torch.equal(got[0].status, expected[0].status)
    assert torch.equal(got[1].r, expected[1].r)
    assert len(captures) == 1
    again = step(data, units, *got)
    assert again[0] is got[0] and again[1] is got[1]  # the state lives in the graph's buffers
    assert torch.equal(st.x, problem()[2].x)  # the caller's tensors are never written


def test_a_state_replaced_between_calls_is_copied_in(captures):
    data, units, st, res = problem()
    step = graphed.GraphedStep(toy_step, key=None)
    st1, res1 = iterate(step, data, units, st, res, 2)
    changed = replace(st1, x=st1.x.clone().fill_(0.5))  # as the host's look replaces a field
    expected = toy_step(data, units, replace(changed, status=changed.status.clone()), Res(r=res1.r.clone()))
    got = step(data, units, changed, res1)  # overwrites st1 and res1, the graph's buffers
    assert torch.equal(got[0].x, expected[0].x) and torch.equal(got[1].r, expected[1].r)


def test_a_later_solve_of_the_same_layout_replays_with_its_own_data(captures):
    first, second = problem(seed=0), problem(seed=1)
    iterate(graphed.GraphedStep(toy_step, key="k"), *first, 3)
    got = iterate(graphed.GraphedStep(toy_step, key="k"), *second, 3)
    expected = iterate(toy_step, *second, 3)
    assert torch.equal(got[0].x, expected[0].x)
    assert len(captures) == 1


def test_another_shape_key_or_field_value_is_another_capture(captures):
    iterate(graphed.GraphedStep(toy_step, key="k"), *problem(), 2)
    iterate(graphed.GraphedStep(toy_step, key="k"), *problem(batch=5), 2)
    iterate(graphed.GraphedStep(toy_step, key="other"), *problem(), 2)
    data, units, st, res = problem()
    iterate(graphed.GraphedStep(toy_step, key="k"), replace(data, diagonal=True), units, st, res, 2)
    assert len(captures) == 4


def test_at_most_max_graphs_are_kept(captures, monkeypatch):
    monkeypatch.setattr(graphed, "MAX_GRAPHS", 2)
    for key in ("a", "b", "c", "a"):
        iterate(graphed.GraphedStep(toy_step, key=key), *problem(), 1)
    assert len(captures) == 4 and len(graphed._GRAPHS.captured) == 2  # "a" was dropped before its second use


def test_an_output_of_another_layout_runs_uncaptured_with_a_warning(captures):
    def counting_step(data, units, st, res):
        new, res = toy_step(data, units, st, res)
        return replace(new, n=st.n + 1), res  # a field the next call's buffers cannot hold

    data, units, st, res = problem()
    with pytest.warns(RuntimeWarning, match="could not be captured in a CUDA graph .*ValueError: the step's output layout"):
        got = graphed.GraphedStep(counting_step, key=None)(data, units, st, res)
    assert got[0].n == st.n + 1 and torch.equal(got[0].x, toy_step(data, units, st, res)[0].x)
    assert not captures


def test_a_failed_capture_runs_uncaptured_with_a_warning(monkeypatch):
    monkeypatch.setattr(graphed, "_GRAPHS", graphed._Graphs())

    def failing(body, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphed, "warm_up", lambda warm, device: warm())
    monkeypatch.setattr(graphed, "capture", failing)
    data, units, st, res = problem()
    step = graphed.GraphedStep(toy_step, key=None)
    with pytest.warns(RuntimeWarning, match="RuntimeError: operation not permitted"):
        got = iterate(step, data, units, st, res, 3)
    assert torch.equal(got[0].x, iterate(toy_step, data, units, st, res, 3)[0].x)
    (entry,) = graphed._GRAPHS.captured.values()  # no state kept for a layout that runs uncaptured
    assert entry.graph is None and entry.buffers == [] and entry.outputs == (None, None)


def test_each_thread_keeps_its_own_graphs(captures):
    iterate(graphed.GraphedStep(toy_step, key="k"), *problem(), 2)
    other = threading.Thread(target=lambda: iterate(graphed.GraphedStep(toy_step, key="k"), *problem(), 2))
    other.start()
    other.join()
    assert len(captures) == 2


def test_fn_must_be_callable():
    with pytest.raises(TypeError, match="fn must be callable, got int"):
        graphed.GraphedStep(3, key=None)


def test_a_constant_first_made_during_the_capture_is_forgotten_and_the_step_runs_uncaptured(monkeypatch):
    """A cached constant tensor made while a graph is captured would hold its values only in the
    graph's replays: the capture is refused and that constant forgotten, the ones made before kept
    (graphs captured earlier read them)."""
    from optlayers.engine import constants

    monkeypatch.setattr(graphed, "_GRAPHS", graphed._Graphs())
    monkeypatch.setattr(graphed, "warm_up", lambda warm, device: warm())

    def capture_making_a_constant(body, device):
        constants.identity(97, torch.device("cpu"), torch.float64)  # as a step whose path changed at the capture
        return FakeGraph(body)

    monkeypatch.setattr(graphed, "capture", capture_making_a_constant)
    before = constants.identity(3, torch.device("cpu"), torch.float64)
    data, units, st, res = problem()
    with pytest.warns(RuntimeWarning, match="made a cached constant tensor while it was captured"):
        got = graphed.GraphedStep(toy_step, key=None)(data, units, st, res)
    assert torch.equal(got[0].x, toy_step(data, units, st, res)[0].x)
    assert constants.identity(3, torch.device("cpu"), torch.float64) is before
    assert (97, torch.device("cpu"), torch.float64) not in constants.identity.kept.results


def test_a_solves_data_is_copied_at_its_first_step_and_again_only_after_a_change(captures):
    data, units, st, res = problem()
    step = graphed.GraphedStep(toy_step, key="k")
    st1, res1 = step(data, units, st, res)
    (entry,) = graphed._GRAPHS.captured.values()
    entry.buffers[0][0].fill_(7.0)  # were data.a copied again, the buffer would hold data.a
    expected = toy_step(replace(data, a=torch.full_like(data.a, 7.0)), units, *(replace(x) for x in (st1, res1)))
    expected = (expected[0].x.clone(), None)
    got = step(data, units, st1, res1)
    assert torch.equal(got[0].x, expected[0])
    data.a.mul_(2.0)  # an in-place change (its version moves): copied again
    before = (got[0].x.clone(), got[0].status.clone(), got[1].r.clone())
    got = step(data, units, got[0], got[1])
    state = State(x=before[0], status=before[1], n=st.n)
    assert torch.equal(got[0].x, toy_step(data, units, state, Res(r=before[2]))[0].x)


def test_a_first_capture_under_inference_mode_serves_later_calls_that_record_gradients(captures):
    data, units, st, res = problem()
    with torch.inference_mode():
        inference = [t.clone() for t in (data.a, units.u, st.x, st.status, res.r)]
        args = (Data(a=inference[0], diagonal=False), Units(u=inference[1]),
                State(x=inference[2], status=inference[3], n=st.n), Res(r=inference[4]))
        graphed.GraphedStep(toy_step, key="k")(*args)
    got = graphed.GraphedStep(toy_step, key="k")(data, units, st, res)  # the same layout's buffers, outside
    assert torch.equal(got[0].x, toy_step(data, units, st, res)[0].x)
    assert len(captures) == 1


def test_an_output_that_views_another_fields_buffer_runs_uncaptured_with_a_warning(captures):
    def swapping_step(data, units, st, res):  # the new x is the old residual itself: written back after r would clobber it
        new, _ = toy_step(data, units, st, res)
        return replace(new, x=res.r), Res(r=new.x)

    data, units, st, res = problem()
    with pytest.warns(RuntimeWarning, match="views the buffer of another field"):
        got = graphed.GraphedStep(swapping_step, key=None)(data, units, st, res)
    assert torch.equal(got[0].x, res.r)
    assert not captures


def test_a_capture_that_fails_after_making_a_constant_leaves_none_behind(monkeypatch):
    from optlayers.engine import constants

    monkeypatch.setattr(graphed, "_GRAPHS", graphed._Graphs())
    monkeypatch.setattr(graphed, "warm_up", lambda warm, device: warm())

    def capture_then_fail(body, device):
        constants.identity(98, torch.device("cpu"), torch.float64)
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphed, "capture", capture_then_fail)
    data, units, st, res = problem()
    with pytest.warns(RuntimeWarning, match="operation not permitted"):
        graphed.GraphedStep(toy_step, key=None)(data, units, st, res)
    assert (98, torch.device("cpu"), torch.float64) not in constants.identity.kept.results


# ``GraphedCall``: a host-synchronisation-free function of nested arguments, its outputs copied out.

class Pair(NamedTuple):
    left: Tensor
    right: Tensor | None


@dataclass(frozen=True)
class Factor:
    chol: Tensor
    m: int


def toy_call(data: Data, pair: Pair, scale: float) -> tuple[Factor, Tensor]:
    chol = data.a * scale + pair.left
    return Factor(chol=chol, m=chol.shape[-1]), pair.left  # the second output: an argument, unchanged


@pytest.fixture
def call_captures(captures):
    """``captures``: the stand-in capture runs the body once computing nothing (its outputs
    garbage), as torch's does; a replay runs it for real (what the graph's kernels do on the device)."""
    return captures


def call_args(seed):
    g = torch.Generator().manual_seed(seed)
    data = Data(a=torch.randn(3, 4, generator=g, dtype=torch.float64), diagonal=False)
    return data, Pair(left=torch.randn(3, 4, generator=g, dtype=torch.float64), right=None)


def test_a_graphed_call_returns_the_functions_outputs_as_copies_that_outlive_later_calls(call_captures):
    call = graphed.GraphedCall(toy_call, "toy")
    first_args, second_args = call_args(0), call_args(1)
    first = call(*first_args, 2.0)
    second = call(*second_args, 2.0)
    assert len(call_captures) == 1  # one layout, one capture
    for got, args in ((first, first_args), (second, second_args)):
        want = toy_call(*args, 2.0)
        assert torch.equal(got[0].chol, want[0].chol) and got[0].m == want[0].m == 4
        assert torch.equal(got[1], want[1]) and got[1] is not args[1].left  # a copy, not the argument
    first[0].chol.zero_()  # the caller's to change
    assert torch.equal(call(*second_args, 2.0)[0].chol, toy_call(*second_args, 2.0)[0].chol)
    assert len(call_captures) == 1


def test_a_graphed_call_copies_in_every_argument_also_one_changed_through_data(call_captures):
    """A caller's tensor may change without its version counter seeing it (``.data``): every call
    copies every argument in."""
    call = graphed.GraphedCall(toy_call, "toy")
    data, pair = call_args(0)
    call(data, pair, 1.0)
    pair.left.data.add_(1.0)  # no version bump
    assert torch.equal(call(data, pair, 1.0)[0].chol, toy_call(data, pair, 1.0)[0].chol)
    data.a.data = data.a + 2.0  # another tensor behind the same object
    assert torch.equal(call(data, pair, 1.0)[0].chol, toy_call(data, pair, 1.0)[0].chol)
    assert len(call_captures) == 1


def test_values_of_equal_keys_but_other_types_or_signs_are_other_layouts(call_captures):
    call = graphed.GraphedCall(lambda t, scale: t * scale, "scale")
    t = torch.arange(4)
    assert call(t, 2).dtype == torch.int64 and call(t, 2.0).dtype == torch.get_default_dtype()  # 2 == 2.0, not one layout
    assert torch.equal(call(torch.ones(2), 0.0), torch.zeros(2)) and torch.equal(call(torch.ones(2), -0.0).sign(),
                                                                                   torch.tensor([-0.0, -0.0]).sign())
    assert str(call(torch.ones(2), -0.0)[0].item()) == "-0.0"
    assert len(call_captures) == 4


class Opaque:  # hashable, neither a dataclass nor a tuple: a replay would hand back the capture's object
    def __init__(self, t):
        self.t = t


def test_a_call_returning_an_opaque_value_runs_uncaptured_with_a_warning(call_captures):
    call = graphed.GraphedCall(lambda t: Opaque(t * 2), "opaque")
    with pytest.warns(RuntimeWarning, match="neither a tensor nor a plain value"):
        first = call(torch.ones(2))
    second = call(torch.full((2,), 3.0))
    assert torch.equal(first.t, torch.full((2,), 2.0)) and torch.equal(second.t, torch.full((2,), 6.0))
    (entry,) = graphed._GRAPHS.captured.values()
    assert entry.graph is None and entry.buffers == []  # nothing kept for an uncaptured layout


def test_clear_drops_the_threads_graphs(call_captures):
    call = graphed.GraphedCall(toy_call, "toy")
    call(*call_args(0), 1.0)
    assert len(graphed._GRAPHS.captured) == 1
    graphed.clear()
    assert len(graphed._GRAPHS.captured) == 0
    call(*call_args(0), 1.0)
    assert len(call_captures) == 2


def test_copy_all_copies_each_pair_one_foreach_per_dtype(monkeypatch):
    sources = [torch.arange(3.0, dtype=torch.float32), torch.arange(2), torch.tensor([True, False]),
               torch.ones(2, 2, dtype=torch.float32)]
    targets = [torch.empty_like(t) for t in sources]
    calls = []
    real = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: (calls.append({t.dtype for t in dst}), real(dst, src)))
    graphed.copy_all(targets, sources)
    assert all(torch.equal(t, s) for t, s in zip(targets, sources))
    assert sorted(map(sorted, calls), key=str) == sorted([[torch.float32], [torch.int64], [torch.bool]], key=str)
    with pytest.raises(ValueError):
        graphed.copy_all(targets, sources[:2])


def test_another_value_or_shape_is_another_capture_and_an_unhashable_one_runs_uncaptured(call_captures):
    call = graphed.GraphedCall(toy_call, "toy")
    data, pair = call_args(0)
    call(data, pair, 1.0)
    call(data, pair, 3.0)  # a value is part of the layout
    call(Data(a=data.a[:2], diagonal=False), Pair(pair.left[:2], None), 1.0)
    assert len(call_captures) == 3
    got = call(data, Pair(pair.left, {"unhashable": 1}), 1.0)  # a dict: no layout, no graph
    assert len(call_captures) == 3 and torch.equal(got[0].chol, toy_call(data, pair, 1.0)[0].chol)


def test_a_graphed_call_that_cannot_be_captured_runs_uncaptured_with_a_warning(monkeypatch):
    monkeypatch.setattr(graphed, "_GRAPHS", graphed._Graphs())
    monkeypatch.setattr(graphed, "warm_up", lambda warm, device: warm())

    def failing_capture(body, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphed, "capture", failing_capture)
    call = graphed.GraphedCall(toy_call, "toy")
    data, pair = call_args(0)
    with pytest.warns(RuntimeWarning, match="toy_call could not be captured"):
        got = call(data, pair, 1.0)
    assert torch.equal(got[0].chol, toy_call(data, pair, 1.0)[0].chol)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per layout
        call(data, pair, 1.0)


def test_graphed_call_fn_must_be_callable():
    with pytest.raises(TypeError, match="fn must be callable, got int"):
        graphed.GraphedCall(3, "key")


def test_the_loops_next_step_only_replays(captures, monkeypatch):
    """A call with the last call's data and units and the state and residuals it returned replays
    without looking at layouts or copying; a replaced state, or data changed in place, take the
    full path again. (The stand-in replay runs the body, which looks at its outputs' layouts: only
    looks at the data count here.)"""
    data, units, st, res = problem()
    step = graphed.GraphedStep(toy_step, key="k")
    st, res = step(data, units, st, res)
    looked_at_data = []
    real = graphed._layout
    monkeypatch.setattr(graphed, "_layout", lambda obj: (looked_at_data.append(obj is data), real(obj))[1])
    expected = toy_step(data, units, *(replace(x) for x in (st, res)))
    got = step(data, units, st, res)
    assert not any(looked_at_data) and torch.equal(got[0].x, expected[0].x)
    st, res = step(data, units, replace(got[0]), got[1])  # a state the host replaced
    assert any(looked_at_data)
    data.a.add_(1.0)  # in place: the next call copies it in again
    before = (st.x.clone(), st.status.clone(), res.r.clone())
    got = step(data, units, st, res)
    want = toy_step(data, units, State(x=before[0], status=before[1], n=st.n), Res(r=before[2]))
    assert torch.equal(got[0].x, want[0].x)


def test_two_steps_of_one_layout_interleaved_in_a_thread_each_keep_their_own_data(captures):
    """Two solves of one layout in one thread, their steps interleaved (one graph, one set of
    buffers): each step's replay reads its own data and state, not the other's left in the buffers."""
    from optlayers.compiling import owned

    (data_a, units_a, st_a, res_a), (data_b, units_b, st_b, res_b) = problem(seed=1), problem(seed=2)
    step_a, step_b = graphed.GraphedStep(toy_step, key="k"), graphed.GraphedStep(toy_step, key="k")
    want_a, want_b = (st_a, res_a), (st_b, res_b)
    for _ in range(3):
        want_a = tuple(replace(x) for x in toy_step(data_a, units_a, *want_a))
        want_b = tuple(replace(x) for x in toy_step(data_b, units_b, *want_b))
        st_a, res_a = (owned(x) for x in step_a(data_a, units_a, st_a, res_a))  # copied out: the buffers are shared
        st_b, res_b = (owned(x) for x in step_b(data_b, units_b, st_b, res_b))
        assert torch.equal(st_a.x, want_a[0].x) and torch.equal(st_b.x, want_b[0].x)
    assert len(captures) == 1


# Memory, threads and streams

def test_a_finished_solve_leaves_nothing_alive_through_its_graph_without_the_cycle_collector(captures):
    """A cached graph names the step that replayed it last by a token, not by the step: a solve's
    step, data and state go when the solve drops them, with the cycle collector off."""
    import gc
    import weakref

    data, units, st, res = problem()
    step = graphed.GraphedStep(toy_step, key="k")
    iterate(step, data, units, st, res, 3)
    gone = [weakref.ref(obj) for obj in (step, data, data.a)]
    gc.disable()
    try:
        del step, data
        assert [ref() for ref in gone] == [None, None, None]
    finally:
        gc.enable()
    assert len(captures) == 1 and len(graphed._GRAPHS.captured) == 1  # the graph itself stays cached


def test_a_state_overwritten_by_another_steps_replay_is_refused(captures):
    """Two solves of one layout in one thread share the graph's buffers: a step handed back its own
    buffers after another step replayed them would read that step's state, so it refuses."""
    first, second = graphed.GraphedStep(toy_step, key="k"), graphed.GraphedStep(toy_step, key="k")
    data, units, st, res = problem()
    st1, res1 = first(data, units, st, res)
    second(*problem(seed=1))  # overwrites the buffers that st1 and res1 view
    with pytest.raises(RuntimeError, match="another step of the same layout has replayed since"):
        first(data, units, st1, res1)
    again = first(data, units, replace(st, x=st.x.clone()), Res(r=res.r.clone()))  # fresh tensors: copied in
    assert torch.equal(again[0].x, toy_step(data, units, st, res)[0].x)


def test_a_constant_another_thread_makes_during_a_capture_is_kept_and_the_capture_stands(monkeypatch):
    from optlayers.engine import constants

    monkeypatch.setattr(graphed, "_GRAPHS", graphed._Graphs())
    monkeypatch.setattr(graphed, "warm_up", lambda warm, device: warm())

    def capture_while_another_thread_makes_a_constant(body, device):
        other = threading.Thread(target=lambda: constants.identity(99, torch.device("cpu"), torch.float64))
        other.start()
        other.join()
        return stand_in_graph.capture(body, device)

    monkeypatch.setattr(graphed, "capture", capture_while_another_thread_makes_a_constant)
    data, units, st, res = problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        got = iterate(graphed.GraphedStep(toy_step, key=None), data, units, st, res, 2)
    assert torch.equal(got[0].x, iterate(toy_step, data, units, st, res, 2)[0].x)
    assert graphed._GRAPHS.captured[next(iter(graphed._GRAPHS.captured))].graph is not None
    assert (99, torch.device("cpu"), torch.float64) in constants.identity.kept.results


def test_clear_drops_the_graphs_of_every_thread(captures):
    """``clear()`` reaches the graphs of other live threads (autograd runs CUDA backward passes on a
    thread of its own per device)."""
    made, cleared, done = threading.Event(), threading.Event(), []

    def other_thread():
        iterate(graphed.GraphedStep(toy_step, key="k"), *problem(), 2)
        made.set()
        cleared.wait(30)
        done.append(len(graphed._GRAPHS.captured))

    thread = threading.Thread(target=other_thread)
    thread.start()
    assert made.wait(30)
    iterate(graphed.GraphedStep(toy_step, key="k"), *problem(), 2)
    assert len(graphed._GRAPHS.captured) == 1
    graphed.clear()
    cleared.set()
    thread.join(30)
    assert done == [0] and len(graphed._GRAPHS.captured) == 0


def test_each_stream_has_its_own_graphs(captures, monkeypatch):
    """A replay on one stream would overwrite buffers another stream's replay still reads: the
    calling thread's current stream is part of every key (``_stream_key``; None off CUDA)."""
    stream = ["s1"]
    monkeypatch.setattr(graphed, "_stream_key", lambda tensors: stream[0])
    call = graphed.GraphedCall(toy_call, "toy")
    iterate(graphed.GraphedStep(toy_step, key="k"), *problem(), 2)
    call(*call_args(0), 1.0)
    stream[0] = "s2"
    iterate(graphed.GraphedStep(toy_step, key="k"), *problem(), 2)
    call(*call_args(0), 1.0)
    assert len(captures) == 4


def test_the_stream_key_is_none_off_cuda():
    assert graphed._stream_key([torch.zeros(2)]) is None and graphed._stream_key([]) is None


_DOUBLE = [False]  # a setting that the step reads and its key leaves out


def test_the_stand_in_replay_refuses_a_branch_the_capture_did_not_take(captures):
    """A CUDA graph replays the kernels of its capture, whatever the Python around them would do
    now; the stand-in reruns the Python, so it checks that the replay ran the capture's
    operations: a setting missing from the graph's key shows as a diverged replay."""
    def step(data, units, st, res):
        new, res = toy_step(data, units, st, res)
        return (replace(new, x=new.x * 2) if _DOUBLE[0] else new), res

    data, units, st, res = problem()
    graphed_step = graphed.GraphedStep(step, key=None)
    st, res = graphed_step(data, units, st, res)
    _DOUBLE[0] = True
    try:
        with pytest.raises(stand_in_graph.ReplayDiverged, match="other operations than the capture"):
            graphed_step(data, units, st, res)
    finally:
        _DOUBLE[0] = False


def test_a_capture_out_of_memory_is_tried_again_at_the_next_call(monkeypatch):
    """Out of memory may pass (another solve freed its buffers): such a layout is not cached as
    uncaptured, the next call tries to capture it again."""
    monkeypatch.setattr(graphed, "_GRAPHS", graphed._Graphs())
    monkeypatch.setattr(graphed, "warm_up", lambda warm, device: warm())
    attempts = []

    def out_of_memory_once(body, device):
        attempts.append(body)
        if len(attempts) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return stand_in_graph.capture(body, device)

    monkeypatch.setattr(graphed, "capture", out_of_memory_once)
    data, units, st, res = problem()
    with pytest.warns(RuntimeWarning, match="OutOfMemoryError"):
        first = graphed.GraphedStep(toy_step, key=None)(data, units, st, res)
    assert not graphed._GRAPHS.captured
    second = graphed.GraphedStep(toy_step, key=None)(data, units, st, res)
    assert len(attempts) == 2 and graphed._GRAPHS.captured[next(iter(graphed._GRAPHS.captured))].graph is not None
    assert torch.equal(first[0].x, second[0].x)
