"""The QP layer's forward: from the flat data (``problem.prepare_qp``) to the outputs of
``autograd.QPSolveFn.forward``: the data's value checks, their equilibration, the interior point
method (eager, batch-parallel: ``parallel``; or compiled: ``fused``), the solution mapped back, and
what the derivatives keep (``Saved``, the factor's tensors).

On the compiled path a solve that needs no reaction of the host is one compiled call and one read
(``_checked_solved``); see ``outputs``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import Tensor

from optlayers.compiling import compiled, pointwise_cats
from optlayers.engine.batch import map_chunks_joined
from optlayers.engine.device_loop import Layout, Packed, unpack
from optlayers.engine.graphed import graphs_calls
from optlayers.engine.kkt import diagonal_q, rows_touch_one_variable
from optlayers.engine.step import QPData, State
from optlayers.host import host_read, reads_are_free
from optlayers.qp import fused
from optlayers.qp.derivatives import FACTOR_FIELDS, factor_tensors
from optlayers.qp.ipm import COMPUTE_DTYPE, IPMResult, IPMSettings, Residuals, solve_part
from optlayers.qp.parallel import compiled_slices, solve_scaled_parallel
from optlayers.qp.problem import qp_data
from optlayers.qp.scaling import Scaling, equilibrate, unscale_solution
from optlayers.qp.status import QPStatus
from optlayers.validation.qp import check_values, values_pass

N_PUBLIC = 10  # z, lam, nu, s, status, iterations, primal, dual, gap, primal_limit
# From this many variables on, a batch whose H = Q + GᵀWG is diagonal (diagonal Q, bounds such as
# z ≥ 0: ``kkt.diagonal_h``) is recognised and solved with elementwise H solves; below, the dense
# factorisation costs little. Where a host read is not free (an accelerator) the check is a
# synchronisation, so it is made only where the dense factorisation it may save is large.
DIAGONAL_MIN_N = 32
DIAGONAL_MIN_N_ACCELERATOR = 256


def _scaling(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor) -> tuple[QPData, Scaling]:
    """The flat data in ``COMPUTE_DTYPE``, Q symmetrised, equilibrated: the scaled problem and its scaling."""
    return equilibrate(qp_data(*(t.to(COMPUTE_DTYPE) for t in (Q, p, G, h, A, b))))


def _checked_scaling(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor) -> tuple[QPData, Scaling, Tensor]:
    """``_scaling`` and ``values_pass`` in one function to compile: the data's value checks and
    their scaling in one call (the scaling of data that fail the checks is discarded)."""
    return (*_scaling(Q, p, G, h, A, b), values_pass(Q, p, G, h, A, b))


def _looks_at_structure(n: int, device: torch.device) -> bool:
    """Whether ``_with_structure`` looks at a batch of ``n`` variables on ``device`` (see ``DIAGONAL_MIN_N``)."""
    return n >= (DIAGONAL_MIN_N if reads_are_free(device) else DIAGONAL_MIN_N_ACCELERATOR)


def _with_structure(data: QPData) -> QPData:
    """``data`` with ``diagonal`` set where H is diagonal and that pays (see ``DIAGONAL_MIN_N``)."""
    if not _looks_at_structure(data.p.shape[-1], data.p.device):
        return data
    return replace(data, diagonal=_structure(data.Q, data.G))


def _structure(Q: Tensor, G: Tensor) -> bool:
    """Whether H is diagonal for every problem of the batch, scaled or not (``kkt.diagonal_h``'s two
    tests, ``rows_touch_one_variable`` of G and ``diagonal_q`` of Q + Qᵀ: the scaling multiplies by
    powers of two, so that the verdict is the same either way), read by the host: the first
    problem's first, then the whole batch's, each G's rows before Q, so
    that a dense batch is told by one problem's G: 42 µs at batch 1 and at batch 128 (n = 100, one
    thread), where ``diagonal_h`` of the whole batch took 94 µs and 7.6 ms. Eager: a compiled call
    of its own costs more at batch 1."""
    def holds(test: Tensor) -> bool:
        return bool(host_read(test.reshape(1))[0])

    for part in (slice(0, 1),) if Q.shape[0] == 1 else (slice(0, 1), slice(None)):
        q, g = Q[part], G[part]
        if not holds(rows_touch_one_variable(g)) or not holds(diagonal_q(q + q.transpose(-2, -1))):
            return False
    return True


@dataclass(frozen=True)
class Outcome:
    """What the host knows of a forward's solve when it ends, without a read of its own: whether
    every problem was solved (``IPMResult.all_solved``), and whether some solved problem's derivative
    is inexact (``IPMResult.inexact``; known where the derivatives' factorisation was made)."""

    all_solved: bool
    inexact: bool = False
    factor_left: bool | None = None
    """Where the derivatives' factorisation was left to the backward (``_compiled_forward`` in
    chunks), the batch's structure that it takes (``QPData.diagonal``); None elsewhere."""

    @staticmethod
    def of(result: IPMResult) -> Outcome:
        return Outcome(result.all_solved, result.inexact)

    @staticmethod
    def joined(parts: list[Outcome]) -> Outcome:
        """The outcome of a batch solved in ``parts`` (chunks)."""
        return Outcome(all(part.all_solved for part in parts), any(part.inexact for part in parts))


class Saved(NamedTuple):
    """What the derivatives need, in the scaled space: the trailing outputs of ``outputs``, then
    the tensors of the KKT factorisation at the solution when the forward built it (gradients
    were possible then, and the batch was not solved in chunks: ``Outcome.factor_left``); without
    them the compiled backward (``Outcome.factor_left``) or ``KKTSolve`` (a ``jvp`` asked later)
    builds it."""

    Q: Tensor
    A: Tensor
    G: Tensor
    x: Tensor
    nu: Tensor
    lam: Tensor
    s: Tensor
    d: Tensor
    e: Tensor
    f: Tensor
    c: Tensor


def _rows(mask: Tensor, t: Tensor) -> Tensor:
    return mask.view(mask.shape[0], *([1] * (t.dim() - 1)))  # explicit: the batch may be empty


def keep_solved(mask: Tensor, t: Tensor, fill: float) -> Tensor:
    """``t`` (B, ...) where ``mask`` (B,) holds, ``fill`` elsewhere."""
    return torch.where(_rows(mask, t), t, fill)


def _public(sc: Scaling, status: Tensor, st: State, res: Residuals, fill: Tensor) -> tuple[Tensor, ...]:
    """The forward's first outputs (z, λ, ν, s, status, iterations, primal, dual, gap, primal_limit)
    at the final scaled iterate ``st`` (with statuses ``status``) and its residuals: mapped back to
    the original problem, in the dtype of ``fill`` (0-d, the data's dtype), which the failed
    elements of z, λ, ν, s hold; ``primal_limit`` (float64) is the bound of the solver's test of the
    primal residual (``ipm.Residuals.limit``): for float64 data, primal > primal_limit exactly where
    that test failed."""
    solved, dtype = status == int(QPStatus.SOLVED), fill.dtype
    x, nu, lam, s = (keep_solved(solved, v, fill).to(dtype) for v in unscale_solution(sc, st.x, st.nu, st.lam, st.s))
    return (x, lam, nu, s, status, st.iterations, res.primal.to(dtype), res.dual.to(dtype), res.gap.to(dtype),
            res.limit[:, 0])


def _outputs(scaled: QPData, sc: Scaling, result: IPMResult, fill: Tensor) -> tuple[Tensor, ...]:
    """``QPSolveFn.forward``'s outputs from the solver's ``result``: ``_public``, ``_Saved``, the factor's tensors."""
    st = result.state
    factor = () if result.factor is None else factor_tensors(result.factor)
    return (*_public(sc, st.status, st, result.residuals, fill),
            *Saved(scaled.Q, scaled.A, scaled.G, st.x, st.nu, st.lam, st.s, sc.d, sc.e, sc.f, sc.c), *factor)


def _solved(scaled: QPData, sc: Scaling, fill: Tensor, settings: IPMSettings, with_factor: bool,
            halt: Tensor | None = None) -> tuple:
    """``fused.whole`` and the outputs of a forward that ends with it, in one function to compile:
    its info (6,), the packed state (three tensors) and its layout, ``_public`` with ``fill`` (see
    there), the scaled solution (x, ν, λ, s) and the factor's tensors, each in memory of its own;
    ``halt`` as in ``fused.whole``."""
    packed, where, status, factor, info = fused.whole(scaled, sc, settings, with_factor, halt)
    st, res = unpack(packed, where, fused.KINDS)
    public = _public(sc, status, st, res, fill)
    own = tuple(t.clone() for t in (*public[5:], st.x, st.nu, st.lam, st.s))  # views of the packed state
    split = N_PUBLIC - 5
    return info, (packed.real, packed.counts, packed.flags), where, (*public[:5], *own[:split]), own[split:], factor


def _checked_solved(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, fill: Tensor,
                    settings: IPMSettings, with_factor: bool, diagonal: bool) -> tuple:
    """``_checked_scaling`` and ``_solved`` in one function to compile, ``diagonal`` the batch's
    structure (``QPData.diagonal``; found before, ``_structure``): the scaled data (the tensors
    of ``QPData``, in its order) and the scaling's (``Scaling``'s), each in memory of its own, then
    ``_solved``'s outputs, whose info has a seventh entry: whether the data passed the checks (where
    not, no iteration runs)."""
    scaled, sc, passed = _checked_scaling(Q, p, G, h, A, b)
    info, *rest = _solved(replace(scaled, diagonal=diagonal), sc, fill, settings, with_factor, halt=~passed)
    return ((scaled.Q, scaled.p, scaled.A, scaled.b, scaled.G, scaled.h), (sc.d.clone(), sc.e.clone(), sc.f.clone(), sc.c, sc.objective),
            torch.cat([info, passed.reshape(1)]), *rest)


def _compiled_forward(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, settings: IPMSettings,
                      keep_factor: bool, fill: Tensor) -> tuple[tuple[Tensor, ...], Outcome]:
    """``QPSolveFn.forward``'s outputs and the solve's ``Outcome``, on the compiled path
    whose iterations run in one call (``fused.pays``), in equal slices side by side, each in chunks
    one after another (``parallel.compiled_slices``, ``threads.map_chunks``), their outputs joined
    as they come (``batch.map_chunks_joined``).
    A chunk whose solve needs no reaction of the host is one compiled call (``_checked_solved``) and
    one read. Where the structure is looked at (``_looks_at_structure``), the batch's is found once
    before the chunks (``_structure``: one read for a dense batch), and every chunk takes it:
    chunks that disagreed would give factors of different shapes (diagonal or dense), which no
    joined factor holds, and a verdict per chunk would cost each chunk a compiled call, a read and
    a pass over its data more. Otherwise the solve goes on from there (``fused.go_on``). Data that fail the value checks raise, naming their elements in
    the whole batch.

    A batch solved in chunks leaves the derivatives' factorisation to the backward, which makes
    it chunk by chunk (``autograd._sliced_factorising_vjp``; ``Outcome.factor_left``): joined into
    the batch's tensors here, its five matrices per problem (H, C, Y and both factors) were copied
    once more (at batch 128, n = 100, one thread, the join took 32 of 355 ms of a forward +
    backward, most of it theirs), and the work is the same either way."""
    device = p.device.type
    raw = tuple(t.detach() if t.requires_grad else t for t in (Q, p, G, h, A, b))  # one specialisation whichever require gradients
    batch, n = p.shape
    count, chunk = compiled_slices(batch, n, p.device)
    pointwise = pointwise_cats(chunk, n, p.device)
    diagonal = _looks_at_structure(n, p.device) and _structure(raw[0], raw[2])
    checked = compiled(_checked_solved, device, pointwise_cat=pointwise, batched=True)  # once for every batch of two or more
    left = keep_factor and chunk < batch  # the derivatives' factorisation left to the backward
    keep_factor = keep_factor and not left

    def solve(part: slice) -> tuple[tuple[Tensor, ...], Outcome]:
        data = raw if chunk == batch else tuple(t[part] for t in raw)
        scaled, scaling, info, *rest = checked(*data, fill, settings, keep_factor, diagonal)
        info = host_read(info)
        if not info[6]:
            check_values(*raw, False)  # raises, naming the elements in the whole batch
        return _finished(QPData(*scaled, diagonal=diagonal), Scaling(*scaling), info, *rest, settings, keep_factor, fill)

    if chunk == batch:
        return solve(slice(0, batch))
    outs, solved = map_chunks_joined(solve, batch, count, chunk, ragged=_INVERSES if keep_factor else ())
    outcome = replace(Outcome.joined(solved), factor_left=diagonal if left else None)
    return tuple(_inverses(out) if index in _INVERSES else out for index, out in enumerate(outs)), outcome


# Where the factor's inverses (``KKTFactor.inv_h``, ``inv_s``) sit among the forward's outputs.
_INVERSES = tuple(N_PUBLIC + len(Saved._fields) + FACTOR_FIELDS.index(name) for name in ("inv_h", "inv_s"))


def _inverses(parts: list[Tensor]) -> Tensor:
    """The factor's inverses of consecutive chunks, joined. They only speed up its solves: where the
    chunks disagree on having them (a chunk's factorisation retried eagerly has none), the batch
    has none ((B, 0, 0), the factor's solves then triangular)."""
    if len({part.shape[1:] for part in parts}) > 1:
        return parts[0].new_empty(sum(part.shape[0] for part in parts), 0, 0)
    return torch.cat(parts)


def _finished(scaled: QPData, sc: Scaling, info: list[int], packed: tuple[Tensor, ...], where: Layout,
              public: tuple[Tensor, ...], point: tuple[Tensor, ...], factor: tuple[Tensor, ...], settings: IPMSettings,
              keep_factor: bool, fill: Tensor) -> tuple[tuple[Tensor, ...], Outcome]:
    """The outputs of a compiled solve whose call returned ``info`` (read) and ``_solved``'s other
    outputs, and its ``Outcome``: its own where the solve ended there, else those of the solve gone
    on from there (``fused.go_on``)."""
    if fused.finished(info):
        outputs = (*public, *Saved(scaled.Q, scaled.A, scaled.G, *point, sc.d, sc.e, sc.f, sc.c), *factor)
        return outputs, Outcome(all_solved=not info[3], inexact=bool(info[5]))
    result = fused.go_on(scaled, sc, Packed(*packed), where, factor, info, settings, keep_factor)
    return _outputs(scaled, sc, result, fill), Outcome.of(result)


def outputs(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, settings: IPMSettings,
            keep_factor: bool, fill: Tensor) -> tuple[tuple[Tensor, ...], Outcome]:
    """``QPSolveFn.forward``'s outputs for the flat data, and the solve's ``Outcome``:
    ``N_PUBLIC`` public ones (z, λ, ν, s, status, iterations, primal, dual, gap, primal_limit; see
    ``_public``; the failed elements of z, λ, ν, s hold ``fill``, 0-d in the data's dtype), then
    ``Saved``, then the factor's tensors where ``keep_factor``. Data that fail the value checks
    raise (``validation.qp.check_values``). An empty batch runs eagerly (nothing to compile for)."""
    if settings.compiled and p.shape[0] == 0:
        settings = replace(settings, compiled=False)
    if settings.compiled and fused.pays(p.device):
        return _compiled_forward(Q, p, G, h, A, b, settings, keep_factor, fill)
    if settings.compiled or graphs_calls(p.device, settings.compiled):
        scaled, sc, passed = solve_part(_checked_scaling, settings, p.device)(Q, p, G, h, A, b)
        check_values(Q, p, G, h, A, b, passed)
    else:
        check_values(Q, p, G, h, A, b)
        scaled, sc = _scaling(Q, p, G, h, A, b)
    scaled = _with_structure(scaled)
    result = solve_scaled_parallel(scaled, sc, settings, with_factor=keep_factor)
    return _outputs(scaled, sc, result, fill), Outcome.of(result)
