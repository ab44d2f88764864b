"""Ruiz equilibration (``qp.scaling.equilibrate``) against a plain float64 Ruiz on the explicit KKT matrix."""
from __future__ import annotations

import dataclasses

import torch

from optlayers import host
from optlayers.engine.step import QPData
from optlayers.qp.problem import prepare_qp, qp_data
from optlayers.qp.scaling import equilibrate
from tests.qp.qp_problems import random_qp


def _data(seed: int, batch: int = 3, n: int = 8, k: int = 6, m: int = 2, spread: float = 0.0) -> QPData:
    """Random QPs whose rows and columns are scaled by factors 10^u, u uniform in ±``spread``."""
    torch.manual_seed(seed)
    qp = random_qp((batch,), n, k, m)
    flat, _ = prepare_qp(*(qp[key] for key in ("Q", "p", "G", "h", "A", "b")))
    data = qp_data(*flat)
    if spread:
        d, e, f = (10.0 ** (spread * (2 * torch.rand(batch, size, dtype=torch.float64) - 1)) for size in (n, m, k))
        data = dataclasses.replace(data, Q=d.unsqueeze(-1) * data.Q * d.unsqueeze(-2), A=e.unsqueeze(-1) * data.A,
                                   G=f.unsqueeze(-1) * data.G, b=e * data.b, h=f * data.h)
    return data


def _kkt(data: QPData) -> torch.Tensor:
    """|[[Q, Aᵀ, Gᵀ], [A, 0, 0], [G, 0, 0]]| (B, N, N) in float64."""
    C = torch.cat([data.A, data.G], dim=-2)
    zeros = C.new_zeros(C.shape[0], C.shape[1], C.shape[1])
    return torch.cat([torch.cat([data.Q, C.mT], -1), torch.cat([C, zeros], -1)], -2).abs()


def _reference_scales(data: QPData, iterations: int) -> torch.Tensor:
    """[d, e, f] of plain Ruiz in float64, with the same guard on the norms."""
    K = _kkt(data)
    s = K.new_ones(K.shape[:-1])
    for _ in range(iterations):
        norms = (s.unsqueeze(-1) * K * s.unsqueeze(-2)).amax(-1)
        s = s * torch.where(norms > 0, norms.clamp(1e-4, 1e4).rsqrt(), 1.0)
    return s


def test_the_scalings_are_plain_ruizs_on_the_explicit_kkt_matrix():
    """... rounded to the nearest powers of two (exact scalings, ``scaling._power_of_two``)."""
    data = _data(0, spread=6.0)
    _, sc = equilibrate(data)
    ref = _reference_scales(data, 10)
    scales = torch.cat([sc.d, sc.e, sc.f], -1)
    assert (torch.frexp(scales).mantissa == 0.5).all(), scales
    assert ((scales / ref).log2().abs() <= 0.5 + 1e-9).all(), scales / ref
    assert (_reference_scales(data, 10) / _reference_scales(data, 1) - 1).abs().max() > 1e-2  # the iterations matter here


def test_the_scaled_data_are_the_data_times_the_scalings():
    data = _data(4, spread=2.0)
    scaled, sc = equilibrate(data)
    c, d = sc.c, sc.d
    torch.testing.assert_close(scaled.Q, c[:, None, None] * d.unsqueeze(-1) * data.Q * d.unsqueeze(-2), rtol=1e-15, atol=0)
    torch.testing.assert_close(scaled.G, sc.f.unsqueeze(-1) * data.G * d.unsqueeze(-2), rtol=1e-15, atol=0)
    torch.testing.assert_close(scaled.A, sc.e.unsqueeze(-1) * data.A * d.unsqueeze(-2), rtol=1e-15, atol=0)
    torch.testing.assert_close(scaled.p, c[:, None] * d * data.p, rtol=1e-15, atol=0)
    assert scaled.Q.dtype == scaled.p.dtype == sc.d.dtype == torch.float64


def test_huge_rows_are_clamped_by_the_norm_guard():
    data = _data(5)
    G = data.G.clone()
    G[:, 0] *= 1e300  # a row of norm ~1e300: scaled as if its norm were 1e4 (each iteration)
    data = dataclasses.replace(data, G=G, h=data.h * 1.0)
    _, sc = equilibrate(data)
    ref = _reference_scales(data, 10)
    assert torch.isfinite(torch.cat([sc.d, sc.e, sc.f, sc.c[:, None]], -1)).all()
    # ref's nearest powers of two, times the variables' scale t, a power of two (d·t, e/t, f/t): here
    # the other rows' right-hand sides come out of the equilibration at about 1e20, and t brings them back
    ratio = (torch.cat([sc.d, sc.e, sc.f], -1) / ref).log2()
    n = sc.d.shape[-1]
    log_t = ratio[:, :n].mean(-1, keepdim=True).round()
    assert ((ratio[:, :n] - log_t).abs() <= 0.5 + 1e-9).all() and ((ratio[:, n:] + log_t).abs() <= 0.5 + 1e-9).all()


def test_a_batch_equilibrated_in_slices_is_scaled_as_a_whole(monkeypatch):
    """On the CPU with one thread large batches are equilibrated in cache-sized slices: each
    problem's scaling and scaled data are bit for bit those of the whole batch."""
    from optlayers.qp import scaling

    data = _data(5, batch=7, spread=3.0)
    whole_data, whole = equilibrate(data)
    per_problem = (8 + 2 + 6) * 8 * 8  # bytes of |Q| and |[A; G]| of one problem
    monkeypatch.setattr(scaling, "_SLICE_BYTES", 3 * per_problem)  # slices of 3, 3 and 1
    calls = []
    original = scaling._equilibrate
    monkeypatch.setattr(scaling, "_equilibrate", lambda d, it: calls.append(d.p.shape[0]) or original(d, it))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    equilibrate(data)
    assert calls == [7]  # with several threads the batch is equilibrated whole
    calls.clear()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    sliced_data, sliced = equilibrate(data)
    assert calls == [3, 3, 1]
    calls.clear()
    with host.accelerator_schedule():  # as an accelerator runs it (and ``benchmarks/kernels.py`` counts it)
        equilibrate(data)
    assert calls == [7]
    for name in ("d", "e", "f", "c"):
        assert torch.equal(getattr(sliced, name), getattr(whole, name)), name
    for name in ("Q", "p", "A", "b", "G", "h"):
        assert torch.equal(getattr(sliced_data, name), getattr(whole_data, name)), name


def _integer_data() -> QPData:
    """One QP of small integers (after Maros–Meszaros' QPTEST), whose Ruiz scalings converge to odd
    powers of √2 such as 1/√8: halfway between two powers of two, where any difference in the norms'
    rounding picks the other one."""
    d = torch.float64
    Q = torch.tensor([[8.0, 2, 0, 0], [2, 10, 0, 0], [0, 0, 8, 0], [0, 0, 0, 2]], dtype=d)
    G = torch.tensor([[-1.0, 2, 0, 0], [1, 0, 0, 0], [-2, -1, 1, 0]], dtype=d)
    A = torch.tensor([[0.0, 0, 1, 1]], dtype=d)
    p, b, h = (torch.tensor(v, dtype=d) for v in ([1.5, -2, 1, 0], [1.0], [6.0, 20, -2]))
    return QPData(Q[None], p[None], A[None], b[None], G[None], h[None])


def test_compiled_equilibration_loops_over_the_iterations_with_the_eager_result(monkeypatch):
    """Under compilation on the CPU the Ruiz iterations are one ``while_loop`` (``scaling._looped``)
    rather than written out, and give the eager scalings and scaled data bit for bit (inductor), on
    badly scaled random problems and on integer data whose scalings fall halfway between powers of two
    (where norms taken in another precision on one path, float32 for the eager one, gave QPTEST another
    scaling and another iteration count than the compiled path)."""
    from optlayers.compiling import CPU_OPTIONS
    from optlayers.qp import scaling

    random, integer = _data(6, batch=2, n=4, k=3, m=1, spread=3.0), _integer_data()
    data = QPData(*(torch.cat([getattr(random, name), getattr(integer, name)])
                    for name in ("Q", "p", "A", "b", "G", "h")))
    turns = []
    original = scaling._looped
    monkeypatch.setattr(scaling, "_looped", lambda step, x, iterations: turns.append(iterations) or original(step, x, iterations))
    torch._dynamo.reset()
    try:
        compiled = torch.compile(equilibrate, fullgraph=True, dynamic=False, options=CPU_OPTIONS)
        got_data, got = compiled(data)
    finally:
        torch._dynamo.reset()
    assert turns == [scaling.RUIZ_ITERATIONS]
    want_data, want = equilibrate(data)
    for name in ("d", "e", "f", "c"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    for name in ("Q", "p", "A", "b", "G", "h"):
        assert torch.equal(getattr(got_data, name), getattr(want_data, name)), name
