"""The CPU's Cholesky factorisation of mid-sized matrices by LAPACK's ``potf2`` from scipy, and, in
compiled code, the solves of one vector per matrix with those factors by BLAS's ``trsv`` (``solves_with``),
the product that forms H for the running problems of a batch only (``skips_inactive``,
``add_product_where``), the Schur complement of the rows that S couples, and its factor, over
those rows only (``factors_coupled_rows``, ``coupled_schur``), and the factorisation and inversion
of the small factors that compiled solves invert (``factors_inverted``, ``factor_inverse_lower``).

torch's CPU build factorises with MKL, and MKL runs its generic code on AMD processors: there
its ``dpotrf`` of order 100 takes the unblocked path, a matrix-vector product per column, at
about 7 GFLOP/s. scipy's LAPACK (OpenBLAS in scipy's wheels) has a ``potf2`` of its own,
single-threaded by construction. Measured on the AMD EPYC machine (torch 2.13.0+cpu, scipy 1.17.1,
float64, one thread, 2026-12-05; each call with its copy of the input and the zeroing of the other
triangle), this route against ``torch.linalg.cholesky_ex``, in µs:

| n | batch 1 | batch 2 | batch 4 | batch 16 |
|---|---|---|---|---|
| 40 | 18 / 9 | 23 / 15 | 33 / 27 | 95 / 103 |
| 50 | 20 / 13 | 27 / 24 | 44 / 44 | 132 / 171 |
| 64 | 24 / 20 | 36 / 38 | 60 / 76 | 203 / 303 |
| 100 | 43 / 54 | 71 / 105 | 129 / 210 | 504 / 830 |
| 150 | 106 / 115 | 202 / 223 | 398 / 444 | 1,554 / 1,829 |

and at batch 128, n = 100, 4.8 against 8.9 ms; n = 30, 0.47 against 0.49 ms; n = 20, 0.28 against
0.23 ms; batch 16, n = 200, 4.3 against 4.6 ms. The engine's eager solves on the CPU take it
(``used_for``) where torch's LAPACK is MKL on an AMD processor, for orders from ``MIN_N`` to
``MAX_N``, float32 and float64, whatever the batch: which route factorises a problem depends on
its order only, never on the other problems of its batch, so that the route adds no dependence of
a problem's answer on its batch as the working batch shrinks (a few µs lost per call at batch 1 and
n < 80). A matrix's factor is the same bits wherever it sits in a batch, which torch's MKL
factorisation did not give at n = 45.

On an Intel processor MKL runs its own code, and torch's factorisation of one matrix is as fast
as a call of MKL's ``potrf`` matrix by matrix (eager calls, one thread, 2026-12-06, the Intel
Xeon machine: n = 100, batch 1, 16, 128: 24 / 28, 411 / 417, 3,644 / 3,432 µs); eager solves keep
torch's there (``EAGER_FACTORED``). Compiled solves take the operators below on both processors
(``FACTORED_DTYPES``), from order ``COMPILED_MIN_N``, with MKL's own ``potrf`` (from torch's library, as the product's ``gemm``) as
the factorisation on an Intel processor: torch's factorisation in compiled code is a call through
the operator registry, copies into and out of LAPACK's layout and a pass of ``triu`` over each
factor, and its triangular solves with one vector copy the factor too (at batch 128, n = 100 the
``triu`` pass took 6 % of a compiled forward + backward in the samples of ``py-spy --native``,
and the solves' ``trsm`` 6 %). Measured there (one thread, compiled forward + backward, torch's route
against the operators, two runs each): (1, 100) 4.03 / 3.57 ms, (128, 100) 401 / 369 and
379 / 328 ms.

Compiled solves call it as the C++ operator ``optlayers_lapack::cholesky_lower`` (``lapack.cpp``, built
by torch's extension builder the first time a compiled solve on such a machine factorises a matrix
of those orders, about 40 s, and cached by torch across processes; ``load_operator``). A Python routine called from inductor's
generated code cost 50–80 µs more per call than torch's factorisation (a compiled forward +
backward at batch 1, n = 100 took 1.23 times as long); the C++ operator does not. Where it cannot
be built (no compiler, no ``ninja``), compiled solves keep torch's factorisation, with a warning.

The routine is reached through ``scipy.linalg.cython_lapack``'s table of C entry points and
called with ``ctypes``, which releases the GIL during each call, so that the slices of a batch
(``threads.map_slices``) factorise in parallel. A row-major symmetric matrix read as a
column-major one is itself; LAPACK's upper factor U of that column-major matrix is, read row-major,
the lower factor L = Uᵀ of the same matrix.
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import os
import platform
import threading
import warnings
from typing import Callable

import torch
from torch import Tensor

from optlayers.host import cpu_schedule

MIN_N = 40
"""The smallest order that eager solves factorise by ``potf2``: the measurements above, where it wins
from n = 40 at batch 16 and from n = 30 at batch 128 (at batch 1 a call's fixed cost counts up to
n = 80)."""

COMPILED_MIN_N = 13
"""The smallest order that compiled solves factorise and solve with by the operators: the one above
the factors that compiled solves invert (``kkt.INVERTED_MAX_N``, ``factors_inverted``). The eager
bound ``MIN_N`` is the cost of a ``ctypes`` call from Python, which the C++ operator does not pay;
under it torch's factorisation and solves are calls through the operator registry with their
copies. Measured on the Intel Xeon machine (compiled forward + backward, float64, one thread,
``benchmarks/ab_trees.py``, 2026-12-06), orders 20 and 30 against torch's route: see docs/qp.md,
"The operators below order 40 and above 192"."""

MAX_N = 192
"""The largest order factorised by ``potf2`` (eager solves; compiled ones: ``COMPILED_MAX_N``): unblocked, it falls behind blocked factorisations
above this (batch 16, n = 200: 4.3 against torch's 4.6 ms; n = 500: 1.3 times torch's time). Up to
it the routine stays on its caller's thread: two threads factorising 64 matrices each at once took
0.99–1.21 times one thread's time at n = 100–192 (2026-12-05). scipy's BLAS ``syrk``, which does
not stay there, was measured for H and not adopted (BENCHMARKS.md)."""

_ROUTINES = {torch.float64: "dpotf2", torch.float32: "spotf2"}
_POTRF_ROUTINES = {torch.float64: "dpotrf_", torch.float32: "spotrf_"}
_TRSV_ROUTINES = {torch.float64: "dtrsv", torch.float32: "strsv"}
_TRTI2_ROUTINES = {torch.float64: "dtrti2", torch.float32: "strti2"}
_GEMM_ROUTINES = {torch.float64: "dgemm_", torch.float32: "sgemm_"}
_TRSM_ROUTINES = {torch.float64: "dtrsm_", torch.float32: "strsm_"}
_UPPER = ctypes.create_string_buffer(b"U")
_Routine = Callable[[int, int, int, int, int], None]


def _vendor() -> str:
    """The processor's vendor string ('AuthenticAMD', 'GenuineIntel', ...), or '' where unknown."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            for line in info:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mkl_in_generic_code() -> bool:
    """Whether torch's LAPACK is MKL running on an AMD processor (see the module docstring)."""
    return torch.backends.mkl.is_available() and "AuthenticAMD" in _vendor()


def _capsule(module: str, routine: str) -> object | None:
    """The capsule of ``routine`` in scipy's table of C entry points ``scipy.linalg.<module>``
    (``cython_lapack``, ``cython_blas``), or None where scipy or the routine is missing."""
    try:
        table = getattr(importlib.import_module(f"scipy.linalg.{module}"), "__pyx_capi__", {})
    except ImportError:
        return None
    return table.get(routine)


def _address(capsule: object, signed: Callable[[bytes], bool]) -> int:
    """The address a capsule holds where its C signature (the capsule's name) passes ``signed``; else 0."""
    name = ctypes.pythonapi.PyCapsule_GetName
    name.argtypes, name.restype = [ctypes.py_object], ctypes.c_char_p
    signature = name(capsule) or b""
    if not signed(signature):
        return 0
    pointer = ctypes.pythonapi.PyCapsule_GetPointer
    pointer.argtypes, pointer.restype = [ctypes.py_object, ctypes.c_char_p], ctypes.c_void_p
    return pointer(capsule, signature) or 0


@functools.lru_cache(maxsize=None)
def _factor_source() -> str:
    """Which routine factorises here: "potf2" (scipy's) where torch's LAPACK is MKL on an AMD
    processor (``_mkl_in_generic_code``), "potrf" (MKL's own, from torch's library) where it is
    MKL on another processor, "" where torch's LAPACK is not MKL (nothing measured: torch's
    factorisation stands). Decided once (the module's constants below read it at import)."""
    if not torch.backends.mkl.is_available():
        return ""
    return "potf2" if _mkl_in_generic_code() else "potrf"


@functools.lru_cache(maxsize=None)
def _routine(dtype: torch.dtype) -> _Routine | None:
    """LAPACK's Cholesky factorisation for ``dtype``, callable with five addresses (uplo, n, a, lda,
    info): MKL's ``potrf`` from torch's library where ``_factor_source`` says so and torch exports
    it, else ``potf2`` from scipy's table of C entry points; None where neither is found. The
    operators call the same routine (``load_operator``), so that eager and compiled factors agree."""
    if _factor_source() == "potrf" and (address := _torch_blas_address(_POTRF_ROUTINES[dtype])):
        return ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 5)(address)
    capsule = _capsule("cython_lapack", _ROUTINES[dtype])
    return None if capsule is None else _entry_point(capsule)


@functools.lru_cache(maxsize=None)
def _trsv_address(dtype: torch.dtype) -> int:
    """The address of BLAS's ``trsv`` for ``dtype`` in scipy's table of C entry points
    (``_trsv_entry``), or 0 where scipy does not export it with the signature the operator calls."""
    capsule = _capsule("cython_blas", _TRSV_ROUTINES[dtype])
    return 0 if capsule is None else _trsv_entry(capsule)


def _torch_blas_address(routine: str) -> int:
    """The address of BLAS's ``routine`` in torch's own library (MKL's, where torch's CPU build
    links it), or 0 where the library does not export it."""
    try:
        library = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        return ctypes.cast(getattr(library, routine), ctypes.c_void_p).value or 0
    except (OSError, AttributeError):
        return 0


@functools.lru_cache(maxsize=None)
def _gemm_address(dtype: torch.dtype) -> int:
    """The address of torch's own BLAS ``gemm`` for ``dtype`` (``dgemm_``, ``sgemm_``: MKL's, which
    torch's batched product calls matrix by matrix), or 0 where torch's library does not export it
    (``add_product_where`` then multiplies with torch's ``addmm``, matrix by matrix)."""
    return _torch_blas_address(_GEMM_ROUTINES[dtype])


@functools.lru_cache(maxsize=None)
def _trsm_address(dtype: torch.dtype) -> int:
    """The address of torch's own BLAS ``trsm`` for ``dtype`` (``dtrsm_``, ``strsm_``, MKL's), or 0
    where torch's library does not export it (``coupled_schur`` is then not taken)."""
    return _torch_blas_address(_TRSM_ROUTINES[dtype])


@functools.lru_cache(maxsize=None)
def _trti2_address(dtype: torch.dtype) -> int:
    """The address of LAPACK's ``trti2`` for ``dtype`` in scipy's table of C entry points, where its C
    signature is ``void (char *, char *, int *, <float type> *, int *, int *)`` (32-bit integers, as
    the operator passes them); else 0."""
    capsule = _capsule("cython_lapack", _TRTI2_ROUTINES[dtype])
    return 0 if capsule is None else _address(capsule, lambda signature: signature.startswith(b"void (char *, char *, int *, ")
                                               and signature.endswith(b" *, int *, int *)") and signature.count(b",") == 5)


def _trsv_entry(capsule: object) -> int:
    """The address a ``cython_blas`` capsule holds, where its C signature is ``trsv``'s with 32-bit
    integers, as the C++ operator passes them: ``void (char *, char *, char *, int *, <float type> *,
    int *, <float type> *, int *)``; else 0."""
    return _address(capsule, lambda signature: signature.startswith(b"void (char *, char *, char *, int *, ")
                    and signature.endswith(b" *, int *)") and signature.count(b",") == 7 and signature.count(b"int *") == 3)


def _entry_point(capsule: object) -> _Routine | None:
    """The function a ``cython_lapack`` capsule holds, callable with five addresses, where its C
    signature is ``potf2``'s with 32-bit integers, as this module passes them: ``void (char *, int *,
    <float type> *, int *, int *)``; else None (another build of scipy's LAPACK, 64-bit integers say,
    is not called with them)."""
    address = _address(capsule, lambda signature: signature.startswith(b"void (char *, int *, ")
                       and signature.endswith(b" *, int *, int *)") and signature.count(b",") == 4)
    return ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 5)(address) if address else None


FACTORED_DTYPES = frozenset(dtype for dtype in _ROUTINES if _routine(dtype) is not None) if _factor_source() else frozenset()
"""The dtypes that ``_routine`` factorises on this machine, through the operators in compiled solves
(and in eager ones where ``EAGER_FACTORED``): float32 and float64 where torch's LAPACK is MKL and
the routines are found; none elsewhere. Decided once, at import."""

BLOCKED_MAX_N = 512
"""The largest order that compiled solves take the operators for where their factorisation is
MKL's own ``potrf`` (``_factor_source``: an Intel processor), which is blocked: ``MAX_N``'s reason,
``potf2`` falling behind blocked factorisations, does not hold there, and above it torch's route in
compiled code is a registry call with copies and a ``triu`` pass. Measured on the Intel Xeon
machine (2026-12-06, compiled forward + backward, float64, best of 7, two runs each, ``MAX_N``
patched): (8, 250) 0.92 of the time at one thread and 0.87–0.88 at two, (4, 400) 0.97–0.98 at one
thread. Orders above it were not measured and keep torch's."""

COMPILED_MAX_N = BLOCKED_MAX_N if _factor_source() == "potrf" else MAX_N
"""The largest order that compiled solves take the operators for: ``BLOCKED_MAX_N`` where the
routine is MKL's blocked ``potrf``, ``MAX_N`` where it is scipy's unblocked ``potf2``. Decided once,
at import."""

EAGER_FACTORED = _factor_source() == "potf2"
"""Whether eager solves factorise by ``_routine`` too (``used_for``): where it is scipy's ``potf2``
and torch's MKL runs its generic code (the table above); on an Intel processor torch's own
factorisation is as fast eagerly. Decided once, at import."""


SOLVED_DTYPES = frozenset(dtype for dtype in _TRSV_ROUTINES if _trsv_address(dtype))
"""The dtypes for which scipy exports BLAS's ``trsv`` with the signature the operator calls (decided
once, at import; ``solves_with`` takes it only for ``FACTORED_DTYPES`` too)."""


INVERTED_DTYPES = frozenset(dtype for dtype in _TRTI2_ROUTINES if _trti2_address(dtype))
"""The dtypes for which scipy exports LAPACK's ``trti2`` with the signature the operator calls (decided
once, at import; ``factors_inverted`` takes it only for ``FACTORED_DTYPES`` too)."""


SCHUR_DTYPES = frozenset(dtype for dtype in _TRSM_ROUTINES if _trsm_address(dtype))
"""The dtypes for which torch's library exports BLAS's ``trsm`` (decided once, at import; ``coupled_schur``
takes it only for ``FACTORED_DTYPES`` too)."""


_OPERATOR_SOURCE = os.path.join(os.path.dirname(__file__), "lapack.cpp")
_OPERATOR_LOCK = threading.Lock()
_operator_state = {"loaded": False, "tried": False}


def load_operator() -> bool:
    """Build (once per machine and source: torch's extension cache) and load the C++ operators that
    compiled solves factorise and solve with, where ``FACTORED_DTYPES`` has any dtype; whether they are loaded.
    A failed build warns once and is not tried again in the process."""
    with _OPERATOR_LOCK:
        if _operator_state["tried"] or not FACTORED_DTYPES:
            return _operator_state["loaded"]
        _operator_state["tried"] = True
        try:
            from torch.utils.cpp_extension import load
            load(name="optlayers_lapack", sources=[_OPERATOR_SOURCE], extra_cflags=["-O2"], is_python_module=False)
        except Exception as err:  # a missing compiler or ninja, a failed build: torch's factorisation stands
            warnings.warn(f"optlayers could not build its LAPACK operators, potf2, trsv and the masked product ({type(err).__name__}: "
                          f"{err}); compiled solves on this CPU keep torch's Cholesky factorisation, triangular solves and "
                          "products, which are slower here", RuntimeWarning, stacklevel=2)
            return False
        factors = [ctypes.cast(_routine(dtype), ctypes.c_void_p).value if dtype in FACTORED_DTYPES else 0
                   for dtype in (torch.float64, torch.float32)]
        solves = [_trsv_address(dtype) if dtype in FACTORED_DTYPES else 0 for dtype in (torch.float64, torch.float32)]
        products = [_gemm_address(dtype) for dtype in (torch.float64, torch.float32)]
        triangular = [_trsm_address(dtype) if dtype in FACTORED_DTYPES else 0 for dtype in (torch.float64, torch.float32)]
        inverses = [_trti2_address(dtype) if dtype in FACTORED_DTYPES else 0 for dtype in (torch.float64, torch.float32)]
        torch.ops.optlayers_lapack.set_routines(*factors, *solves, *products, *triangular, *inverses)
        torch.library.register_fake("optlayers_lapack::cholesky_lower", _cholesky_lower_shapes)
        torch.library.register_fake("optlayers_lapack::trsv_lower", _trsv_lower_shapes)
        torch.library.register_fake("optlayers_lapack::add_product_where", _add_product_where_shapes)
        torch.library.register_fake("optlayers_lapack::coupled_schur", _coupled_schur_shapes)
        torch.library.register_fake("optlayers_lapack::cholesky_inverse_lower", _cholesky_inverse_lower_shapes)
        _operator_state["loaded"] = True
        return True


def _cholesky_lower_shapes(M: Tensor, active: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The operator's outputs' shapes, dtypes and layout, for tracing."""
    return torch.empty_like(M, memory_format=torch.contiguous_format), M.new_empty(M.shape[:-2], dtype=torch.int32)


def _trsv_lower_shapes(L: Tensor, r: Tensor, forward: bool, backward: bool) -> Tensor:
    """The solve operator's output's shape, dtype and layout, for tracing."""
    return torch.empty_like(r, memory_format=torch.contiguous_format)


def _add_product_where_shapes(C: Tensor, A: Tensor, B: Tensor, active: Tensor) -> Tensor:
    """The product operator's output's shape, dtype and layout, for tracing."""
    return torch.empty_like(C, memory_format=torch.contiguous_format)


def _cholesky_inverse_lower_shapes(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The factor-and-inverse operator's outputs' shapes, dtypes and layout, for tracing."""
    factor = torch.empty_like(M, memory_format=torch.contiguous_format)
    return factor, torch.empty_like(factor), M.new_empty(M.shape[:-2], dtype=torch.int32)


def _coupled_schur_shapes(L: Tensor, C: Tensor, coupled: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The Schur complement operator's outputs' shapes, dtypes and layout, for tracing."""
    batch, rows, n = C.shape
    return C.new_empty(batch, rows, n).transpose(-2, -1), C.new_empty(batch, rows, rows), C.new_empty(batch, dtype=torch.int32)


@torch.compiler.assume_constant_result
def _operator_loaded() -> bool:
    """``load_operator()``, evaluated when dynamo traces a factorisation that ``potf2`` would take:
    the operator is built where a compiled solve first needs it (never for one whose orders are
    all outside ``COMPILED_MIN_N`` to ``COMPILED_MAX_N``), and the traced code holds the answer as a constant."""
    return load_operator()


def _taken_order(n: int, compiling: bool) -> bool:
    """Whether the route takes a matrix of order ``n``: ``COMPILED_MIN_N`` to ``COMPILED_MAX_N`` in
    compiled code, ``MIN_N`` to ``MAX_N`` in eager solves."""
    return COMPILED_MIN_N <= n <= COMPILED_MAX_N if compiling else MIN_N <= n <= MAX_N


def used_for(M: Tensor) -> bool:
    """Whether ``factor_lower`` factorises ``M`` by ``_routine`` rather than torch: a CPU matrix of a
    dtype in ``FACTORED_DTYPES`` and of order ``MIN_N`` to ``MAX_N`` (compiled: ``COMPILED_MIN_N`` to ``COMPILED_MAX_N``)
    that no gradient flows through: in an eager solve where ``EAGER_FACTORED``, on the CPU's own schedule (``host.cpu_schedule``: the counts of
    ``host.accelerator_schedule`` are of what an accelerator dispatches, which never takes it), and
    in compiled code where the operator loads (``_operator_loaded``)."""
    compiling = torch.compiler.is_compiling()
    if not (M.device.type == "cpu" and M.dtype in FACTORED_DTYPES and _taken_order(M.shape[-1], compiling)
            and not (M.requires_grad and torch.is_grad_enabled())):
        return False
    if compiling:
        return _operator_loaded()
    return EAGER_FACTORED and cpu_schedule(M.device)


_ORDERS: dict[int, ctypes.c_int] = {}


def _order(n: int) -> int:
    """The address of a C int holding ``n``, LAPACK's order and leading dimension (read only: one
    for every call and thread)."""
    return ctypes.addressof(_ORDERS.setdefault(n, ctypes.c_int(n)))


def factor_lower(M: Tensor, active: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The lower Cholesky factors of a (..., n, n) symmetric CPU batch (a new row-major tensor, its
    upper triangle zero) and LAPACK's int32 info per matrix (0, or the order of the first leading
    minor that is not positive definite), by ``_routine`` (scipy's ``potf2``, or MKL's ``potrf``
    on an Intel processor), as ``torch.linalg.cholesky_ex`` gives them
    but for a NaN pivot: OpenBLAS's ``potf2`` tests a pivot for ≤ 0 only, so that a factor with NaN
    is reported 0 (``kkt.cholesky``'s ``check_finite`` tests the factor's diagonal). For float32
    and float64 matrices where scipy exports the routine (``_routine``); the engine calls it where
    ``used_for(M)`` holds; under compilation through the C++ operator (the same routine on the same
    layout: the same bits). ``active``: a (B,) bool mask of a (B, n, n) batch's matrices to
    factorise (``skips_inactive``); the others are not, their factor the identity (info 0)."""
    if active is not None and (M.dim() != 3 or active.shape != M.shape[:1] or active.dtype != torch.bool):
        raise ValueError(f"factor_lower: active must be a ({M.shape[0] if M.dim() else 0},) bool mask of a (B, n, n) batch, "
                         f"got {tuple(active.shape)} {active.dtype} for M of shape {tuple(M.shape)}")
    if torch.compiler.is_compiling():
        return torch.ops.optlayers_lapack.cholesky_lower(M, active)
    factor = M.clone(memory_format=torch.contiguous_format)
    n = M.shape[-1]
    info = torch.zeros(M.shape[:-2], dtype=torch.int32)
    routine, upper, order = _routine(M.dtype), ctypes.addressof(_UPPER), _order(n)
    stride, first = n * n * factor.element_size(), factor.data_ptr()
    skipped = set() if active is None else {k for k, on in enumerate(active.tolist()) if not on}
    for k, report in enumerate(range(info.data_ptr(), info.data_ptr() + 4 * info.numel(), 4)):
        if k not in skipped:
            routine(upper, order, first + k * stride, order, report)
    if skipped:
        factor[sorted(skipped)] = torch.eye(n, dtype=M.dtype)
    return factor.tril_(), info


def skips_inactive(M: Tensor) -> bool:
    """Whether the engine's factorisation of the (B, n, n) batch ``M`` skips the problems that have
    finished (``kkt.factor_kkt``'s ``active``): in compiled code on ``potf2``'s route
    (``used_for``), where the batch keeps its finished problems to the end of a solve (the eager
    solve sheds them). The product that forms H (``add_product_where``) and the factorisation then
    leave those matrices out: a compiled chunk of 8 problems (n = 100) runs to its slowest problem,
    and at batch 128 its finished problems were 15 % of the factorisations (1,792 problem-iterations
    where 1,532 were needed)."""
    return torch.compiler.is_compiling() and M.dim() == 3 and used_for(M)


def add_product_where(C: Tensor, A: Tensor, B: Tensor, active: Tensor) -> Tensor:
    """C + A B for the matrices of the (B, r, d) batch ``C`` that the (B,) bool ``active`` marks, C
    itself for the others (the C++ operator, product by product: the same bits as
    ``torch.baddbmm`` gives each matrix); where ``skips_inactive``."""
    return torch.ops.optlayers_lapack.add_product_where(C, A, B, active)


def solves_with(L: Tensor, R: Tensor) -> bool:
    """Whether ``solve_lower`` solves with the factor ``L`` for the right-hand sides ``R``, in place of
    torch's triangular solves: in compiled code where the operator loads, for a row-major
    (contiguous) lower factor that ``potf2`` would have given (``used_for``'s dtypes and orders, no
    gradient through it) and one vector per matrix ((..., n, 1) ``R``, no gradient through it), where
    scipy exports ``trsv`` for the dtype (``SOLVED_DTYPES``). Under compilation torch's solve is a
    dispatch through the operator registry, a copy of the vector into and out of LAPACK's layout and
    MKL's ``trsv``, which runs its generic code on an AMD processor: a pair of solves took 13.6 µs
    at (1, 100) against the operator's 10.2, and a compiled forward + backward 0.95 of the time at
    (1, 100), 0.93 at (1, 50), within the machine's noise at batch 128 (docs/qp.md, "The Cholesky
    factorisation on an AMD processor"). The route depends on the factor's order and dtype only,
    never on the rest of its batch, as the factorisation's does."""
    if not (torch.compiler.is_compiling() and R.shape[-1] == 1 and R.dtype == L.dtype and L.is_contiguous()
            and L.dtype in SOLVED_DTYPES and not (R.requires_grad and torch.is_grad_enabled())):
        return False
    return used_for(L)


def solve_lower(L: Tensor, R: Tensor, forward: bool, backward: bool) -> Tensor:
    """L⁻¹R (``forward``), then L⁻ᵀ of that (``backward``), for a (..., n, n) lower factor ``L`` and
    (..., n, 1) ``R``, by BLAS's ``trsv`` matrix by matrix (the C++ operator; where ``solves_with``)."""
    return torch.ops.optlayers_lapack.trsv_lower(L, R.squeeze(-1), forward, backward).unsqueeze(-1)


def factors_coupled_rows(H: Tensor, C: Tensor) -> bool:
    """Whether ``coupled_schur`` forms and factorises the Schur complement of the rows ``C``
    (B, r, n) with the factor of ``H`` (B, n, n): in compiled code, on ``potf2``'s route for H
    (``used_for``) and for S's order r, where torch's library exports ``trsm`` for the dtype (``SCHUR_DTYPES``). There the batch keeps
    every row of C (no host read says how many are coupled), and the rows that S does not couple are
    zero: the operator leaves them out of the solve, the product and the factorisation."""
    return (torch.compiler.is_compiling() and H.dim() == 3 and C.dim() == 3 and H.dtype in SCHUR_DTYPES
            and _taken_order(C.shape[-2], compiling=True) and used_for(H))


def coupled_schur(L: Tensor, C: Tensor, coupled: Tensor, shift: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Y = L⁻¹Cᵀ (B, n, r; column-major, as torch's triangular solve gives it) and the lower factor of S = YᵀY + diag(``shift``) (B, r, r) over the rows
    that the (B, r) bool ``coupled`` marks, for the lower factor ``L`` (B, n, n) of H and the rows
    ``C`` (B, r, n), whose uncoupled rows are zero: Y's columns there are zero and the factor's
    diagonal √shift (S is diagonal there), and LAPACK's int32 info per matrix (0, or the position
    of the first row that is not positive definite). The C++ operator, matrix by matrix: torch's
    ``trsm`` and ``gemm`` and scipy's ``potf2`` over the coupled rows only (``factors_coupled_rows``)."""
    return torch.ops.optlayers_lapack.coupled_schur(L, C, coupled, shift)


def factors_inverted(M: Tensor) -> bool:
    """Whether ``factor_inverse_lower`` factorises the (..., n, n) batch ``M`` and inverts its factor,
    for a caller that inverts the factor anyway (``kkt.inverts``: compiled, orders up to
    ``kkt.INVERTED_MAX_N``): in compiled code on the CPU where the operator loads, for the dtypes of
    ``FACTORED_DTYPES`` and ``INVERTED_DTYPES``, no gradient through ``M``. torch's factorisation and its
    triangular solve with the identity are two calls through the operator registry, each with copies
    into and out of LAPACK's layout; the operator is one call, ``potf2`` and ``trti2`` matrix by matrix."""
    if not (torch.compiler.is_compiling() and M.device.type == "cpu" and M.dtype in FACTORED_DTYPES
            and M.dtype in INVERTED_DTYPES and not (M.requires_grad and torch.is_grad_enabled())):
        return False
    return _operator_loaded()


def factor_inverse_lower(M: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The lower Cholesky factors L of a (..., n, n) symmetric CPU batch (as ``factor_lower`` gives
    them), their inverses L⁻¹ (lower; the identity where the factorisation failed) and LAPACK's int32
    info per matrix: the C++ operator, ``potf2`` then ``trti2`` matrix by matrix (``factors_inverted``)."""
    return torch.ops.optlayers_lapack.cholesky_inverse_lower(M)
