"""The cone K as a product of simple cones, in SCS order; the one place where cone sizes live."""
from __future__ import annotations

import dataclasses
import operator
from types import ModuleType
from typing import Iterator

from optlayers.cone import exp, nonneg, psd, soc, zero

EXP_SIZE = 3  # an exponential cone is a subset of R^3


def psd_vec_size(order: int) -> int:
    """Length of the vectorized lower triangle of an ``order`` x ``order`` symmetric matrix."""
    return order * (order + 1) // 2


@dataclasses.dataclass(frozen=True)
class Block:
    """A run of ``count`` identical cones, each a vector of length ``size``, at ``start`` in s.

    ``module`` holds ``project`` / ``derivative``; ``dual`` marks a cone given as the dual of
    ``module``'s cone (the dual exponential cone).
    """

    module: ModuleType
    start: int
    count: int
    size: int
    dual: bool = False

    @property
    def stop(self) -> int:
        return self.start + self.count * self.size


@dataclasses.dataclass(frozen=True)
class ConeSpec:
    """K = {0}^zero x R_+^nonneg x SOC(soc[0]) x ... x PSD(psd[0]) x ... x K_exp^exp x (K_exp^*)^exp_dual.

    Args:
        zero: rows of the zero cone (equality constraints).
        nonneg: rows of the nonnegative orthant.
        soc: sizes of the second-order cones {(t, x): ||x|| <= t}, t first.
        psd: orders d of the PSD cones, each d(d+1)/2 rows: the lower triangle stacked by
            columns with off-diagonal entries scaled by sqrt(2) (SCS's convention).
        exp: number of exponential cones {(x, y, z): y exp(x / y) <= z, y > 0}, 3 rows each.
        exp_dual: number of dual exponential cones, 3 rows each.
    """

    zero: int = 0
    nonneg: int = 0
    soc: tuple[int, ...] = ()
    psd: tuple[int, ...] = ()
    exp: int = 0
    exp_dual: int = 0

    def __post_init__(self) -> None:
        for name in ("soc", "psd"):
            sizes = getattr(self, name)
            if not isinstance(sizes, (tuple, list)):
                hint = (f"{name}={[_plain(value) for value in sizes]!r}" if hasattr(sizes, "__iter__")
                        else f"{name}=[{sizes!r}] for one cone")
                raise TypeError(f"ConeSpec.{name} must be a list or tuple of sizes (one per cone), got "
                                f"{type(sizes).__name__} {sizes!r}; e.g. {hint}")
            object.__setattr__(self, name, tuple(_size(f"ConeSpec.{name} entries", value, 1) for value in sizes))
        for name in ("zero", "nonneg", "exp", "exp_dual"):
            object.__setattr__(self, name, _size(f"ConeSpec.{name}", getattr(self, name), 0))

    def blocks(self) -> Iterator[Block]:
        """The cones in SCS order, consecutive identical cones merged into one block."""
        start = 0
        runs: list[tuple[ModuleType, int, int, bool]] = [(zero, 1, self.zero, False), (nonneg, 1, self.nonneg, False)]
        runs += _runs(soc, self.soc, lambda k: k)
        runs += _runs(psd, self.psd, psd_vec_size)
        runs += [(exp, EXP_SIZE, self.exp, False), (exp, EXP_SIZE, self.exp_dual, True)]
        for module, size, count, dual in runs:
            if count:
                yield Block(module, start, count, size, dual)
                start += count * size

    @property
    def size(self) -> int:
        """Total number of rows m of A that K covers."""
        return sum(block.count * block.size for block in self.blocks())

    def scs_cone(self) -> dict:
        """The cone as SCS's ``cone`` dictionary."""
        return {"z": self.zero, "l": self.nonneg, "q": list(self.soc), "s": list(self.psd),
                "ep": self.exp, "ed": self.exp_dual}


def _plain(value: object) -> object:
    """An integer scalar (numpy's too) as a Python int, for a message; anything else as it is."""
    try:
        return operator.index(value)
    except TypeError:
        return value


def _size(what: str, value: object, least: int) -> int:
    """``value`` as an int of at least ``least``: ints and integer scalars (numpy's) are taken, booleans
    and everything else refused, naming the type given."""
    try:
        size = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        size = None
    if size is None or size < least:
        kind = "nonnegative" if least == 0 else "positive"
        raise ValueError(f"{what} must be {kind} ints, got {type(value).__name__} {value!r}" if "entries" in what else
                         f"{what} must be a {kind} int, got {type(value).__name__} {value!r}")
    return int(size)


def _runs(module: ModuleType, sizes: tuple[int, ...], vec_size) -> list[tuple[ModuleType, int, int, bool]]:
    """Merge consecutive equal sizes into (module, vector size, count, dual) runs."""
    runs: list[tuple[ModuleType, int, int, bool]] = []
    for value in sizes:
        if runs and runs[-1][1] == vec_size(value):
            runs[-1] = (module, runs[-1][1], runs[-1][2] + 1, False)
        else:
            runs.append((module, vec_size(value), 1, False))
    return runs
