"""A stand-in for a CUDA graph on the CPU, for tests of ``engine.graphed``: ``capture(body, device)``
runs ``body`` as a CUDA graph capture does, recording but computing nothing (every tensor an
operation makes or writes is filled with garbage: NaN, or 0 for integers, True for booleans;
views and the inputs they view are left alone) and refusing a read by the host (``item``,
``bool(tensor)``, ``nonzero``, a boolean index), and returns a graph whose ``replay()`` runs
``body`` for real, as the captured kernels would on the device. Run the code under
``host.accelerator_schedule()``, so that it takes the branches it takes on a GPU.

A CUDA graph replays the kernels of its capture whatever Python would do now; the stand-in reruns
Python. So each replay checks that it ran the capture's operations (their names and the shapes
and dtypes of what they return, copies aside): a replay that took another branch (a setting the
graph's key leaves out, changed since the capture) raises ``ReplayDiverged``, where a real graph
would silently have run the old branch."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _garble(t: torch.Tensor) -> None:
    if t.is_floating_point() or t.is_complex():
        t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.fill_(True)
    else:
        t.fill_(0)  # an index made in the body must stay in range: the CPU checks it where a capture does not


# Operations whose result the host reads (``item``, ``bool(tensor)``, ``nonzero``, ...): on CUDA a
# synchronisation, which a capture refuses.
_HOST_READS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "nonzero_static", "masked_select", "unique",
               "_unique2", "unique_consecutive", "unique_dim"}


def _bool_index(name: str, args: tuple) -> bool:
    indices = args[1] if name in ("index", "index_put", "index_put_") and len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (indices or ()))


# Copies are left out of the operations a replay must repeat: a graphed call's stand-in replay copies
# its fresh outputs into the capture's (what the real graph's kernels write in place).
_COPIES = {"copy_", "_foreach_copy_", "_to_copy", "clone"}


def _signature(name: str, out: object) -> tuple:
    return (name, tuple((tuple(t.shape), t.dtype) for t in tree_leaves(out) if isinstance(t, torch.Tensor)))


class ReplayDiverged(AssertionError):
    """A stand-in replay ran other operations than its capture (see the module docstring)."""


class _Recording(TorchDispatchMode):
    """Records each operation's ``_signature`` (copies aside) into ``ops``."""

    def __init__(self, ops: list) -> None:
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in _COPIES:
            self.ops.append(_signature(name, out))
        return out


class _CapturedComputesNothing(_Recording):
    """Every operation's fresh outputs and the arguments it writes, garbled; a read by the host
    raises, as on CUDA during a capture."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _HOST_READS or _bool_index(name, args):
            raise RuntimeError(f"operation not permitted when stream is capturing ({name}: a read by the host; stand-in capture)")
        out = func(*args, **kwargs)
        if name not in _COPIES:
            self.ops.append(_signature(name, out))
        with torch.utils._python_dispatch._disable_current_modes():
            schema = func._schema
            for argument, value in zip(schema.arguments, list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]):
                if argument.alias_info is not None and argument.alias_info.is_write:
                    for t in tree_leaves(value):
                        if isinstance(t, torch.Tensor):
                            _garble(t)
            returns = out if isinstance(out, (tuple, list)) else (out,)
            for ret, value in zip(schema.returns, returns):
                if ret.alias_info is None:  # a fresh tensor (not a view of an input, not an input written in place)
                    for t in tree_leaves(value):
                        if isinstance(t, torch.Tensor):
                            _garble(t)
        return out


class StandInGraph:
    def __init__(self, body: Callable[[], None], ops: list) -> None:
        self.body, self.ops = body, ops

    def replay(self) -> None:
        ops: list = []
        with _Recording(ops):
            self.body()
        if ops != self.ops:
            at = next((i for i, (a, b) in enumerate(zip(ops, self.ops)) if a != b), min(len(ops), len(self.ops)))
            raise ReplayDiverged(f"the replay ran other operations than the capture from operation {at} on: "
                                 f"{ops[at:at + 3]} against {self.ops[at:at + 3]} (of {len(ops)} and {len(self.ops)})")


def capture(body: Callable[[], None], device: Any) -> StandInGraph:
    ops: list = []
    with _CapturedComputesNothing(ops):
        body()
    return StandInGraph(body, ops)


def warm_up(warm: Callable[[], None], device: Any) -> None:
    warm()
