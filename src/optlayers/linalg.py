"""Batched dense matrix products shared by the QP and cone solvers.

Matrix-vector products are written as a row vector times a matrix: on the CPU, torch's batched
product of a (B, r, c) matrix with (B, c, 1) columns runs about four times slower than the same
product taken as (B, 1, c) rows times the transposed matrix.

Under compilation, a small product (every one of its sizes at most ``SMALL_PRODUCT_MAX``, or an
inner size of 1: an outer product) is written as a broadcast multiply and a sum over the inner
size (``elementwise``), which inductor fuses with the operations around it and, with
``compiling.CPU_OPTIONS``, unrolls. On the CPU inductor otherwise calls the library for every
batched product whose rows and columns both exceed 1 (a call, a buffer and a pass each; at n = 10
they cost their calls, not their arithmetic). Eagerly, torch's products are used.

Transposes are written ``M.transpose(-2, -1)``, here and in the solvers' traced code, not ``M.mT``:
where dynamo traces with a symbolic batch size (``compiling.BATCH_DYNAMIC``), torch 2.13 wraps the
``.mT`` of a compiled function's input as an input of its own, guarded anew at each access (a fresh
view each time), and fails building the guards.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from optlayers.host import cpu_schedule

SMALL_PRODUCT_MAX = 16
"""The largest size (rows, inner, columns) of a product written elementwise under compilation:
inductor unrolls sums of at most 16 terms (``compiling.CPU_OPTIONS``), and the factors inverted
under compilation are of order at most ``engine.kkt.INVERTED_MAX_N`` = 12."""


def elementwise(a: Tensor, b: Tensor) -> bool:
    """Whether ``product(a, b)`` is written as a broadcast multiply and a sum: under compilation,
    where the inner size is 1 or no size of the product exceeds ``SMALL_PRODUCT_MAX``."""
    inner = a.shape[-1]
    return torch.compiler.is_compiling() and (inner == 1 or max(a.shape[-2], inner, b.shape[-1]) <= SMALL_PRODUCT_MAX)


VECTOR_LIBRARY_SIZES = (17, 63)
"""The inner sizes (first, last) of the compiled CPU products of one row or one column that are
called from the library (``vector_in_library``) in a batch of two or more problems ..."""

VECTOR_LIBRARY_MIN_ONE = 32
"""... and the first in a batch of one problem, where the library call's fixed cost counts for more
(a batch of one has no last: every inner size from this one)."""


def vector_in_library(a: Tensor, b: Tensor) -> bool:
    """Whether ``product(a, b)`` of (B, r, c) a and (B, c, d) b with one row (r = 1) or one column
    (d = 1) is taken as ``torch.baddbmm`` with ``beta=0`` rather than ``torch.bmm``: under
    compilation on the CPU, for inner sizes c in ``VECTOR_LIBRARY_SIZES`` (at batch 1, every c from
    ``VECTOR_LIBRARY_MIN_ONE``). Inductor lowers a CPU ``bmm`` with one row or one column
    to a multiply and a sum of its own, which runs far slower than the library's product where the
    matrix is in the cache (at n = 100 its hottest instructions were in the masked loads ending each row). Measured (torch
    2.13, one thread, the Intel Xeon machine, 2026-12-06, a compiled chain of 20 products of one
    matrix, each with a multiply and an add; µs per product, ``bmm`` against ``baddbmm``):
    (B, c) = (1, 20) 1.3 / 1.5, (1, 32) 1.6 / 1.5, (1, 100) 5.6 / 2.3, (8, 20) 2.8 / 2.1,
    (8, 32) 5.2 / 2.4, (8, 100) 37 / 8, (128, 20) 31 / 10, (128, 100) 831 / 393. In whole solves
    (compiled forward + backward, ``benchmarks/ab_trees.py``, both orders) the library's products took
    (128, 50) 0.76–0.81 of the time, (32, 30) 0.72–0.74, (128, 20) 0.91, (1, 50) 0.91–0.94, but
    (64, 100) and (128, 100) 1.03 (chunks of 8 whose matrices come from memory: there inductor's
    fused sums were no slower than the library's calls): hence the last size, which a batch of one,
    whose matrix stays in the cache, does not have: there the library's products took (1, 100)
    0.90–0.91 of the time at two threads (25 rounds, both orders) and 0.97 at one, (1, 200) 0.96
    (the Intel Xeon machine, 2026-12-07); (8, 100) 1.00 and (128, 100) 0.97 with the last size lifted
    for batches up to 32 too, within the noise, so it stays there. ``baddbmm`` is lowered to the library call
    whatever its ``beta``. Elsewhere (eagerly, on an accelerator, where ``elementwise``) the product is
    ``product``'s usual one."""
    if not torch.compiler.is_compiling() or a.device.type != "cpu" or (a.shape[-2] != 1 and b.shape[-1] != 1):
        return False
    first, last = VECTOR_LIBRARY_SIZES
    if a.shape[0] == 1:
        return VECTOR_LIBRARY_MIN_ONE <= a.shape[-1]
    return first <= a.shape[-1] <= last


def product(a: Tensor, b: Tensor) -> Tensor:
    """a @ b for (..., r, c) a and (..., c, d) b (batch dimensions broadcast), elementwise where
    ``elementwise`` says so. Two (B, ·, ·) operands go to ``torch.bmm`` directly: ``@`` reaches the
    same ``bmm`` through an expand and a reshape of each operand and a view of the result, five
    dispatches of its own per product (each costs about as much as an n = 10 product itself); a
    row or a column times a matrix under compilation on the CPU to ``torch.baddbmm``
    (``vector_in_library``)."""
    if not elementwise(a, b):
        if a.ndim == b.ndim == 3 and a.shape[0] == b.shape[0]:
            if vector_in_library(a, b):  # beta = 0: the first operand's values are not read
                return torch.baddbmm(a[:, :1, :1], a, b, beta=0)
            return torch.bmm(a, b)
        return a @ b
    if a.shape[-1] == 1:
        return a * b
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


def add_product(c: Tensor, a: Tensor, b: Tensor, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    """beta·c + alpha·(a @ b) for (B, r, d) c, (B, r, k) a and (B, k, d) b: ``torch.baddbmm``, or
    elementwise where ``elementwise`` says so."""
    if not elementwise(a, b):
        return torch.baddbmm(c, a, b, beta=beta, alpha=alpha)
    return torch.add(c if beta == 1 else c * beta, product(a, b), alpha=alpha)


def add_product_(c: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """c += a @ b in place, for (B, r, d) c, (B, r, k) a and (B, k, d) b, and c returned: the same
    values as ``add_product(c, a, b)`` (the same product, accumulated into the same sum) without
    copying c into a fresh tensor first; elementwise where ``elementwise`` says so."""
    if not elementwise(a, b):
        return c.baddbmm_(a, b)
    return c.add_(product(a, b))


def mv(M: Tensor, v: Tensor) -> Tensor:
    """Batched matrix-vector product M v: (B, r, c) or shared (r, c), with (B, c) -> (B, r)."""
    return product(v.unsqueeze(-2), M.transpose(-2, -1)).squeeze(-2)


def mtv(M: Tensor, v: Tensor) -> Tensor:
    """Batched transposed product Mᵀ v: (B, r, c) or shared (r, c), with (B, r) -> (B, c)."""
    return product(v.unsqueeze(-2), M).squeeze(-2)


def add_mv(r: Tensor, M: Tensor, v: Tensor, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    """beta·r + alpha·M v for (B, r) r, (B, r, c) M and (B, c) v, in one kernel."""
    return add_product(r.unsqueeze(-2), v.unsqueeze(-2), M.transpose(-2, -1), beta, alpha).squeeze(-2)


def add_mtv(r: Tensor, M: Tensor, v: Tensor, beta: float = 1.0, alpha: float = 1.0) -> Tensor:
    """beta·r + alpha·Mᵀ v for (B, c) r, (B, r, c) M and (B, r) v, in one kernel."""
    return add_product(r.unsqueeze(-2), v.unsqueeze(-2), M, beta, alpha).squeeze(-2)


def inf_norm(x: Tensor, dim: int = -1) -> Tensor:
    """The largest |entry| of x over ``dim`` (the infinity norm): one reduction, except on the CPU's
    own schedule (``host.cpu_schedule``; not the accelerators' schedule that the kernel counts
    follow), where torch's ``vector_norm(x, inf)`` is about nine times slower than
    ``x.abs().amax()`` (one thread, (4, 128, 96) float64: 178 against 20 µs). The same value (NaN
    where x has one)."""
    if not torch.compiler.is_compiling() and cpu_schedule(x.device):
        return x.abs().amax(dim)
    return torch.linalg.vector_norm(x, math.inf, dim)


def power_of_two_above(t: Tensor) -> Tensor:
    """A power of two 2ᵉ for each t ≥ 0 with t in [2ᵉ⁻¹, 2ᵉ) (up to log2's rounding next to a power of
    two; 1 for t = 0): a scale by which t divides into about [½, 1) exactly. exp2 of an integer, as
    ``qp.scaling``'s Ruiz scalings (which take the nearest power), not ``frexp``: its int32 exponent
    does not compile in inductor's vectorised C++ ("no matching function for call to
    convert<double, 2, int32_t, 1>"), and a compiled solve of 64 or more problems would run eagerly
    (``tests/test_compiling.py``)."""
    return torch.where(t > 0, torch.exp2(torch.floor(torch.log2(t)) + 1), 1.0)


def symmetric_eigenvalues(a: Tensor) -> Tensor:
    """The eigenvalues of the symmetric (..., d, d) matrices ``a`` (from their lower triangles), in
    ascending order, as ``torch.linalg.eigvalsh``. Under compilation torch 2.13 lowers ``eigvalsh``
    to ``aten._linalg_eigh`` with the eigenvectors (its ``compute_v`` follows whether a gradient
    could be wanted, which the tracing assumes): there the operator is called for the values
    alone. For the cone method's step lengths (two calls of 128 matrices of order 4 per iteration
    of a compiled slice of 64 programs) that took a compiled iteration from 5.84-5.95 to 5.61-5.72
    ms (one thread, the Intel Xeon machine, 2026-12-06; BENCHMARKS.md). Eagerly, ``eigvalsh``
    itself, which leaves the vectors out where no gradient is wanted."""
    if torch.compiler.is_compiling():
        return torch.ops.aten._linalg_eigh.default(a, "L", False)[0]
    return torch.linalg.eigvalsh(a)
