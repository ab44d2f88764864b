"""Sudoku boards: constraint matrix, a counting solver, and puzzles with unique solutions.

A board of box size ``b`` has ``N = b²`` rows, columns and digits. Grids are ``(N, N)`` integer
arrays with digits ``1..N`` and ``0`` for a blank; the one-hot encoding used by the models is
``(N, N, N)`` over (row, column, digit) with all-zero rows for blanks.
"""
from __future__ import annotations

import numpy as np


def constraint_matrix(box: int) -> np.ndarray:
    """The ``(4N², N³)`` 0/1 matrix A with ``A x = 1`` for the one-hot x of every valid grid.

    Rows: one digit per cell, each digit once per row, per column and per box.
    """
    n = box * box
    index = np.arange(n**3).reshape(n, n, n)
    rows = [index[r, c, :] for r in range(n) for c in range(n)]
    rows += [index[r, :, d] for r in range(n) for d in range(n)]
    rows += [index[:, c, d] for c in range(n) for d in range(n)]
    rows += [index[br : br + box, bc : bc + box, d].ravel()
             for br in range(0, n, box) for bc in range(0, n, box) for d in range(n)]
    A = np.zeros((len(rows), n**3))
    for i, cols in enumerate(rows):
        A[i, cols] = 1.0
    return A


def equality_rank(box: int) -> int:
    """Rank of :func:`constraint_matrix` (40 for 4×4): the number of equalities the paper's OptNet learns."""
    return int(np.linalg.matrix_rank(constraint_matrix(box)))


class _Masks:
    """Digits used in each row, column and box of a grid, as bit masks (bit d−1 for digit d)."""

    def __init__(self, grid: np.ndarray, box: int):
        n = box * box
        self.box, self.full = box, (1 << n) - 1
        self.rows, self.cols, self.boxes = [0] * n, [0] * n, [0] * n
        self.consistent = True
        for (r, c), d in np.ndenumerate(grid):
            if d:
                self.consistent &= self.place(r, c, 1 << (int(d) - 1))

    def unit(self, r: int, c: int) -> int:
        return (r // self.box) * self.box + c // self.box

    def free(self, r: int, c: int) -> int:
        """Bit mask of the digits that cell (r, c) can still take."""
        return self.full & ~(self.rows[r] | self.cols[c] | self.boxes[self.unit(r, c)])

    def place(self, r: int, c: int, bit: int) -> bool:
        """Mark ``bit`` used around (r, c); False if it already was (the grid breaks a rule)."""
        b = self.unit(r, c)
        clash = (self.rows[r] | self.cols[c] | self.boxes[b]) & bit
        self.rows[r] |= bit
        self.cols[c] |= bit
        self.boxes[b] |= bit
        return not clash

    def remove(self, r: int, c: int, bit: int) -> None:
        b = self.unit(r, c)
        self.rows[r] &= ~bit
        self.cols[c] &= ~bit
        self.boxes[b] &= ~bit


def _bits(mask: int) -> list[int]:
    """The set bits of ``mask``, lowest first."""
    out = []
    while mask:
        bit = mask & -mask
        out.append(bit)
        mask ^= bit
    return out


def count_solutions(puzzle: np.ndarray, box: int, limit: int = 2) -> int:
    """Number of completions of ``puzzle`` (0 = blank), counting no further than ``limit``."""
    if limit < 1:
        raise ValueError(f"count_solutions: limit must be >= 1, got {limit}")
    masks = _Masks(np.asarray(puzzle), box)
    if not masks.consistent:
        return 0
    blanks = [(int(r), int(c)) for r, c in zip(*np.nonzero(np.asarray(puzzle) == 0))]

    def search(remaining: list[tuple[int, int]]) -> int:
        if not remaining:
            return 1
        # Most constrained blank first keeps the search small.
        best, best_free, best_count = 0, 0, box * box + 1
        for k, (r, c) in enumerate(remaining):
            free = masks.free(r, c)
            count = free.bit_count()
            if count < best_count:
                best, best_free, best_count = k, free, count
                if count <= 1:
                    break
        r, c = remaining[best]
        rest = remaining[:best] + remaining[best + 1 :]
        found = 0
        for bit in _bits(best_free):
            masks.place(r, c, bit)
            found += search(rest)
            masks.remove(r, c, bit)
            if found >= limit:
                break
        return found

    return min(search(blanks), limit)


def random_grid(box: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly shuffled valid full grid, by randomised backtracking."""
    n = box * box
    grid = np.zeros((n, n), dtype=np.int64)
    masks = _Masks(grid, box)

    def fill(k: int) -> bool:
        if k == n * n:
            return True
        r, c = divmod(k, n)
        for d in rng.permutation([d for d in range(1, n + 1) if masks.free(r, c) >> (d - 1) & 1]):
            bit = 1 << (int(d) - 1)
            masks.place(r, c, bit)
            grid[r, c] = d
            if fill(k + 1):
                return True
            masks.remove(r, c, bit)
        grid[r, c] = 0
        return False

    fill(0)
    return grid


def all_grids(box: int) -> np.ndarray:
    """Every valid grid, ``(count, N, N)``, in lexicographic order; only for box 2 (288 grids)."""
    if box != 2:
        raise ValueError(f"all_grids enumerates only 4×4 boards (box=2), got box={box}")
    n = box * box
    grid = np.zeros((n, n), dtype=np.int64)
    grids: list[np.ndarray] = []
    masks = _Masks(grid, box)

    def fill(k: int) -> None:
        if k == n * n:
            grids.append(grid.copy())
            return
        r, c = divmod(k, n)
        for bit in _bits(masks.free(r, c)):
            masks.place(r, c, bit)
            grid[r, c] = bit.bit_length()
            fill(k + 1)
            masks.remove(r, c, bit)
        grid[r, c] = 0

    fill(0)
    return np.stack(grids)


def is_valid(grid: np.ndarray, box: int) -> bool:
    """Every row, column and box of the full ``grid`` holds each digit once (the paper's metric)."""
    n = box * box
    digits = set(range(1, n + 1))
    units = [grid[r] for r in range(n)] + [grid[:, c] for c in range(n)]
    units += [grid[r : r + box, c : c + box].ravel() for r in range(0, n, box) for c in range(0, n, box)]
    return all(set(u.tolist()) == digits for u in units)


class _UniquenessOracle:
    """Counts completions: by matching against all grids for 4×4, by backtracking otherwise."""

    def __init__(self, box: int):
        self.box = box
        self.grids = all_grids(box).reshape(-1, box**4) if box == 2 else None

    def unique(self, puzzle: np.ndarray) -> bool:
        if self.grids is None:
            return count_solutions(puzzle, self.box, limit=2) == 1
        given = puzzle.ravel() != 0
        return int((self.grids[:, given] == puzzle.ravel()[given]).all(1).sum()) == 1


def make_puzzle(solution: np.ndarray, box: int, rng: np.random.Generator, oracle: _UniquenessOracle | None = None) -> np.ndarray:
    """Blank cells of ``solution`` in random order while the puzzle keeps a unique solution (a minimal puzzle)."""
    oracle = oracle or _UniquenessOracle(box)
    puzzle = solution.copy()
    for k in rng.permutation(solution.size):
        r, c = divmod(int(k), solution.shape[1])
        puzzle[r, c] = 0
        if not oracle.unique(puzzle):
            puzzle[r, c] = solution[r, c]
    return puzzle


def make_dataset(box: int, n_train: int, n_test: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Puzzles and solutions, ``(count, N, N)`` each, with no test solution grid among the training ones.

    For 4×4 the 288 grids are split between train and test in proportion to the set sizes; for larger
    boards grids are drawn at random and any repeat of a test grid is redrawn for training.
    """
    oracle = _UniquenessOracle(box)
    if box == 2:
        grids = oracle.grids.reshape(-1, 4, 4)[rng.permutation(len(oracle.grids))]
        n_test_grids = max(1, round(len(grids) * n_test / (n_train + n_test)))
        test_grids, train_grids = grids[:n_test_grids], grids[n_test_grids:]
        test_sol = test_grids[rng.integers(len(test_grids), size=n_test)]
        train_sol = train_grids[rng.integers(len(train_grids), size=n_train)]
    else:
        test_sol = np.stack([random_grid(box, rng) for _ in range(n_test)])
        held_out = {g.tobytes() for g in test_sol}
        train = []
        while len(train) < n_train:
            grid = random_grid(box, rng)
            if grid.tobytes() not in held_out:
                train.append(grid)
        train_sol = np.stack(train)
    return {
        "train_puzzles": np.stack([make_puzzle(s, box, rng, oracle) for s in train_sol]),
        "train_solutions": train_sol,
        "test_puzzles": np.stack([make_puzzle(s, box, rng, oracle) for s in test_sol]),
        "test_solutions": test_sol,
    }


def one_hot(grids: np.ndarray, box: int) -> np.ndarray:
    """``(count, N, N)`` digits (0 = blank) → ``(count, N, N, N)`` one-hot, blanks all zero."""
    n = box * box
    return (grids[..., None] == np.arange(1, n + 1)).astype(np.float64)
