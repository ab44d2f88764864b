"""Derivatives at a constraint row that the solve leaves neither clearly active nor clearly inactive
are reported (``qp.derivative_checks``): every element whose gradient is off by more than the
check allows is named, and well-resolved problems are not."""
import re
import warnings

import pytest
import torch

from optlayers import InexactDerivativeWarning, solve_qp
from optlayers.qp import autograd, parallel
from optlayers.qp.derivative_checks import AMBIGUOUS_ROW_RATIO
from qp_problems import random_qp
from tests.inexact_warnings import inexact_warnings

N, K, ACTIVE = 6, 8, 3


def planted(batch: int, lam_small: float, s_small: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Strictly convex QPs whose solution z* has ``ACTIVE`` active rows, the first with λ =
    ``lam_small`` (1 for the others), and inactive rows with slack 1 but the first, ``s_small``;
    and dz*/dp from the active-set KKT system (the derivative of the solution map there)."""
    gen = torch.Generator().manual_seed(seed)
    kw = {"generator": gen, "dtype": torch.float64}
    M = torch.randn(batch, N, N, **kw)
    Q = M @ M.mT / N + torch.eye(N, dtype=torch.float64)
    G, z = torch.randn(batch, K, N, **kw), torch.randn(batch, N, **kw)
    lam, s = torch.zeros(batch, K, dtype=torch.float64), torch.zeros(batch, K, dtype=torch.float64)
    lam[:, :ACTIVE], s[:, ACTIVE:] = 1.0, 1.0
    lam[:, 0], s[:, ACTIVE] = lam_small, s_small
    p = -(Q @ z.unsqueeze(-1)).squeeze(-1) - (G.mT @ lam.unsqueeze(-1)).squeeze(-1)
    h = (G @ z.unsqueeze(-1)).squeeze(-1) + s
    active = G[:, :ACTIVE]
    kkt = torch.cat([torch.cat([Q, active.mT], -1),
                     torch.cat([active, torch.zeros(batch, ACTIVE, ACTIVE, dtype=torch.float64)], -1)], -2)
    dz_dp = -torch.linalg.inv(kkt)[:, :N, :N]
    return Q, p, G, h, dz_dp


def named_elements(caught: list[warnings.WarningMessage]) -> set[int]:
    """The batch elements the inexact-derivative warnings name (batches of at most ten: all listed)."""
    named = set()
    for w in caught:
        text = str(w.message)
        if "is inexact" in text:
            listed = re.search(r"at elements ([\d, ]+) is inexact", text).group(1)
            named |= {int(i) for i in listed.split(", ")}
    return named


def jacobian_and_named(Q, p, G, h, **kw) -> tuple[torch.Tensor, set[int]]:
    """dz/dp of every element (reverse mode, one backward per output coordinate) and the elements
    the backward's warnings named."""
    p = p.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        z = solve_qp(Q, p, G, h, **kw).z
        rows = [torch.autograd.grad(z[:, i].sum(), p, retain_graph=True)[0] for i in range(N)]
    return torch.stack(rows, -2), named_elements(caught)


@pytest.mark.parametrize("tol", [None, 1e-8])
@pytest.mark.parametrize("lam_small, s_small", [(1.0, 1.0), (1e-3, 1.0), (1e-5, 1.0), (1e-7, 1.0), (1.0, 1e-6), (1.0, 1e-7)])
def test_an_element_not_named_has_an_accurate_gradient(lam_small, s_small, tol):
    Q, p, G, h, dz_dp = planted(8, lam_small, s_small, seed=3)
    jacobian, named = jacobian_and_named(Q, p, G, h, tol=tol)
    error = (jacobian - dz_dp).abs().amax((-1, -2)) / dz_dp.abs().amax((-1, -2))
    for i in range(8):
        if i not in named:  # the row ratio is within AMBIGUOUS_ROW_RATIO: the error within 25 times that
            assert error[i] <= 25 * AMBIGUOUS_ROW_RATIO, (i, float(error[i]), named)
    if lam_small <= 1e-7 or s_small <= 1e-7:  # below √tol at either tolerance: every element named
        assert named == set(range(8))
    if lam_small == s_small == 1.0 and tol is None:  # well separated: nothing named, the gradients exact
        assert named == set() and error.max() < 1e-8


@pytest.mark.parametrize("compile", [False, True])
def test_a_weakly_active_row_is_named_in_reverse_and_forward_mode(compile):
    # min ½|z|² + pᵀz over z ≤ 1: element 1's first row has λ = s = 0 at z = (1, 0.2)
    Q, G, h = torch.eye(2).expand(3, 2, 2), torch.eye(2).expand(3, 2, 2), torch.ones(3, 2)
    p = torch.tensor([[-0.5, -0.5], [-1.0, -0.2], [-3.0, 0.0]], dtype=torch.float64)
    Q, G, h = Q.double(), G.double(), h.double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solve_qp(Q, p.clone().requires_grad_(), G, h, compile=compile).z.sum().backward()
    assert named_elements(caught) == {1}
    message = next(str(w.message) for w in caught if "is inexact" in str(w.message))
    assert "weakly active" in message and "one-sided" in message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.func.jvp(lambda p: solve_qp(Q, p, G, h).z, (p,), (torch.ones_like(p),))
    assert named_elements(caught) == {1}


def test_only_a_derivative_taken_warns():
    """Not a solve without gradients, nor one whose inputs require them but whose derivative is not
    taken (a model evaluated outside ``torch.no_grad``)."""
    Q, G, h = torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    p = torch.tensor([-1.0, -0.2], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve_qp(Q, p, G, h)
        z = solve_qp(Q, p.clone().requires_grad_(), G, h).z
    with pytest.warns(InexactDerivativeWarning, match="the derivative of the QP is inexact"):
        z.sum().backward()


@pytest.mark.parametrize("m", [0, 3])
def test_random_qps_are_not_named(m):
    data = random_qp((32,), 10, 12, m)
    p = data["p"].clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solve_qp(data["Q"], p, data["G"], data["h"], data["A"], data["b"]).z.sum().backward()


BOX_G = torch.cat([torch.eye(2), -torch.eye(2)]).double()  # |z| ≤ 1
BOX_H = torch.ones(4, dtype=torch.float64)


def _not_unique_named(compile: bool) -> tuple[str, torch.Tensor]:
    """The warning of a backward through four problems over the box (the gradient of p beside it).
    Element 0: an LP whose optima are a face (min z₂ over the box: any z₁); 1: a Q singular along
    that face; 2: a Q with an eigenvalue of 1e-4 (OptNet's ε: unique, derivative 1e4, not named); 3: a
    strictly convex QP."""
    Q = torch.stack([torch.zeros(2, 2), torch.diag(torch.tensor([0.0, 1.0])), torch.diag(torch.tensor([1.0, 1e-4])),
                     torch.eye(2)]).double()
    p = torch.tensor([[0.0, 1.0], [0.0, 0.3], [0.3, 3e-5], [0.3, 0.2]], dtype=torch.float64, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        solve_qp(Q, p, BOX_G, BOX_H, compile=compile).z.sum().backward()
    (message,) = [str(w.message) for w in caught if issubclass(w.category, InexactDerivativeWarning)]
    return message, p.grad


@pytest.mark.parametrize("compile", [False, True])
def test_a_solution_that_is_not_unique_is_named(compile):
    message, grad = _not_unique_named(compile)
    assert "the derivative at elements 0, 1 amplifies a change of p" in message and "not unique" in message
    assert grad[:2, 0].abs().min() > 1e8  # the face's direction: about 4/tol, where the map has no derivative
    torch.testing.assert_close(grad[2], torch.tensor([-1.0, -1e4], dtype=torch.float64), rtol=1e-6, atol=0)


def test_a_tie_in_an_lp_over_the_simplex_is_named():
    # min z₁ + z₂ + 2 z₃ over the simplex: every point of the edge z₁ + z₂ = 1 is optimal
    p = torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    z = solve_qp(torch.zeros(3, 3, dtype=torch.float64), p, -torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64),
                 torch.ones(1, 3, dtype=torch.float64), torch.ones(1, dtype=torch.float64)).z
    with pytest.warns(InexactDerivativeWarning, match="the derivative of the QP amplifies a change of p"):
        z.sum().backward()


def test_a_batch_in_chunks_names_the_elements_the_whole_batch_names(eager_backend, monkeypatch):
    """A compiled batch in chunks of two makes its derivatives' factorisation in the backward
    (``autograd._sliced_factorising_vjp``), and names the elements whose derivative amplifies a
    change, as the whole batch does (``test_a_solution_that_is_not_unique_is_named``)."""
    monkeypatch.setattr(parallel, "_MIN_CHUNK_ENTRIES", 1)
    monkeypatch.setattr(parallel, "_CHUNK_ENTRIES", 2 * 2 * 2)
    factorising = []
    real = autograd._sliced_factorising_vjp
    monkeypatch.setattr(autograd, "_sliced_factorising_vjp", lambda *args: factorising.append(1) or real(*args))
    message, _ = _not_unique_named(True)
    assert "the derivative at elements 0, 1 amplifies a change of p" in message and "not unique" in message
    assert factorising == [1]


def test_torch_func_reverse_mode_warns_once_as_a_backward_does():
    """Under ``torch.func`` a forward's context is set up twice; each transform's derivative warns once,
    with the elements the forward named (under ``vmap``, the vmapped ones)."""
    one = torch.ones(1, dtype=torch.float64)
    Q, G, p = one.diag(), one.diag(), -one  # min ½(z − 1)² over z ≤ h = 1: weakly active (λ = s = 0)
    loss = lambda h: solve_qp(Q, p, G, h).z.sum()  # noqa: E731
    backward = inexact_warnings(lambda: loss(one.clone().requires_grad_()).backward())
    assert len(backward) == 1 and "the derivative of the QP is inexact" in backward[0]
    for transform in (torch.func.grad(loss), torch.func.jacrev(loss)):
        assert inexact_warnings(lambda: transform(one)) == backward
    (batched,) = inexact_warnings(lambda: torch.func.vmap(torch.func.grad(loss))(one.expand(3, 1)))
    assert "the derivative at elements 0, 1, 2 is inexact" in batched


def test_forward_mode_tests_the_amplification_without_a_kept_factorisation():
    """A forward whose inputs require no gradient keeps no factorisation; its forward-mode derivative
    (``jvp``, ``jacfwd``) makes one for the test, and names a face of optima as the backward does."""
    Q, p = torch.zeros(2, 2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)  # min z₂ over |z| ≤ 1
    solution = lambda p: solve_qp(Q, p, BOX_G, BOX_H).z  # noqa: E731
    tangent = torch.tensor([1.0, 0.0], dtype=torch.float64)
    for derivative in (lambda: torch.func.jvp(solution, (p,), (tangent,)), lambda: torch.func.jacfwd(solution)(p)):
        (message,) = inexact_warnings(derivative)
        assert "the derivative of the QP amplifies a change of p" in message and "not unique" in message
