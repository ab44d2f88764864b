"""The engine's loop on a toy method: element i counts down from its own start and finishes at
zero, so every element's number of steps is known in advance."""
import dataclasses

import torch

from optlayers import host
from optlayers.engine import loop


@dataclasses.dataclass(frozen=True)
class Toy:
    left: torch.Tensor
    steps: torch.Tensor
    status: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Data:
    start: torch.Tensor


def _step(data: Data, st: Toy, res: Toy) -> tuple[Toy, Toy]:
    running = st.status == host.RUNNING
    left = st.left - running.long()
    st = Toy(left, st.steps + running.long(), st.status.masked_fill(running & (left == 0), 0))
    return st, st


def _start(starts: list[int]) -> tuple[Data, Toy]:
    left = torch.tensor(starts)
    st = Toy(left, torch.zeros_like(left), torch.where(left == 0, 0, host.RUNNING))
    return Data(left.clone()), st


def test_every_element_takes_its_own_steps_and_the_working_batch_shrinks(monkeypatch):
    data, st = _start([1, 7, 2, 0, 9, 3])
    taken = []
    monkeypatch.setattr(loop, "take", lambda obj, index: taken.append(len(index)) or dataclasses.replace(
        obj, **{f.name: getattr(obj, f.name)[index] for f in dataclasses.fields(obj)}))
    calls = []
    out = loop.run((data,), st, st, lambda *a: calls.append(1) or _step(*a), 50, torch.device("cpu"))
    assert out.state.steps.tolist() == [1, 7, 2, 0, 9, 3] and (out.state.status == 0).all()
    assert len(calls) == 9  # the CPU looks after every step: none after the last element finished
    assert taken and min(taken) < 6 and out.index is not None
    assert out.working_res.left.shape[0] == len(out.index)


def test_max_iter_leaves_slow_elements_running():
    data, st = _start([1, 30])
    out = loop.run((data,), st, st, _step, 5, torch.device("cpu"))
    assert out.state.steps.tolist() == [1, 5] and out.state.status.tolist() == [0, host.RUNNING]


def _double(data: Data, st: Toy, res: Toy) -> tuple[Toy, Toy]:
    return _step(data, *_step(data, st, res))


class CountingLook:
    """Counts the elements with an odd number of steps left at each look, and switches to a
    step that takes two at a time once none is odd."""

    def __init__(self):
        self.seen = []

    def flags(self, data, st, res, running, iteration):
        return (running & (st.left % 2 == 1)).unsqueeze(0)

    def react(self, data, st, res, flags, counts, running, step):
        self.seen.append(counts[0])
        return st, res, _double if counts[0] == 0 else step


def test_a_look_hook_reads_its_flags_in_the_same_look(monkeypatch):
    data, st = _start([4, 6])
    reads = []
    real = host.host_read
    monkeypatch.setattr(host, "host_read", lambda t: reads.append(t.shape) or real(t))
    hook = CountingLook()
    out = loop.run((data,), st, st, _step, 50, torch.device("cpu"), hook)
    assert hook.seen[0] == 0 and len(reads) == len(hook.seen) == 4  # one read per look, flags included
    assert out.state.steps.tolist() == [4, 6] and (out.state.status == 0).all()  # 3 double steps


def _modes_seen(seen: list):
    def step(data: Data, st: Toy, res: Toy) -> tuple[Toy, Toy]:
        seen.append(torch.is_inference_mode_enabled())
        return _step(data, st, res)
    return step


def test_eager_steps_on_the_cpu_run_in_inference_mode_and_hand_back_normal_tensors():
    data, st = _start([3, 1, 4])
    seen = []
    out = loop.run((data,), st, st, _modes_seen(seen), 50, torch.device("cpu"))
    assert seen and all(seen)
    assert out.state.steps.tolist() == [3, 1, 4]
    kept = [t for obj in (out.state, out.working_res) for t in dataclasses.astuple(obj)] + [out.index]
    assert not any(t.is_inference() for t in kept if t is not None)
    # the state is usable where autograd records: saved for a backward
    weight = torch.ones(3, requires_grad=True)
    (weight * out.state.steps).sum().backward()
    assert weight.grad.tolist() == [3.0, 1.0, 4.0]


def test_counted_as_an_accelerator_and_with_several_iterations_per_call_steps_run_as_called():
    data, st = _start([2, 2])
    seen = []
    with host.accelerator_schedule():
        loop.run((data,), st, st, _modes_seen(seen), 50, torch.device("cpu"))
    assert seen and not any(seen)

    calls = []

    def steps(data, st, res, iteration):
        calls.append(torch.is_inference_mode_enabled())
        st, res = _step(data, st, res)
        return st, res, torch.tensor(1)

    out = loop.run((data,), st, st, loop.Steps(steps), 50, torch.device("cpu"))
    assert calls and not any(calls) and (out.state.status == 0).all()
