"""Shared fixtures: float64 by default, seeded randomness; the compiled path traced by dynamo's eager backend."""
import pytest
import torch

from optlayers import compiling


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    """Every test (tests/cone included) starts seeded, in float64. (No torch.set_num_threads here:
    restoring a count of 2 or more leaves torch's batched LU broken on MKL builds, pytorch/pytorch#142815.)"""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def eager_compile(fn, **kwargs):
    """``torch.compile(fn, **kwargs)`` as the package calls it, traced whole by dynamo but run by its
    eager backend (no inductor compilation: fast; the guards kept as asked)."""
    return torch._dynamo.optimize("eager", nopython=True, dynamic=kwargs.get("dynamic"),
                                  guard_filter_fn=kwargs.get("options", {}).get("guard_filter_fn"))(fn)


@pytest.fixture
def eager_backend(monkeypatch):
    """``torch.compile`` replaced by ``eager_compile``, with the compiled wrappers and dynamo's
    specialisations cleared before and after."""
    yield from _compiling_with(monkeypatch, eager_compile)


@pytest.fixture
def failing_backend(monkeypatch):
    """``torch.compile``, as the package calls it, with a backend that raises (as inductor's C++
    compilation does without a compiler, or with a broken cache), counting its attempts;
    specialisations cleared before and after."""
    attempts = []

    def backend(gm, example_inputs):
        attempts.append(1)
        raise RuntimeError("g++: not found\nsecond line")

    real = torch.compile

    def compile(fn, **kwargs):  # the package's calls pass inductor's options; torch's own (an eager while_loop's) pass
        return torch._dynamo.optimize(backend, nopython=True)(fn) if "options" in kwargs else real(fn, **kwargs)

    yield from _compiling_with(monkeypatch, compile, attempts)


def _compiling_with(monkeypatch, compile, value=None):
    """``torch.compile`` replaced by ``compile`` for a test (which gets ``value``), with the compiled
    wrappers and dynamo's specialisations cleared before and after: dynamo keeps its
    specialisations per code object across tests."""
    compiling.compiled.cache_clear()
    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", compile)
    yield value
    compiling.compiled.cache_clear()
    torch._dynamo.reset()
