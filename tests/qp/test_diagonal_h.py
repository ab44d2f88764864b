"""The diagonal-H path (diagonal Q; at most one nonzero per row of G, as bounds): recognised, and in
agreement with the dense path and with finite differences."""
import torch

from optlayers import QPStatus, solve_qp
from optlayers.engine.kkt import diagonal_h, factor_kkt
from optlayers.qp import forward
from qp_problems import box_qp

NAMES = ("Q", "p", "G", "h", "A", "b")


def test_diagonal_h_recognises_only_diagonal_structure():
    data = box_qp(3, 6, 2)
    assert bool(diagonal_h(data["Q"], data["G"]))
    coupled_q = data["Q"].clone()
    coupled_q[1, 0, 1] = coupled_q[1, 1, 0] = 0.1
    assert not bool(diagonal_h(coupled_q, data["G"]))
    coupled_g = data["G"].clone()
    coupled_g[2, 4, 5] = 1.0  # one row of one element constrains two variables
    assert not bool(diagonal_h(data["Q"], coupled_g))


def test_diagonal_h_counts_off_diagonal_entries_whatever_the_diagonal_holds():
    """Q's off-diagonal nonzeros are its nonzeros less its diagonal's: zeros on the diagonal (a
    free variable without curvature) do not hide an off-diagonal entry, and a NaN counts as one."""
    data = box_qp(2, 5, 1)
    Q = data["Q"].clone()
    Q[0].diagonal()[:2] = 0.0
    assert bool(diagonal_h(Q, data["G"]))
    for value in (1e-300, float("nan")):
        coupled = Q.clone()
        coupled[0, 3, 0] = value  # one entry off the diagonal, beside a zero diagonal entry
        assert not bool(diagonal_h(coupled, data["G"]))
        compiled = torch.compile(diagonal_h, fullgraph=True, backend="eager")
        assert not bool(compiled(coupled, data["G"]))


def test_diagonal_factor_holds_the_diagonal_of_the_dense_h():
    """H = Q + GᵀW⁻¹G of the diagonal path (from Gᵀ(W⁻¹·G1), no G∘G) is the dense H's diagonal:
    rows with one nonzero of either sign, empty rows, several rows on one variable; stiff rows out."""
    torch.manual_seed(0)
    B, n = 3, 7
    Q = torch.diag_embed(torch.rand(B, n, dtype=torch.float64))
    columns = torch.tensor([0, 3, 3, 6, 2, 0, 5, 1])
    G = torch.zeros(B, len(columns), n, dtype=torch.float64)
    G[:, torch.arange(len(columns)), columns] = 4 * torch.rand(B, len(columns), dtype=torch.float64) - 2
    G[1, 4] = 0.0  # an empty row
    assert bool(diagonal_h(Q, G))
    w_inv = 10.0 ** (6 * torch.rand(B, len(columns), dtype=torch.float64) - 3)
    reg = torch.full((B,), 1e-9, dtype=torch.float64)
    for stiff in (None, w_inv > 1.0):
        f = factor_kkt(Q, Q.new_zeros(B, 0, n), G, w_inv, reg, reg, stiff=stiff, diagonal=True)
        dense = Q + G.mT @ (f.w_inv_soft.unsqueeze(-1) * G)
        torch.testing.assert_close(f.H, dense.diagonal(dim1=-2, dim2=-1), rtol=1e-15, atol=0)
        assert torch.equal(f.chol_h, (f.H + 1e-9).sqrt())


def _solve_and_differentiate(data, monkeypatch, diagonal: bool):
    monkeypatch.setattr(forward, "DIAGONAL_MIN_N", 1 if diagonal else 10**9)
    seen = []
    recognise = forward._with_structure

    def spy(scaled):
        out = recognise(scaled)
        seen.append(out.diagonal)
        return out

    monkeypatch.setattr(forward, "_with_structure", spy)
    inputs = {k: v.clone().requires_grad_() for k, v in data.items()}
    sol = solve_qp(*(inputs[k] for k in NAMES), tol=1e-12)
    weights = torch.linspace(-1.0, 1.0, sol.z.shape[-1])
    ((sol.z * weights).sum() + sol.lam.sum() + sol.nu.square().sum()).backward()
    assert seen == [diagonal]
    return sol, {k: inputs[k].grad for k in NAMES}


def test_diagonal_path_matches_dense_path(monkeypatch):
    data = box_qp(4, 40, 5)
    diag_sol, diag_grads = _solve_and_differentiate(data, monkeypatch, diagonal=True)
    dense_sol, dense_grads = _solve_and_differentiate(data, monkeypatch, diagonal=False)
    assert bool((diag_sol.status == 0).all()) and bool((dense_sol.status == 0).all())
    active = (diag_sol.lam > 1e-6).sum()
    assert active >= 20, f"the test needs active bounds, got {int(active)}"
    for name in ("z", "lam", "nu"):
        torch.testing.assert_close(getattr(diag_sol, name), getattr(dense_sol, name), rtol=1e-8, atol=1e-9)
    for name in NAMES:
        torch.testing.assert_close(diag_grads[name], dense_grads[name], rtol=1e-6, atol=1e-7, msg=f"gradient of {name}")


def test_diagonal_path_gradients_match_finite_differences(monkeypatch):
    monkeypatch.setattr(forward, "DIAGONAL_MIN_N", 1)
    data = box_qp(2, 5, 1)
    q_diagonal = torch.diagonal(data["Q"], dim1=-2, dim2=-1).clone().requires_grad_()
    inputs = [q_diagonal] + [data[k].clone().requires_grad_() for k in ("p", "h", "A", "b")]

    def fn(q, p, h, A, b):  # Q and G keep their structure under the perturbations
        sol = solve_qp(torch.diag_embed(q), p, data["G"], h, A, b, tol=1e-13)
        return sol.z, sol.lam, sol.nu

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_compiled_solve_takes_the_diagonal_path(monkeypatch, eager_backend):
    """``compile=True`` (traced whole by dynamo; its eager backend here, so no inductor compilation)
    gives the eager path's solution and gradients on a problem with a diagonal H."""
    monkeypatch.setattr(forward, "DIAGONAL_MIN_N", 1)
    data = box_qp(2, 6, 1)
    results = []
    for compile in (False, True):
        p = data["p"].clone().requires_grad_()
        sol = solve_qp(data["Q"], p, data["G"], data["h"], data["A"], data["b"], compile=compile)
        results.append((sol.z, torch.autograd.grad((sol.z ** 2).sum(), p)[0]))
    (z, grad), (z_compiled, grad_compiled) = results
    torch.testing.assert_close(z_compiled, z, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grad_compiled, grad, rtol=1e-8, atol=1e-9)


def test_compiled_batch_takes_one_structure_whichever_problem_breaks_it(monkeypatch, eager_backend):
    """The compiled forward finds the batch's structure before its chunks (``forward._structure``:
    the first problem, then the whole batch): diagonal where every problem is, dense where the first
    or only a later one is not, each solve as the eager path's."""
    monkeypatch.setattr(forward, "DIAGONAL_MIN_N", 1)
    data = box_qp(3, 6, 1)
    for coupled in (None, 0, 2):
        Q = data["Q"].clone()
        if coupled is not None:  # an off-diagonal pair, with curvature enough to keep Q semidefinite
            Q[coupled, 0, 0] += 1.0
            Q[coupled, 1, 1] += 1.0
            Q[coupled, 0, 1] = Q[coupled, 1, 0] = 0.5
        assert forward._structure(Q, data["G"]) == (coupled is None)
        assert forward._structure(Q[2:], data["G"][2:]) == (coupled != 2)  # a batch of one
        eager, compiled = (solve_qp(Q, data["p"], data["G"], data["h"], data["A"], data["b"], compile=c) for c in (False, True))
        assert bool((compiled.status == QPStatus.SOLVED).all())
        torch.testing.assert_close(compiled.z, eager.z, rtol=1e-9, atol=1e-10)


def test_diagonal_path_certifies_infeasible_and_unbounded_elements(monkeypatch):
    """Elements whose outcome is known by construction, on the diagonal path: bounds that contradict
    (l > u), equalities the box excludes, and a free direction of a zero-Q variable with falling cost."""
    monkeypatch.setattr(forward, "DIAGONAL_MIN_N", 1)
    data = box_qp(4, 8, 1)
    Q, p, h, A, b = (data[k].clone() for k in ("Q", "p", "h", "A", "b"))
    n = Q.shape[-1]
    h[1, 2], h[1, n + 2] = -1.0, -1.0  # z_2 <= -1 and z_2 >= 1
    A[2], b[2] = torch.ones(n), 10.0 * n  # sum(z) = 10 n, but every |z_j| < 2
    G = data["G"].clone()
    G[3, 0], p[3, 0], Q[3, 0, 0] = 0.0, 1.0, 0.0  # z_0 keeps its lower bound only; its cost falls without end
    G[3, n, 0] = 0.0  # ... and loses that too: a row of zeros (0 <= h) stays
    A[3, :, 0] = 0.0
    assert bool(diagonal_h(Q, G))
    sol = solve_qp(Q, p, G, h, A, b, on_failure="ignore")
    expected = [QPStatus.SOLVED, QPStatus.PRIMAL_INFEASIBLE, QPStatus.PRIMAL_INFEASIBLE, QPStatus.DUAL_INFEASIBLE]
    assert [QPStatus(int(v)) for v in sol.status] == expected
