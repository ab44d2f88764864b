"""A stand-in for a CUDA graph on the CPU, for tests of ``engine.graphed``: ``capture(body, device)``
runs ``body`` as a CUDA graph capture does, recording but computing nothing (every tensor an
operation makes or writes is filled with garbage: NaN, or 0 for integers, True for booleans;
views and the inputs they view are left alone) and refusing a read by the host (``item``,
``bool(tensor)``, ``nonzero``, a boolean index), and returns a graph whose ``replay()`` runs
``body`` for real, as the captured kernels would on the device. Run the code under
``host.accelerator_schedule()``, so that it takes the branches it takes on a GPU."""
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


class _CapturedComputesNothing(TorchDispatchMode):
    """Every operation's fresh outputs and the arguments it writes, garbled; a read by the host
    raises, as on CUDA during a capture."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _HOST_READS or _bool_index(name, args):
            raise RuntimeError(f"operation not permitted when stream is capturing ({name}: a read by the host; stand-in capture)")
        out = func(*args, **kwargs)
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
    def __init__(self, body: Callable[[], None]) -> None:
        self.body = body

    def replay(self) -> None:
        self.body()


def capture(body: Callable[[], None], device: Any) -> StandInGraph:
    with _CapturedComputesNothing():
        body()
    return StandInGraph(body)


def warm_up(warm: Callable[[], None], device: Any) -> None:
    warm()
