"""The machine a benchmark ran on: one reader of the CPU model for every script that records it.

``cpu_model()`` is what ``qp_benchmark`` and ``bench_cone`` write as ``meta["cpu"]`` and what
``blas_backends`` prints: the ``model name`` of ``/proc/cpuinfo`` (x86 Linux), else the
``Model name`` of ``lscpu`` (aarch64 Linux, whose ``/proc/cpuinfo`` has none), else
``platform.processor()``, else ``"unknown cpu"``. It never raises: a missing file or command, or
output it cannot read, moves on to the next source.

``preloaded()`` is what they write as ``meta["preload"]``: the libraries ``LD_PRELOAD`` names,
such as a memory allocator put in place of the C library's (docs/qp.md, "Memory allocator"),
which changes a small call's time by a third.

``STEADY_MALLOC`` is the ``GLIBC_TUNABLES`` value with which ``ab_trees`` (by default) and
``qp_benchmark --malloc steady`` start their worker processes: glibc's thresholds fixed, so that
no process trims its heap after a call's large tensors are freed and grows it again in the next
(BENCHMARKS.md, "The allocator's state"); ``malloc_tunables()`` is what they record of it.
"""
from __future__ import annotations

import contextlib
import os
import platform
import re
import subprocess
from typing import Iterator

CPUINFO = "/proc/cpuinfo"
LSCPU = ("lscpu",)
UNKNOWN = "unknown cpu"
LSCPU_TIMEOUT_S = 10

STEADY_MALLOC = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"
"""Blocks up to 32 MiB come from the heap, which is returned to the system only above 256 MiB free at
its top; fixing either threshold also stops glibc from moving them as blocks are freed."""


def with_steady_malloc(env: dict[str, str]) -> dict[str, str]:
    """``env`` with ``STEADY_MALLOC`` added to its ``GLIBC_TUNABLES`` (a process reads them at its start)."""
    return {**env, "GLIBC_TUNABLES": ":".join(filter(None, [env.get("GLIBC_TUNABLES"), STEADY_MALLOC]))}


@contextlib.contextmanager
def steady_malloc_children() -> Iterator[None]:
    """Within the block, processes started from this one get ``STEADY_MALLOC`` (this process's own
    allocator is unchanged: glibc read its tunables at its start); ``GLIBC_TUNABLES`` restored after."""
    before = os.environ.get("GLIBC_TUNABLES")
    os.environ["GLIBC_TUNABLES"] = with_steady_malloc(dict(os.environ))["GLIBC_TUNABLES"]
    try:
        yield
    finally:
        if before is None:
            del os.environ["GLIBC_TUNABLES"]
        else:
            os.environ["GLIBC_TUNABLES"] = before


def malloc_tunables() -> str | None:
    """This process's ``GLIBC_TUNABLES``, as recorded with a benchmark's results."""
    return os.environ.get("GLIBC_TUNABLES")


def _value(lines, key: str) -> str | None:
    """The value of the first ``key: value`` line (leading blanks ignored: newer lscpu indents it)."""
    for line in lines:
        name, sep, value = line.strip().partition(":")
        if sep and name.strip() == key and value.strip():
            return value.strip()
    return None


def _from_cpuinfo() -> str | None:
    with open(CPUINFO, encoding="utf-8", errors="replace") as f:
        return _value(f, "model name")


def _from_lscpu() -> str | None:
    env = {**os.environ, "LC_ALL": "C"}  # lscpu translates its field names
    out = subprocess.run(list(LSCPU), capture_output=True, text=True, check=True, env=env,
                         timeout=LSCPU_TIMEOUT_S).stdout
    return _value(out.splitlines(), "Model name")


def cpu_model() -> str:
    """The CPU's model name, a non-empty string; ``"unknown cpu"`` when no source names it."""
    for read in (_from_cpuinfo, _from_lscpu):
        try:
            model = read()
        except (OSError, ValueError, subprocess.SubprocessError):
            model = None
        if model:
            return model
    try:
        return platform.processor().strip() or UNKNOWN
    except (OSError, ValueError, subprocess.SubprocessError):
        return UNKNOWN


def preloaded() -> list[str]:
    """The libraries the dynamic loader was told to load first (``LD_PRELOAD``, whose entries are
    separated by colons or blanks), in order; empty when it names none."""
    return [entry for entry in re.split(r"[:\s]+", os.environ.get("LD_PRELOAD", "")) if entry]
