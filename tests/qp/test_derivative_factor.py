"""The derivatives' KKT factorisation is built in the forward pass only when gradients are
possible, and rebuilt on demand otherwise — with the same derivatives either way."""
import torch

from optlayers import solve_qp
from optlayers.qp import derivatives, ipm
from tests.qp.qp_problems import random_qp


def _count_factorisations(monkeypatch) -> list[int]:
    calls = []
    original = ipm.derivative_factor
    counting = lambda *a, **k: calls.append(1) or original(*a, **k)  # noqa: E731
    monkeypatch.setattr(ipm, "derivative_factor", counting)
    monkeypatch.setattr(derivatives, "derivative_factor", counting)
    return calls


def test_forward_without_gradients_builds_no_factorisation(monkeypatch):
    torch.manual_seed(0)
    data = random_qp((4,), 6, 5, 2, active=True)
    calls = _count_factorisations(monkeypatch)
    with torch.no_grad():
        solve_qp(**data)
    solve_qp(**data)  # no input requires grad
    assert calls == []
    leaves = {k: v.clone().requires_grad_() for k, v in data.items()}
    sol = solve_qp(**leaves)
    assert len(calls) == 1
    sol.z.sum().backward()
    assert len(calls) == 1, "backward must reuse the forward's factorisation"


def test_factorisation_rebuilt_for_forward_mode_matches_reverse_mode(monkeypatch):
    torch.manual_seed(1)
    data = random_qp((3,), 5, 4, 1, active=True)
    keys = ("Q", "p", "G", "h", "A", "b")
    primals = tuple(data[k] for k in keys)
    tangents = tuple(torch.randn_like(t) for t in primals)
    calls = _count_factorisations(monkeypatch)

    def z(*args):
        return solve_qp(**dict(zip(keys, args))).z

    with torch.autograd.forward_ad.dual_level():
        duals = [torch.autograd.forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)]
        forward_mode = torch.autograd.forward_ad.unpack_dual(z(*duals)).tangent
    assert calls, "forward mode needs the factorisation too"
    leaves = [p.clone().requires_grad_() for p in primals]
    out = z(*leaves)
    v = torch.randn_like(out)
    grads = torch.autograd.grad((out * v).sum(), leaves)
    reverse_mode = sum((g * t).sum() for g, t in zip(grads, tangents))
    torch.testing.assert_close((forward_mode * v).sum(), reverse_mode, rtol=1e-9, atol=1e-9)
