import numpy as np
import pytest
import torch

from optlayers.experiments import denoising, sudoku, sudoku_data
from optlayers.experiments.idx import read_idx, write_idx


def test_constraint_matrix_accepts_exactly_valid_grids():
    A = sudoku_data.constraint_matrix(2)
    grids = sudoku_data.all_grids(2)
    assert len(grids) == 288 and sudoku_data.equality_rank(2) == 40
    x = sudoku_data.one_hot(grids, 2).reshape(len(grids), -1)
    np.testing.assert_array_equal(x @ A.T, 1.0)
    broken = grids[0].copy()
    broken[0, [0, 1]] = broken[0, [1, 0]]
    assert not sudoku_data.is_valid(broken, 2)
    assert not np.allclose(sudoku_data.one_hot(broken[None], 2).reshape(1, -1) @ A.T, 1.0)


def test_puzzles_have_unique_solutions_and_disjoint_grids():
    data = sudoku_data.make_dataset(2, 300, 60, np.random.default_rng(1))
    for split in ("train", "test"):
        puzzles, solutions = data[f"{split}_puzzles"], data[f"{split}_solutions"]
        for puzzle, solution in zip(puzzles[:40], solutions[:40]):
            assert sudoku_data.count_solutions(puzzle, 2, limit=3) == 1
            given = puzzle != 0
            np.testing.assert_array_equal(puzzle[given], solution[given])
            assert sudoku_data.is_valid(solution, 2)
    train_grids = {g.tobytes() for g in data["train_solutions"]}
    assert not any(g.tobytes() in train_grids for g in data["test_solutions"])


def test_9x9_generator_gives_unique_puzzle():
    rng = np.random.default_rng(0)
    grid = sudoku_data.random_grid(3, rng)
    assert sudoku_data.is_valid(grid, 3)
    puzzle = sudoku_data.make_puzzle(grid, 3, rng)
    assert sudoku_data.count_solutions(puzzle, 3) == 1 and (puzzle == 0).sum() > 40


def test_count_solutions_counts_completions_and_refuses_bad_limit():
    empty = np.zeros((4, 4), dtype=np.int64)
    # every completion of the empty board is one of the enumerated grids
    assert sudoku_data.count_solutions(empty, 2, limit=10_000) == len(sudoku_data.all_grids(2))
    assert sudoku_data.count_solutions(empty, 2, limit=5) == 5
    clash = empty.copy()
    clash[0, :2] = 1  # the same digit twice in a row: no completion
    assert sudoku_data.count_solutions(clash, 2) == 0
    grid = sudoku_data.all_grids(2)[7]
    assert sudoku_data.count_solutions(grid, 2) == 1
    with pytest.raises(ValueError, match="limit must be >= 1, got 0"):
        sudoku_data.count_solutions(empty, 2, limit=0)


def test_board_metrics_distinguish_exact_and_valid():
    grids = sudoku_data.all_grids(2)[:2]
    truth = torch.tensor(sudoku_data.one_hot(grids, 2))
    pred = truth.clone()
    pred[1] = truth[0]  # a valid board that is not this puzzle's solution
    metrics = sudoku.board_metrics(pred, truth, 2)
    assert metrics["error"].tolist() == [0.0, 1.0] and metrics["invalid_error"].tolist() == [0.0, 0.0]
    pred[0, 0, 0] = pred[0, 0, 1]
    assert sudoku.board_metrics(pred, truth, 2)["invalid_error"][0] == 1.0


def test_signals_follow_the_paper_statistics():
    clean, noisy = denoising.make_signals(2000, np.random.default_rng(0))
    assert clean.shape == (2000, 100)
    segments = (np.diff(clean, axis=1) != 0).sum(1) + 1  # equal neighbouring heights may merge
    assert segments.min() >= 1 and segments.max() <= 9 and segments.mean() > 4
    assert clean.min() >= 10 and clean.max() <= 99 and np.all(clean == np.round(clean))
    assert abs((noisy - clean).std() - 10.0) < 0.1 and abs((noisy - clean).mean()) < 0.1


def test_tv_initialised_optnet_computes_tv():
    torch.manual_seed(0)
    _, noisy = denoising.make_signals(3, np.random.default_rng(0), length=12)
    y = torch.tensor(noisy)
    tv = denoising.OptNetTV(12, 15.0, learn_d=False, dtype=torch.float64)
    model = denoising.TVInitOptNet(12, 15.0, dtype=torch.float64)
    torch.testing.assert_close(model(y), tv(y), atol=0, rtol=1e-3)  # Q_xx = (1 + ε)I in the OptNet


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float64])
def test_idx_round_trip(tmp_path, suffix, dtype):
    array = (np.arange(2 * 3 * 5) % 7).reshape(2, 3, 5).astype(dtype)
    write_idx(tmp_path / f"a{suffix}", array)
    back = read_idx(tmp_path / f"a{suffix}")
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


def test_idx_reads_a_hand_written_mnist_header(tmp_path):
    raw = bytes([0, 0, 0x08, 1]) + (3).to_bytes(4, "big") + bytes([7, 2, 9])
    (tmp_path / "labels").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "labels"), [7, 2, 9])
    (tmp_path / "bad").write_bytes(b"\x12\x34\x08\x01")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match=r"header says shape \(3,\)"):
        read_idx(tmp_path / "short")


def test_tv_init_perturbation_keeps_h_zero_and_perturbs_the_input_layer():
    torch.manual_seed(0)
    model = denoising.TVInitOptNet(12, 15.0, init_noise=1e-3, dtype=torch.float64)
    _, _, h, _, _ = model.qp.qp_data()
    assert float(h.abs().max()) < 1e-5
    deviation = model.input.weight.detach() - torch.cat([-torch.eye(12), torch.zeros(11, 12)]).double()
    assert 0.5e-3 < float(deviation.std()) < 2e-3


def test_learn_d_loss_adds_the_l1_penalty_on_d_with_its_gradient():
    torch.manual_seed(0)
    clean, noisy = denoising.make_signals(4, np.random.default_rng(0), length=8)
    batch = [torch.tensor(noisy), torch.tensor(clean)]
    model = denoising.OptNetTV(8, 13.0, init="random", dtype=torch.float64)
    plain = denoising._mse(model, batch)
    penalised = denoising._mse_with_d_penalty(0.1)(model, batch)
    torch.testing.assert_close(penalised["loss"] - plain["loss"], 0.1 * model.D.abs().sum().expand(4))
    torch.testing.assert_close(penalised["mse"], plain["mse"])
    (g_plain,) = torch.autograd.grad(plain["loss"].mean(), model.D)
    (g_pen,) = torch.autograd.grad(penalised["loss"].mean(), model.D)
    torch.testing.assert_close(g_pen - g_plain, 0.1 * torch.sign(model.D.detach()))
