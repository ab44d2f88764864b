import numpy as np
import pytest
import torch

from optlayers import OptNet, OptNetTV, Status
from optlayers.layers import first_difference

DTYPE = torch.float64


def _scramble(layer: torch.nn.Module, scale: float = 3.0) -> None:
    with torch.no_grad():
        for param in layer.parameters():
            param.copy_(scale * torch.randn_like(param))


@pytest.mark.parametrize("n_ineq,n_eq,nonnegative", [(6, 2, False), (0, 3, True), (4, 0, True), (5, 0, False)])
def test_optnet_is_feasible_by_construction(n_ineq, n_eq, nonnegative):
    torch.manual_seed(0)
    layer = OptNet(5, n_ineq=n_ineq, n_eq=n_eq, nonnegative=nonnegative, dtype=DTYPE)
    for _ in range(3):
        _scramble(layer)
        _, G, h, A, b = layer.qp_data()
        z0 = layer.z0
        if G is not None:
            assert (G @ z0 < h).all(), "z0 must be strictly feasible for any parameter value"
        if A is not None:
            torch.testing.assert_close(A @ z0, b)
        z = layer(torch.randn(7, 5, dtype=DTYPE))
        if G is not None:
            assert (z @ G.T - h).max() < 1e-6
        if A is not None:
            assert (z @ A.T - b).abs().max() < 1e-6
        if nonnegative:
            assert z.min() > -1e-6


def test_optnet_gradients_reach_every_parameter():
    """Every parameter's gradient against a central difference of the loss along a random direction."""
    torch.manual_seed(0)
    layer = OptNet(4, n_ineq=6, n_eq=1, dtype=DTYPE)
    p = torch.randn(3, 4, dtype=DTYPE)

    def loss() -> torch.Tensor:
        return layer(p).square().sum()

    loss().backward()
    eps = 1e-6
    for name, param in layer.named_parameters():
        direction = torch.randn_like(param)
        with torch.no_grad():
            param.add_(eps * direction)
            up = loss()
            param.sub_(2 * eps * direction)
            down = loss()
            param.add_(eps * direction)
        assert param.grad.abs().sum() > 0, name
        torch.testing.assert_close((param.grad * direction).sum(), (up - down) / (2 * eps), rtol=1e-5, atol=1e-7,
                                   msg=name)


def test_optnet_unconstrained_matches_closed_form():
    torch.manual_seed(0)
    layer = OptNet(3, dtype=DTYPE)
    p = torch.randn(2, 3, dtype=DTYPE)
    Q = layer.qp_data()[0]
    torch.testing.assert_close(layer(p), -torch.linalg.solve(Q, p.T).T)


def test_fixed_q_sudoku_variant():
    layer = OptNet(8, n_eq=3, fixed_q=0.1, nonnegative=True, dtype=DTYPE)
    assert {n for n, _ in layer.named_parameters()} == {"A", "z0_raw"}
    torch.testing.assert_close(layer.qp_data()[0], 0.1 * torch.eye(8, dtype=DTYPE))
    assert "fixed_q=0.1" in repr(layer) and "nonnegative=True" in repr(layer)


@pytest.mark.parametrize("kwargs,match", [
    ({"n": 0}, "n must be an integer >= 1, got 0"),
    ({"n": 3, "n_eq": 3}, "n_eq must be < n"),
    ({"n": 3, "n_ineq": -1}, "n_ineq must be an integer >= 0, got -1"),
    ({"n": 3, "eps": -1.0}, "eps must be a finite number >= 0, got -1.0"),
    ({"n": 3, "on_failure": "explode"}, "on_failure must be one of"),
])
def test_optnet_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptNet(**kwargs)


def test_tv_layer_denoises_and_is_feasible_for_any_d():
    torch.manual_seed(0)
    clean = torch.repeat_interleave(torch.tensor([20.0, 60.0, 30.0], dtype=DTYPE), 10)
    noisy = clean + 5 * torch.randn(4, 30, dtype=DTYPE)
    tv = OptNetTV(30, lam=10.0, learn_d=False, dtype=DTYPE)
    assert ((tv(noisy) - clean) ** 2).mean() < ((noisy - clean) ** 2).mean()
    random_tv = OptNetTV(30, lam=10.0, init="random", n_diff=12, dtype=DTYPE)
    _, G, h = random_tv.qp_data()
    assert G.shape == (24, 30 + 12) and (h == 0).all()
    assert random_tv(noisy).shape == (4, 30)


def test_tv_layer_validates():
    with pytest.raises(ValueError, match="lam must be a finite number > 0, got 0"):
        OptNetTV(10, lam=0)
    with pytest.raises(ValueError, match="init must be 'difference' or 'random', got 'x'"):
        OptNetTV(10, lam=1.0, init="x")
    torch.testing.assert_close(first_difference(3), torch.tensor([[-1.0, 1.0, 0.0], [0.0, -1.0, 1.0]]))


def test_mnist_feature_optnet_head_solves_its_qp():
    """The head's z against cvxpy's solution of the same QP, whose z₀(x), s₀(x) come from the features."""
    cp = pytest.importorskip("cvxpy")
    from optlayers.experiments.mnist import FeatureOptNetHead

    torch.manual_seed(0)
    head = FeatureOptNetHead(10, 10, dtype=torch.float64)
    with torch.no_grad():
        head.L.add_(0.3 * torch.tril(torch.rand(10, 10, dtype=torch.float64)))
    x = torch.relu(torch.randn(3, 10, dtype=torch.float64))
    z = head(x).detach().numpy()
    L = torch.tril(head.L).detach().numpy()
    Q = L @ L.T + 1e-4 * np.eye(10)
    G = head.G.detach().numpy()
    h = (head.z0(x) @ head.G.T + torch.nn.functional.softplus(head.s0(x))).detach().numpy()
    for i in range(3):
        v = cp.Variable(10)
        # Clarabel by name: with Gurobi or CPLEX installed cvxpy would pick them, at looser default tolerances
        cp.Problem(cp.Minimize(0.5 * cp.quad_form(v, cp.psd_wrap(Q)) + x[i].numpy() @ v), [G @ v <= h[i]]).solve(solver=cp.CLARABEL)
        np.testing.assert_allclose(z[i], v.value, atol=1e-5)


def test_layers_run_outside_autocast_in_their_own_dtype():
    """Under torch.autocast (bfloat16) OptNet formed Q = LLᵀ + εI and b = A z₀ in bfloat16: with
    equalities the solve refused b ("b must be float32 or float64"), without them z was 2 % off. The
    layers run with autocast off, in their dtype; a bfloat16 input (a layer before under autocast)
    is cast to it."""
    from optlayers import OptNet, OptNetTV

    torch.manual_seed(0)
    layer, tv = OptNet(6, n_ineq=4, n_eq=2, dtype=torch.float32), OptNetTV(8, lam=0.1, dtype=torch.float32)
    p, y = torch.randn(5, 6, dtype=torch.float32), torch.randn(3, 8, dtype=torch.float32)
    plain, plain_tv = layer(p), tv(y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, x = layer(p), tv(y)
        z_low, x_low = layer(p.bfloat16()), tv(y.bfloat16())
    assert z.dtype == x.dtype == z_low.dtype == x_low.dtype == torch.float32
    assert torch.equal(z, plain) and torch.equal(x, plain_tv)
    torch.testing.assert_close(z_low, layer(p.bfloat16().float()), rtol=0, atol=0)
    torch.testing.assert_close(x_low, tv(y.bfloat16().float()), rtol=0, atol=0)


@pytest.mark.parametrize("sizes, warned", [
    (dict(), True),  # no constraints at all
    (dict(n_ineq=2, n_eq=2), True),  # 2 inequalities in the 3 dimensions the equalities leave
    (dict(nonnegative=True), True),  # the orthant: 5 facets in 5 dimensions
    (dict(n_ineq=6), False),
    (dict(n_ineq=2, n_eq=2, nonnegative=True), False),
])
def test_optnet_lp_whose_feasible_set_cannot_be_bounded_warns(sizes, warned):
    """OptNet(fixed_q=0) is an LP: with fewer inequalities than the dimensions the equalities leave
    plus one, its feasible set is unbounded, and every p that decreases along it gave DUAL_INFEASIBLE
    (z = 0, zero gradient, a warning per call) without a word at construction."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer = OptNet(5, fixed_q=0.0, dtype=torch.float64, **sizes)
    said = [str(w.message) for w in caught if "cannot be bounded" in str(w.message)]
    assert bool(said) == warned, said
    if warned:  # and it is so: a p that decreases along the unbounded direction
        p = -torch.ones(1, 5, dtype=torch.float64)
        with pytest.warns(RuntimeWarning):
            layer(p)
        assert int(layer.last_status) == int(Status.DUAL_INFEASIBLE)


@pytest.mark.parametrize("options", [{}, {"fixed_q": 0.5, "nonnegative": True}, {"fixed_q": 0.5}])
@pytest.mark.parametrize("how", ["to_empty", "assign", "skip_init"])
def test_deferred_initialisation_then_a_state_dict_gives_the_layer_it_was_saved_from(options, how):
    """A layer built without memory (torch's meta device, or ``skip_init``) and loaded from a
    state_dict is the saved layer: its Q is formed from parameters and constants, not from a buffer
    left out of the state_dict (which kept uninitialised memory: z 1.5e4 off, silently)."""
    sizes = (6, 4, 1) if "fixed_q" not in options or options.get("nonnegative") else (6,)
    saved = OptNet(*sizes, dtype=torch.float64, **options)
    if how == "skip_init":
        layer = torch.nn.utils.skip_init(OptNet, *sizes, dtype=torch.float64, **options)
        layer.load_state_dict(saved.state_dict())
    else:
        with torch.device("meta"):
            layer = OptNet(*sizes, dtype=torch.float64, **options)
        if how == "to_empty":
            layer = layer.to_empty(device="cpu")
            layer.load_state_dict(saved.state_dict())
        else:
            layer.load_state_dict(saved.state_dict(), assign=True)
    p = torch.randn(3, 6, dtype=torch.float64)
    assert torch.equal(layer(p), saved(p))
    for got, want in zip(layer.qp_data(p), saved.qp_data(p)):
        assert (got is None and want is None) or torch.equal(got, want)
