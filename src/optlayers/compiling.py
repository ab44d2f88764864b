"""The opt-in compiled path (``compile=True``): functions free of host synchronisations compiled
whole with ``torch.compile(fullgraph=True)``, one specialisation per shape of their arguments.

On CUDA the interior point step is replayed from a CUDA graph of its own (``engine.graphed``):
its outputs are the next call's inputs, written back into the buffers it reads, while the outputs
of the other compiled functions (the equilibration, the start, the derivatives' factorisation)
outlive later calls, which a replay would overwrite. The caller copies the step's last outputs out
of the graph's buffers (``owned``) before they are kept. torch's own CUDA graphs (mode
"reduce-overhead") are not used: they take each call for a new iteration of a training loop and
free the previous call's outputs, which the step's next call reads.

On the CPU, where a small problem's solve is a few compiled calls, each call's guards are cut to
those that can change without editing the code (``keeps_guard``).
"""
from __future__ import annotations

import functools
import logging
import threading
import types
import warnings
import weakref
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, TypeVar

import torch
from torch import Tensor
from torch._inductor.exc import InductorError

if TYPE_CHECKING:  # a type only: the module is torch's private one
    from torch._dynamo.types import GuardFilterEntry

T = TypeVar("T")

COMPILED_SHAPES = 64
"""Specialisations per compiled function: torch's default of 8 would turn the ninth problem shape
into an error. Past this many (or torch's limit, if that is higher), calls run eagerly (with a
warning)."""

CPU_OPTIONS = {"cpp_wrapper": True, "unroll_reductions_threshold": 16,
               "unsafe_marked_cacheable_functions": {f"torch.ops.higher_order.{op}": f"optlayers, torch {torch.__version__}"
                                                     for op in ("while_loop", "cond")}}
"""Inductor's options on the CPU:

- ``cpp_wrapper``: the generated code calls its kernels and library functions (Cholesky,
  triangular solves, batched products) from C++ rather than Python, which at batch 1, n = 10
  takes a third off a compiled iteration (a forward + backward 4.8 -> 4.1 ms, measured one
  iteration per call), at the same compilation time.
- ``unroll_reductions_threshold``: sums of at most 16 terms (inductor's default is 8) are
  unrolled into the loop over their outputs. Left as loops of their own, each short sum (a row of
  a small matrix-vector product that inductor writes elementwise, a norm over a problem's 10
  variables) is a masked vector load and a horizontal reduction: at batch 128, n = 10 those took a
  third of the compiled solve's time (``perf``), and a forward + backward took 17.3 ms of CPU time
  against 10.5 ms with them unrolled (one thread).
- ``unsafe_marked_cacheable_functions``: graphs with a ``while_loop`` (the QP's iterations, the
  equilibration) or a ``cond`` (the refinement steps, ``engine.kkt.refines_on_device``) are kept
  in inductor's FX graph cache like any other. torch bypasses that cache
  for higher-order operators it has not marked cacheable, so that each new process lowered and
  generated the whole solve again (only the C++ compilation was cached): a (1, 10) solve's first
  call in a new process took 38-60 s with a warm cache, 11 s with this. The cache key holds the
  loop's condition and body graphs, and a ``cond``'s branches (as for ``invoke_subgraph``, which
  torch marks cacheable), so another loop body or branch is another entry (tested)."""

POINTWISE_CAT_OPTIONS = {**CPU_OPTIONS, "force_pointwise_cat": True}
"""``CPU_OPTIONS`` for the calls of a small batch (``pointwise_cats``): each concatenation
(``torch.cat``, ``torch.stack``) is computed by a pointwise kernel that reads its inputs, instead
of inductor's CPU default, each input computed into a slice of the output. The C++ wrapper names
each such slice by a tensor handle of its own (``reinterpret_tensor``: a tensor made and freed
with the allocator's calls) at every execution, the loop body's included: at batch 1, n = 10 the
solve's iteration made 128 of them (72 for the stacked comparisons of ``qp.ipm._certificates``)
and a forward + backward 1,425, with 9,140 calls of malloc; pointwise, 89 and 4,827 (``perf stat`` on
uprobes), and the results are the same to the bit. The pointwise kernels index their inputs
element by element, which at batch 32 and 128 (n = 10) cost more than the handles (one thread,
alternated in one process: 1.17 and 1.46 times the time, against 0.84 at (1, 10), 0.90 at (1, 100)
and 0.93 at (8, 10))."""

POINTWISE_CAT_MAX_ENTRIES = 100
"""The largest batch × n (the entries of x) whose compiled calls concatenate pointwise
(``POINTWISE_CAT_OPTIONS``): measured faster at 10, 80 and 100, slower at 320 and 1,280."""


def pointwise_cats(batch: int, n: int, device: torch.device) -> bool:
    """Whether the compiled calls on a batch of ``batch`` problems of ``n`` variables on ``device``
    concatenate pointwise (``POINTWISE_CAT_OPTIONS``): on the CPU, up to ``POINTWISE_CAT_MAX_ENTRIES``."""
    return device.type == "cpu" and batch * n <= POINTWISE_CAT_MAX_ENTRIES


class _NoShimNotices(logging.Filter):
    """Drops inductor's notice, one per library call compiled with ``cpp_wrapper``, that an
    operation without a C shim (Cholesky, triangular solves) is called through its fallback: the
    expected route for those calls, which would otherwise fill the log at every compilation."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is missing a c-shim implementation" not in record.getMessage()


_PACKAGE = str(Path(__file__).resolve().parent)


class _OwnRecompileLimitNotices(logging.Filter):
    """Drops dynamo's warning that one of this package's compiled functions hit torch's recompile
    limit: ``compiled`` expects that on every new specialisation past torch's eighth, and compiles
    it again under ``COMPILED_SHAPES`` (warning itself past that). The same warning about any other
    function passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("hit config.recompile_limit" in message and _PACKAGE in message)


TORCH_OWN_DEPRECATION = r"`torch\._prims_common\.check` is deprecated"
"""The start of a FutureWarning that torch 2.13's inductor raises against its own code while it
lowers one of our graphs (``torch._inductor.lowering`` calls the deprecated ``check``): nothing
a user of this package can act on."""


_OWN_FILTERS: list = []
"""The entry of ``warnings.filters`` that ``_hide_torch_own_deprecation`` made (the first time)."""


def _hide_torch_own_deprecation() -> None:
    """Ignore ``TORCH_OWN_DEPRECATION``, and only where inductor's lowering raises it; again where
    the filter is gone (a ``warnings.catch_warnings`` block restores at its exit the filters it
    found, dropping one added inside it: the first compiled call inside such a block, as in a
    test, would otherwise leave every later compilation showing torch's warning) or no longer
    first (a user's later ``filterwarnings("error", category=FutureWarning)`` put in front of it made
    torch's warning an exception inside inductor, which took it for a failed compilation and left
    the solve eager for the rest of the process). ``_call`` asks before each compiled call."""
    if _OWN_FILTERS and warnings.filters and warnings.filters[0] is _OWN_FILTERS[0]:
        return
    warnings.filterwarnings("ignore", message=TORCH_OWN_DEPRECATION, category=FutureWarning,
                            module=r"torch\._inductor\.lowering")
    _OWN_FILTERS[:] = [warnings.filters[0]]


@functools.cache
def _quiet_expected_notices() -> None:
    logging.getLogger("torch._inductor.ir").addFilter(_NoShimNotices())
    logging.getLogger("torch._dynamo.convert_frame").addFilter(_OwnRecompileLimitNotices())
    _hide_torch_own_deprecation()


_GUARDED_GLOBALS = (int, float, bool, type(None))
_CODE_PARTS = ("__dataclass_fields__", "__defaults__", "__kwdefaults__", "G['__import_torch")
"""Parts of a guard's source (``GuardFilterEntry.name``) that name a value describing code, not a
module constant: a dataclass's fields (their ``init`` flags, which ``dataclasses.replace`` reads),
a function's defaults, and what is reached through torch's own modules (its pytree's constants)."""


def keeps_guard(entry: GuardFilterEntry) -> bool:
    """Whether a compiled function keeps a guard that dynamo built for it (``guard_filter_fn``):
    every guard on its arguments, on the global state (grad mode, default device) and on tensors,
    and of the guards on what it reaches through module globals only those on values (numbers,
    booleans, None) of the package's module constants, which a test may change. The others guard
    the code it traced (functions, classes, modules, enum members, builtins, dataclass fields and
    function defaults: ``_CODE_PARTS``): a (1, 10) QP solve's compiled call keeps 73 guards and its
    backward 96. Code changes only when it is monkeypatched, after which the compiled
    specialisations must be cleared (``torch._dynamo.reset()``, as the tests' ``eager_backend``
    fixture does)."""
    if not entry.is_global or entry.guard_type == "TENSOR_MATCH":
        return True
    if any(part in entry.name for part in _CODE_PARTS):
        return False
    return entry.has_value and type(entry.value) in _GUARDED_GLOBALS


def _keep_guards(entries: list[GuardFilterEntry]) -> list[bool]:
    return [keeps_guard(entry) for entry in entries]


_STATIC_UNRECORDED = torch._dynamo.config._make_closure_patcher(
    automatic_dynamic_shapes=False, assume_static_by_default=True, record_runtime_overhead=False)
"""Dynamo's settings for the duration of each compiled call (a patch entered and reverted per call,
as the one ``torch.compile(dynamic=False)`` enters, which this replaces): every specialisation
static (no dynamic shapes on a recompilation), and none of the profiler ranges that dynamo would
otherwise generate around the call of each graph (``record_runtime_overhead``, read when it
generates the code that calls the graph: two more ``torch._dynamo.disable`` wrappers entered per
call, 25 Python calls, whether a profiler runs or not)."""

BATCH_DYNAMIC = True
"""Whether the QP's compiled functions on the CPU (those compiled ``batched``) compile one
specialisation for every batch size but the first: the first batch size of a signature (the
shapes after the batch, the dtypes) is compiled as it is, static, and every other batch of at
least 2 problems runs one more specialisation, compiled once with the batch size a symbol (on a
copy of the function, whose specialisations dynamo keeps apart, so that the first size keeps its
own). A data loader's smaller last batch, or any number of other batch sizes, is then one
compilation more (1-2 minutes on two cores), not one per size. The symbolic batch costs: at
(128, 100) and (37, 10) a compiled forward + backward took 1.09 and 1.08 times the static one's
time (``docs/qp.md``). A batch of one problem is a specialisation of its own (dynamo specialises
sizes 0 and 1), as is one whose size changes which options it is compiled with
(``pointwise_cats``). False: each batch size is compiled."""

# Compilation raises torch's (process-wide) recompile limit for its duration: one thread at a time.
_COMPILING = threading.Lock()


def _batch_tensors(args: tuple) -> Iterator[Tensor]:
    """The tensors of ``args`` (and of their dataclasses, tuples and lists, one level down) that
    have a first dimension, in order: a ``batched`` function's batch."""
    for arg in args:
        if isinstance(arg, Tensor):
            parts: Iterable = (arg,)
        elif is_dataclass(arg) and not isinstance(arg, type):
            parts = (getattr(arg, f.name) for f in fields(arg))
        elif isinstance(arg, (tuple, list)):
            parts = arg
        else:
            continue
        yield from (t for t in parts if isinstance(t, Tensor) and t.dim() >= 1)


def _copy(fn: Callable) -> Callable:
    """``fn`` with a code object of its own: dynamo keeps its specialisations per code object, so
    that the copy's (a symbolic batch's) are looked up apart from ``fn``'s."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__, copy.__qualname__ = fn.__kwdefaults__, fn.__qualname__
    return copy


@functools.cache
def compiled(fn: Callable, device_type: str, pointwise_cat: bool = False, batched: bool = False) -> Callable:
    """``fn`` compiled whole (no graph breaks) for devices of ``device_type``; with ``pointwise_cat``, on the CPU
    with ``POINTWISE_CAT_OPTIONS`` (see ``pointwise_cats``). Positional and keyword arguments
    pass through. ``batched``: every tensor argument's first dimension is the batch (see
    ``BATCH_DYNAMIC``).

    Each call runs under ``_STATIC_UNRECORDED`` and torch's own recompile limit; only one that
    hits it (a new specialisation past torch's default of 8) compiles again under
    ``COMPILED_SHAPES``, one thread at a time (``_past_torchs_limit``): keying every call's
    arguments here would cost more host time than a compiled step of a small problem (a
    ``batched`` function keys the shapes of a batch of two or more, to route it, but not of one).
    Past that limit ``fn`` runs eagerly."""
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if not isinstance(device_type, str) or not device_type:
        raise ValueError(f"device_type must be a device type such as 'cpu' or 'cuda', got {device_type!r}")
    if not isinstance(pointwise_cat, bool):
        raise TypeError(f"pointwise_cat must be True or False, got {pointwise_cat!r}")
    if not isinstance(batched, bool):
        raise TypeError(f"batched must be True or False, got {batched!r}")
    if device_type == "cpu":
        _quiet_expected_notices()
        options = POINTWISE_CAT_OPTIONS if pointwise_cat else CPU_OPTIONS
        graph = torch.compile(fn, fullgraph=True, options={**options, "guard_filter_fn": _keep_guards})
    else:
        graph = torch.compile(fn, fullgraph=True)
    name = getattr(fn, "__qualname__", repr(fn))
    if not (batched and BATCH_DYNAMIC and device_type == "cpu"):
        return functools.wraps(fn)(functools.partial(_call, graph, fn, name))
    symbolic = torch.compile(_copy(fn), fullgraph=True, options={**options, "guard_filter_fn": _keep_guards})
    first_batch: dict[tuple, int] = {}  # each signature's first batch size (of at least 2)

    @functools.wraps(fn)
    def run(*args: object, **kwargs: object) -> object:
        first = next(_batch_tensors(args), None)  # a batch of one is looked at no further
        batch = 1 if first is None else first.shape[0]
        if batch < 2:  # dynamo specialises sizes 0 and 1 whatever their marks
            return _call(graph, fn, name, *args, **kwargs)
        tensors = list(_batch_tensors(args))
        signature = tuple((t.shape[1:], t.dtype) for t in tensors)
        if first_batch.setdefault(signature, batch) == batch:
            return _call(graph, fn, name, *args, **kwargs)
        for t in tensors:
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return _call(symbolic, fn, name, *args, **kwargs)

    return run


def _call(graph: Callable, fn: Callable, name: str, *args: object, **kwargs: object) -> object:
    """``graph`` (``fn`` compiled) called under ``_STATIC_UNRECORDED`` and torch's own recompile
    limit; past that, ``_past_torchs_limit``. Where the backend failed to compile ``graph``
    (``_BACKEND_FAILURES``), ``fn`` runs eagerly, from then on for every call of ``graph``
    (``_gave_up``)."""
    if graph in _GAVE_UP:
        return fn(*args, **kwargs)
    _hide_torch_own_deprecation()
    revert = _STATIC_UNRECORDED()
    try:
        return graph(*args, **kwargs)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        return _past_torchs_limit(graph, fn, name, *args, **kwargs)
    except _BACKEND_FAILURES as error:
        _gave_up(graph, name, error)
    finally:
        revert()
    return fn(*args, **kwargs)


_BACKEND_FAILURES = (torch._dynamo.exc.BackendCompilerFailed, InductorError)
"""What torch raises where its backend, not the traced code, failed: inductor's lowering or the C++
compiler (no compiler, a broken cache, headers built for another instruction set). The traced code
is the eager one, so its eager run gives the same results, only slower. A graph break or an
unsupported operation in the traced code (a package bug) raises dynamo's own errors, which pass."""

_GAVE_UP: weakref.WeakSet = weakref.WeakSet()
"""The compiled functions whose backend failed: their calls run eagerly for the rest of the process
(a new attempt would trace and fail again at every call)."""


def _gave_up(graph: Callable, name: str, error: Exception) -> None:
    """Record that the backend failed to compile ``graph`` (``name``), with a warning that names the error."""
    _GAVE_UP.add(graph)
    cause = getattr(error, "inner_exception", None) or error
    first = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
    warnings.warn(f"compile=True: torch's backend failed to compile {name} ({type(cause).__name__}: {first[:200]}); "
                  "it runs eagerly from now on in this process (the same results, more slowly)",
                  RuntimeWarning, stacklevel=4)


def _past_torchs_limit(graph: Callable, fn: Callable, name: str, *args: object, **kwargs: object) -> object:
    """A call of ``graph`` (``fn`` compiled) that met torch's recompile limit, again under
    ``COMPILED_SHAPES``; past that, ``fn`` run eagerly, with a warning; where the backend fails,
    as in ``_call``."""
    with _COMPILING, torch._dynamo.config.patch(recompile_limit=COMPILED_SHAPES):
        try:
            return graph(*args, **kwargs)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            warnings.warn(f"compile=True: {name} has {COMPILED_SHAPES} compiled specialisations (problem shapes, "
                          "tolerances); this call runs eagerly", RuntimeWarning, stacklevel=3)
        except _BACKEND_FAILURES as error:
            _gave_up(graph, name, error)
    return fn(*args, **kwargs)


OPAQUE_REASON = ("optlayers' solvers read flags on the host and loop on them: a user's torch.compile calls them "
                 "as they are (compile=True compiles the solver's own parts)")


def opaque_to_user_compile(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` (a public entry point: a solve, a layer's ``forward``) called as it is where a user's
    ``torch.compile`` meets it, one graph break, rather than traced.

    Traced, a solve's host reads, loops and validation split it into dozens of graphs, each compiled
    by inductor: a model of a linear layer and an ``OptNet`` took 122 s for its first compiled call
    (23 graph breaks, dynamo's warnings about ``lru_cache`` and data-dependent reads), where it takes
    about a second called as it is. The solve's own compiled parts (``compile=True``) still compile
    inside it: ``torch.compiler.disable`` stops dynamo at ``fn``'s frame and its callees, and a
    ``torch.compile``d function called from there starts dynamo again. Costs under a µs a call."""
    return torch.compiler.disable(fn, reason=OPAQUE_REASON)


def owned(obj: T) -> T:
    """``obj`` (a dataclass of tensors) with every tensor copied into memory of its own: the state
    replayed in a CUDA graph's buffers before it is kept (see the module docstring), and the data that the
    body of a ``while_loop`` reads (``engine.device_loop.run``)."""
    if not is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"obj must be a dataclass instance, got {type(obj).__name__}")
    return replace(obj, **{f.name: t.clone() for f in fields(obj) if isinstance(t := getattr(obj, f.name), Tensor)})
