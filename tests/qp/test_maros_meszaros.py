"""The dense Maros–Meszaros set: at least 61 of 62 solved to 1e-7 (slow; run with -m slow)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import maros_meszaros  # noqa: E402

DATA = maros_meszaros.DEFAULT_DATA
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not DATA.is_dir(), reason=f"no data at {DATA}")]

SMALL = ["HS21", "HS35", "HS51", "HS76", "QAFIRO", "DUALC1", "GENHS28", "TAME"]


@pytest.mark.parametrize("name", SMALL)
def test_small_problems_solve(name):
    outcome = maros_meszaros.solve_one(DATA / f"{name}.mat", tol=1e-6, max_iter=200)
    assert outcome.solved, outcome


def test_at_least_61_of_62_solved():
    outcomes = [maros_meszaros.solve_one(path, tol=1e-7, max_iter=200) for path in sorted(DATA.glob("*.mat"))]
    assert len(outcomes) == 62
    failed = [o.name for o in outcomes if not o.solved]
    assert len(outcomes) - len(failed) >= 61, f"failed: {failed}"
    # SOLVED claims the solver's tolerance (1e-8) for the returned point's gap in exact arithmetic
    overstated = [(o.name, o.reported_gap, o.exact_gap) for o in outcomes if o.status == "solved" and not o.exact_gap <= 1e-8]
    assert not overstated, overstated


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", ["QISRAEL", "QSHARE1B"])
def test_edge_problems_solve_with_one_and_two_threads(name, threads, tmp_path):
    """Problems that end where double precision runs out: QSHARE1B's factorisation fails near
    μ = 3e-11 with two MKL threads (the stiff split takes over), QISRAEL's gap is 1e-9 made of
    terms of 5e7 (``ipm.accurate_gap`` sees it). Each runs in a process of its own, whose thread
    count is set before torch starts."""
    out = tmp_path / "outcome.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "maros_meszaros.py"), "--data", str(DATA), "--tol", "1e-7",
                    "--only", name, "--json", str(out)], env=env, check=True, capture_output=True, timeout=600)
    (outcome,) = json.loads(out.read_text())
    assert outcome["solved"], outcome
