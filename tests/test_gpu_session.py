"""``benchmarks/gpu_session.sh`` takes every GPU figure in one device call, on a machine this
project is lent rarely and briefly: each of its commands must at least parse its arguments and
name files that exist, which is checked here without a GPU."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import torch

from benchmarks import bench_cone, cuda_launches, cuda_variants, qp_benchmark

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"
PARSERS = {"benchmarks.qp_benchmark": qp_benchmark.parse_args, "benchmarks/cuda_launches.py": cuda_launches.parse_args,
           "benchmarks/bench_cone.py": bench_cone.parse_args, "benchmarks/cuda_variants.py": cuda_variants.parse_args}


def python_steps(tmp_path: Path) -> list[list[str]]:
    """The script's ``step SECONDS python3 ...`` commands, split as the shell would, its ``$out``
    folder replaced by ``tmp_path``; each without ``step SECONDS python3``."""
    steps = []
    for line in SCRIPT.read_text().splitlines():
        words = shlex.split(line.replace('"$out', f'"{tmp_path}'), comments=True)
        if len(words) > 2 and words[0] == "step" and words[2] == "python3":
            assert words[1].isdigit(), f"a step's first word must be its time limit in seconds: {line!r}"
            steps.append(words[3:])
    return steps


def test_every_python_step_is_known_here(tmp_path):
    steps = python_steps(tmp_path)
    assert len(steps) >= 5, f"expected the tests, the launches and three benchmarks, got {steps}"
    for words in steps:
        if words[0] == "-c":  # inline code: it must compile
            compile(words[1], "gpu_session.sh", "exec")
            continue
        target = words[1] if words[0] == "-m" else words[0]
        assert target == "pytest" or target in PARSERS, f"a step this test does not check: {words}"


def test_every_benchmark_step_parses_its_arguments(tmp_path):
    for words in python_steps(tmp_path):
        if words[0] == "-c":
            continue
        target, argv = (words[1], words[2:]) if words[0] == "-m" else (words[0], words[1:])
        if target == "pytest":
            continue
        args = PARSERS[target](argv)  # argparse exits (SystemExit) on an unknown or malformed option
        assert args is not None


def test_the_test_step_names_existing_files_and_a_registered_marker(tmp_path):
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    (words,) = [w for w in python_steps(tmp_path) if w[:2] == ["-m", "pytest"]]
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    registered = {marker.split(":")[0] for marker in markers}
    marker = words[words.index("-m", 2) + 1]
    assert marker in registered
    files = [w for w in words[2:] if w.endswith(".py")]
    assert files, words
    for name in files:
        assert (ROOT / name).is_file(), f"gpu_session.sh runs {name}, which does not exist"


def test_every_background_compilation_parses_its_arguments(tmp_path):
    """The ``prepare NAME ARGS...`` lines: ``qp_benchmark --prepare`` with the function's own arguments
    (``local args=(...)``, its ``"${@:2}"`` replaced by the line's ARGS)."""
    lines = SCRIPT.read_text().splitlines()
    (template,) = [shlex.split(line.strip()[len("local args=("):-1]) for line in lines if line.strip().startswith("local args=(")]
    calls = []
    for line in lines:
        words = shlex.split(line, comments=True)
        if words and words[0] == "for" and "prepare" in words:  # for shape in A B C; do prepare NAME ARGS; done
            shapes = words[words.index("in") + 1 : words.index("do")]
            body = words[words.index("prepare") + 2 : words.index("done")]
            calls += [[word.replace("$shape", shape) for word in body] for shape in (s.rstrip(";") for s in shapes)]
        elif words and words[0] == "prepare":
            calls.append(words[2:])
    assert len(calls) >= 2, calls
    for call in calls:
        call = [word.rstrip(";") for word in call]
        argv = [word for part in template for word in (call if part == "${@:2}" else [part])]
        argv = [str(tmp_path) if "$out" in word else word for word in argv]
        args = qp_benchmark.parse_args(argv)
        assert args.prepare and args.solvers == "optlayers-compiled"
        assert args.sweep or args.figures == ["target"]


@pytest.mark.parametrize("argv", [["--device", "cuda", "--sweep", "--no-such-option"], ["--solvers", "no-such-solver"]])
def test_a_wrong_option_is_caught_by_the_check(argv, tmp_path, capsys):
    with pytest.raises(SystemExit):
        qp_benchmark.parse_args(argv + ["--out", str(tmp_path)])


def test_top_kernels_rank_names_by_their_total_time():
    """``cuda_launches.top_kernels`` on profiler events (CPU ones here: the same fields)."""
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn(200, 200)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            a @ a
        torch.ones(2) + 1
    events = list(prof.events())
    top = cuda_launches.top_kernels(events, count=3)
    assert len(top) == 3
    assert [k["device_us"] for k in top] == sorted((k["device_us"] for k in top), reverse=True)
    by_name = {k["name"]: k for k in cuda_launches.top_kernels(events, count=len(events))}
    assert by_name["aten::mm"]["calls"] == 3
    expected = sum(e.time_range.elapsed_us() for e in events if e.name == "aten::mm")
    assert by_name["aten::mm"]["device_us"] == pytest.approx(expected, abs=0.1)


@pytest.mark.parametrize("argv, message", [
    (["--dtypes", "float16"], "--dtypes: unknown ['float16']"),
    (["--variants", "eager,nope"], "--variants: unknown ['nope']"),
    (["--batch", "0"], "--batch, --n and --repeats must be positive"),
])
def test_cuda_variants_refuses_unknown_names_and_sizes(argv, message, capsys):
    with pytest.raises(SystemExit):
        cuda_variants.parse_args(argv)
    assert message in capsys.readouterr().err
    assert cuda_variants.parse_args(["--dtypes", "float32", "--variants", "eager"]).variants == ["eager"]


def test_cuda_launches_host_profile_ranks_functions_by_cumulative_time():
    """``cuda_launches.host_profile`` on a CPU function: the outer function first, per-call figures."""
    def inner() -> None:
        sum(range(2000))

    def outer() -> None:
        for _ in range(3):
            inner()

    rows = cuda_launches.host_profile(outer, calls=4, count=40)
    by_name = {row["function"].split(" (")[0]: row for row in rows}
    assert rows[0]["cumulative_ms"] >= rows[-1]["cumulative_ms"]
    assert by_name["outer"]["calls_per_call"] == 1 and by_name["inner"]["calls_per_call"] == 3
    assert by_name["outer"]["cumulative_ms"] >= by_name["inner"]["cumulative_ms"] > 0
