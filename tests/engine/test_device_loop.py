"""The engine's device loop (``engine.device_loop``): packing a state and its residuals, and the
``while_loop`` on a toy method (element i counts down from its own start and finishes at zero)."""
import dataclasses

import pytest
import torch

from optlayers import host
from optlayers.engine import device_loop
from optlayers.qp import fused, ipm
from optlayers.qp.problem import prepare_qp, qp_data
from optlayers.qp.scaling import equilibrate
from tests.qp.qp_problems import random_qp


@dataclasses.dataclass(frozen=True)
class Toy:
    """A toy method's state (and residuals): one field of each kind the loop packs."""

    left: torch.Tensor
    steps: torch.Tensor
    status: torch.Tensor
    done: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Data:
    start: torch.Tensor


def _start(starts: list[int]) -> tuple[Data, Toy]:
    left = torch.tensor(starts, dtype=torch.float64)
    done = left == 0
    return Data(left.clone()), Toy(left, torch.zeros(len(starts), dtype=torch.int64),
                                   torch.where(done, 0, host.RUNNING), done)


def _step(data: Data, st: Toy, res: Toy) -> tuple[Toy, Toy]:
    running = st.status == host.RUNNING
    left = st.left - running.double()
    done = left == 0
    st = Toy(left, st.steps + running.long(), st.status.masked_fill(running & done, 0), done)
    return st, st


@dataclasses.dataclass(frozen=True)
class Shift:
    """A toy method's data with a matrix the step reads transposed."""

    M: torch.Tensor


def test_packing_keeps_every_field_of_the_qps_state_and_residuals():
    """``pack`` and ``unpack`` carry every field of the QP's ``State`` and ``Residuals``, whatever
    they hold, with equalities and without."""
    for m in (0, 2):
        data = random_qp((3,), 5, 6, m)
        flat, _ = prepare_qp(*(data[key] for key in ("Q", "p", "G", "h", "A", "b")))
        scaled, sc = equilibrate(qp_data(*flat))
        settings = ipm.default_settings(torch.float64, None, None, None)
        st, res = ipm.start(scaled, ipm.Units.of(sc, scaled, settings), settings)
        where = device_loop.layout(st, res)
        back = device_loop.unpack(device_loop.pack(st, res), where, fused.KINDS)
        for before, after in zip((st, res), back):
            for f in dataclasses.fields(before):
                a, b = getattr(before, f.name), getattr(after, f.name)
                if isinstance(a, torch.Tensor):
                    assert a.dtype == b.dtype and torch.equal(a, b), f.name
                else:
                    assert a == b, f.name


def _run(starts: list[int], max_iter: int) -> tuple[Toy, int]:
    data, st = _start(starts)
    where = device_loop.layout(st, st)

    def proceeds(j, st, res):
        return (st.status == host.RUNNING).any() & (j < max_iter)

    packed, taken = device_loop.run((data,), device_loop.pack(st, st), where, (Toy, Toy), _step, proceeds)
    out, _ = device_loop.unpack(packed, where, (Toy, Toy))
    return out, int(taken)


@pytest.mark.parametrize("max_iter, steps, running", [(50, [1, 7, 2, 0, 9, 3], []), (5, [1, 5, 2, 0, 5, 3], [1, 4])])
def test_the_loop_runs_while_its_condition_holds_and_counts_its_iterations(max_iter, steps, running):
    out, taken = _run([1, 7, 2, 0, 9, 3], max_iter)
    assert out.steps.tolist() == steps and taken == max(steps)
    assert (out.status == host.RUNNING).nonzero().flatten().tolist() == running


def test_a_step_may_read_the_data_and_a_view_of_it(eager_backend):
    """The data enter the loop's body copied, so that a step that reads a matrix and its ``.mT``
    traces whole (read from the enclosing function, the transpose would enter the body as a second
    input aliasing the first, which the loop refuses)."""
    M = torch.arange(4.0, dtype=torch.float64).reshape(1, 2, 2).expand(3, 2, 2).contiguous()
    st = Toy(torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.int64), torch.full((3,), host.RUNNING),
             torch.zeros(3, dtype=torch.bool))
    where = device_loop.layout(st, st)

    def step(data: Shift, st: Toy, res: Toy) -> tuple[Toy, Toy]:
        left = (data.M @ st.left.unsqueeze(-1) + data.M.mT @ st.left.unsqueeze(-1)).squeeze(-1)
        st = Toy(left, st.steps + 1, st.status, st.done)
        return st, st

    def three_steps(M: torch.Tensor, packed: device_loop.Packed) -> tuple[device_loop.Packed, torch.Tensor]:
        return device_loop.run((Shift(M),), packed, where, (Toy, Toy), step, lambda j, st, res: j < 3)

    packed, taken = torch.compile(three_steps, fullgraph=True)(M, device_loop.pack(st, st))
    out, _ = device_loop.unpack(packed, where, (Toy, Toy))
    expected = torch.ones(3, 2, 1, dtype=torch.float64)
    for _ in range(3):
        expected = M @ expected + M.mT @ expected
    assert int(taken) == 3 and torch.equal(out.left, expected.squeeze(-1)) and out.steps.tolist() == [3, 3, 3]
