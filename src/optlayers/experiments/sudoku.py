"""Mini-Sudoku (paper section 5.3, Figure 5): learn the game's constraints from puzzles and solutions.

The OptNet model is a single QP over the one-hot board ``z ∈ R^{N³}``:
``min ½·0.1‖z‖² − puzzleᵀz  s.t.  A z = A z₀, z ≥ 0`` with ``A`` (rank(true constraints) × N³) and
``z₀ > 0`` learned from random init (Adam, lr 0.1, MSE loss). The baseline is the paper's
convolutional network (10 layers of 512 3×3 filters, softmax over digits).
"""
from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optlayers import OptNet
from optlayers.experiments import common
from optlayers.experiments.sudoku_data import equality_rank, make_dataset, one_hot

DESCRIPTION = "learn Sudoku's rules: OptNet (learned equality constraints) vs a convolutional network"
FULL = {"epochs": 20, "batch_size": 150, "lr": None, "n_train": 9000, "n_test": 1000, "conv_width": 512}
QUICK = {"epochs": 6, "batch_size": 25, "lr": None, "n_train": 1000, "n_test": 200, "conv_width": 64}
"""--quick: 240 Adam steps, enough for OptNet's error to start falling (at 4 epochs of batch 100 it had not yet moved)."""
QUICK_9X9 = {"epochs": 2, "batch_size": 20, "n_train": 40, "n_test": 20, "lr": None, "conv_width": 64}
"""--quick with --box 3: the 9×9 smoke test of EXPERIMENTS.md (about 2 minutes at one thread; OptNet's QP has 729
variables, and --quick's 4×4 sizes would take over 25 minutes there)."""
MODELS = ("optnet", "conv")
PAPER_LR = {"optnet": 0.1, "conv": 1e-3}
"""Adam learning rates: 0.1 for OptNet as in the paper; 1e-3 (Adam's default) for the conv net."""
Q_PENALTY = 0.1
"""The paper's Q = 0.1·I: small enough that the QP is close to the LP relaxation of the puzzle."""
CONV_LAYERS = 10
"""Hidden 3×3 convolutions of the paper's baseline (then one more to N output channels)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser, "runs/sudoku")
    parser.add_argument("--box", type=int, choices=(2, 3), default=2, help="box size: 2 for 4×4 boards (default), 3 for 9×9 (--quick: a 2-minute smoke test there)")
    parser.add_argument("--models", nargs="+", action=common.Distinct, choices=MODELS, default=list(MODELS), help="models to train (default: both)")
    parser.add_argument("--conv-width", type=common.positive_int, default=None, help="filters per conv layer (paper 512; --quick 64)")


class OptNetSudoku(nn.Module):
    """``z*(puzzle)`` of the paper's Sudoku QP; input and output ``(B, N, N, N)`` one-hot boards."""

    def __init__(self, box: int, *, n_eq: int | None = None, device=None, dtype=None):
        super().__init__()
        n = box**2
        self.qp = OptNet(n**3, n_eq=equality_rank(box) if n_eq is None else n_eq, fixed_q=Q_PENALTY,
                         nonnegative=True, device=device, dtype=dtype)

    def forward(self, puzzles: Tensor) -> Tensor:
        return self.qp(-puzzles.flatten(1)).view_as(puzzles)


class ConvSudoku(nn.Module):
    """The paper's baseline: CONV_LAYERS ReLU 3×3 convolutions, then a softmax over digits per cell."""

    def __init__(self, box: int, width: int, *, device=None, dtype=None):
        super().__init__()
        n = box**2
        sizes = [n] + [width] * CONV_LAYERS + [n]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1, device=device, dtype=dtype) for a, b in zip(sizes, sizes[1:]))

    def forward(self, puzzles: Tensor) -> Tensor:
        x = puzzles.permute(0, 3, 1, 2)
        for conv in self.convs[:-1]:
            x = F.relu(conv(x))
        return self.convs[-1](x).softmax(1).permute(0, 2, 3, 1)


def board_metrics(pred: Tensor, solution: Tensor, box: int) -> dict[str, Tensor]:
    """Per board: ``error`` (1 unless the argmax board equals the solution) and ``invalid_error``
    (the paper's original metric: 1 unless every row, column and box of the argmax board holds each digit once).
    """
    n = box * box
    board = pred.argmax(-1)
    error = (board != solution.argmax(-1)).flatten(1).any(1)
    digits = F.one_hot(board, n)
    boxes = digits.view(-1, box, box, box, box, n).sum((2, 4))
    valid = (digits.sum(1) == 1).all((1, 2)) & (digits.sum(2) == 1).all((1, 2)) & (boxes == 1).all((1, 2, 3))
    return {"error": error.to(pred.dtype), "invalid_error": (~valid).to(pred.dtype)}


def sizes(args: argparse.Namespace) -> tuple[int, int, int, int, int]:
    """(epochs, batch_size, n_train, n_test, conv_width): the user's, else the full or --quick defaults
    (``QUICK_9X9`` for 9×9 boards)."""
    quick = QUICK_9X9 if args.box == 3 else QUICK
    return tuple(common.pick(args, name, FULL, quick) for name in ("epochs", "batch_size", "n_train", "n_test", "conv_width"))


def run(args: argparse.Namespace, ctx: common.DistContext, device: torch.device) -> dict[str, Any]:
    epochs, batch_size, n_train, n_test, conv_width = sizes(args)
    dtype = common.DTYPES[args.dtype]
    data = make_dataset(args.box, n_train, n_test, np.random.default_rng(args.seed))
    tensors = {k: torch.tensor(one_hot(v, args.box), dtype=dtype) for k, v in data.items()}
    train = (tensors["train_puzzles"], tensors["train_solutions"])
    test = (tensors["test_puzzles"], tensors["test_solutions"])

    def per_sample(model: nn.Module, batch: list[Tensor]) -> dict[str, Tensor]:
        puzzles, solutions = batch
        pred = model(puzzles)
        loss = ((pred - solutions) ** 2).flatten(1).mean(1)
        return {"loss": loss, **board_metrics(pred.detach(), solutions, args.box)}

    histories = {}
    for name in args.models:
        torch.manual_seed(args.seed)
        if name == "optnet":
            model: nn.Module = OptNetSudoku(args.box, device=device, dtype=dtype)
        else:
            model = ConvSudoku(args.box, conv_width, device=device, dtype=dtype)
        lr = args.lr or PAPER_LR[name]
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        options = common.run_options(args, lr=lr, conv_width=conv_width if name == "conv" else None)
        cfg = common.TrainConfig(args.out / name, epochs, batch_size, args.seed, args.resume, not args.no_progress,
                                 name=name, options=options)
        histories[name] = common.fit(model, optimizer, train, test, per_sample, cfg, device=device, ctx=ctx)

    results: dict[str, Any] = {"experiment": "sudoku", "quick": args.quick, "board": f"{args.box**2}x{args.box**2}",
                               "n_train": n_train, "n_test": n_test, "epochs": epochs,
                               "batch_size": batch_size, "conv_width": conv_width}
    for name, history in histories.items():
        results[name] = {k: history[-1][k] for k in ("test_loss", "test_error", "test_invalid_error", "train_loss", "train_error")}
    if ctx.is_main:
        common.plot_curves(histories, [("loss", "MSE"), ("error", "error (board ≠ solution)")], args.out / "curves.png")
        common.write_json(args.out / "results.json", results)
    return results
