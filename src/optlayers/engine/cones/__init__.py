"""The cone plug-ins of the interior point step, beside its nonnegative rows: second-order, PSD
and exponential cones (and nonnegative ones where a method keeps them among the cone rows).

Each plug-in supplies, for its ``count`` cones of ``size`` rows, a scaling V (``scaling``;
VᵀV = (WᵀW)⁻¹: Nesterov–Todd for the symmetric cones, ``symmetric.py``; the
primal-dual scaling of Dahl and Andersen for the exponential cone, ``exponential.py``),
whose VᵀV the step folds into H (``normal_matrix``); the affine right-hand side −s and the
combined one (``combined_rhs``); the longest step to its boundary (``max_step``; the exponential
cone has none in closed form and is searched, ``exp_step``); and its central point.
"""
from __future__ import annotations

import dataclasses

import torch

from optlayers.engine.cones import exponential, symmetric
from optlayers.engine.constants import made_once
from optlayers.host import reads_are_free
from optlayers.linalg import mtv, mv

# The exponential cones' step search first tries _EXP_FINE_FACTOR^k (k < _EXP_FINE_TRIALS) of the
# symmetric cones' step, then backtrack^k: near the solution the full step often ends just outside
# an exponential cone, and 0.8 of the step there (the first backtrack) made the last iterations
# converge only linearly (the residual / 5 per iteration); with 1, 0.97, 0.94, 0.91 first, the
# elements of the cone benchmark (m = 96, n = 48, B = 128) finish 1-2 iterations earlier (with
# the primal-dual scaling too: batches of 200 random three-cone programs took 13-15 iterations
# with the fine trials, 17-18 without).
_EXP_FINE_FACTOR, _EXP_FINE_TRIALS = 0.97, 4
# Where the host reads for free, the step search tries this many of its trials first (the fine
# ones and the first backtracks: enough for nearly every element of the cone benchmark), and the
# rest only when an element needs them.
_EXP_FIRST_TRIALS = 8


@dataclasses.dataclass(frozen=True)
class Part:
    """``count`` cones of one kind, ``size`` rows each, at ``start`` among the cone rows."""

    kind: str
    start: int
    count: int
    size: int
    degree: int
    dual: bool = False  # dual exponential cones, which the method maps to primal ones before the step

    @property
    def stop(self) -> int:
        return self.start + self.count * self.size


def degree(parts: list[Part] | tuple[Part, ...]) -> int:
    """The barrier degree of the parts' cones (the divisor of the mean complementarity μ)."""
    return sum(part.count * part.degree for part in parts)


def piece(v: torch.Tensor, part: Part) -> torch.Tensor:
    """The rows of ``part`` of v (B, m_K, ...) as (B, count, size, ...)."""
    return v[:, part.start:part.stop].reshape(v.shape[0], part.count, part.size, *v.shape[2:])


def join(pieces: list[torch.Tensor], batch: int, empty: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of ``piece`` over all parts: (B, count, size, ...) pieces -> (B, m_K, ...);
    ``empty`` (B, 0, ...) when there are no parts."""
    if not pieces:
        return empty
    return torch.cat([p.reshape(batch, -1, *p.shape[3:]) for p in pieces], 1)


def device_constant(values: tuple, like: torch.Tensor) -> torch.Tensor:
    """A (nested) tuple of numbers as a tensor of ``like``'s dtype, filled on its device entry by
    entry: a tensor made from Python numbers would be a blocking host-to-device copy on a GPU.
    Under compilation it is made in the graph (where inductor folds it)."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=like.dtype, device=like.device)
    shape = torch.tensor(values).shape  # on the host, for the shape only
    out = like.new_empty(shape.numel())
    for index, value in enumerate(torch.tensor(values, dtype=torch.float64).flatten().tolist()):
        out[index].fill_(value)
    return out.reshape(shape)


def central_point(parts: list[Part], batch: int, like: torch.Tensor) -> torch.Tensor:
    """The start s = y (B, m_K): the unit of each symmetric cone, the exponential cone's central point."""
    pieces = []
    for part in parts:
        shape = (batch, part.count, part.size)
        if part.kind == "exp":
            value = device_constant(exponential.CENTRAL_POINT, like).expand(shape)
        else:
            algebra = {"nonneg": symmetric.NONNEG, "soc": symmetric.SOC, "psd": symmetric.PSD}[part.kind]
            value = algebra.unit(like.new_zeros(shape))
        pieces.append(value)
    return join(pieces, batch, like.new_zeros(batch, 0))


def scaling(part: Part, s: torch.Tensor, y: torch.Tensor, mu: torch.Tensor) -> symmetric.NTScaling | exponential.ExpScaling:
    """The scaling of one part's cones at s, y (B, count, size); mu (B, count)."""
    if part.kind == "nonneg":
        return symmetric.nonneg_scaling(s, y)
    if part.kind == "soc":
        return symmetric.soc_scaling(s, y)
    if part.kind == "psd":
        return symmetric.psd_scaling(s, y)
    return exponential.exp_scaling(s, y, mu)


def _times(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """M (B, count, k, k) @ X (B, count, k, c); for k = 1 a broadcast product (far cheaper than
    B * count one-by-one matrix products)."""
    return M * X if M.shape[-1] == 1 else M @ X


# The cone rows' scalings are applied as one dense block-diagonal (B, m_K, m_K) matrix where that
# is small beside the scaled rows G = V A_K (B, m_K, n) the step forms anyway: m_K at most this
# many times n, or at most _DENSE_MAX_ROWS rows. Otherwise (many cones, few variables: a thousand
# exponential cones would be a (B, 3000, 3000) matrix) they are applied part by part.
_DENSE_ROWS_PER_VARIABLE = 4
_DENSE_MAX_ROWS = 128


@dataclasses.dataclass(frozen=True)
class BlockDiagonal:
    """A block-diagonal (B, m_K, m_K) matrix: one (B, count, k, k) tensor per part (``blocks``), and
    where it is small enough (see ``_DENSE_ROWS_PER_VARIABLE``) the same as one dense matrix
    (``dense``), so that each product with it is one matrix-vector product (part by part, the rows
    of a vector are not one batch and each product copies them first)."""

    blocks: list[torch.Tensor]
    parts: list[Part]
    dense: torch.Tensor | None


def _dense_size(parts: list[Part] | tuple[Part, ...], n: int) -> int | None:
    """The rows m_K of the cone rows' dense block-diagonal scaling matrix, None where they are
    applied part by part (see ``_DENSE_ROWS_PER_VARIABLE``)."""
    size = parts[-1].stop
    return None if size > max(_DENSE_ROWS_PER_VARIABLE * n, _DENSE_MAX_ROWS) else size


def scaling_workspace(parts: list[Part] | tuple[Part, ...], batch: int, n: int, like: torch.Tensor) -> torch.Tensor | None:
    """A zero (B, m_K, m_K) matrix for ``block_diagonal``'s ``out`` over the iterations of one
    solve (None where there is no dense form, or no parts): each iteration writes only its
    diagonal blocks, and the zeros outside them stay."""
    size = _dense_size(parts, n) if parts else None
    return None if size is None else like.new_zeros(batch, size, size)


@dataclasses.dataclass(frozen=True)
class StepWorkspace:
    """Buffers that the step overwrites in each iteration of one solve instead of allocating them
    afresh (``step_workspace``): the scalings' block-diagonal matrix ``V`` (B, m_K, m_K), zero
    outside its blocks, the scaled rows ``G`` = V A_K (B, m_K, n) and the normal matrix ``H``
    (B, n, n) (``normal_matrix``). At the cone benchmark's size (batch 128, m_K = 52, n = 48) G
    and H are 2.4-2.6 MB each. Allocated afresh in every iteration, they and the factorisation's
    temporaries made glibc's allocator hand their pages back to the kernel and fault them in
    again wherever its thresholds had not yet grown past them (the first calls of a process, or
    one that runs only the method): there, 16,000-25,000 page faults per solve against about
    3,000 with them kept, and 0.84 of the CPU time (one thread). Once a larger temporary (the
    refinement's LU) has raised the thresholds, neither faults, and the two take the same time."""

    V: torch.Tensor
    G: torch.Tensor
    H: torch.Tensor

    def first(self, count: int) -> StepWorkspace:
        """The buffers of a working batch of the first ``count`` elements."""
        return StepWorkspace(self.V[:count], self.G[:count], self.H[:count])


def step_workspace(parts: list[Part] | tuple[Part, ...], batch: int, n: int, like: torch.Tensor) -> StepWorkspace | None:
    """The ``StepWorkspace`` of a batch of programs whose cone rows ``parts`` act on n variables;
    None where V has no dense form (see ``scaling_workspace``) or there are no parts."""
    V = scaling_workspace(parts, batch, n, like)
    if V is None:
        return None
    return StepWorkspace(V, like.new_empty(batch, V.shape[-1], n), like.new_empty(batch, n, n))


def block_diagonal(mats: list[torch.Tensor], parts: list[Part], n: int, out: torch.Tensor | None = None) -> BlockDiagonal:
    """The ``BlockDiagonal`` of one (B, count, k, k) tensor per part, for cone rows over n
    variables; the dense form by one copy per part into its diagonal blocks (a view of the part's
    square as (B, k, k, count)), of a fresh zero matrix or of ``out`` (``scaling_workspace``: zero
    outside these blocks, and overwritten)."""
    size = _dense_size(parts, n)
    if size is None:
        return BlockDiagonal(mats, parts, None)
    first = mats[0]
    full = first.new_zeros(first.shape[0], size, size) if out is None else out
    for M, part in zip(mats, parts):
        square = full[:, part.start:part.stop, part.start:part.stop]
        blocks = square.unflatten(1, (part.count, part.size)).unflatten(-1, (part.count, part.size))
        blocks.diagonal(dim1=1, dim2=3).copy_(M.permute(0, 2, 3, 1))
    return BlockDiagonal(mats, parts, full)


def apply_blocks(V: BlockDiagonal, v: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """The block-diagonal matrix ``V``, or its transpose, times v (B, m_K)."""
    if V.dense is not None:
        return mtv(V.dense, v) if transpose else mv(V.dense, v)
    pieces = [_times(M.mT if transpose else M, piece(v, part).unsqueeze(-1)).squeeze(-1) for M, part in zip(V.blocks, V.parts)]
    return join(pieces, v.shape[0], v[:, :0])


def scaled_rows(A: torch.Tensor, V: BlockDiagonal, out: torch.Tensor | None = None) -> torch.Tensor:
    """The scaled cone rows G = V A (B, m_K, n) for the block-diagonal ``V``: one product with its
    dense form where it has one (into ``out``, ``StepWorkspace.G``, where given), else part by
    part. Part by part where there is a dense form is no faster: at the cone benchmark's size
    (batch 128; three second-order blocks and one PSD block of 10 rows, four exponential blocks of
    3; n = 48) the dense product, a sixth of its flops on nonzero entries, took 0.67 ms (one
    thread), the blocks' products joined 0.78-0.89 ms, and written each into its rows of one
    output 1.4 ms (the same values: the dense product adds its zero terms exactly)."""
    if V.dense is not None:
        return V.dense @ A if out is None else torch.bmm(V.dense, A, out=out)
    return join([_times(v, piece(A, part)) for v, part in zip(V.blocks, V.parts)], A.shape[0], A)


def normal_matrix(Q: torch.Tensor | None, G: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Q + Aᵀ VᵀV A (B, n, n) as Q + GᵀG for the scaled cone rows G = V A (``scaled_rows``; one
    product over all rows: summing a product per part took 1.6 times as long); Q None: zero.
    Into ``out`` (``StepWorkspace.H``) where given."""
    if out is None:
        return G.mT @ G if Q is None else torch.baddbmm(Q, G.mT, G)
    return torch.bmm(G.mT, G, out=out) if Q is None else torch.baddbmm(Q, G.mT, G, out=out)


def _exp_rows(v: torch.Tensor, parts: list[Part]) -> torch.Tensor:
    """The exponential cones' rows of v (..., m_K) as (..., cones, 3) (a view where they are one part)."""
    pieces = [v[..., part.start:part.stop].reshape(*v.shape[:-1], part.count, 3) for part in parts if part.kind == "exp"]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, -2)


@made_once
def _trial_factors(backtrack: float, max_backtracks: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The step search's factors _EXP_FINE_FACTOR^k (k < _EXP_FINE_TRIALS), then backtrack^k
    (0 < k < max_backtracks), longest first (K,); made once per setting, device and dtype (as a
    normal tensor even when first asked for under ``torch.inference_mode``)."""
    factors = [_EXP_FINE_FACTOR ** k for k in range(_EXP_FINE_TRIALS)]
    factors += [backtrack ** k for k in range(1, max_backtracks)]
    if torch.compiler.is_compiling():  # the same numbers, not as a constant tensor: inductor's C++ wrapper
        # does not declare a compiled loop body's constant tensors
        return torch.stack([torch.full((), factor, dtype=dtype, device=device) for factor in factors])
    return torch.tensor(factors, dtype=torch.float64).to(device, dtype)


@made_once
def _to_primal_maps(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(4, 3, 3): the identity for s and ds, ``exponential.to_primal``'s matrix (acting on rows)
    for y and dy, so that one batched product maps the four (the map is linear); made once per
    device and dtype (as a normal tensor even under ``torch.inference_mode``)."""
    eye = torch.eye(3, dtype=torch.float64)
    to_primal = exponential.to_primal(eye)  # row i: the image of the i-th unit vector
    return torch.stack([eye, to_primal, eye, to_primal]).to(device, dtype)


def exp_step(parts: list[Part], s: torch.Tensor, y: torch.Tensor, ds: torch.Tensor, dy: torch.Tensor,
             alpha: torch.Tensor, fraction: float, backtrack: float, max_backtracks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The longest of alpha * t, t = _EXP_FINE_FACTOR^k (k < _EXP_FINE_TRIALS) then backtrack^k
    (0 < k < max_backtracks), for which the step divided by ``fraction`` keeps every exponential
    cone's s and y strictly inside (the feasible steps along a ray form an interval), all tried at
    once (no look from the host); and whether one was found (B,). The dual points are mapped to
    primal ones (``exponential.to_primal``, linear: the same map takes their steps; s, y, ds and
    dy stacked and mapped by one batched product), so that one membership test covers both.
    Where the host's reads are free (the CPU), the first _EXP_FIRST_TRIALS are tried first, and
    the others only if some element found none of them inside (the answer is the same: later
    trials are shorter)."""
    rows = torch.stack([_exp_rows(v, parts) for v in (s, y, ds, dy)])  # (4, B, cones, 3)
    mapped = torch.bmm(rows.flatten(1, 2), _to_primal_maps(s.device, s.dtype)).view(2, 2, *rows.shape[1:])
    point, step = mapped.unbind(0)  # (2, B, cones, 3) each: s and y mapped, their steps
    trials = alpha.unsqueeze(0) * _trial_factors(backtrack, max_backtracks, s.device, s.dtype).unsqueeze(-1)  # (K, B)

    def tried(trials: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reach = (trials / fraction)[:, None, :, None, None]
        inside = exponential.primal_margin(torch.addcmul(point, reach, step)).amin((1, -1)) > 0
        return (trials * inside).amax(0), inside.any(0)

    if not torch.compiler.is_compiling() and reads_are_free(s.device):
        step_length, found = tried(trials[:_EXP_FIRST_TRIALS])
        if bool(found.all()):
            return step_length, found
    return tried(trials)
