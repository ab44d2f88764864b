"""The cone derivative survives torch's racing batched LU after torch.set_num_threads(2)
(pytorch/pytorch#142815), in a fresh interpreter since the race depends on process state."""
import os
import subprocess
import sys

import pytest
import torch

from optlayers.cone import linsolve

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "src")

_SCRIPT = """
import torch
torch.set_num_threads(2)
from optlayers.cone import ConeSpec, solve_cone
from optlayers.cone.testing import random_program
spec = ConeSpec(zero=20, nonneg=120, soc=[10, 10])
A, b, c, _, x, _, _ = random_program(spec, 60, batch=8, seed=0)
A.requires_grad_()
sol = solve_cone(A, b, c, spec, solver="ipm")
sol.x.sum().backward()
assert bool((sol.status == 0).all()), sol.status
assert float((sol.x - x).detach().abs().max()) < 1e-9
racing = A.grad.clone()
torch.set_num_threads(1)  # one thread: no concurrent getrf
A.grad = None
solve_cone(A, b, c, spec, solver="ipm").x.sum().backward()
assert torch.allclose(racing, A.grad, atol=1e-10), float((racing - A.grad).abs().max())
"""


_BARE_LU = """
import torch
torch.set_num_threads(2)
torch.linalg.lu_factor_ex(torch.randn(8, 230, 230, dtype=torch.float64))
"""


def test_cone_layer_after_set_num_threads_two():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    try:  # the layer cannot survive torch's batched LU if that LU does not return at all
        subprocess.run([sys.executable, "-c", _BARE_LU], env=env, capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("torch's own batched LU (8 x 230 x 230) did not return within 60 s after torch.set_num_threads(2) "
                    "on this machine (pytorch/pytorch#142815): nothing of optlayers' to test")
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_lu_factor_refactorises_corrupted_elements(monkeypatch):
    """Elements whose batched factorisation came back with invalid pivots or wrong factors (as
    the racing getrf returns them) are factorised again on their own."""
    matrices = torch.randn(4, 30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    real = torch.linalg.lu_factor_ex

    def racing(M):
        lu, pivots, info = real(M)
        if M.dim() == 3:
            lu, pivots = lu.clone(), pivots.clone()
            pivots[1, 5] = 0  # invalid pivot
            lu[2, 7, 3] += 1.0  # wrong factor, valid pivots
        return lu, pivots, info

    monkeypatch.setattr(torch.linalg, "lu_factor_ex", racing)
    lu, pivots = linsolve.lu_factor(matrices)
    P, L, U = torch.lu_unpack(lu, pivots)
    assert torch.allclose(P @ L @ U, matrices, atol=1e-12)
    with pytest.raises(ValueError, match=r"lu_factor expects \(B, N, N\)"):
        linsolve.lu_factor(matrices[0])


@pytest.mark.parametrize("flagged", [True, False])
def test_a_suspect_lu_factor_is_repaired_before_it_is_used(monkeypatch, flagged):
    """Where the batched LU is suspect (see lu_factor), solve_dense factorises those elements again
    and solves with the repaired factors: a corrupted factor changes nothing, whether its pivots
    flag it (``flagged``) or only the residual of the solve against the exact M shows it."""
    from optlayers import ConeSpec, solve_cone
    from optlayers.cone import linsolve
    from optlayers.cone.testing import random_program

    spec = ConeSpec(zero=1, nonneg=4, soc=[3])
    A, b, c, *_ = random_program(spec, 4, batch=3, seed=1)

    def gradient() -> torch.Tensor:
        A_ = A.clone().requires_grad_(True)
        solve_cone(A_, b, c, spec, solver="ipm").x.sum().backward()
        return A_.grad

    expected = gradient()
    real, calls = linsolve._lu_factor_unchecked, []

    def corrupted(matrices, check=True, overwrite=False):
        lu, pivots, suspect = real(matrices, check, overwrite)
        lu = lu.clone()
        if flagged:
            lu[1] = torch.nan  # a wrong factor, flagged as suspect
            suspect = suspect | (torch.arange(len(suspect)) == 1)
        else:
            lu[1].triu_().diagonal().mul_(1.5)  # wrong factors with valid pivots, as the racing getrf returns
        calls.append(1)
        return lu, pivots, suspect

    real_lu, single = torch.linalg.lu_factor_ex, []

    def counting(M, **kwargs):
        if M.dim() == 2:
            single.append(1)
        return real_lu(M, **kwargs)

    monkeypatch.setattr(linsolve, "_lu_factor_unchecked", corrupted)
    monkeypatch.setattr(torch.linalg, "lu_factor_ex", counting)
    got = gradient()
    assert calls, "the fresh-factorisation path was not taken"
    assert single, "the corrupted element was not factorised again on its own"
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_lu_factor_keeps_the_batched_factors_of_singular_matrices(monkeypatch):
    """Correct factors of singular matrices (as the residual map's M at a program with a non-unique
    dual solution) pass the check: no element is factorised again on its own, where factorising
    again cannot make its solve more accurate."""
    gen = torch.Generator().manual_seed(4)
    left, right = torch.randn(2, 6, 20, 17, dtype=torch.float64, generator=gen)
    matrices = left @ right.mT  # rank 17 of 20
    real, single = torch.linalg.lu_factor_ex, []

    def counting(M):
        if M.dim() == 2:
            single.append(1)
        return real(M)

    monkeypatch.setattr(torch.linalg, "lu_factor_ex", counting)
    lu, pivots = linsolve.lu_factor(matrices)
    P, L, U = torch.lu_unpack(lu, pivots)
    assert torch.allclose(P @ L @ U, matrices, atol=1e-12)
    assert not single, f"{len(single)} singular elements were factorised again one by one"
