"""The engine's step: nonnegative rows as the KKT system's diagonal rows and the same rows as a
cone plug-in (Nesterov–Todd scaling folded into H) are two eliminations of one Newton system, so
they must give the same direction and step (up to rounding)."""
import dataclasses

import torch

from optlayers.cone.interior.solver import IPMSettings
from optlayers.engine import cones
from optlayers.engine.step import ConeRows, State, newton_step
from optlayers.qp.scaling import QPData


@dataclasses.dataclass(frozen=True)
class Residuals:
    r_d: torch.Tensor
    r_e: torch.Tensor
    r_i: torch.Tensor
    r_k: torch.Tensor
    mu: torch.Tensor


def _program(batch=3, n=5, z=2, k=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    M = r(batch, n, n)
    positive = lambda: torch.rand(batch, k, generator=g, dtype=torch.float64) + 0.1  # noqa: E731
    x, nu, lam, s = r(batch, n), r(batch, z), positive(), positive()
    return M @ M.mT / n, r(batch, n), r(batch, z, n), r(batch, z), r(batch, k, n), r(batch, k), x, nu, lam, s


def _state(v, n, z, k, mk, batch):
    zeros = torch.zeros(batch, dtype=torch.int64)
    no = torch.zeros(batch, dtype=torch.bool)
    return State(v, zeros - 1, zeros, zeros.new_zeros(batch, 3), torch.full((batch,), 1e-10, dtype=torch.float64),
                 no, no, n, z, k, mk)


def test_nonnegative_rows_as_diagonal_rows_and_as_a_cone_plug_in_give_one_step():
    Q, p, A, b, G, h, x, nu, lam, s = _program()
    batch, n, z, k = x.shape[0], x.shape[1], nu.shape[1], lam.shape[1]
    r_d = Q @ x.unsqueeze(-1) + A.mT @ nu.unsqueeze(-1) + G.mT @ lam.unsqueeze(-1)
    r_d = r_d.squeeze(-1) + p
    r_e = (A @ x.unsqueeze(-1)).squeeze(-1) - b
    r_p = (G @ x.unsqueeze(-1)).squeeze(-1) + s - h
    mu = (s * lam).sum(-1) / k
    settings = IPMSettings()
    empty = r_p[:, :0]
    # as diagonal rows of the KKT system
    diagonal = newton_step(QPData(Q, p, A, b, G, h), None, (), _state(torch.cat([x, nu, lam, s], -1), n, z, k, 0, batch),
                           Residuals(r_d, r_e, r_p, empty, mu), None, settings)
    # as a cone plug-in: k nonnegative cones of one row among the cone rows
    part = cones.Part("nonneg", 0, k, 1, 1)
    folded = newton_step(QPData(Q, p, A, b, G[:, :0], h[:, :0]), ConeRows(G, h), (part,),
                         _state(torch.cat([x, nu, lam, s], -1), n, z, 0, k, batch),
                         Residuals(r_d, r_e, empty, r_p, mu), None, settings)
    assert diagonal.factor_ok.all() and folded.factor_ok.all()
    torch.testing.assert_close(diagonal.dv, folded.dv, rtol=1e-9, atol=1e-9)  # the same layout [x, ν, λ/y, s]
    torch.testing.assert_close(diagonal.alpha, folded.alpha, rtol=1e-9, atol=1e-12)
    assert (diagonal.alpha > 0).all() and (diagonal.alpha <= 1).all()
