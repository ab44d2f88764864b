"""The peer benchmark runs end to end on tiny problems (optlayers and the linear layer only)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import qp_benchmark

FLOAT64_ACCURACY = 1e-6
PHASES = ("forward", "backward", "total")


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


def test_every_setting_has_both_solvers_timed(run):
    rows = run[0]["results"]
    settings = {(r["figure"], r["batch"], r["n"], r["n_eq"]) for r in rows}
    assert len(rows) == 2 * len(settings)
    for row in rows:
        assert row["status"] == "ok", row["note"]
        for phase in PHASES:
            stats = row["timings"][phase]
            assert 0 < stats["min"] <= stats["q25"] <= stats["median"] <= stats["q75"] <= stats["max"]


def test_optlayers_is_accurate_and_linear_is_not_judged(run):
    for row in run[0]["results"]:
        if row["solver"] == "linear":
            assert row["accuracy"] is None
            continue
        accuracy = row["accuracy"]
        assert accuracy["failed"] == 0
        assert accuracy["kkt"] < FLOAT64_ACCURACY and accuracy["distance"] < FLOAT64_ACCURACY


def test_figures_option_selects_settings_and_refuses_unknown(tmp_path, capsys):
    argv = ["--quick", "--threads", "1", "--dtype", "float64", "--solvers", "linear", "--figures", "fig2",
            "--out", str(tmp_path)]
    rows = qp_benchmark.main(argv)["results"]
    assert rows and {r["figure"] for r in rows} == {"fig2"}
    with pytest.raises(SystemExit):
        qp_benchmark.main(["--quick", "--figures", "fig2,fig9", "--out", str(tmp_path)])
    assert "--figures: unknown ['fig9']" in capsys.readouterr().err


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
