"""Solving a CPU batch in slices on parallel threads gives the whole batch's answer."""
import pytest
import torch

from optlayers import QPStatus, solve_qp
from optlayers.qp import parallel
from tests.qp.qp_problems import random_qp


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _solve_with_threads(count: int, data: dict) -> tuple:
    torch.set_num_threads(count)
    leaves = {k: v.clone().requires_grad_() for k, v in data.items() if v is not None}
    sol = solve_qp(**leaves, on_failure="ignore")
    loss = torch.nan_to_num(sol.z).square().sum() + torch.nan_to_num(sol.lam).sum()
    loss.backward()
    return sol, {k: v.grad for k, v in leaves.items()}


def test_slices_reproduce_the_whole_batch(monkeypatch, threads):
    torch.manual_seed(0)
    data = random_qp((7,), 6, 5, 2, active=True)
    data["G"][3, 1] = -data["G"][3, 0]
    data["h"][3, :2] = -1.0  # gᵀz ≤ −1 and gᵀz ≥ 1: element 3 is infeasible
    monkeypatch.setattr(parallel, "_MIN_SLICE_ENTRIES", 1)
    whole, whole_grads = _solve_with_threads(1, data)
    torch.set_num_threads(3)
    assert parallel.slice_count(7, 6, torch.device("cpu")) == 3
    sliced, sliced_grads = _solve_with_threads(3, data)
    assert torch.get_num_threads() == 3, "the caller's thread count must survive the parallel solve"
    assert whole.status[3] != QPStatus.SOLVED and (whole.status != QPStatus.SOLVED).sum() == 1
    for name in ("z", "lam", "nu", "s", "status", "iterations", "primal_residual", "dual_residual", "gap"):
        torch.testing.assert_close(getattr(sliced, name), getattr(whole, name), rtol=0, atol=0, equal_nan=True, msg=name)
    for name, g in whole_grads.items():
        torch.testing.assert_close(sliced_grads[name], g, rtol=1e-12, atol=1e-12, msg=name)


def test_small_batches_and_other_devices_are_not_sliced(threads):
    torch.set_num_threads(2)
    assert parallel.slice_count(128, 100, torch.device("cpu")) == 2
    assert parallel.slice_count(128, 10, torch.device("cpu")) == 1
    assert parallel.slice_count(1, 500, torch.device("cpu")) == 1
    assert parallel.slice_count(128, 100, torch.device("meta")) == 1
    torch.set_num_threads(1)
    assert parallel.slice_count(128, 100, torch.device("cpu")) == 1
