"""The peer benchmark runs end to end on tiny problems (optlayers and the linear layer only)."""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from benchmarks import interleaved, machine, qp_benchmark

FLOAT64_ACCURACY = 1e-6
PHASES = ("forward", "backward", "total", "total_cpu")  # wall seconds, then the process's CPU seconds


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("benchmark")
    argv = ["--quick", "--threads", "1", "--dtype", "float64", "--solvers", "optlayers,linear", "--out", str(out)]
    return qp_benchmark.main(argv), out


def test_writes_json_table_and_figures(run):
    results, out = run
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 2 + len(results["results"])
    assert (out / "fig1.png").stat().st_size > 0 and (out / "fig2.png").stat().st_size > 0


def test_metadata_records_the_machine(run):
    meta = run[0]["meta"]
    assert meta["torch_threads"] == 1
    assert meta["command"].startswith("PYTHONPATH=src python -m benchmarks.qp_benchmark --quick")
    assert meta["cpu"] and meta["date"] and meta["commit"] and meta["versions"]["torch"]
    assert meta["glibc_tunables"] == machine.malloc_tunables()


def test_every_setting_has_both_solvers_timed(run):
    rows = run[0]["results"]
    settings = {(r["figure"], r["batch"], r["n"], r["n_eq"]) for r in rows}
    assert len(rows) == 2 * len(settings)
    for row in rows:
        assert row["status"] == "ok", row["note"]
        for phase in PHASES:
            stats = row["timings"][phase]
            assert 0 <= stats["min"] <= stats["q25"] <= stats["median"] <= stats["q75"] <= stats["max"]
            assert phase == "total_cpu" or stats["min"] > 0
        assert row["timings"]["total_cpu"]["max"] > 0


def test_optlayers_is_accurate_and_linear_is_not_judged(run):
    for row in run[0]["results"]:
        if row["solver"] == "linear":
            assert row["accuracy"] is None
            continue
        accuracy = row["accuracy"]
        assert accuracy["failed"] == 0
        assert accuracy["kkt"] < FLOAT64_ACCURACY and accuracy["distance"] < FLOAT64_ACCURACY
        assert accuracy["gradient_checked"] > 0 and accuracy["gradient"] < FLOAT64_ACCURACY


def test_figures_option_selects_settings_and_refuses_unknown(tmp_path, capsys):
    argv = ["--quick", "--threads", "1", "--dtype", "float64", "--solvers", "linear", "--figures", "fig2",
            "--out", str(tmp_path)]
    rows = qp_benchmark.main(argv)["results"]
    assert rows and {r["figure"] for r in rows} == {"fig2"}
    with pytest.raises(SystemExit):
        qp_benchmark.main(["--quick", "--figures", "fig2,fig9", "--out", str(tmp_path)])
    assert "--figures: unknown ['fig9']" in capsys.readouterr().err


def test_shapes_option_keeps_only_those_shapes_and_refuses_malformed(tmp_path, capsys):
    argv = ["--quick", "--threads", "1", "--dtype", "float64", "--solvers", "linear", "--shapes", "8x10,1x10",
            "--out", str(tmp_path)]
    rows = qp_benchmark.main(argv)["results"]
    assert {(r["batch"], r["n"]) for r in rows} == {(8, 10), (1, 10)}
    for shapes in ("8by10", "8x0", "8x10x2"):
        with pytest.raises(SystemExit):
            qp_benchmark.main(["--quick", "--shapes", shapes, "--out", str(tmp_path)])
        assert "--shapes: expected comma-separated BATCHxN" in capsys.readouterr().err


def test_prepare_checks_and_warms_every_solver_and_times_nothing(tmp_path, capsys):
    argv = ["--quick", "--threads", "1", "--dtype", "float64", "--solvers", "optlayers,linear", "--figures", "fig2",
            "--prepare", "--out", str(tmp_path)]
    result = qp_benchmark.main(argv)
    assert result["meta"]["prepare"] is True
    rows = result["results"]
    assert {r["solver"] for r in rows} == {"optlayers", "linear"}
    for row in rows:
        assert row["status"] == "ok" and "timings" not in row
        if row["solver"] == "optlayers":
            assert row["accuracy"]["distance"] < FLOAT64_ACCURACY
    assert not list(tmp_path.glob("*.png"))
    with pytest.raises(SystemExit):
        qp_benchmark.main([*argv, "--isolate"])
    assert "--prepare: warms the solvers in this process; not with --isolate" in capsys.readouterr().err


def test_target_row_runs_on_a_gpu_or_without_caps_only():
    cpu = qp_benchmark.full_settings(["float64"], large_batches=False)
    gpu = qp_benchmark.full_settings(["float32", "float64"], large_batches=True)
    assert not [s for s in cpu if s.figure == "target"]
    target = [s for s in gpu if s.figure == "target"]
    assert [(s.batch, s.n, s.dtype) for s in target] == [(128, 100, "float32"), (128, 100, "float64")]
    assert all("optlayers-compiled" in s.solvers for s in target)


def test_isolate_measures_each_solver_in_its_own_process_in_the_usual_order(tmp_path):
    argv = ["--quick", "--threads", "1", "--dtype", "float64", "--solvers", "optlayers,linear", "--figures", "fig1"]
    together = qp_benchmark.main([*argv, "--out", str(tmp_path / "together")])
    isolated = qp_benchmark.main([*argv, "--isolate", "--out", str(tmp_path / "isolated")])
    key = lambda row: (row["figure"], row["batch"], row["n"], row["n_eq"], row["solver"])  # noqa: E731
    assert [key(r) for r in isolated["results"]] == [key(r) for r in together["results"]]
    assert {r["solver"] for r in isolated["results"]} == {"optlayers", "linear"}
    assert all(r["status"] == "ok" for r in isolated["results"])
    for name in ("optlayers", "linear"):  # each child measured its solver alone
        child = json.loads((tmp_path / "isolated" / "isolated" / name / "results.json").read_text())
        assert {r["solver"] for r in child["results"]} == {name}


def test_rounds_time_every_solver_in_turns_in_warm_processes(tmp_path):
    argv = ["--quick", "--threads", "1", "--dtype", "float64", "--solvers", "optlayers,linear", "--figures", "fig1"]
    together = qp_benchmark.main([*argv, "--out", str(tmp_path / "together")])
    rounds = qp_benchmark.main([*argv, "--isolate", "--rounds", "2", "--out", str(tmp_path / "rounds")])
    key = lambda row: (row["figure"], row["batch"], row["n"], row["n_eq"], row["solver"])  # noqa: E731
    assert [key(r) for r in rounds["results"]] == [key(r) for r in together["results"]]
    assert rounds["meta"]["rounds"] == 2 and rounds["meta"]["budget"] == asdict(qp_benchmark.ROUND_BUDGET)
    for row in rounds["results"]:
        assert row["status"] == "ok" and row["rounds"] == 2
        timings = row["timings"]
        assert set(timings) == {*PHASES, "page_faults"}
        assert timings["page_faults"]["repeats"] == 2 and timings["page_faults"]["min"] >= 0  # one value a round
        assert 2 <= timings["total"]["repeats"] <= 2 * qp_benchmark.ROUND_BUDGET.max_repeats
        assert 0 < timings["total"]["min"] <= timings["total"]["median"] <= timings["total"]["max"]
        if row["solver"] == "optlayers":
            assert row["accuracy"]["distance"] < FLOAT64_ACCURACY


def test_steady_malloc_starts_the_solvers_processes_with_fixed_thresholds(tmp_path, monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    argv = ["--quick", "--threads", "1", "--dtype", "float64", "--solvers", "linear", "--figures", "fig1",
            "--shapes", "8x5", "--isolate", "--rounds", "1", "--malloc", "steady", "--out", str(tmp_path)]
    result = qp_benchmark.main(argv)
    assert result["meta"]["glibc_tunables"] == machine.STEADY_MALLOC
    assert [row["status"] for row in result["results"]] == ["ok"]
    assert "GLIBC_TUNABLES" not in os.environ  # this process's environment restored


def test_steady_malloc_children_keep_tunables_and_restore_them(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    with machine.steady_malloc_children():
        assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:" + machine.STEADY_MALLOC
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2"


def test_steady_malloc_needs_the_solvers_own_processes(tmp_path, capsys):
    with pytest.raises(SystemExit):
        qp_benchmark.main(["--quick", "--malloc", "steady", "--out", str(tmp_path)])
    assert "--malloc steady: sets the allocator of the solvers' own processes; needs --isolate" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--rounds", "2"], ["--isolate", "--rounds", "0"]])
def test_rounds_need_isolate_and_a_positive_count(argv, tmp_path, capsys):
    with pytest.raises(SystemExit):
        qp_benchmark.main(["--quick", *argv, "--out", str(tmp_path)])
    assert "--rounds: needs --isolate" in capsys.readouterr().err


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 7, 8])
def test_round_orders_balance_places_and_predecessors(count):
    names = [chr(ord("a") + i) for i in range(count)]
    cycle = count if count % 2 == 0 else 2 * count
    orders = [order for _, order in interleaved.round_orders(names, cycle)]
    assert all(sorted(order) == names for order in orders)
    for place in range(count):  # each name in each place equally often
        assert Counter(order[place] for order in orders) == dict.fromkeys(names, cycle // count)
    pairs = Counter((a, b) for order in orders for a, b in zip(order, order[1:]))
    if count > 1:  # each name directly after each other one equally often
        assert set(pairs) == {(a, b) for a in names for b in names if a != b}
        assert len(set(pairs.values())) == 1
    # later rounds repeat the cycle
    assert [order for _, order in interleaved.round_orders(names, 2 * cycle)][cycle:] == orders


def test_round_orders_need_a_round():
    with pytest.raises(ValueError, match="rounds must be at least 1, got 0"):
        list(interleaved.round_orders(["a", "b", "c"], 0))


def test_serve_answers_each_line_and_keeps_prints_off_the_protocol(capsys):
    def answer(request):
        print("chatter")
        return {"twice": 2 * request["x"]}

    stdin, protocol = io.StringIO('{"x": 1}\n\n{"x": 4}\n'), io.StringIO()
    interleaved.serve(answer, stdin, protocol)
    assert [json.loads(line) for line in protocol.getvalue().splitlines()] == [{"twice": 2}, {"twice": 8}]
    assert capsys.readouterr().err.count("chatter") == 2


def test_a_worker_that_dies_is_named():
    worker = interleaved.Worker("quitter", ["-c", "import sys; sys.exit(3)"])
    with pytest.raises(RuntimeError, match="worker 'quitter' exited \\(status 3\\)"):
        worker.ask({"ask": "hello"})


def test_unknown_solver_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        qp_benchmark.main(["--quick", "--solvers", "linear,nosuch", "--out", str(tmp_path)])
    assert "nosuch" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--batch", "0"], ["--n", "-1"], ["--calls", "0"]])
def test_compile_time_refuses_sizes_below_one(argv, capsys):
    from benchmarks import compile_time

    with pytest.raises(SystemExit):
        compile_time.main(argv)
    assert "must be positive" in capsys.readouterr().err


MM_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "maros_meszaros_dense"


@pytest.mark.skipif(not (MM_DATA / "HS21.mat").is_file(), reason=f"no data at {MM_DATA}")
def test_maros_meszaros_solver_tolerance_is_passed_to_the_solver(tmp_path, capsys):
    from benchmarks import maros_meszaros

    path = MM_DATA / "HS21.mat"
    tight = maros_meszaros.solve_one(path, tol=1e-6, max_iter=200)  # solver at 1e-7
    loose = maros_meszaros.solve_one(path, tol=1e-6, max_iter=200, solver_tol=1e-2)
    assert tight.solved and tight.exact_gap <= 1e-7
    assert loose.iterations < tight.iterations  # stopped earlier, at its own looser tolerance
    assert maros_meszaros.main(["--data", str(MM_DATA), "--only", "HS21", "--tol", "1e-6", "--solver-tol", "1e-7",
                                "--json", str(tmp_path / "mm.json")]) == 0
    assert "solved 1 of 1" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--solver-tol", "0"], ["--solver-tol", "1"],
                                  ["--solver-tol", "1e-7", "--layer", "cone-clarabel"]])
def test_maros_meszaros_refuses_a_solver_tolerance_it_cannot_use(argv, capsys):
    from benchmarks import maros_meszaros

    with pytest.raises(SystemExit):
        maros_meszaros.main(argv)
    assert "--solver-tol must be in (0, 1)" in capsys.readouterr().err


def test_maros_meszaros_cone_layer_solves_and_takes_the_interior_point_tolerance(monkeypatch):
    from benchmarks import maros_meszaros

    seen = []
    solve = maros_meszaros.solve_qp_cone

    def spy(*args, **kwargs):
        seen.append(kwargs["solver_options"])
        return solve(*args, **kwargs)

    monkeypatch.setattr(maros_meszaros, "solve_qp_cone", spy)
    path = MM_DATA / "HS21.mat"
    default = maros_meszaros.solve_one(path, tol=1e-6, max_iter=200, layer="cone-ipm")
    loose = maros_meszaros.solve_one(path, tol=1e-6, max_iter=200, layer="cone-ipm", solver_tol=1e-4)
    assert seen == [{}, {"tol": 1e-4, "inaccurate_tol": 1e-4}]
    assert default.solved and loose.solved  # the Newton refinement finishes either
    assert math.isnan(default.reported_gap) and default.exact_gap <= 1e-6


def test_maros_meszaros_cone_auto_layer_runs_solve_cones_default(monkeypatch):
    from benchmarks import maros_meszaros

    seen = []
    solve = maros_meszaros.solve_qp_cone

    def spy(*args, **kwargs):
        seen.append((kwargs["solver"], kwargs["solver_options"]))
        return solve(*args, **kwargs)

    monkeypatch.setattr(maros_meszaros, "solve_qp_cone", spy)
    outcome = maros_meszaros.solve_one(MM_DATA / "HS21.mat", tol=1e-6, max_iter=200, layer="cone-auto")
    assert seen == [("auto", {})] and outcome.solved


def test_cone_fallbacks_counts_statuses_and_iterations_at_the_given_tolerance():
    from benchmarks import cone_fallbacks

    spec = cone_fallbacks.KINDS["soc"]
    tight = cone_fallbacks.fallbacks(spec, 8)
    loose = cone_fallbacks.fallbacks(spec, 8, tol=1e-3)
    assert tight["final"] == loose["final"] == {"SOLVED": 8}
    assert tight["solved_again"] == loose["solved_again"] == 0  # no refinement stalls on these
    assert loose["batch_iterations"][0] < tight["batch_iterations"][0]
    assert loose["final_distance_to_clarabel"] <= 1e-9  # the refinement takes both to round-off


def test_blas_backends_times_every_operation_with_both_libraries(capsys):
    from benchmarks import blas_backends

    times = blas_backends.measure(batch=2, n=4, repeats=1)
    assert set(times) == {f"{op}_{lib}" for op, libs in (("cholesky", ("torch", "numpy")),
                                                          ("triangular_solve", ("torch", "scipy")),
                                                          ("product", ("torch", "numpy"))) for lib in libs}
    assert all(t > 0 for t in times.values())
    assert blas_backends.main(["--batch", "2", "--n", "4", "--repeats", "1"]) == 0
    assert "torch / numpy" in capsys.readouterr().out


def test_blas_backends_refuses_sizes_below_one(capsys):
    from benchmarks import blas_backends

    with pytest.raises(SystemExit):
        blas_backends.main(["--n", "0"])
    assert "--n must be >= 1" in capsys.readouterr().err


ROOT = Path(__file__).resolve().parents[1]
FAKE_CPU = "Fake CPU 9000 (monkeypatched)"


def test_machine_reader_names_this_cpu():
    model = machine.cpu_model()
    assert isinstance(model, str) and model and model == model.strip()


def test_machine_reader_reads_cpuinfo_then_lscpu(tmp_path, monkeypatch):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: Fake EPYC 7B13\n")
    monkeypatch.setattr(machine, "CPUINFO", str(cpuinfo))
    assert machine.cpu_model() == "Fake EPYC 7B13"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU part\t: 0xd0c\n")  # aarch64: no model name
    lscpu = "Architecture: aarch64\nVendor ID: ARM\n  BIOS Model name: Not Specified\n  Model name: Neoverse-N1\n"
    monkeypatch.setattr(machine, "LSCPU", (sys.executable, "-c", f"print({lscpu!r}, end='')"))
    assert machine.cpu_model() == "Neoverse-N1"  # newer lscpu indents the field


def test_machine_reader_falls_back_and_never_raises(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "CPUINFO", str(tmp_path / "absent"))
    monkeypatch.setattr(machine, "LSCPU", (str(tmp_path / "no-lscpu"),))
    monkeypatch.setattr(machine.platform, "processor", lambda: "x86_64")
    assert machine.cpu_model() == "x86_64"
    monkeypatch.setattr(machine.platform, "processor", lambda: "")
    assert machine.cpu_model() == "unknown cpu"
    monkeypatch.setattr(machine, "CPUINFO", str(tmp_path))  # unreadable (a directory), and lscpu failing
    monkeypatch.setattr(machine, "LSCPU", (sys.executable, "-c", "raise SystemExit(1)"))
    assert machine.cpu_model() == "unknown cpu"


def test_preloaded_libraries_are_read_from_ld_preload_and_recorded(monkeypatch):
    from benchmarks import bench_cone

    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert machine.preloaded() == []
    monkeypatch.setenv("LD_PRELOAD", " /lib/libtcmalloc_minimal.so.4:libfoo.so  /opt/bar.so ")
    expected = ["/lib/libtcmalloc_minimal.so.4", "libfoo.so", "/opt/bar.so"]
    assert machine.preloaded() == expected
    args = argparse.Namespace(device="cpu", rounds=0, quick=True, prepare=False)
    assert qp_benchmark.metadata(args, ["--quick"], [])["preload"] == expected
    assert bench_cone.metadata(bench_cone.parse_args(["--threads", "1"]))["preload"] == expected


def test_every_benchmark_that_records_the_machine_uses_the_shared_reader(monkeypatch, capsys):
    from benchmarks import bench_cone, blas_backends

    monkeypatch.setattr(machine, "cpu_model", lambda: FAKE_CPU)
    args = argparse.Namespace(device="cpu", rounds=0, quick=True, prepare=False)
    assert qp_benchmark.metadata(args, ["--quick"], [])["cpu"] == FAKE_CPU
    meta = bench_cone.metadata(bench_cone.parse_args(["--threads", "1", "--batch", "2"]))
    assert meta["cpu"] == FAKE_CPU and meta["threads"] == 1 and meta["batch"] == 2
    assert meta["commit"] == qp_benchmark._git_commit()  # the figure names the code it measured
    ops = {"cholesky": "numpy", "triangular_solve": "scipy", "product": "numpy"}
    monkeypatch.setattr(blas_backends, "measure", lambda batch, n, repeats: {
        f"{op}_{lib}": 1.0 for op, other in ops.items() for lib in ("torch", other)})  # nothing timed
    assert blas_backends.main(["--batch", "2", "--n", "4", "--repeats", "1"]) == 0
    assert capsys.readouterr().out.startswith(f"{FAKE_CPU}, torch ")
    for script in sorted((ROOT / "benchmarks").glob("*.py")):  # no script reads the CPU on its own
        if script.name != "machine.py":
            source = script.read_text()
            assert not any(s in source for s in ("lscpu", "/proc/cpuinfo", "platform.processor")), script.name


@pytest.mark.parametrize("script", ["bench_cone.py", "blas_backends.py", "cone_memory.py"])
def test_benchmark_scripts_find_the_shared_reader_when_run_by_path(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:")


def test_iteration_cost_splits_a_solve_into_its_iterations_and_the_rest(tmp_path):
    from benchmarks import iteration_cost

    out = tmp_path / "cost.json"
    result = iteration_cost.main(["--batch", "2", "--n", "5", "--low", "1", "--high", "2", "--rounds", "1",
                                  "--calls", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["iterations"] > 2 and result["per_iteration_us"] == pytest.approx(
        result["capped_us"]["2"] - result["capped_us"]["1"])
    assert result["forward_us"] > 0 and result["forward_backward_us"] > 0
    assert result["meta"]["command"].startswith("PYTHONPATH=src python -m benchmarks.iteration_cost --batch 2")
    assert result["meta"]["tol"] is None  # solve_qp's default


def test_iteration_cost_refuses_caps_the_solve_does_not_reach():
    from benchmarks import iteration_cost

    with pytest.raises(ValueError, match=r"low and high must satisfy 0 < low < high < \d+.*got low=1, high=500"):
        iteration_cost.measure(2, 5, False, 1, 500, 1, 1)
    with pytest.raises(SystemExit):
        iteration_cost.parse_args(["--low", "4", "--high", "4"])


def test_compiled_launches_count_a_conds_dearer_branch_and_its_cheaper_one(tmp_path, monkeypatch):
    """``kernels._launches`` on inductor's code for a ``torch.cond`` whose branches are a triangular
    solve and an exponential (a library call and a fused kernel) and a copy (one fused kernel): the
    total counts the first, ``total_skipped`` the second (inductor, a fresh cache)."""
    import torch
    from torch._inductor.utils import run_and_get_code

    from benchmarks import kernels

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    L = torch.eye(3, dtype=torch.float64).expand(2, 3, 3).contiguous()
    x = torch.ones(2, 3, 1, dtype=torch.float64)

    def fn(L: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        def solved(L: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return torch.linalg.solve_triangular(L, y, upper=False).exp()
        return torch.cond(x.sum() > 0, solved, lambda L, y: y.clone(), (L, x))

    torch._dynamo.reset()
    try:
        _, code = run_and_get_code(torch.compile(fn, fullgraph=True, dynamic=False), L, x)
    finally:
        torch._dynamo.reset()
    launches = kernels._launches(code[-1])
    outside = kernels._launch_count(code[-1][code[-1].index("def call("):])
    assert launches["library"] == outside[1] + 1
    assert launches["total"] == launches["fused"] + launches["library"] == sum(outside) + 2
    assert launches["total_skipped"] == sum(outside) + 1


def test_compiled_graph_split_counts_the_time_inside_compiled_graphs_only():
    from benchmarks import iteration_cost
    from torch._inductor.output_code import CompiledFxGraph

    call = CompiledFxGraph.__call__
    x = torch.randn(4, 3, requires_grad=True)
    eager = iteration_cost.compiled_graph_split(lambda: (x * 2).sum(), torch.Tensor.backward, rounds=2, per_round=3)
    assert eager["forward_graphs"] == 0 and eager["backward_graphs"] == 0
    assert eager["outside_graphs"] == pytest.approx(eager["forward"] + eager["backward"])

    double = torch.compile(lambda t: (t * 2).sin().sum(), fullgraph=True)
    split = iteration_cost.compiled_graph_split(lambda: double(x), torch.Tensor.backward, rounds=2, per_round=3)
    assert 0 < split["forward_graphs"] < split["forward"] and 0 < split["backward_graphs"] < split["backward"]
    assert split["outside_graphs"] == pytest.approx(
        split["forward"] + split["backward"] - split["forward_graphs"] - split["backward_graphs"])
    assert CompiledFxGraph.__call__ is call  # the clock is taken off again


def test_cone_memory_times_the_solves_products_in_and_out_of_the_solve(tmp_path):
    from benchmarks import cone_memory

    out = tmp_path / "memory.json"
    result = cone_memory.main(["--batch", "4", "--chunks", "2", "--top", "2", "--calls", "1", "--repeats", "1",
                               "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert len(result["products"]) == 2 and all(row["product"] in ("bmm", "baddbmm") for row in result["products"])
    first, second = result["products"]
    assert first["in_solve_us"] * first["calls_in_solve"] >= second["in_solve_us"] * second["calls_in_solve"]  # longest first
    assert all(row["repeated_us"] > 0 and row["repeated_after_flush_us"] > 0 for row in result["products"])
    assert [row["programs_per_call"] for row in result["chunks"]] == [4, 2]
    assert result["meta"]["command"].startswith("PYTHONPATH=src python -m benchmarks.cone_memory --batch 4")


def test_cone_memory_refuses_chunks_larger_than_the_batch():
    from benchmarks import cone_memory

    with pytest.raises(SystemExit):
        cone_memory.parse_args(["--batch", "4", "--chunks", "8"])


def test_bench_cone_measures_diffcps_solved_count_by_our_kkt_test():
    """diffcp returns no statuses (and with a Clarabel forward does not read Clarabel's: 62 of the
    benchmark's 128 programs ended "AlmostSolved"), so the table counted every answer as solved. It
    now counts the answers whose relative KKT residual passes our SOLVED test."""
    from benchmarks import bench_cone
    from optlayers.cone.testing import random_program

    A, b, c, _, x, y, s = random_program(bench_cone.SPEC, 48, batch=4)
    exact = [list(t.numpy()) for t in (x, y, s)]
    assert bench_cone.kkt_solved((A, b, c), *exact) == 4
    off = [row + (1e-3 if i == 2 else 0.0) for i, row in enumerate(x.numpy())]  # program 2's x off by 1e-3
    assert bench_cone.kkt_solved((A, b, c), off, *exact[1:]) == 3


def test_qplayer_parallel_runs_on_the_threads_asked_for_and_leaves_the_serial_one_serial(monkeypatch):
    """QPLayer's OpenMP mode takes half of os.cpu_count() as its threads (one on a 2-core machine), and
    keeps its mode in a module global that the last QPFunction made sets: the benchmark's
    "qplayer-parallel" must run ``threads`` threads, and "qplayer" stay serial beside it."""
    pytest.importorskip("proxsuite")
    import proxsuite

    from benchmarks.problems import random_qp
    from benchmarks.solvers import _qplayer

    calls = []
    for name in ("solve_in_parallel", "solve_backward_in_parallel"):
        real = getattr(proxsuite.proxqp.dense, name)

        def recorded(*args, _real=real, _name=name, **kwargs):
            calls.append((_name, kwargs.get("num_threads")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(proxsuite.proxqp.dense, name, recorded)
    qp = random_qp(4, 5, 5).map(lambda t: t.detach().requires_grad_())
    serial, parallel = _qplayer(), _qplayer(3)
    serial.solve(qp).sum().backward()
    assert calls == []
    z = parallel.solve(qp)
    z.sum().backward()
    assert calls == [("solve_in_parallel", 3), ("solve_backward_in_parallel", 3)]
    calls.clear()
    torch.testing.assert_close(serial.solve(qp), z, rtol=0, atol=1e-12)
    assert calls == []


def test_one_thread_holds_qpaxs_xla_to_one_thread_too(monkeypatch):
    """Under --threads 1 the workers (``--serve``) set XLA's one-thread flags before jax loads: XLA's
    CPU backend otherwise runs on every core while the other solvers are held to one."""
    from benchmarks import interleaved

    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(interleaved, "serve", lambda server: None)
    threads = torch.get_num_threads()
    try:
        qp_benchmark.main(["--threads", "1", "--solvers", "linear", "--serve"])
    finally:
        torch.set_num_threads(threads)
    assert os.environ["XLA_FLAGS"] == qp_benchmark.XLA_ONE_THREAD


def test_a_solver_differentiated_outside_torch_reports_no_backward():
    """Its forward and gradient are one call (qpax: one jitted function), whose forward is not the
    forward timed alone: a backward taken as their difference could read zero, so none is reported."""
    from benchmarks.problems import random_qp
    from benchmarks.solvers import Solver
    from benchmarks.timing import Budget, Clock

    calls = []
    solver = Solver("fake-jax", solve=lambda qp: calls.append("solve") or qp.p, differentiable=True, settings="",
                    value_and_grad=lambda qp, weights: calls.append("value_and_grad"))
    samples = qp_benchmark.measure(solver, random_qp(2, 3, 3), Budget(warmup=0, min_repeats=2, max_repeats=2, seconds=0.0),
                                   Clock(torch.device("cpu")))
    assert set(samples) == {"forward", "total", "total_cpu", "page_faults"}
    assert len(samples["forward"]) == len(samples["total"]) == 2 and len(samples["page_faults"]) == 1
    assert set(calls) == {"solve", "value_and_grad"}
    row = {"figure": "f", "n": 3, "n_ineq": 3, "n_eq": 0, "batch": 2, "dtype": "float64", "solver": "fake-jax", "note": "",
           "timings": qp_benchmark._stats(samples)}
    assert qp_benchmark.table_rows([row])[0][8] == "—"  # the backward column


def test_bench_cone_times_every_method_once_a_round_in_changing_orders():
    from benchmarks import bench_cone

    log = []

    def method(name):
        def forward():
            log.append(name)
            return name, len(log)

        def adjoint(out):
            assert out[0] == name  # the adjoint of this method's own forward, just solved
            return out[1]

        return bench_cone.Method(forward, adjoint, lambda out, grads: {"solved": grads, "x": None, "grad_c": None})

    names = ["a", "b", "c"]
    rows = bench_cone.time_in_rounds({name: method(name) for name in names}, rounds=6)
    assert sorted(log) == sorted(names * 6)
    rounds = [log[i:i + 3] for i in range(0, 18, 3)]
    assert all(sorted(r) == names for r in rounds) and len({tuple(r) for r in rounds}) == 6
    for name, row in rows.items():
        assert row["solved"] == max(i + 1 for i, n in enumerate(log) if n == name)  # the last round's row
        assert row["forward_s"] >= 0 and row["adjoint_cpu_s"] >= 0


def test_scale_accuracy_prints_both_tables_and_writes_every_row(tmp_path, capsys):
    """``benchmarks/scale_accuracy.py`` runs, and its rows say what the solver's scaling promises:
    every problem solved, at every scale and with bounds far above its sides, within 1e-7 of the
    unit-scale answers."""
    from benchmarks import scale_accuracy
    out = tmp_path / "scales.json"
    scale_accuracy.main(["--json", str(out)])
    printed = capsys.readouterr().out
    assert "| ω = 1e-10 |" in printed and "| 1, 1e-10 |" in printed
    rows = json.loads(out.read_text())
    assert len(rows["qp"]) == len(scale_accuracy.QP_SCALES) and len(rows["lp"]) == len(scale_accuracy.LP_SCALES)
    assert len(rows["far_bounds"]) == len(scale_accuracy.FAR_BOUNDS) and "| box, β = 1e+20 |" in printed
    assert "| box, β = inf |" in printed
    for row in rows["qp"] + rows["far_bounds"] + rows["lp"]:
        assert all(status == 0 for status in row["statuses"]), row
        assert row["z"] <= 1e-7 and row.get("gradients", 0.0) <= 1e-7, row
    assert len(rows["cone_far_bounds"]) == len(scale_accuracy.CONE_FAR_BOUNDS) and "| linear, clarabel, 1e+20 |" in printed
    for row in rows["cone_far_bounds"]:
        assert all(status == 0 for status in row["statuses"]) and row["x"] <= 1e-7 and row["gradients"] <= 1e-7, row
        assert row["violation"] <= 1e-9, row
    assert [r["beta"] for r in rows["large_variable"]] == list(scale_accuracy.LARGE_VARIABLES)
    for row in rows["large_variable"]:  # a variable far larger than the others leaves theirs as accurate
        assert all(status == 0 for status in row["statuses"]) and row["z"] <= 1e-9 and row["gradients"] <= 1e-7, row
    for row in rows["far_bounds"]:  # a bound never active weighs nothing: neither iterations nor gradient
        assert max(row["iterations"]) <= max(row["unit_iterations"]) + 3 and row["far_gradient"] <= 1e-9, row
    assert len(rows["cone_spread"]) == 2 * 2 * len(scale_accuracy.CONE_SPREAD_KINDS) * len(scale_accuracy.CONE_SPREADS)
    for row in rows["cone_spread"]:  # variables and rows of every size: each program as accurate as at its own
        assert row["solved"] == row["of"] and row["off"] == 0 and row["x"] <= 1e-9, row
    assert [(r["kind"], r["size"]) for r in rows["cone_qp_sides"][::2]] == scale_accuracy.CONE_QP_SIDES
    for row in rows["cone_qp_sides"]:  # a box or a ball far above the other sides: as solve_qp without it
        if row["kind"] != "spread":
            assert row["solved"] == row["of"] and row["off"] == 0 and row["z"] <= 1e-9, row


def test_scale_accuracy_takes_the_peers_through_the_benchmarks_solvers(tmp_path, capsys):
    """``scale_accuracy.py --peers``: each named solver of ``benchmarks/solvers.py`` (here the package
    itself, which every machine has) solves the QPs with a far box, a row per bound."""
    from benchmarks import scale_accuracy
    out = tmp_path / "peers.json"
    scale_accuracy.main(["--peers", "optlayers", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| optlayers, 1e+20 | 8 |" in printed and "| optlayers, inf | 8 |" in printed
    rows = json.loads(out.read_text())["peer_far_bounds"]
    assert [r["bound"] for r in rows] == list(scale_accuracy.PEER_FAR_BOUNDS)
    assert all(r["finite"] == 8 and r["z"] <= 1e-9 for r in rows), rows
    large = json.loads(out.read_text())["peer_large_variable"]
    assert [r["beta"] for r in large] == list(scale_accuracy.LARGE_VARIABLES)
    assert all(r["finite"] == 8 and r["z"] <= 1e-9 for r in large), large


def test_scale_accuracy_takes_the_spread_cone_programs_to_diffcp():
    """``scale_accuracy.py --diffcp``: every kind and span of the spread cone programs by both of
    diffcp's forwards, each row an error count or diffcp's refusal."""
    pytest.importorskip("diffcp")
    from benchmarks import scale_accuracy
    rows = scale_accuracy.diffcp_spread_rows(batch=2)
    assert len(rows) == 2 * len(scale_accuracy.CONE_SPREAD_KINDS) * len(scale_accuracy.CONE_SPREADS)
    for row in rows:
        assert ("error" in row) != ("off" in row), row
        assert "error" in row or 0 <= row["off"] <= row["of"] == 2, row


def test_iteration_counts_compares_ours_with_clarabels_per_problem(tmp_path, capsys):
    pytest.importorskip("clarabel", reason="clarabel not installed")
    from benchmarks import iteration_counts

    out = tmp_path / "counts.json"
    result = iteration_counts.main(["--batch", "3", "--n", "4", "6", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [row["n"] for row in result["rows"]] == [4, 6]
    for row in result["rows"]:  # every problem solved by both, each with its own count
        assert len(row["ours"]) == len(row["clarabel"]) == 3
        assert row["ours_solved"] == row["clarabel_solved"] == 3
        assert all(count > 0 for count in row["ours"] + row["clarabel"])
    assert result["meta"]["cpu"] and result["meta"]["date"]
    table = capsys.readouterr().out
    assert table.startswith("| n | ours (solved of 3) | Clarabel (solved) |") and "| 6 | mean " in table


def test_iteration_counts_refuses_sizes_below_one(capsys):
    from benchmarks import iteration_counts

    with pytest.raises(SystemExit):
        iteration_counts.main(["--batch", "0"])
    assert "--batch and --n must be positive, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("layer", ["qp", "cone"])
def test_steady_loop_times_the_calls_after_the_warm_ones(layer, monkeypatch, capsys):
    from benchmarks import steady_loop

    calls = []
    real = steady_loop.call
    monkeypatch.setattr(steady_loop, "call", lambda args: (lambda once: lambda: (calls.append(1), once())[1])(real(args)))
    mean = steady_loop.main(["--layer", layer, "--batch", "2", "--n", "4", "--warm", "1", "--calls", "2", "--backward"])
    assert len(calls) == 3 and mean > 0
    assert capsys.readouterr().out.startswith(f"{layer} batch 2")


def test_steady_loop_refuses_counts_below_one(capsys):
    from benchmarks import steady_loop

    with pytest.raises(SystemExit):
        steady_loop.main(["--calls", "0"])
    assert "must be positive" in capsys.readouterr().err


def test_nearly_dependent_rows_benchmark_judges_both_solvers_against_the_exact_rows(tmp_path, capsys):
    """One LP per range: a table row per range, the exact rows' reference found for every problem,
    and solve_qp's answers at copies 2^-8 to 2^-11 apart within 1e-9 of it."""
    pytest.importorskip("clarabel")
    from benchmarks import nearly_dependent

    assert nearly_dependent.main(["--problems", "1", "--json", str(tmp_path / "rows.json")]) == 0
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [row["noise"] for row in rows] == [f"2^-{low}..2^-{high}" for low, high in nearly_dependent.RANGES]
    assert all(row["references"] == {"Solved": 1} for row in rows)
    assert rows[0]["optlayers"] == {"SOLVED": 1} and rows[0]["optlayers_errors"]["max"] < 1e-9
    assert capsys.readouterr().out.count("\n| 2^-") == len(rows)


@pytest.mark.parametrize("count", ["0", "-3"])
def test_nearly_dependent_rows_benchmark_refuses_counts_below_one(count, capsys):
    from benchmarks import nearly_dependent

    with pytest.raises(SystemExit):
        nearly_dependent.main(["--problems", count])
    assert f"--problems must be positive, got {count}" in capsys.readouterr().err
