"""Each cone: projection against a reference, derivative against finite differences of the projection."""
import math

import cvxpy as cp
import numpy as np
import pytest
import torch

from optlayers.cone import exp, nonneg, psd, soc, zero
from optlayers.engine.cones import svec

FD_STEP = 1e-6
FD_TOL = 1e-6  # central differences with step 1e-6 are accurate to ~1e-9 on smooth pieces
REF_TOL = 1e-4  # an interior point reference lands ~sqrt(its 1e-8 tolerance) from a curved boundary;
# exactness is checked separately by Moreau's decomposition


def fd_jacobian(project, v: torch.Tensor, dual: bool) -> torch.Tensor:
    """Central finite-difference Jacobian of project at each row of v (N, k) -> (N, k, k)."""
    k = v.shape[-1]
    cols = []
    for i in range(k):
        e = torch.zeros(k)
        e[i] = FD_STEP
        cols.append((project(v + e, dual) - project(v - e, dual)) / (2 * FD_STEP))
    return torch.stack(cols, -1)


def fd_error(module, v: torch.Tensor, dual: bool = False) -> float:
    """max |derivative - FD| of the projection's Jacobian at the rows of v."""
    return float((module.derivative(v, dual).dense() - fd_jacobian(module.project, v, dual)).abs().max())


def check_derivative(module, v: torch.Tensor, dual: bool = False, name: str = "") -> float:
    op = module.derivative(v, dual)
    dense = op.dense()
    err = fd_error(module, v, dual)
    assert err < FD_TOL, f"{name}: derivative differs from finite differences by {err:.2e}"
    d = torch.randn(v.shape)
    assert torch.allclose(op.matvec(d), (dense @ d.unsqueeze(-1)).squeeze(-1), atol=1e-12)
    assert torch.allclose(op.rmatvec(d), (dense.transpose(-1, -2) @ d.unsqueeze(-1)).squeeze(-1), atol=1e-12)
    return err


def moreau_check(module, v: torch.Tensor) -> None:
    """v = proj_K(v) - proj_K*(-v), with the two parts orthogonal."""
    p, q = module.project(v), module.project(-v, dual=True)
    assert torch.allclose(p - q, v, atol=1e-10)
    assert float((p * q).sum(-1).abs().max()) < 1e-9


def test_zero_cone():
    v = torch.randn(5, 4)
    assert torch.equal(zero.project(v), torch.zeros_like(v))
    assert torch.equal(zero.project(v, dual=True), v)
    check_derivative(zero, v, name="zero")
    check_derivative(zero, v, dual=True, name="zero")


def test_nonneg_projection_and_derivative():
    v = torch.randn(50, 1) + torch.sign(torch.randn(50, 1)) * 0.01
    assert torch.equal(nonneg.project(v), v.clamp_min(0))
    moreau_check(nonneg, v)
    check_derivative(nonneg, v, name="nonneg")


def test_nonneg_boundary_uses_inside_piece():
    v = torch.zeros(3, 1)
    d = torch.ones(3, 1)  # pointing into the cone: the one-sided difference is the identity
    one_sided = (nonneg.project(v + FD_STEP * d) - nonneg.project(v)) / FD_STEP
    assert torch.allclose(nonneg.derivative(v).matvec(d), one_sided)


def soc_points(k: int, count: int) -> torch.Tensor:
    x = torch.randn(count, k - 1)
    norm = x.norm(dim=-1)
    t = torch.cat([norm[: count // 3] * 1.5, -norm[count // 3: 2 * count // 3] * 1.5,
                   norm[2 * count // 3:] * (torch.rand(count - 2 * (count // 3)) * 1.6 - 0.8)])
    return torch.cat([t.unsqueeze(-1), x], -1)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_soc_projection_against_cvxpy(k):
    v = soc_points(k, 6)
    got = soc.project(v)
    for row, expected_in in zip(v.numpy(), got.numpy()):
        z = cp.Variable(k)
        # the cone of order 1 is t ≥ 0 (older cvxpy refuses the empty z[1:] of cp.SOC)
        cone = cp.SOC(z[0], z[1:]) if k > 1 else z[0] >= 0
        cp.Problem(cp.Minimize(cp.sum_squares(z - row)), [cone]).solve(solver="CLARABEL")
        assert np.allclose(expected_in, z.value, atol=REF_TOL)
    moreau_check(soc, v)


@pytest.mark.parametrize("k", [2, 3, 6])
def test_soc_derivative(k):
    check_derivative(soc, soc_points(k, 60), name="soc")


def test_soc_boundary_points():
    x = torch.randn(10, 3)
    on_cone = torch.cat([x.norm(dim=-1, keepdim=True), x], -1)
    inward = torch.cat([torch.ones(10, 1), torch.zeros(10, 3)], -1)  # +t moves into the interior
    one_sided = (soc.project(on_cone + FD_STEP * inward) - soc.project(on_cone)) / FD_STEP
    assert torch.allclose(soc.derivative(on_cone).matvec(inward), one_sided, atol=1e-6)
    for offset in (1e-3, -1e-3):  # just inside and just outside: smooth pieces
        check_derivative(soc, on_cone + offset * inward, name="soc")


def psd_points(d: int, count: int, boundary: bool = False) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(count, d, d))
    lam = torch.randn(count, d) + torch.sign(torch.randn(count, d)) * 0.2
    if boundary:
        lam[:, 0] = 0
        lam[:, 1:] = lam[:, 1:].abs()
    return svec.mat_to_vec((q * lam.unsqueeze(-2)) @ q.transpose(-1, -2))


def test_psd_vectorization_is_scs_convention():
    mat = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 5.0], [3.0, 5.0, 6.0]])
    r2 = 2 ** 0.5
    assert torch.allclose(svec.mat_to_vec(mat), torch.tensor([1.0, 2 * r2, 3 * r2, 4.0, 5 * r2, 6.0]))
    assert torch.allclose(svec.vec_to_mat(svec.mat_to_vec(mat)), mat)
    other = svec.vec_to_mat(torch.randn(6))
    assert torch.allclose((svec.mat_to_vec(mat) * svec.mat_to_vec(other)).sum(), torch.trace(mat @ other))


@pytest.mark.parametrize("d", [2, 3])
def test_psd_projection_against_cvxpy(d):
    v = psd_points(d, 4)
    got = svec.vec_to_mat(psd.project(v))
    for row, expected_in in zip(svec.vec_to_mat(v).numpy(), got.numpy()):
        X = cp.Variable((d, d), PSD=True)
        cp.Problem(cp.Minimize(cp.sum_squares(X - row))).solve(solver="CLARABEL")
        assert np.allclose(expected_in, X.value, atol=REF_TOL)
    moreau_check(psd, v)


@pytest.mark.parametrize("d", [1, 2, 4])
def test_psd_derivative(d):
    check_derivative(psd, psd_points(d, 30), name="psd")


def test_psd_boundary_derivative_one_sided():
    v = psd_points(3, 5, boundary=True)
    lam, vecs = torch.linalg.eigh(svec.vec_to_mat(v))
    inward = svec.mat_to_vec(vecs[..., :, :1] @ vecs[..., :, :1].transpose(-1, -2))  # raises the zero eigenvalue
    one_sided = (psd.project(v + FD_STEP * inward) - psd.project(v)) / FD_STEP
    assert torch.allclose(psd.derivative(v).matvec(inward), one_sided, atol=1e-6)


def exp_region_points():
    """Points in each of the four regions (K, polar, analytic, root), including near-extreme ratios."""
    inside = torch.tensor([[-1.0, 1.0, 1.0], [0.5, 2.0, 3.0], [-3.0, 0.5, 0.2]])
    polar = -torch.tensor([[-1.0, 1.0, 1.0], [-0.5, 0.2, 2.0], [-2.0, 3.0, 1.0]])  # -K* points
    analytic = torch.tensor([[-1.0, -1.0, 1.0], [-2.0, -0.5, -0.3], [-0.1, -3.0, 2.0]])
    root = torch.tensor([[1.0, 1.0, 1.0], [0.3, -2.0, 1.0], [2.0, 0.5, -0.5], [0.01, 3.9, -0.5], [5.0, -1.0, 0.1]])
    return {"inside": inside, "polar": polar, "analytic": analytic, "root": root}


def test_exp_regions_classified():
    codes = {name: exp.regions(v) for name, v in exp_region_points().items()}
    assert (codes["inside"] == exp.REGION_INSIDE).all()
    assert (codes["polar"] == exp.REGION_POLAR).all()
    assert (codes["analytic"] == exp.REGION_ANALYTIC).all()
    assert (codes["root"] == exp.REGION_ROOT).all()


def test_exp_projection_against_cvxpy():
    points = torch.cat([*exp_region_points().values(), torch.randn(10, 3) * 2])
    got = exp.project(points)
    for row, value in zip(points.numpy(), got.numpy()):
        z = cp.Variable(3)
        cp.Problem(cp.Minimize(cp.sum_squares(z - row)), [cp.constraints.ExpCone(z[0], z[1], z[2])]).solve(solver="CLARABEL")
        assert np.allclose(value, z.value, atol=REF_TOL), (row, value, z.value)


def test_exp_orthogonal_decomposition_many_points():
    """proj_K* is defined through Moreau here, so what this checks is <proj_K(v), proj_K*(-v)> = 0."""
    v = torch.randn(3000, 3) * 3
    moreau_check(exp, v)
    moreau_check(exp, v * 1e-3)


@pytest.mark.parametrize("region", ["inside", "polar", "analytic", "root"])
def test_exp_derivative_each_region(region):
    v = exp_region_points()[region]
    check_derivative(exp, v, name="exp")
    check_derivative(exp, -v, dual=True, name="exp")


def test_exp_derivative_random_points():
    v = torch.randn(500, 3) * 2
    v = v[(exp.regions(v) != exp.REGION_ANALYTIC) | (v[:, 2].abs() > 1e-3)]
    check_derivative(exp, v, name="exp")
    check_derivative(exp, v, dual=True, name="exp")


def test_exp_boundary_point_inward():
    rho = torch.linspace(-2, 2, 5)
    on_cone = torch.stack([rho, torch.ones_like(rho), torch.exp(rho)], -1)
    inward = torch.tensor([0.0, 0.0, 1.0]).expand(5, 3)  # raising z enters the interior
    one_sided = (exp.project(on_cone + FD_STEP * inward) - exp.project(on_cone)) / FD_STEP
    assert torch.allclose(exp.derivative(on_cone).matvec(inward), one_sided, atol=1e-6)
    for offset in (1e-3, -1e-3):
        check_derivative(exp, on_cone + offset * inward, name="exp")


def test_report_max_fd_errors(capsys):
    """Prints the largest finite-difference error of each cone's projection derivative (for docs/cone.md)."""
    exp_points = torch.randn(200, 3) * 2
    exp_points = exp_points[(exp.regions(exp_points) != exp.REGION_ANALYTIC) | (exp_points[:, 2].abs() > 1e-3)]
    samples = {"zero": (zero, torch.randn(20, 4)), "nonneg": (nonneg, torch.randn(50, 1) + torch.sign(torch.randn(50, 1)) * 0.01),
               "soc": (soc, soc_points(5, 60)), "psd": (psd, psd_points(3, 30)), "exp": (exp, exp_points)}
    errors = {name: max(fd_error(module, v, dual) for dual in (False, True)) for name, (module, v) in samples.items()}
    with capsys.disabled():
        print("\nmax |derivative - FD| per cone:", {k: f"{v:.1e}" for k, v in sorted(errors.items())})
    assert all(err < FD_TOL for err in errors.values()), errors


def in_exp_cone(p: torch.Tensor, tol: float) -> torch.Tensor:
    x, y, z = p.unbind(-1)
    safe = torch.where(y > 0, y, torch.ones_like(y))
    curved = (y > 0) & (safe * torch.exp(x / safe) - z <= tol)
    return curved | ((y.abs() <= tol) & (x <= tol) & (z >= -tol))


def test_exp_projection_on_a_wide_grid():
    """Friberg's test domain (coarser): +-e^k, k = -10..10, and 0 in every coordinate.

    p = proj_K(v) must lie in K (by the formula), q = p - v in K* (by its distance to K*,
    ||proj_K(-q)||: the formula for K* amplifies round-off by exp(v/u)), and <p, q> = 0, all
    relative to |v|.
    """
    vals = torch.cat([-torch.exp(torch.arange(-10.0, 11.0, 2.0)), torch.zeros(1), torch.exp(torch.arange(-10.0, 11.0, 2.0))])
    v = torch.cartesian_prod(vals, vals, vals)
    scale = v.norm(dim=-1).clamp_min(1)
    p = exp.project(v)
    q = p - v
    assert torch.isfinite(p).all()
    assert in_exp_cone(p / scale.unsqueeze(-1), 1e-12).all()
    assert float((exp.project(-q).norm(dim=-1) / scale).max()) < 1e-12
    assert float(((p * q).sum(-1).abs() / scale**2).max()) < 1e-12


def test_psd_vectorisation_against_its_definition_and_after_inference_mode():
    """svec: the lower triangle column by column, off-diagonal entries times sqrt(2); its index
    maps are cached, and a first use under torch.inference_mode must not leave inference tensors
    that a later differentiated use cannot save."""
    svec._maps.cache_clear()
    d = 4
    with torch.inference_mode():
        svec.vec_to_mat(torch.zeros(d * (d + 1) // 2, dtype=torch.float64))
    M = torch.randn(3, d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    M = (M + M.mT).requires_grad_()
    want = torch.stack([M[:, i, j] * (1 if i == j else math.sqrt(2)) for j in range(d) for i in range(j, d)], -1)
    v = svec.mat_to_vec(M)
    torch.testing.assert_close(v, want, rtol=0, atol=0)
    torch.testing.assert_close(svec.vec_to_mat(v), M, rtol=1e-15, atol=1e-15)
    v.sum().backward()  # the cached maps were saved for the backward
    assert M.grad is not None and M.grad.isfinite().all()
