"""The dense Maros–Meszaros set: at least 60 of 62 solved to 1e-6 (slow; run with -m slow)."""
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


def test_at_least_60_of_62_solved():
    outcomes = [maros_meszaros.solve_one(path, tol=1e-6, max_iter=200) for path in sorted(DATA.glob("*.mat"))]
    assert len(outcomes) == 62
    failed = [o.name for o in outcomes if not o.solved]
    assert len(outcomes) - len(failed) >= 60, f"failed: {failed}"
