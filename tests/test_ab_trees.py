"""``benchmarks/ab_trees.py``: its cases, and a QP and a cone case timed in two trees' workers."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from benchmarks import ab_trees, machine

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text, case", [
    ("1,10", {"cone": False, "batch": 1, "n": 10, "compiled": False}),
    ("128,100,compiled", {"cone": False, "batch": 128, "n": 100, "compiled": True}),
    ("cone,16", {"cone": True, "batch": 16, "n": 0, "compiled": False}),
    ("cone,128,compiled", {"cone": True, "batch": 128, "n": 0, "compiled": True}),
])
def test_cases_are_read_as_written(text, case):
    assert ab_trees._case(text) == case


@pytest.mark.parametrize("text", ["1", "1,10,eager", "cone", "cone,x", "0,10", "cone,0", "a,b"])
def test_a_malformed_case_is_refused_with_the_forms_it_takes(text):
    with pytest.raises(argparse.ArgumentTypeError, match="case"):
        ab_trees._case(text)


def test_a_qp_and_a_cone_case_are_timed_in_each_tree(tmp_path, capsys):
    other = tmp_path / "tree"
    other.symlink_to(ROOT)  # a second path to the same tree: a worker of its own
    ab_trees.main([str(ROOT), str(other), "--cases", "2,10", "cone,2", "--rounds", "2", "--reps", "1"])
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.startswith("workers: 1 intra-op thread(s), GLIBC_TUNABLES=") and machine.STEADY_MALLOC in header
    pattern = r"{}: [\d.]+ ms -> [\d.]+ ms \(ratio [\d.]+; page faults per call, most of a round: \d+ -> \d+\)"
    assert re.fullmatch(pattern.format(re.escape("(2, 10)")), lines[0]), lines
    assert re.fullmatch(pattern.format("cone, batch 2"), lines[1]), lines


def test_glibcs_own_allocator_is_kept_when_asked(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    other = tmp_path / "tree"
    other.symlink_to(ROOT)
    ab_trees.main([str(ROOT), str(other), "--cases", "1,5", "--rounds", "1", "--reps", "1", "--malloc", "default"])
    header, line = capsys.readouterr().out.splitlines()
    assert header == "workers: 1 intra-op thread(s), GLIBC_TUNABLES=None" and line.startswith("(1, 5): ")


def test_steady_malloc_keeps_tunables_already_set():
    env = machine.with_steady_malloc({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "PATH": "/bin"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + machine.STEADY_MALLOC, "PATH": "/bin"}
    assert machine.with_steady_malloc({})["GLIBC_TUNABLES"] == machine.STEADY_MALLOC


def test_each_worker_builds_the_operators_in_a_folder_of_its_own(tmp_path):
    """Two trees whose C++ operators differ must not build into one extension folder: each worker's
    ``TORCH_EXTENSIONS_DIR`` is its own, under the one given (or torch's default)."""
    given = {"TORCH_EXTENSIONS_DIR": str(tmp_path), "OTHER": "kept"}
    first, second = (ab_trees._own_extensions(given, which) for which in (0, 1))
    assert first["TORCH_EXTENSIONS_DIR"] != second["TORCH_EXTENSIONS_DIR"]
    assert all(Path(env["TORCH_EXTENSIONS_DIR"]).parent == tmp_path and env["OTHER"] == "kept" for env in (first, second))
    assert given["TORCH_EXTENSIONS_DIR"] == str(tmp_path)  # the caller's environment is not changed
    default = ab_trees._own_extensions({}, 0)["TORCH_EXTENSIONS_DIR"]
    assert Path(default).parent == Path.home() / ".cache" / "torch_extensions"
