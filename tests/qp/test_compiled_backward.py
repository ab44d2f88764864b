"""The compiled first-order backward (``compile=True``: ``qp.autograd._compiled_vjp``): the eager
backward's gradients for every datum, failed elements included; higher-order derivatives keep the
eager rules. Traced by dynamo's eager backend (no inductor compilation: fast), except the slow
test, which compiles with inductor."""
import dataclasses

import pytest
import torch

from optlayers import solve_qp
from optlayers.engine import kkt
from optlayers.qp import autograd, parallel
from optlayers.status import Status
from tests.qp.qp_problems import random_qp


def _calls(monkeypatch) -> list[int]:
    """Counts the compiled backward's calls (the wrapper is traced like the function)."""
    calls: list[int] = []
    real = autograd._compiled_vjp

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(autograd, "_compiled_vjp", counted)
    return calls


def _gradients(data: dict, which: tuple[str, ...]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Statuses and the gradients of the data named in ``which`` (those given) of a loss on z, λ,
    ν and s, with ``compile=True``."""
    data = {k: v.clone().requires_grad_(k in which) for k, v in data.items() if v is not None}
    sol = solve_qp(**data, compile=True, on_failure="ignore", failed_value=0.0)
    loss = (sol.z ** 2).sum() + (sol.lam * torch.arange(sol.lam.shape[-1])).sum() + sol.nu.sum() + sol.s.pow(2).sum()
    leaves = {k: v for k, v in data.items() if v.requires_grad}
    return sol.status, dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


def _eager_rule(monkeypatch) -> None:
    monkeypatch.setattr(autograd, "_first_order", lambda saved: False)
    monkeypatch.setattr(autograd, "_plain", lambda saved: False)


def _in_chunks_of(monkeypatch, problems: int, n: int) -> None:
    """Compiled solves of ``n`` variables cut into chunks of ``problems`` (``parallel``'s bounds
    lowered to small problems)."""
    monkeypatch.setattr(parallel, "_MIN_CHUNK_ENTRIES", 1)
    monkeypatch.setattr(parallel, "_CHUNK_ENTRIES", problems * n * n)


def _counted(monkeypatch, name: str) -> list[int]:
    """Counts the calls of ``autograd.<name>``."""
    calls: list[int] = []
    real = getattr(autograd, name)
    monkeypatch.setattr(autograd, name, lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    return calls


def _compare(data: dict, monkeypatch, rtol: float, which: tuple[str, ...] = ("Q", "p", "G", "h", "A", "b")) -> torch.Tensor:
    calls = _calls(monkeypatch)
    status, compiled_grads = _gradients(data, which)
    assert calls, "the compiled backward did not run"
    with monkeypatch.context() as patch:
        _eager_rule(patch)
        eager_status, eager_grads = _gradients(data, which)
    assert torch.equal(status, eager_status)
    assert set(compiled_grads) == {k for k in which if data[k] is not None}
    for name, got in compiled_grads.items():
        want = eager_grads[name]
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * float(want.abs().max()), msg=name)
    return status


def _with_infeasible_element(data: dict) -> dict:
    """``data`` whose element 0 is primal infeasible: g z ≤ −1 and −g z ≤ −1."""
    G, h = data["G"].clone(), data["h"].clone()
    G[0, 1] = -G[0, 0]
    h[0, :2] = -1.0
    return {**data, "G": G, "h": h}


@pytest.mark.parametrize("m, failed", [(0, False), (2, True)])
def test_compiled_backward_gives_the_eager_gradients(eager_backend, monkeypatch, m, failed):
    data = random_qp((4,), 6, 8, m, active=True)
    status = _compare(_with_infeasible_element(data) if failed else data, monkeypatch, 1e-12)
    assert (status != Status.SOLVED).any() == failed and (status == Status.SOLVED).any()


@pytest.mark.parametrize("m, failed", [(0, False), (2, True)])
def test_a_batch_in_chunks_factorises_for_the_derivatives_in_the_backward(eager_backend, monkeypatch, m, failed):
    """A compiled solve in chunks leaves the derivatives' factorisation to its backward, which makes
    it chunk by chunk (``autograd._sliced_factorising_vjp``): the eager backward's gradients, a
    failed element's zero included."""
    _in_chunks_of(monkeypatch, 2, 6)
    factorising = _counted(monkeypatch, "_sliced_factorising_vjp")
    data = random_qp((4,), 6, 8, m, active=True)
    status = _compare(_with_infeasible_element(data) if failed else data, monkeypatch, 1e-12)
    assert factorising == [1]  # the compiled backward's; the eager rule's ran without it
    assert (status != Status.SOLVED).any() == failed and (status == Status.SOLVED).any()


def test_a_factorisation_that_fails_in_the_backward_is_made_again_with_retries(eager_backend, monkeypatch):
    """Where the backward's unretried factorisation fails, the batch's is made again with retries,
    as a forward's would be (``autograd._left_factor``), and the gradients are the eager rule's."""
    _in_chunks_of(monkeypatch, 2, 6)
    data = random_qp((4,), 6, 8, 2, active=True)
    real = autograd.derivative_factor

    def unretried_fails(*args, retries=kkt.MAX_FACTOR_RETRIES, **kwargs):
        f = real(*args, retries=retries, **kwargs)
        return f if retries else dataclasses.replace(f, ok=torch.zeros_like(f.ok))
    monkeypatch.setattr(autograd, "derivative_factor", unretried_fails)
    remade = _counted(monkeypatch, "_left_factor")
    status, compiled_grads = _gradients(data, ("Q", "p", "G", "h", "A", "b"))
    assert remade == [1] and (status == Status.SOLVED).all()
    with monkeypatch.context() as patch:
        _eager_rule(patch)
        _, eager_grads = _gradients(data, ("Q", "p", "G", "h", "A", "b"))
    for name, got in compiled_grads.items():
        want = eager_grads[name]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * float(want.abs().max()), msg=name)


def test_compiled_backward_of_float32_data_and_one_datum(eager_backend, monkeypatch):
    """float32 data (solved and differentiated in float64, the gradient cast back), and the
    cotangent of p alone (the others not formed)."""
    data = {k: None if v is None else v.float() for k, v in random_qp((3,), 5, 6, 2, active=True).items()}
    _compare(data, monkeypatch, 1e-6, which=("p",))


def test_higher_order_derivatives_keep_the_eager_rules(eager_backend, monkeypatch):
    """A backward that records a graph (create_graph) runs the differentiable rules, not the
    compiled one; the backward of that graph, first-order again where it reaches the solve's
    outputs, may run it. The second derivative is the eager path's."""
    data = random_qp((3,), 5, 6, 2, active=True)
    calls = _calls(monkeypatch)
    hessians = []
    for compile in (False, True):
        p = data["p"].clone().requires_grad_(True)
        sol = solve_qp(data["Q"], p, data["G"], data["h"], data["A"], data["b"], compile=compile)
        (grad,) = torch.autograd.grad((sol.z ** 3).sum(), p, create_graph=True)
        assert not calls
        hessians.append((grad, torch.autograd.grad((grad * torch.linspace(1, 2, 5)).sum(), p)[0]))
    (grad, hessian), (grad_compiled, hessian_compiled) = hessians
    torch.testing.assert_close(grad_compiled, grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(hessian_compiled, hessian, rtol=1e-8, atol=1e-9)


def test_torch_func_keeps_the_eager_rules(eager_backend, monkeypatch):
    """Under torch.func transforms (here grad and jacrev, whose vmap batches the backward) the
    backward runs the eager rules, with compile=False's results."""
    data = random_qp((3,), 5, 6, 2, active=True)
    p = data.pop("p")
    calls = _calls(monkeypatch)
    results = []
    for compile in (False, True):
        grad = torch.func.grad(lambda q: solve_qp(p=q, **data, compile=compile).z.square().sum())(p)
        results.append((grad, torch.func.jacrev(lambda q: solve_qp(p=q, **data, compile=compile).z)(p)))
    assert not calls
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_compile_false_never_runs_the_compiled_backward(monkeypatch):
    calls = _calls(monkeypatch)
    data = random_qp((2,), 4, 4, 1)
    p = data.pop("p").requires_grad_(True)
    solve_qp(p=p, **data).z.sum().backward()
    assert not calls and p.grad is not None


@pytest.mark.slow
@pytest.mark.parametrize("m", [0, 2])
def test_inductor_compiled_backward_gives_the_eager_gradients(monkeypatch, m):
    """With inductor (compiles; tens of seconds): the fused kernels give the eager backward's
    gradients to 1e-12, a failed element's zero included."""
    data = random_qp((4,), 6, 8, m, active=True)
    status = _compare(_with_infeasible_element(data) if m else data, monkeypatch, 1e-12)
    assert (status != Status.SOLVED).any() == bool(m)


def test_one_compilation_serves_expanded_and_dense_cotangents(eager_backend, monkeypatch):
    """z.sum() hands the backward an expanded cotangent, z.square().sum() a dense one: the
    compiled backward sees both contiguous, so the second loss compiles nothing new (and both
    backward passes ran compiled)."""
    from torch._dynamo.utils import counters

    calls = []  # counted outside the compiled function (a count inside it would be guarded on)
    real = autograd._sliced_compiled_vjp
    monkeypatch.setattr(autograd, "_sliced_compiled_vjp", lambda *args: calls.append(1) or real(*args))
    data = random_qp((3,), 5, 6, 0)
    p = data.pop("p").requires_grad_(True)
    solve_qp(p=p, **data, compile=True).z.sum().backward()
    graphs = counters["stats"]["unique_graphs"]
    solve_qp(p=p, **data, compile=True).z.square().sum().backward()
    assert counters["stats"]["unique_graphs"] == graphs
    assert len(calls) == 2
