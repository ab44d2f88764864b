"""Nearly dependent equality rows, replaced by their orthonormal equivalent (``qp.equalities``)."""
import numpy as np
import pytest
import torch

from optlayers import QPStatus, solve_qp
from optlayers.qp import equalities
from qp_problems import clarabel_solve, random_qp

NAMES = ("Q", "p", "G", "h", "A", "b")


def _nearly_dependent_lps(noise_bits: list[int], n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of LPs over a box around an integer point z, with three equality rows that z satisfies
    and two copies of them, 2^-bits apart (dyadic data: A z = b holds exactly), one problem per entry
    of ``noise_bits``; and ``rows``, the same feasible sets written with the copies' exact
    differences (scaled to unit size) in their place: well-conditioned rows for the reference."""
    rng = np.random.default_rng(seed)
    out = {name: [] for name in (*NAMES, "rows", "sides")}
    for bits in noise_bits:
        z = rng.integers(-4, 5, n).astype(float)
        A0 = np.round(rng.standard_normal((3, n)) * 2**10) / 2**10
        noise = rng.integers(-3, 4, (2, n)).astype(float)
        noise[:, 0] = 1.0  # never zero
        A = np.vstack([A0, A0[:2] + noise * 2.0**-bits])
        rows = np.vstack([A0, noise / 3.0])
        G = np.vstack([np.eye(n), -np.eye(n)])
        h = np.concatenate([z + rng.integers(1, 4, n) / 2, -z + rng.integers(1, 4, n) / 2])
        p = np.round(rng.standard_normal(n) * 2**8) / 2**8
        for name, value in zip((*NAMES, "rows", "sides"), (np.zeros((n, n)), p, G, h, A, A @ z, rows, rows @ z)):
            out[name].append(value)
    return {name: torch.tensor(np.stack(values)) for name, values in out.items()}


def test_nearly_dependent_rows_are_solved_as_the_exact_rows_are():
    """Copies 2^-12 to 2^-24 apart: every LP SOLVED, at the objective of the same feasible set written
    with well-conditioned rows (the copies' exact differences). Left as given, 62 of 100 such LPs at
    2^-16 to 2^-19 and 92 of 100 at 2^-20 to 2^-23 ended MAX_ITER, INACCURATE or NUMERICAL_ERROR, the
    primal residual stalled at about the noise times the iterate's distance along the difference."""
    bits = [12, 14, 16, 17, 18, 19, 20, 21, 22, 23, 24]
    d = _nearly_dependent_lps(bits)
    sol = solve_qp(*(d[name] for name in NAMES))
    assert (sol.status == QPStatus.SOLVED).all(), sol.status
    reference = solve_qp(d["Q"], d["p"], d["G"], d["h"], d["rows"], d["sides"])
    assert (reference.status == QPStatus.SOLVED).all(), reference.status
    # the objective to within the rounding of the data times the rows' conditioning (2^bits): the
    # rows' difference is known to ε·2^bits, and z along it (an ill-conditioned problem, not the method's)
    objective, expected = (d["p"] * sol.z).sum(-1), (d["p"] * reference.z).sum(-1)
    bound = 1e-14 * 2.0 ** torch.tensor(bits, dtype=torch.float64) * expected.abs().clamp_min(1.0)
    assert ((objective - expected).abs() <= bound).all(), (objective - expected) / bound
    # the given rows hold at the solution, and ν are multipliers of the given rows: stationarity
    # with them (the LPs' Q is zero) to the solve's accuracy
    assert (torch.einsum("bmn,bn->bm", d["A"], sol.z) - d["b"]).abs().max() < 1e-12
    stationarity = d["p"] + torch.einsum("bkn,bk->bn", d["G"], sol.lam) + torch.einsum("bmn,bm->bn", d["A"], sol.nu)
    assert stationarity.abs().max() < 1e-9 * max(1.0, float(sol.nu.abs().max())), stationarity.abs().max()


def test_nearly_dependent_rows_agree_with_clarabel_on_the_exact_rows():
    """The reference of the test above from an independent solver: Clarabel on the well-conditioned
    rows. (Clarabel on the nearly dependent rows themselves reports Solved with objectives off by up
    to 2.4 at noise 2^-24 to 2^-27: its tolerance of 1e-8 leaves the rows' difference unresolved.)"""
    pytest.importorskip("clarabel")
    d = _nearly_dependent_lps([16, 20, 24], seed=1)
    sol = solve_qp(*(d[name] for name in NAMES))
    for i in range(3):
        z, _, _ = clarabel_solve(d["Q"][i], d["p"][i], d["G"][i], d["h"][i], d["rows"][i], d["sides"][i])
        expected = float(d["p"][i].numpy() @ z)
        assert abs(float(d["p"][i] @ sol.z[i]) - expected) < 1e-7 * max(1.0, abs(expected)), i


def _loss_and_gradients(data: dict, weights: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    inputs = {name: data[name].clone().requires_grad_() for name in NAMES}
    sol = solve_qp(*(inputs[name] for name in NAMES), tol=1e-13)
    loss = sum((w * t).sum() for w, t in zip(weights, (sol.z, sol.lam, sol.nu)))
    grads = torch.autograd.grad(loss, [inputs[name] for name in NAMES])
    return (sol.z, sol.lam, sol.nu, *grads)


def test_transformed_rows_give_the_given_problems_solution_multipliers_and_derivatives(monkeypatch):
    """Every problem transformed (the threshold raised above every row's share) against none: the
    same z, λ, ν of the given rows, and the same derivatives of a loss of all three with respect to
    all six inputs (the map (A, b) -> (MA, Mb) with M held fixed leaves the solution map as it is)."""
    torch.manual_seed(0)
    data = random_qp((4,), 6, 6, 2, active=True)  # 3 active rows and 2 equalities: unique multipliers
    g = torch.Generator().manual_seed(1)
    weights = tuple(torch.randn(4, size, generator=g, dtype=torch.float64) for size in (6, 6, 2))
    plain = _loss_and_gradients(data, weights)
    identity = torch.eye(2, dtype=torch.float64).expand(4, 2, 2)
    assert torch.equal(equalities.orthonormal_rows(data["A"], data["b"])[2].factor, identity)  # well-conditioned rows: as given
    monkeypatch.setattr(equalities, "NEARLY_DEPENDENT", 2.0)
    assert not torch.equal(equalities.orthonormal_rows(data["A"], data["b"])[2].factor, identity)
    transformed = _loss_and_gradients(data, weights)
    for name, a, b in zip(("z", "lam", "nu", *NAMES), plain, transformed):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8), (name, (a - b).abs().max())


def test_gradients_of_nearly_dependent_rows_match_finite_differences():
    """A QP with a row and its copy 2^-10 apart (transformed): gradcheck of z and ν in every input."""
    Q, p, G, h, A, b = _nearly_dependent_qp()
    assert not torch.equal(equalities.orthonormal_rows(A, b)[2].factor, torch.eye(3, dtype=torch.float64).expand(2, 3, 3))

    def solution(M, p, G, h, A, b):
        sol = solve_qp(0.5 * (M + M.mT), p, G, h, A, b, tol=1e-13)
        return sol.z, sol.nu

    inputs = [t.clone().requires_grad_() for t in (Q, p, G, h, A, b)]
    assert torch.autograd.gradcheck(solution, inputs, eps=1e-7, atol=1e-5, rtol=1e-4)


def test_rows_dependent_to_rounding_are_left_as_given():
    """An exact duplicate, a zero row or more rows than variables: the problem is not transformed
    (a division by R_ii of rounding size would make a constraint of noise)."""
    A = torch.tensor([[[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
                      [[1.0, 2.0, 3.0], [1.0, 2.0, 3.0 + 1e-6]]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    rows, sides, (factor, scale) = equalities.orthonormal_rows(A, b)
    assert torch.equal(rows[:2], A[:2]) and torch.equal(sides[:2], b[:2])
    assert torch.equal(factor[:2], torch.eye(2, dtype=torch.float64).expand(2, 2, 2)) and (scale[:2] == 1).all()
    # 1e-6 apart: transformed to MA, Mb with M = R⁻ᵀE (the same rows' span, well-conditioned)
    M = torch.linalg.solve_triangular(factor[2].mT, torch.diag(scale[2]), upper=False)
    assert torch.allclose(rows[2], M @ A[2], atol=1e-9) and torch.allclose(sides[2], M @ b[2], atol=1e-9)
    assert torch.linalg.cond(rows[2]) < 10 < 1e5 < torch.linalg.cond(A[2])
    assert equalities.orthonormal_rows(torch.ones(1, 3, 2, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64))[2] is None


def test_vmap_of_nearly_dependent_rows_matches_the_batched_solve():
    d = _nearly_dependent_lps([18, 24])
    batched = solve_qp(*(d[name] for name in NAMES))
    mapped = torch.func.vmap(lambda *data: solve_qp(*data).z)(*(d[name] for name in NAMES))
    assert torch.allclose(mapped, batched.z, atol=1e-10)


def test_rows_nearer_than_the_smallest_share_are_left_as_given_and_not_certified_infeasible():
    """Copies 2^-30 and 2^-36 apart: below ``SMALLEST_SHARE`` the transform's rounding would move the
    rows by more than 1.5e-8 of their size, so the problems are solved as given. They may stall
    (MAX_ITER, INACCURATE), and are not reported infeasible: they are feasible."""
    d = _nearly_dependent_lps([30, 36])
    identity = torch.eye(5, dtype=torch.float64).expand(2, 5, 5)
    assert torch.equal(equalities.orthonormal_rows(d["A"], d["b"])[2].factor, identity)
    sol = solve_qp(*(d[name] for name in NAMES), on_failure="ignore")
    assert not (sol.status == QPStatus.PRIMAL_INFEASIBLE).any(), sol.status


def _nearly_dependent_qp() -> tuple[torch.Tensor, ...]:
    """Two QPs whose third equality row is a copy of their first 2^-10 apart (transformed), one
    inequality active at the solution."""
    g = torch.Generator().manual_seed(3)
    d = torch.float64
    L = torch.randn(2, 5, 5, generator=g, dtype=d)
    Q = L @ L.mT / 5 + 0.1 * torch.eye(5, dtype=d)
    A = torch.randn(2, 2, 5, generator=g, dtype=d)
    A = torch.cat([A, A[:, :1] + 2.0**-10 * torch.randn(2, 1, 5, generator=g, dtype=d)], 1)
    G, z0 = torch.randn(2, 2, 5, generator=g, dtype=d), torch.randn(2, 5, generator=g, dtype=d)
    h = torch.einsum("bkn,bn->bk", G, z0) + torch.tensor([0.0, 0.5], dtype=d)
    b = torch.einsum("bmn,bn->bm", A, z0)
    p = -torch.einsum("bij,bj->bi", Q, z0) - G[:, 0] * 0.7 - torch.einsum("bmn,bm->bn", A, torch.randn(2, 3, generator=g, dtype=d))
    return Q, p, G, h, A, b


@pytest.mark.parametrize("wrt", [4, 5, 1])
def test_forward_mode_derivatives_of_nearly_dependent_rows_match_reverse_mode(wrt):
    """torch.func.jvp and forward-mode dual tensors (under which A does not require grad) give the
    tangent of z and ν in A, b and p that the reverse mode's vjp gives."""
    data = _nearly_dependent_qp()
    assert not torch.equal(equalities.orthonormal_rows(data[4], data[5])[2].factor, torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
    tangent = torch.randn(data[wrt].shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def outputs(x):
        args = list(data)
        args[wrt] = x
        sol = solve_qp(*args, tol=1e-13)
        return torch.cat([sol.z, sol.nu], -1)

    _, jvp = torch.func.jvp(outputs, (data[wrt],), (tangent,))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.unpack_dual(outputs(torch.autograd.forward_ad.make_dual(data[wrt], tangent))).tangent
    out, vjp_fn = torch.func.vjp(outputs, data[wrt])
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    reverse = (vjp_fn(cotangent)[0] * tangent).sum()
    assert jvp.abs().max() > 0
    for forward in (jvp, dual):
        assert torch.allclose((forward * cotangent).sum(), reverse, rtol=1e-7), (float((forward * cotangent).sum()), float(reverse))


def test_failed_elements_of_transformed_problems_hold_failed_value_in_nu():
    data = _nearly_dependent_qp()
    sol = solve_qp(*data, max_iter=2, on_failure="ignore", failed_value=3.0)
    assert (sol.status != QPStatus.SOLVED).all()
    assert (sol.nu == 3.0).all() and (sol.z == 3.0).all(), sol.nu


def test_float32_data_are_solved_with_their_rows_as_given():
    """Cast back to float32 the replaced rows would carry float32's rounding into ν amplified by
    1/share: float32 data keep their rows (and are solved in float64, where rows 2^-9 apart solve)."""
    d = _nearly_dependent_lps([9, 10])
    single = {name: d[name].float() for name in NAMES}
    assert equalities.orthonormal_rows(single["A"], single["b"])[2] is None
    sol = solve_qp(*(single[name] for name in NAMES))
    reference = solve_qp(*(d[name] for name in NAMES))
    assert torch.allclose(sol.z.double(), reference.z, atol=1e-5)
