"""QPFunction as a drop-in for qpth's: qpth's arguments with qpth's meanings, qpth-style calls, and
qpth's own gradient checks (finite differences of an independent solver's solution) through our class."""
import warnings

import numpy as np
import pytest
import torch

from optlayers import QPFunction, QPSolvers, Status
from qp_problems import clarabel_solve

pytest.importorskip("clarabel")


def qpth_problem(nz=10, neq=2, nineq=3, Qscale=1.0, Gscale=1.0, Ascale=1.0, seed=1):
    """The construction of qpth's test.py ``get_grads``: Q = L Lᵀ, a strictly feasible z0."""
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((nz, nz))
    Q = Qscale * L @ L.T
    G = Gscale * rng.standard_normal((nineq, nz))
    z0, s0 = rng.standard_normal(nz), rng.random(nineq)
    h = G @ z0 + s0
    A = Ascale * rng.standard_normal((neq, nz))
    b = A @ z0
    p = rng.standard_normal((1, nz))
    truez = rng.standard_normal((1, nz))
    return {k: torch.tensor(v) for k, v in dict(Q=Q, p=p, G=G, h=h, A=A, b=b, truez=truez).items()}


def qpth_style_layer():
    return QPFunction(eps=1e-12, verbose=-1, notImprovedLim=3, maxIter=50, solver=QPSolvers.PDIPM_BATCHED,
                      check_Q_spd=True)


def clarabel_loss(data, name, value):
    """½‖ẑ − truez‖² with ẑ from Clarabel, ``name`` replaced by ``value``."""
    args = {k: data[k] for k in "QpGhAb"}
    args[name] = value
    args["p"] = args["p"][0]
    z = clarabel_solve(*(args[k] for k in "QpGhAb"))[0]
    return 0.5 * float(np.sum((z - data["truez"][0].numpy()) ** 2))


def finite_difference(data, name, step=1e-6):
    base = data[name].clone()
    grad = torch.zeros_like(base)
    for index in np.ndindex(*base.shape):
        plus, minus = base.clone(), base.clone()
        plus[index] += step
        minus[index] -= step
        grad[index] = (clarabel_loss(data, name, plus) - clarabel_loss(data, name, minus)) / (2 * step)
    return grad


@pytest.mark.parametrize("name, sizes", [
    ("p", dict(neq=2, nineq=3, Qscale=100.0, Gscale=100.0, Ascale=100.0)),
    ("G", dict(neq=0, nineq=3)),
    ("h", dict(neq=0, nineq=3)),
    ("A", dict(neq=3, nineq=1, Qscale=100.0, Gscale=100.0, Ascale=100.0)),
    ("b", dict(neq=3, nineq=1, Qscale=100.0, Gscale=100.0, Ascale=100.0)),
    ("Q", dict(neq=1, nineq=3)),
])
def test_qpth_gradient_checks_through_our_class(name, sizes):
    """qpth's test_dl_dp / dG / dh / dA / db (and dQ), with its problem sizes and scales; qpth's
    tolerance is atol 1e-2, ours is far tighter."""
    data = qpth_problem(**sizes)
    inputs = {k: data[k].clone().requires_grad_() for k in "QpGhAb"}
    empty = torch.Tensor()
    A, b = (inputs["A"], inputs["b"]) if sizes["neq"] else (empty, empty)
    zhat = qpth_style_layer()(inputs["Q"], inputs["p"], inputs["G"], inputs["h"], A, b)
    assert zhat.shape == (1, 10)
    zhat.backward(zhat.detach() - data["truez"])
    if name == "Q":  # qpth symmetrises the Q gradient; finite differences of a symmetric perturbation
        grad = 0.5 * (inputs["Q"].grad + inputs["Q"].grad.T)
        fd = finite_difference(data, "Q")
        fd = 0.5 * (fd + fd.T)
    else:
        grad, fd = inputs[name].grad, finite_difference(data, name)
    scale = float(fd.abs().max())
    np.testing.assert_allclose(grad.numpy(), fd.numpy(), rtol=1e-4, atol=1e-5 * scale)


def test_qpth_call_with_empty_tensors_runs_unchanged():
    data = qpth_problem(neq=0, nineq=4)
    e = torch.Tensor()
    p = data["p"].expand(3, 10) * torch.tensor([[1.0], [2.0], [-1.0]])
    z = QPFunction(verbose=-1)(data["Q"], p, data["G"], data["h"], e, e)
    for i in range(3):
        expected = clarabel_solve(data["Q"], p[i], data["G"], data["h"])[0]
        np.testing.assert_allclose(z[i].numpy(), expected, atol=1e-8)
    # qpth code often makes its empty tensor with the default dtype, whatever the data's
    e32 = torch.empty(0, dtype=torch.float32)
    torch.testing.assert_close(QPFunction(verbose=-1)(data["Q"], p, data["G"], data["h"], e32, e32), z)


def test_unsupported_solver_is_refused_with_the_alternative():
    with pytest.raises(ValueError, match=r"solver=QPSolvers.CVXPY\) is not supported.*solve_qp_cone"):
        QPFunction(solver=QPSolvers.CVXPY)
    with pytest.raises(ValueError, match="solver must be QPSolvers.PDIPM_BATCHED, got 'gurobi'"):
        QPFunction(solver="gurobi")


def test_qpth_and_own_names_for_one_option_are_not_both_accepted():
    with pytest.raises(ValueError, match=r"give eps \(qpth's name\) or tol, not both"):
        QPFunction(eps=1e-8, tol=1e-8)
    with pytest.raises(ValueError, match=r"give maxIter \(qpth's name\) or max_iter, not both"):
        QPFunction(maxIter=10, max_iter=10)
    with pytest.raises(ValueError, match=r"eps=0 with rel_tol=None \(rel_tol defaults to eps\)"):
        QPFunction(eps=0)
    with pytest.raises(ValueError, match="notImprovedLim must be an integer >= 1 or None, got 0"):
        QPFunction(notImprovedLim=0)
    with pytest.raises(ValueError, match="check_Q_spd must be True or False"):
        QPFunction(check_Q_spd="yes")
    with pytest.raises(ValueError, match="verbose must be an integer"):
        QPFunction(verbose="loud")


def test_check_Q_spd_refuses_singular_Q_and_its_default_accepts_it():
    data = qpth_problem(neq=0, nineq=3)
    Q = torch.zeros(10, 10)
    Q[0, 0] = 1.0
    G = torch.cat([torch.eye(10), -torch.eye(10)])
    h = torch.ones(20)
    with pytest.raises(ValueError, match=r"Q is not positive definite \(check_Q_spd=True\)"):
        QPFunction(check_Q_spd=True)(Q, data["p"], G, h)
    z = QPFunction()(Q, data["p"], G, h)
    np.testing.assert_allclose(z[0].numpy(), clarabel_solve(Q, data["p"][0], G, h)[0], atol=1e-8)


def test_check_Q_spd_names_the_elements_as_the_failure_messages_do():
    """The elements whose Q is not positive definite, listed as ``status.listed_elements`` lists
    failed elements (indices, multi-indices, at most ten then how many more); none for unbatched data."""
    G, h = torch.cat([torch.eye(3), -torch.eye(3)]), torch.ones(6)
    fix = "; this solver accepts positive semidefinite Q: pass check_Q_spd=False"
    singular = torch.diag(torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError) as error:
        QPFunction(check_Q_spd=True)(singular, torch.ones(3), G, h)
    assert str(error.value) == "Q is not positive definite (check_Q_spd=True)" + fix
    Q = torch.eye(3).repeat(4, 1, 1)
    Q[2] = singular
    with pytest.raises(ValueError) as error:
        QPFunction(check_Q_spd=True)(Q, torch.ones(4, 3), G, h)
    assert str(error.value) == "Q is not positive definite (check_Q_spd=True) at elements 2" + fix
    with pytest.raises(ValueError) as error:
        QPFunction(check_Q_spd=True)(singular, torch.ones(2, 6, 3), G, h)
    # one Q shared by the batch is tested once and blamed as such (it had been listed as every element)
    assert str(error.value) == "Q is not positive definite (check_Q_spd=True) (the one Q shared by the batch)" + fix
    Q = torch.eye(3).repeat(2, 6, 1, 1)
    Q[1, 2] = singular
    with pytest.raises(ValueError) as error:
        QPFunction(check_Q_spd=True)(Q, torch.ones(2, 6, 3), G, h)
    assert str(error.value) == "Q is not positive definite (check_Q_spd=True) at elements (1, 2)" + fix


def test_maxIter_limits_the_iterations_and_verbose_sets_the_warnings():
    data = qpth_problem(neq=0, nineq=3)
    args = (data["Q"], data["p"], data["G"], data["h"])
    with pytest.warns(RuntimeWarning, match=r"max_iter \(elements 0\).*Their outputs are 0 and their gradients zero"):
        layer = QPFunction(maxIter=2)
        z = layer(*args)
    assert layer.last_status.tolist() == [Status.MAX_ITER] and (z == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = QPFunction(maxIter=2, verbose=-1)
        assert (quiet(*args) == 0).all() and quiet.last_status.tolist() == [Status.MAX_ITER]
        assert QPFunction(maxIter=50, verbose=-1).solve(*args).iterations.item() > 2


def test_verbose_one_prints_a_summary_of_each_solve(capsys):
    data = qpth_problem(neq=0, nineq=3)
    QPFunction(verbose=1)(data["Q"], data["p"], data["G"], data["h"])
    out = capsys.readouterr().out
    assert "QPFunction: 1 QPs, {'SOLVED': 1}" in out and "largest primal residual" in out


def test_notImprovedLim_is_the_stall_limit(monkeypatch):
    from optlayers.qp import solve as solve_module

    seen = []
    real = solve_module.solve_prepared
    monkeypatch.setattr(solve_module, "solve_prepared", lambda flat, batch, settings, *rest: (
        seen.append(settings.stall_limit) or real(flat, batch, settings, *rest)))
    data = qpth_problem(neq=0, nineq=3)
    layer = QPFunction(notImprovedLim=1, verbose=-1)
    sol = layer.solve(data["Q"], data["p"], data["G"], data["h"])
    assert layer.not_improved_lim == 1 and int(sol.status[0]) == Status.SOLVED
    assert seen == [1]  # the solve ran with it


def test_against_qpth_itself_when_installed():
    """Same solutions and gradients as qpth on a well-conditioned batch, except that a shared
    argument's gradient is the sum over the batch here and the mean in qpth."""
    qpth = pytest.importorskip("qpth.qp")
    data = qpth_problem(neq=2, nineq=4)
    p = torch.randn(3, 10)
    ours_in = [data[k].clone().requires_grad_() for k in "QGhAb"]
    theirs_in = [data[k].clone().requires_grad_() for k in "QGhAb"]
    ours = QPFunction(solver=qpth.QPSolvers.PDIPM_BATCHED, verbose=-1)(ours_in[0], p, *ours_in[1:])
    theirs = qpth.QPFunction(verbose=-1)(theirs_in[0], p, *theirs_in[1:])
    np.testing.assert_allclose(ours.detach().numpy(), theirs.detach().numpy(), atol=1e-5)
    ours.square().sum().backward()
    theirs.square().sum().backward()
    for name, a, b in zip("GhAb", ours_in[1:], theirs_in[1:]):
        np.testing.assert_allclose(a.grad.numpy() / 3, b.grad.numpy(), rtol=1e-3, atol=1e-4, err_msg=name)
