"""What a compiled QP layer call (``compile=True``) does outside its compiled functions, counted
for one forward + backward at batch 1: ``torch._dynamo.disable`` wrappers entered (the dynamo
code that calls each graph, ``compiling._STATIC_UNRECORDED``), dynamo configuration patches
entered, guards evaluated (``compiling.keeps_guard``), argument bindings of the autograd
Function's ``apply`` (``functions.applied_as_given``), and aten operations dispatched outside the
compiled calls. Upper bounds, as measured; traced by dynamo's eager backend (no inductor
compilation: fast), whose calls enter the same wrappers and keep the same guards."""
import collections
import inspect
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from optlayers import QPFunction
from optlayers.qp import autograd, forward
from tests.qp.qp_problems import random_qp

# the compiled calls of a forward + backward that ends in one call: the solve and the backward
COMPILED_CALLS = 2
# aten operations outside them: the layer's (the gradient-requiring datum detached, the absent
# equalities made, the information read, the relaxed mask, the statuses kept, the cotangent made
# contiguous; autograd's own detaches of saved and returned tensors) and the loss's (sum, its
# backward's ones and expand, the gradient's accumulation)
ATEN_OUTSIDE = 19
# guards evaluated by a call of each compiled function (``compiling.keeps_guard``)
SOLVE_GUARDS = 92  # 3 of them the default absolute tolerance that follows small data (IPMSettings.tol_follows_data, SMALL_DATA as ipm reads it), 2 the scale of small data and objectives (scaling.SMALL_DATA, _SMALLEST_SCALE), 2 on IPMSettings.balanced_step_fraction, 4 the progress test's constants (ipm._PROGRESS, _PROGRESS_COUNTER, _REDUCED_ACCURACY,
# progress_limit), 3 the iterate's recession test's and the augmented factorisation's (ipm._STILL_DIVERGING,
# kkt.AUGMENT, augment), 1 the refinement's early stop (kkt._REFINED_ROUNDOFFS), 2 the derivative checks'
# bounds (derivative_checks.AMBIGUOUS_ROW_RATIO, MAX_AMPLIFICATION), 1 dynamo's own on the 0-d fill (an
# epilogue guard), 1 the Cholesky route's smallest compiled order (lapack.COMPILED_MIN_N, where lapack.FACTORED_DTYPES has the dtype),
# 1 the gap of far sides (sides.FAR_SIDE)
BACKWARD_GUARDS = 107  # 3 of them the factor's augment (KKTFactor.augment, kkt.AUGMENT), 8 the refinement's
# early stop (kkt._REFINED_ROUNDOFFS, and 7 on torch's pytree registry, with which torch.cond flattens its operands)


def _layer_call() -> tuple:
    """A (1, 10) problem and a forward + backward of ``QPFunction(compile=True)`` through p."""
    data = random_qp((1,), 10, 10, 0)
    Q, p, G, h = (data[k] for k in ("Q", "p", "G", "h"))
    p = p.clone().requires_grad_()
    layer, absent = QPFunction(compile=True), torch.empty(0)

    def call() -> None:
        layer(Q, p, G, h, absent, absent).sum().backward()
    return call


def _python_calls(call) -> collections.Counter:
    """Python function calls made by ``call()``, by (file name, function name)."""
    calls: collections.Counter = collections.Counter()

    def profile(frame, event, arg):
        if event == "call":
            calls[(frame.f_code.co_filename.rsplit("/", 1)[-1], frame.f_code.co_name)] += 1
    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return calls


def test_dynamo_wrappers_and_patches_entered_per_call(eager_backend, monkeypatch):
    call = _layer_call()
    call()  # compiles
    binds = []
    real_bind = inspect.Signature.bind
    monkeypatch.setattr(inspect.Signature, "bind", lambda self, *a, **k: binds.append(str(self)) or real_bind(self, *a, **k))
    calls = _python_calls(call)
    assert calls[("eval_frame.py", "compile_wrapper")] == COMPILED_CALLS  # one call of each compiled function
    # the graphs' calls, and the two entries' torch.compiler.disable wrappers (QPFunction.forward, its
    # solve: compiling.opaque_to_user_compile), no profiler ranges around them
    assert calls[("eval_frame.py", "_fn")] <= COMPILED_CALLS + 2
    assert calls[("_config_module.py", "change")] <= COMPILED_CALLS  # one patch of dynamo's settings per call
    assert binds == []


class _AtenCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_aten_operations_outside_the_compiled_calls(eager_backend, monkeypatch):
    call = _layer_call()
    call()  # compiles
    real = forward.compiled

    def without_counting(fn, *args, **kwargs):
        run = real(fn, *args, **kwargs)

        def uncounted(*a, **k):
            with _disable_current_modes():  # the compiled call's own operations are not counted
                return run(*a, **k)
        return uncounted

    monkeypatch.setattr(forward, "compiled", without_counting)
    monkeypatch.setattr(autograd, "compiled", without_counting)
    with _AtenCount() as counted:
        call()
    assert sum(counted.ops.values()) <= ATEN_OUTSIDE, dict(counted.ops)
    assert counted.ops["aten.detach.default"] <= 10, dict(counted.ops)  # of the data, only p (requires grad)


def _guards(manager) -> int:
    """The leaf guards under a guard manager (dynamo's tree: leaves, child managers, a dict's keys and values)."""
    count = len(manager.get_leaf_guards()) + sum(_guards(child) for child in manager.get_child_managers())
    if hasattr(manager, "get_key_value_managers"):
        count += sum(_guards(m) for pair in manager.get_key_value_managers().values() for m in pair if m is not None)
    return count


def test_guards_per_compiled_function(eager_backend):
    """The guards each call of the compiled solve and backward evaluates: those on their arguments,
    the global state and the package's module constants (``compiling.keeps_guard``), not those on
    the traced code's dataclass fields and defaults."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    _layer_call()()
    for fn, most in ((forward._checked_solved, SOLVE_GUARDS), (autograd._compiled_vjp, BACKWARD_GUARDS)):
        (entry,) = _debug_get_cache_entry_list(fn.__code__)
        root = entry.guard_manager.root
        assert _guards(root) + len(root.get_epilogue_lambda_guards()) <= most, fn.__name__
