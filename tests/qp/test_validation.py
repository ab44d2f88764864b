"""Every bad input raises a message naming the argument, the expected shape and what was given."""
import pytest
import torch

from optlayers import ConeLayer, ConeSpec, OptNet, OptNetTV, QPFunction, Relaxation, Status, solve_cone, solve_qp


def good():
    return dict(Q=torch.eye(3), p=torch.ones(3), G=torch.eye(3), h=torch.ones(3), A=torch.ones(1, 3), b=torch.ones(1))


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (lambda: dict(Q=torch.eye(4)), ValueError, r"Q must have shape \(\.\.\., 3, 3\) .* got \(4, 4\)"),
        (lambda: dict(Q=torch.ones(3)), ValueError, r"Q must have shape"),
        (lambda: dict(p=torch.ones(0)), ValueError, r"p must have shape \(\.\.\., n\) with n >= 1"),
        (lambda: dict(G=torch.ones(2, 4)), ValueError, r"G must have shape \(\.\.\., k, 3\) .* got \(2, 4\)"),
        (lambda: dict(p=torch.ones(2)), ValueError,
         r"p must have shape \(\.\.\., 3\) to match Q of shape \(3, 3\) and G of shape \(3, 3\) and A of shape \(1, 3\) .*got \(2,\)"),
        (lambda: dict(p=torch.ones(4), G=torch.ones(2, 4)), ValueError, r"Q must have shape \(\.\.\., 4, 4\) to match p of shape \(4,\)"),
        (lambda: dict(h=torch.ones(2)), ValueError, r"h must have shape \(\.\.\., 3\) to match G of shape \(3, 3\), got \(2,\)"),
        (lambda: dict(b=torch.ones(2)), ValueError, r"b must have shape \(\.\.\., 1\)"),
        (lambda: dict(h=None), ValueError, r"G was given without h"),
        (lambda: dict(A=None), ValueError, r"b was given without A"),
        (lambda: dict(A=torch.ones(3)), ValueError, r"A must have shape \(\.\.\., m, 3\) .* got \(3,\)"),
        (lambda: dict(G=torch.ones(0, 3)), ValueError, r"G has no rows \(shape \(0, 3\)\) but h has shape \(3,\)"),
        (lambda: dict(b=torch.ones(0)), ValueError, r"b has no rows \(shape \(0,\)\) but A has shape \(1, 3\)"),
        (lambda: dict(Q=torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])), ValueError, r"Q must be symmetric"),
        (lambda: dict(p=torch.tensor([1.0, float("nan"), 0.0])), ValueError, r"p contains NaN or Inf"),
        (lambda: dict(h=torch.tensor([1.0, -float("inf"), 0.0])), ValueError, r"h contains NaN or -inf at batch elements .*Gz ≤ -inf has no solution"),
        (lambda: dict(Q=torch.eye(3, dtype=torch.int64)), TypeError, r"Q must be float32 or float64, got torch.int64"),
        (lambda: dict(G=torch.eye(3, dtype=torch.float32)), TypeError, r"G has dtype torch.float32 but p has dtype torch.float64"),
        (lambda: dict(Q=[[1.0]]), TypeError, r"Q must be a torch.Tensor, got list"),
        (lambda: dict(p=torch.ones(2, 3), h=torch.ones(4, 3)), ValueError, r"batch dimensions .* do not broadcast .*p: \(2,\).*h: \(4,\)"),
        (lambda: dict(Q=torch.eye(3).to_sparse()), TypeError, r"Q must be a dense tensor"),
    ],
)
def test_bad_data(change, error, pattern):
    with pytest.raises(error, match=pattern):
        solve_qp(**{**good(), **change()})


@pytest.mark.parametrize("change, pattern", [
    (lambda: dict(Q=torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])), r"Q must be symmetric"),
    (lambda: dict(p=torch.tensor([1.0, float("nan"), 0.0])), r"p contains NaN or Inf"),
    (lambda: dict(b=torch.tensor([float("inf")])), r"b contains NaN or Inf"),
    (lambda: dict(Q=torch.diag(torch.tensor([1.0, -1e-3, 1.0]))), r"Q must be positive semidefinite"),
])
@pytest.mark.parametrize("structure", [False, True])
def test_compiled_path_checks_values_alike(eager_backend, monkeypatch, change, pattern, structure):
    """compile=True tests the values in its compiled call (with the solve, or with the structure's
    test where that is looked at), then names the culprit alike."""
    from optlayers.qp import forward

    monkeypatch.setattr(forward, "DIAGONAL_MIN_N", 1 if structure else 10**9)
    with pytest.raises(ValueError, match=pattern):
        solve_qp(**{**good(), **change()}, compile=True)


def test_a_q_that_is_not_semidefinite_is_refused_naming_its_elements():
    """An indefinite Q (eigenvalues -1.76 and 1.29, a box -1 <= z <= 1) was taken and reported SOLVED
    at z = (-1, -1), f = -1.497, where the vertex (1, 1) gives -1.802: the interior point method's
    H = Q + GᵀWG + ρI can be positive definite all the same. It is refused as non-finite data is."""
    box = dict(G=torch.cat([torch.eye(2), -torch.eye(2)]).double(), h=torch.ones(4, dtype=torch.float64))
    Q = torch.stack([torch.eye(2), torch.tensor([[-1.0, 1.2], [1.2, 0.6]]), torch.eye(2)]).double()
    assert torch.linalg.eigvalsh(Q[1]).amin() < -1.0
    p = torch.tensor([0.1, -0.2], dtype=torch.float64).expand(3, 2)
    lowest = torch.linalg.eigvalsh(Q[1]).amin() / Q[1].abs().max()  # the message says how far from semidefinite
    with pytest.raises(ValueError, match=r"Q must be positive semidefinite .* at batch elements 1 \(flattened\): its "
                                         rf"smallest eigenvalue is {float(lowest):.3g}·max\|Q\|"):
        solve_qp(Q, p, **box)
    with pytest.raises(ValueError, match=r"Q must be positive semidefinite"):
        QPFunction(verbose=-1)(Q, p, box["G"], box["h"], torch.Tensor(), torch.Tensor())
    # one Q shared by the batch (an OptNet layer's) is factorised once, and blamed as such
    with pytest.raises(ValueError, match=r"Q must be positive semidefinite .* \(the one Q shared by the batch\)"):
        solve_qp(Q[1], p, **box)


def test_semidefinite_q_at_the_rounding_of_float32_is_taken():
    """Q = L Lᵀ formed in float32 with L of rank 4 < n = 10 (eigenvalues down to -1e-7 of max|Q|, and
    asymmetric by its rounding), then converted to float64, is taken (the test is to float32's √ε
    whatever the dtype), as are zero and singular Q, and solved as (Q + Qᵀ)/2 would be."""
    L = torch.randn(16, 10, 4, generator=torch.Generator().manual_seed(0))
    Q = (L @ L.mT).double()
    assert torch.linalg.eigvalsh(0.5 * (Q + Q.mT)).amin() < 0  # not semidefinite in float64 itself
    p = torch.randn(16, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    G = torch.cat([torch.eye(10), -torch.eye(10)]).double()
    h = torch.ones(20, dtype=torch.float64)
    sol = solve_qp(Q, p, G, h)
    assert bool((sol.status == Status.SOLVED).all())
    torch.testing.assert_close(sol.z, solve_qp(0.5 * (Q + Q.mT), p, G, h).z, rtol=0, atol=1e-7)
    lp = solve_qp(torch.zeros(16, 10, 10, dtype=torch.float64), p, G, h)
    assert bool((lp.status == Status.SOLVED).all())
    torch.testing.assert_close(lp.z, -p.sign(), rtol=0, atol=1e-6)  # min pᵀz over the box: a vertex


@pytest.mark.parametrize("route", ["engine", "torch"])
def test_semidefiniteness_at_the_orders_the_engine_factorises_itself(route, monkeypatch):
    """At n = 60 (LAPACK's ``potf2`` on an AMD processor with torch's MKL, ``engine.lapack``; torch's
    Cholesky elsewhere, and with ``route="torch"``) the test takes Q = LLᵀ of rank 20 formed in
    float32 and refuses Q with one eigenvalue of -1e-2·max|Q|, eagerly and compiled (dynamo, eager
    backend), element by element."""
    from optlayers.engine import lapack
    from optlayers.validation.qp import semidefinite
    if route == "torch":
        monkeypatch.setattr(lapack, "used_for", lambda M: False)
    gen = torch.Generator().manual_seed(3)
    L = torch.randn(2, 60, 20, generator=gen)
    low_rank = (L @ L.mT).double()
    V = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=torch.float64))[0]
    eigenvalues = torch.linspace(0.0, 1.0, 60, dtype=torch.float64)
    eigenvalues[0] = -1e-2  # below -δ = -DATA_TOL·max|Q| (max|Q| <= 1)
    mixed = torch.stack([low_rank[0], (V * eigenvalues) @ V.mT, low_rank[1]])
    compiled = torch.compile(semidefinite, fullgraph=True, backend="eager")
    for test in (semidefinite, compiled):
        assert test(mixed).tolist() == [True, False, True]


BAD_QP_OPTIONS = [
    (dict(tol=-1.0), r"tol must be a finite number >= 0 or None, got -1.0"),
    (dict(tol=float("nan")), r"tol must be a finite number >= 0 or None, got nan"),
    (dict(rel_tol=float("inf")), r"rel_tol must be a finite number >= 0 or None, got inf"),
    (dict(tol=True), r"tol must be a finite number >= 0 or None, got True"),
    (dict(tol="1e-6"), r"tol must be a finite number"),
    (dict(tol=0.0), r"tol=0.0 with rel_tol=None \(rel_tol defaults to tol\) asks for residuals below float64's"),
    (dict(tol=0.0, rel_tol=0.0), r"below float64's resolution"),
    (dict(tol=1e-300), r"below float64's resolution"),
    (dict(max_iter=0), r"max_iter must be an integer >= 1 or None, got 0"),
    (dict(max_iter=2.5), r"max_iter must be an integer >= 1 or None, got 2.5"),
    (dict(max_iter=True), r"max_iter must be an integer >= 1 or None, got True"),
    (dict(on_failure="explode"), r"on_failure must be one of \('raise', 'warn', 'ignore', 'relax'\), got 'explode'"),
    (dict(failed_value="zero"), r"failed_value must be a float"),
    (dict(failed_value=float("inf")), r"failed_value must be a float \(NaN, or a finite value such as 0.0\), got inf"),
]


@pytest.mark.parametrize("options, pattern", BAD_QP_OPTIONS)
def test_bad_options(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        solve_qp(**good(), **options)


@pytest.mark.parametrize("options, pattern", BAD_QP_OPTIONS)
def test_qpfunction_refuses_the_same_options_at_construction(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        QPFunction(**options)


@pytest.mark.parametrize("layer", ["optnet", "tv"])
@pytest.mark.parametrize("options, pattern", [o for o in BAD_QP_OPTIONS if "rel_tol" not in o[0]])
def test_optnet_layers_refuse_the_same_options(layer, options, pattern):
    with pytest.raises(ValueError, match=pattern):
        OptNet(3, n_ineq=2, **options) if layer == "optnet" else OptNetTV(5, lam=1.0, **options)


@pytest.mark.parametrize("verbose, level", [(False, 0), (True, 1), (-1, -1), (2, 2)])
def test_qpfunction_verbose_takes_qpths_bools(verbose, level):
    """qpth's code passes verbose=False (and True); qpth reads them as 0 and 1."""
    layer = QPFunction(verbose=verbose)
    assert layer.verbose == level and type(layer.verbose) is int
    assert layer.on_failure == ("ignore" if level < 0 else "warn")


@pytest.mark.parametrize("verbose", [0.5, "1", None])
def test_qpfunction_verbose_must_be_an_int_or_a_bool(verbose):
    with pytest.raises(ValueError, match=f"verbose must be an integer .* or a bool, got {verbose!r}"):
        QPFunction(verbose=verbose)


@pytest.mark.parametrize("keyword", ["maxIter", "max_iter"])
def test_qpfunction_names_the_iteration_limit_as_given(keyword):
    with pytest.raises(ValueError, match=f"^{keyword} must be"):
        QPFunction(**{keyword: 0})


@pytest.mark.parametrize("layer", ["optnet", "tv"])
def test_layer_inputs_are_checked(layer):
    module = (OptNet(3, n_ineq=2) if layer == "optnet" else OptNetTV(3, lam=1.0)).double()
    name = "p" if layer == "optnet" else "y"
    with pytest.raises(TypeError, match=f"{name} must be a torch.Tensor of shape \\(\\*, 3\\), got list"):
        module([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=f"{name} must have shape \\(\\*, 3\\), got \\(2, 4\\)"):
        module(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match=f"{name} has dtype torch.float32 but the layer's parameters are torch.float64"):
        module(torch.zeros(2, 3, dtype=torch.float32))
    # another device than the layer's (the meta device stands in for a GPU): the input is named, not
    # the Q the layer formed ("Q is on meta but p is on cpu")
    with pytest.raises(ValueError, match=f"{name} is on cpu but the layer's parameters are on meta; move the input"):
        module.to("meta")(torch.zeros(2, 3, dtype=torch.float64))


def test_layer_flags_must_be_bools():
    with pytest.raises(ValueError, match="nonnegative must be True or False, got 'yes'"):
        OptNet(3, nonnegative="yes")
    with pytest.raises(ValueError, match="learn_d must be True or False, got 1"):
        OptNetTV(5, lam=1.0, learn_d=1)
    with pytest.raises(TypeError, match="relaxation must be an optlayers.qp.relax.Relaxation"):
        OptNet(3, relaxation={"penalty": 1.0})
    with pytest.raises(ValueError, match=r"Relaxation.penalty must be a finite number > 0, got 0"):
        Relaxation(penalty=0)


def test_zero_absolute_tolerance_with_a_relative_one_solves():
    sol = solve_qp(**good(), tol=0.0, rel_tol=1e-12)
    assert int(sol.status) == Status.SOLVED and int(sol.iterations) < 100


CONE_ARGS = dict(A=torch.tensor([[-1.0, 0.0], [0.0, -1.0], [1.0, 1.0]]), b=torch.tensor([0.0, 0.0, 1.0]),
                 c=torch.tensor([-1.0, -2.0]), cones=ConeSpec(nonneg=3))


@pytest.mark.parametrize("solver, options, pattern", [
    ("ipm", {"max_iter": 0}, r"ConeIPMSettings.max_iter must be an int >= 1, got 0"),
    ("ipm", {"tol": 0.0}, r"ConeIPMSettings.tol must be a number in \(0.0, 1.0\), got 0.0"),
    ("ipm", {"tol": float("nan")}, r"ConeIPMSettings.tol must be a number"),
    ("clarabel", {"max_iter": 0}, r"solver_options\['max_iter'\] must be an integer >= 1, got 0"),
    ("clarabel", {"max_iter": True}, r"solver_options\['max_iter'\] must be of the type of Clarabel's default"),
    ("clarabel", {"tol_gap_abs": -1.0}, r"solver_options\['tol_gap_abs'\] must be a finite number >= 0"),
    ("clarabel", {"tol_feas": float("nan")}, r"solver_options\['tol_feas'\] must be a finite number > 0"),
    ("clarabel", {"tol_gap_abs": 0.0, "tol_gap_rel": 0.0}, r"tol_gap_abs and tol_gap_rel cannot both be 0"),
    ("clarabel", {"tolerance": 1e-8}, r"must be clarabel.DefaultSettings attributes, got \['tolerance'\]"),
    ("clarabel", {"time_limit": 0.0}, r"time_limit'\] must be > 0 seconds"),
    ("scs", {"max_iters": 0}, r"solver_options\['max_iters'\] must be an integer >= 1, got 0"),
    ("scs", {"eps_abs": -1.0}, r"solver_options\['eps_abs'\] must be a finite number >= 0"),
    ("scs", {"eps_abs": 0.0, "eps_rel": 0.0}, r"eps_abs and eps_rel cannot both be 0"),
    # values the solvers refuse themselves, which a solve would have read as a failed factorisation (SCS)
    # or raised raw (Clarabel), and a value Clarabel takes and then fails every solve with
    ("scs", {"alpha": 5.0}, r"solver_options\['alpha'\] = 5.0 is refused by SCS \(ValueError: alpha must be in"),
    ("scs", {"normalize": "yes"}, r"solver_options\['normalize'\] = 'yes' is refused by SCS \(TypeError"),
    ("scs", {"use_indirect": True}, r"solver_options\['use_indirect'\] = True is refused by SCS"),
    ("clarabel", {"max_iter": -1}, r"solver_options\['max_iter'\] = -1 is refused by Clarabel \(OverflowError"),
    ("clarabel", {"direct_solve_method": "bogus"}, r"solver_options\['direct_solve_method'\] = 'bogus' is refused by Clarabel"),
    ("clarabel", {"max_step_fraction": 2.0}, r"solver_options\['max_step_fraction'\] must be in \(0.0, 1.0\], got 2.0"),
])
def test_cone_solver_options_refused_at_the_door(solver, options, pattern):
    if solver != "ipm":
        pytest.importorskip(solver)
    with pytest.raises(ValueError, match=pattern):
        solve_cone(**CONE_ARGS, solver=solver, solver_options=options)
    with pytest.raises(ValueError, match=pattern):
        ConeLayer(CONE_ARGS["cones"], solver=solver, solver_options=options)


def test_cone_layer_refuses_bad_policy_at_construction():
    with pytest.raises(ValueError, match=r"on_failure must be one of \('raise', 'warn', 'ignore'\), got 'relax'"):
        ConeLayer(CONE_ARGS["cones"], on_failure="relax")
    with pytest.raises(ValueError, match=r"refine_steps must be an integer >= 0, got True"):
        ConeLayer(CONE_ARGS["cones"], refine_steps=True)


def test_check_q_spd_refuses_torch_func_transforms_with_a_reason():
    Q, p = torch.eye(2, dtype=torch.float64).expand(3, 2, 2), torch.ones(3, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="check_Q_spd=True reads Q's Cholesky factorisation on the host"):
        torch.func.vmap(lambda q, v: QPFunction(check_Q_spd=True)(q, v))(Q, p)
    torch.testing.assert_close(torch.func.vmap(lambda q, v: QPFunction()(q, v))(Q, p), -p)


def test_non_finite_data_names_the_batch_elements():
    p = torch.ones(4, 2, dtype=torch.float64)
    p[1, 0], p[3, 1] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"p contains NaN or Inf at batch elements 1, 3 \(flattened\)"):
        QPFunction()(torch.eye(2, dtype=torch.float64), p)


@pytest.mark.parametrize("layer", ["optnet", "tv"])
def test_optnet_layers_take_the_compiled_path_switch(layer, monkeypatch):
    """``compile=True`` reaches solve_qp (docs/qp.md tells a compiled model's layer to take it);
    a non-bool is refused, naming it."""
    import optlayers.layers as layers

    seen = []
    real = layers.solve_qp

    def spy(*args, **kwargs):
        seen.append(kwargs["compile"])
        return real(*args, **{**kwargs, "compile": False})  # the compiled path itself: test_compiling.py
    monkeypatch.setattr(layers, "solve_qp", spy)
    make = (lambda **kw: OptNet(3, n_ineq=2, **kw)) if layer == "optnet" else (lambda **kw: OptNetTV(5, lam=1.0, **kw))
    for flag in (True, False):
        module = make(compile=flag).double()
        module(torch.randn(2, module.n if layer == "optnet" else 5, dtype=torch.float64))
    assert seen == [True, False]
    with pytest.raises(ValueError, match="compile must be True or False, got 1"):
        make(compile=1)


def test_a_layer_input_of_an_unsolvable_dtype_is_not_answered_by_converting_the_layer_to_it():
    layer = OptNet(3, n_ineq=2, dtype=torch.float32)
    with pytest.raises(TypeError) as error:
        layer(torch.randint(0, 3, (4, 3)))
    assert "p has dtype torch.int64 but the layer's parameters are torch.float32; convert the input (p.to(torch.float32))" \
        in str(error.value)
    assert "layer.to" not in str(error.value)


def test_a_layer_in_half_precision_is_named_as_such():
    with pytest.raises(TypeError, match=r"the layer's parameters are torch.bfloat16, which the solver does not take "
                                        r"\(float32 or float64\); convert the layer \(layer.to\(torch.float32\)\) and its input p"):
        OptNet(3, n_ineq=2).to(torch.bfloat16)(torch.randn(4, 3, dtype=torch.bfloat16))


def test_large_finite_data_whose_sum_overflows():
    """The value check sums each tensor (one reduction): in float32, bounds of 1e38 overflowed that
    sum and the check crashed with an internal torch error; it sums in float64 now, and data whose
    float64 sum overflows are refused by name."""
    Q, G = torch.eye(3), torch.cat([torch.eye(3), -torch.eye(3)])
    p = torch.randn(4, 3)
    box = solve_qp(Q.float(), p.float(), G.float(), torch.full((6,), 1e38, dtype=torch.float32))
    assert (box.status == 0).all()
    torch.testing.assert_close(box.z, -p.float(), rtol=1e-5, atol=1e-5)  # no bound active: z = -p
    huge = torch.full((6,), torch.finfo(torch.float64).max)
    with pytest.raises(ValueError, match=r"h has entries so large \(up to 1.8e\+308\) that their sum overflows float64"):
        solve_qp(Q, p, G, huge)


def test_an_absent_bound_as_a_row_of_zeros_costs_nothing():
    """The advice of the messages and docs/qp.md: a row of zeros in G with h = 1 is never active, and
    the solve takes the solution and the iterations of the problem without it."""
    L = torch.randn(4, 6, 6)
    Q, p = L @ L.mT + torch.eye(6), torch.randn(4, 6)
    G, h = torch.eye(6).expand(4, 6, 6), torch.full((4, 6), 0.3)
    without = solve_qp(Q, p, G, h)
    padded = solve_qp(Q, p, torch.cat([G, torch.zeros(4, 3, 6)], 1), torch.cat([h, torch.ones(4, 3)], 1))
    torch.testing.assert_close(padded.z, without.z, rtol=1e-9, atol=1e-9)
    assert torch.equal(padded.iterations, without.iterations)
    assert float(padded.lam[:, 6:].abs().max()) < 1e-9
