"""Under compilation, Cholesky factors of order at most ``kkt.INVERTED_MAX_N`` are inverted once
and solved with by batched products: as accurate as the triangular solves they replace, on
ill-conditioned systems and on the small Maros–Meszaros problems. Traced by dynamo's eager backend
(no inductor compilation: fast)."""
import sys
from pathlib import Path

import pytest
import torch

from optlayers import QPStatus, host, solve_qp
from optlayers.engine import kkt
from tests.qp.test_refinement import EPS, _backward_error, _ill_conditioned_system

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import maros_meszaros  # noqa: E402


def _traced(fn):
    return torch.compile(fn, backend="eager", fullgraph=True, dynamic=False)


def _graded_system(seed: int, n: int):
    """``_ill_conditioned_system`` of order n, with 3 equalities and 20 inequalities."""
    return _ill_conditioned_system(seed, n, m=3, k=20)


@pytest.mark.parametrize("n, inverted", [(kkt.INVERTED_MAX_N, True), (kkt.INVERTED_MAX_N + 1, False)])
def test_small_factors_are_inverted_under_compilation_only(n, inverted):
    Q, A, G, w_inv, _ = _graded_system(0, n)
    reg = torch.full((Q.shape[0],), 1e-9, dtype=torch.float64)
    eager = kkt.factor_kkt(Q, A, G, w_inv, reg, reg, retries=0)
    traced = _traced(lambda *args: kkt.factor_kkt(*args, retries=0))(Q, A, G, w_inv, reg, reg)
    assert eager.inv_h.shape == eager.inv_s.shape == (Q.shape[0], 0, 0)
    m = A.shape[-2]
    assert traced.inv_h.shape == ((Q.shape[0], n, n) if inverted else (Q.shape[0], 0, 0))
    assert traced.inv_s.shape == (Q.shape[0], m, m)  # S is 3 x 3: inverted at every n
    if inverted:
        eye = torch.eye(n, dtype=torch.float64)
        residual = (traced.inv_h @ traced.chol_h - eye).abs().amax()
        assert residual <= 64 * EPS * (traced.inv_h.abs() @ traced.chol_h.abs()).amax(), residual


@pytest.mark.parametrize("stiff", [False, True])
def test_solves_with_the_inverse_are_as_accurate_as_triangular_solves(stiff):
    for seed in range(3):
        Q, A, G, w_inv, rhs = _graded_system(seed, kkt.INVERTED_MAX_N)
        reg = torch.full((Q.shape[0],), 1e-9, dtype=torch.float64)
        mask = (w_inv > 1.0) if stiff else None

        def solve(Q, A, G, w_inv, reg, rx, re, v):
            f = kkt.factor_kkt(Q, A, G, w_inv, reg, reg, stiff=mask, retries=0)
            return f.ok, f.inv_h.shape[-1], kkt.solve_reduced(f, rx, re, v, refine_steps=3)

        with host.accelerator_schedule():  # every refinement step taken, as under compilation
            ok, width, eager = solve(Q, A, G, w_inv, reg, *rhs)
            traced_ok, traced_width, traced = _traced(solve)(Q, A, G, w_inv, reg, *rhs)
        assert bool(ok.all()) and bool(traced_ok.all()) and width == 0 and traced_width == Q.shape[-1]
        error, traced_error = (_backward_error(Q, A, G, w_inv, rhs, s) for s in (eager, traced))
        assert traced_error <= max(4 * error, 64 * EPS), (seed, traced_error, error)


SMALL = ["DUALC1", "DUALC2", "DUALC5", "DUALC8", "GENHS28", "HS21", "HS268", "HS35", "HS35MOD", "HS51", "HS52",
         "HS53", "HS76", "LOTSCHD", "QPTEST", "S268", "TAME", "ZECEVIC2"]  # every problem of at most 12 variables


@pytest.mark.slow
@pytest.mark.skipif(not maros_meszaros.DEFAULT_DATA.is_dir(), reason="no Maros-Meszaros data")
def test_small_maros_meszaros_problems_compiled_as_eagerly(eager_backend):
    """The compiled path (inverted factors) ends every problem of at most 12 variables as the eager
    path does (triangular solves): solved, in as many iterations, the solutions within 1e-6."""
    for name in SMALL:
        qp = maros_meszaros.load(maros_meszaros.DEFAULT_DATA / f"{name}.mat")
        data = maros_meszaros.to_optlayers(qp)
        data.pop("_masks")
        assert qp.P.shape[0] <= kkt.INVERTED_MAX_N
        sols = [solve_qp(**data, tol=1e-7, rel_tol=0.0, max_iter=200, on_failure="ignore", compile=compile)
                for compile in (False, True)]
        assert all(int(s.status) == QPStatus.SOLVED for s in sols), name
        assert int(sols[0].iterations) == int(sols[1].iterations), name
        torch.testing.assert_close(sols[1].z, sols[0].z, rtol=1e-6, atol=1e-6, msg=name)


def test_cuda_inverts_up_to_its_own_limit_eager_or_compiled_and_the_cpu_only_compiled(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # device objects only: no GPU needed
    assert not kkt.inverts(4, cpu)  # the CPU, eager: never
    monkeypatch.setattr(kkt, "CUDA_INVERTED_MAX_N", 100)
    assert kkt.inverts(100, cuda) and not kkt.inverts(101, cuda) and not kkt.inverts(0, cuda)  # CUDA, eager
    monkeypatch.setattr(kkt, "CUDA_INVERTED_MAX_N", 0)
    assert not kkt.inverts(4, cuda)  # 0: CUDA too only under compilation
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(kkt, "CUDA_INVERTED_MAX_N", 0)
    assert kkt.inverts(kkt.INVERTED_MAX_N, cuda) and not kkt.inverts(kkt.INVERTED_MAX_N + 1, cuda)
    assert not kkt.inverts(0, cuda)
    monkeypatch.setattr(kkt, "CUDA_INVERTED_MAX_N", 128)
    assert kkt.inverts(128, cuda) and not kkt.inverts(129, cuda)
    assert not kkt.inverts(kkt.INVERTED_MAX_N + 1, cpu)  # the CPU keeps its own limit
