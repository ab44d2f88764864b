"""1-D total-variation denoising (paper section 5.2, Table 1).

Piecewise-constant signals (length 100, 1–9 segments, heights 10–99) with Gaussian noise σ = 10.
Four methods: TV denoising with the λ that is best on the training set; a fully-connected ReLU net;
an OptNet TV layer learning the differencing operator D from a random init; and a general OptNet
layer (with a linear input layer) initialised at the TV solution and fine-tuned.
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optlayers import OptNet, OptNetTV
from optlayers.experiments import common
from optlayers.layers import first_difference

DESCRIPTION = "1-D total-variation denoising: TV, FC net, OptNet learning D, OptNet fine-tuned from TV"
SIGNAL_LENGTH = 100
MAX_SEGMENTS = 9
HEIGHT_RANGE = (10, 99)
NOISE_STD = 10.0
"""The paper's data: piecewise-constant signals with 1–9 segments of integer heights 10–99, noise σ = 10."""
FULL = {"epochs": 50, "batch_size": 150, "lr": None, "n_train": 9000, "n_test": 1000}
QUICK = {"epochs": 2, "batch_size": 25, "lr": None, "n_train": 100, "n_test": 100}
METHODS = ("tv", "fc", "optnet-learn-d", "optnet-tv-init")
TRAINED = METHODS[1:]
LEARNING_RATES = {"fc": 1e-3, "optnet-learn-d": 1e-2, "optnet-tv-init": 1e-4}
"""Adam: the default rate for the FC net; a larger one to move D far from its random init; a small one
to fine-tune the TV initialisation without leaving its basin."""
LAMBDA_GRID = (1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 60.0)
"""λ values searched for the TV baseline (the paper's best λ is about 21)."""
QUICK_LAMBDA_GRID = (10.0, 15.0, 20.0, 25.0, 30.0)
"""The part of LAMBDA_GRID around the optimum, for --quick."""
TV_SEARCH_SIGNALS = 500
"""Training signals used to choose λ (more changes the choice little and costs a QP solve each)."""
LEARN_D_LAMBDA = 13.0
"""λ of the learn-D layer (as in the paper's code); D's scale is learned, so λ only sets the initial balance."""
FC_HIDDEN = 500
EVAL_BATCH_SIZE = 50
"""Signals per evaluation batch: on one CPU thread a batch of 1000 of these 199-variable QPs solves at half the
per-signal speed of a batch of 50 (cache misses on the 1000 KKT matrices)."""
SOLVER_OPTIONS = {"tol": 1e-8, "max_iter": 300}
"""QP settings of every denoising layer: signals are O(100), so 1e-8 is far below the noise (σ = 10); with a random D
the default 1e-10 sometimes needs over 100 iterations on a signal, and max_iter leaves room for such stragglers."""
EXAMPLES_PLOTTED = 2
TINY_NOISE = 1e-6
D_PENALTY = 0.01
"""Weight of the L1 penalty ``‖D‖₁`` added to the batch MSE of the learn-D model: it drives the entries of D that
the denoising does not need to zero. The original code's experiment script ran 0.01 and 0.1 (its ``main.py``
default); 0.01 reproduces the paper's Table 1 here (EXPERIMENTS.md), 0.1 trades MSE for sparsity (83 after 4
epochs of batch 25)."""
INIT_NOISE = 1e-3
"""Standard deviation of the random perturbation of the fine-tuned model's input layer at init (the original code's
``1e-3·randn``); z₀ and s₀ get a 1e-6 perturbation, as there."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser, "runs/denoising")
    parser.add_argument("--methods", nargs="+", action=common.Distinct, choices=METHODS, default=list(METHODS), help="methods to run (default: all four)")
    parser.add_argument("--d-penalty", type=_nonnegative_float, default=D_PENALTY,
                        help=f"weight of the L1 penalty on D for optnet-learn-d (default {D_PENALTY}, one of the original code's two settings; 0: none)")
    parser.add_argument("--init-noise", type=_nonnegative_float, default=INIT_NOISE,
                        help=f"std of the random perturbation of optnet-tv-init's input layer at init (default {INIT_NOISE}; 0: exact TV)")


def _nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not np.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def make_signals(n: int, rng: np.random.Generator, length: int = SIGNAL_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """``n`` clean piecewise-constant signals and their noisy versions, each ``(n, length)``."""
    clean = np.empty((n, length))
    for i in range(n):
        segments = int(rng.integers(1, MAX_SEGMENTS + 1))
        breaks = np.sort(rng.choice(np.arange(1, length), segments - 1, replace=False))
        heights = rng.integers(HEIGHT_RANGE[0], HEIGHT_RANGE[1] + 1, segments)
        clean[i] = np.repeat(heights, np.diff(np.concatenate([[0], breaks, [length]])))
    return clean, clean + NOISE_STD * rng.standard_normal((n, length))


def _signal_tensors(n: int, rng: np.random.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(noisy, clean)`` tensors of ``n`` signals; train and test draw from separate streams, so the test
    set depends only on ``--seed`` and ``--n-test`` and runs with different ``--n-train`` share it."""
    clean, noisy = make_signals(n, rng)
    return torch.tensor(noisy, dtype=dtype), torch.tensor(clean, dtype=dtype)


class FCDenoiser(nn.Module):
    """The paper's fully-connected baseline: Linear–ReLU–Linear."""

    def __init__(self, n: int, hidden: int = FC_HIDDEN, *, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(n, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, n, device=device, dtype=dtype)

    def forward(self, y: Tensor) -> Tensor:
        return self.fc2(F.relu(self.fc1(y)))


class TVInitOptNet(nn.Module):
    """``Linear → OptNet(2n−1 variables, 2n−2 inequalities)``, initialised so that it computes TV denoising with ``lam``.

    At init ``p = (−y, λ1)``, ``Q = diag(I, εI)``, ``G = [[D, −I], [−D, −I]]``, ``h = G z₀ + s₀ = 0``
    (``z₀ = (0, 1)``, ``s₀ = 1``): exactly :class:`~optlayers.OptNetTV`. Every piece is then trained. With
    ``init_noise > 0`` the input layer's weight gets ``init_noise·randn`` added and ``z₀``, ``s₀`` a
    ``1e-6·randn`` (the original code's symmetry-breaking perturbation; h stays ≈ 0).
    """

    def __init__(self, n: int, lam: float, init_noise: float = 0.0, *, device=None, dtype=None):
        super().__init__()
        m = n - 1
        factory = {"device": device, "dtype": dtype}
        self.n = n
        self.input = nn.Linear(n, n + m, **factory)
        self.qp = OptNet(n + m, n_ineq=2 * m, **SOLVER_OPTIONS, **factory)
        D, eye = first_difference(n, **factory), torch.eye(m, **factory)
        with torch.no_grad():
            self.input.weight.zero_()
            self.input.weight[:n] = -torch.eye(n, **factory)
            self.input.bias.zero_()
            self.input.bias[n:] = lam
            self.qp.L.copy_(torch.block_diag(torch.eye(n, **factory), torch.zeros(m, m, **factory)))
            self.qp.G.copy_(torch.cat([torch.cat([D, -eye], 1), torch.cat([-D, -eye], 1)]))
            self.qp.z0_raw.copy_(torch.cat([torch.zeros(n, **factory), torch.ones(m, **factory)]))
            if init_noise > 0:
                self.input.weight.add_(init_noise * torch.randn_like(self.input.weight))
                s0 = 1.0 + TINY_NOISE * torch.randn(2 * m, **factory)
                self.qp.s0_raw.copy_(torch.log(torch.expm1(s0)))
                # z₀ = (0, t₀) with t₀ the mean of the two slacks of each |Dx| row: G z₀ ≈ −s₀, h ≈ 0
                self.qp.z0_raw[n:].copy_((s0[:m] + s0[m:]) / 2)
                self.qp.z0_raw.add_(TINY_NOISE * torch.randn_like(self.qp.z0_raw))

    def forward(self, y: Tensor) -> Tensor:
        return self.qp(self.input(y))[..., : self.n]


def _mse(model: nn.Module, batch: list[Tensor]) -> dict[str, Tensor]:
    noisy, clean = batch
    mse = ((model(noisy) - clean) ** 2).mean(-1)
    return {"loss": mse, "mse": mse.detach()}


def _mse_with_d_penalty(weight: float):
    """Per-sample ``MSE + weight·‖D‖₁``: averaged over a batch, the original code's ``MSE + Dpenalty·‖D‖₁``."""
    def per_sample(model: nn.Module, batch: list[Tensor]) -> dict[str, Tensor]:
        out = _mse(model, batch)
        module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        return {**out, "loss": out["loss"] + weight * module.D.abs().sum()}
    return per_sample


def tv_search(train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], device: torch.device,
              ctx: common.DistContext, grid: tuple[float, ...] = LAMBDA_GRID) -> dict[str, Any]:
    """TV denoising: the λ of ``grid`` with the lowest training MSE, and its test MSE."""
    subset = [t[:TV_SEARCH_SIGNALS] for t in train]
    dtype = train[0].dtype
    train_mse = {}
    for lam in grid:
        tv = OptNetTV(SIGNAL_LENGTH, lam, learn_d=False, **SOLVER_OPTIONS, device=device, dtype=dtype)
        train_mse[lam] = common.evaluate(tv, subset, _mse, device, ctx, EVAL_BATCH_SIZE)["loss"]
    best = min(train_mse, key=train_mse.get)
    tv = OptNetTV(SIGNAL_LENGTH, best, learn_d=False, **SOLVER_OPTIONS, device=device, dtype=dtype)
    test_mse = common.evaluate(tv, test, _mse, device, ctx, EVAL_BATCH_SIZE)["loss"]
    return {"lambda": best, "train_mse": train_mse[best], "test_mse": test_mse,
            "search": [{"lambda": k, "train_mse": v} for k, v in train_mse.items()]}


def build(method: str, lam: float, device: torch.device, dtype: torch.dtype, init_noise: float = 0.0) -> nn.Module:
    if method == "fc":
        return FCDenoiser(SIGNAL_LENGTH, device=device, dtype=dtype)
    if method == "optnet-learn-d":
        return OptNetTV(SIGNAL_LENGTH, LEARN_D_LAMBDA, init="random", **SOLVER_OPTIONS, device=device, dtype=dtype)
    return TVInitOptNet(SIGNAL_LENGTH, lam, init_noise, device=device, dtype=dtype)


def method_options(method: str, args: argparse.Namespace) -> dict[str, Any]:
    """The options that change ``method``'s training (for the checkpoint fingerprint and results)."""
    options = {"lr": args.lr or LEARNING_RATES[method], "dtype": args.dtype, "quick": args.quick}
    if method == "optnet-learn-d":
        options["d_penalty"] = args.d_penalty
    if method == "optnet-tv-init":
        options["init_noise"] = args.init_noise
    return options


def plot_d(initial: Tensor, learned: Tensor, path) -> None:
    """The learn-D model's D at its random initialisation and after training, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for ax, (title, D) in zip(axes, (("initial D (random)", initial), ("learned D", learned))):
        limit = float(D.abs().max())
        image = ax.imshow(D.cpu().numpy(), cmap="RdBu", vmin=-limit, vmax=limit)
        ax.set_title(title)
        ax.set_xlabel("signal index")
        ax.set_ylabel("row of D")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    common.save_figure(fig, path)


def plot_examples(models: dict[str, nn.Module], test: tuple[Tensor, Tensor], path, count: int = EXAMPLES_PLOTTED) -> None:
    """The first ``count`` test signals: noisy, clean and each model's output."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noisy, clean = (t[:count] for t in test)
    fig, axes = plt.subplots(count, 1, figsize=(9, 3.4 * count), squeeze=False)
    with torch.no_grad():
        outputs = {name: model(noisy).cpu().numpy() for name, model in models.items()}
    for i, ax in enumerate(axes[:, 0]):
        ax.plot(noisy[i].cpu().numpy(), color="0.7", label="noisy")
        ax.plot(clean[i].cpu().numpy(), color="k", label="clean")
        for j, (name, out) in enumerate(outputs.items()):
            ax.plot(out[i], color=f"C{j}", label=name)
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    common.save_figure(fig, path)


def run(args: argparse.Namespace, ctx: common.DistContext, device: torch.device) -> dict[str, Any]:
    epochs, batch_size = common.pick(args, "epochs", FULL, QUICK), common.pick(args, "batch_size", FULL, QUICK)
    n_train, n_test = common.pick(args, "n_train", FULL, QUICK), common.pick(args, "n_test", FULL, QUICK)
    dtype = common.DTYPES[args.dtype]
    train, test = (_signal_tensors(n, np.random.default_rng([args.seed, split]), dtype)
                   for split, n in enumerate((n_train, n_test)))

    results: dict[str, Any] = {"experiment": "denoising", "quick": args.quick, "n_train": n_train, "n_test": n_test,
                               "epochs": epochs, "batch_size": batch_size, "noisy_test_mse": float(((test[0] - test[1]) ** 2).mean())}
    tv_file = args.out / "tv" / "results.json"
    needs_tv = "tv" in args.methods or "optnet-tv-init" in args.methods
    grid = QUICK_LAMBDA_GRID if args.quick else LAMBDA_GRID
    tv_data = {"seed": args.seed, "n_train": n_train, "n_test": n_test, "grid": list(grid)}
    saved = json.loads(tv_file.read_text()) if args.resume and tv_file.exists() else {}
    if needs_tv and saved.get("data") == tv_data:
        results["tv"] = saved
    elif needs_tv:
        results["tv"] = {**tv_search(train, test, device, ctx, grid), "data": tv_data}
        if ctx.is_main:
            common.write_json(tv_file, results["tv"])
    lam = results["tv"]["lambda"] if needs_tv else None

    histories, models, initial_d = {}, {}, None
    for method in (m for m in args.methods if m in TRAINED):
        options = method_options(method, args)
        torch.manual_seed(args.seed)
        model = build(method, lam, device, dtype, args.init_noise)
        if method == "optnet-learn-d":
            initial_d = model.D.detach().clone()
        optimizer = torch.optim.Adam(model.parameters(), lr=options["lr"])
        cfg = common.TrainConfig(args.out / method, epochs, batch_size, args.seed, args.resume, not args.no_progress,
                                 eval_batch_size=EVAL_BATCH_SIZE, name=method, options=options)
        per_sample = _mse_with_d_penalty(args.d_penalty) if method == "optnet-learn-d" and args.d_penalty else _mse
        histories[method] = common.fit(model, optimizer, train, test, per_sample, cfg, device=device, ctx=ctx)
        models[method] = model
        last = histories[method][-1]
        results[method] = {"test_mse": last["test_mse"], "train_mse": last["train_mse"], "epochs": last["epoch"],
                           "best_test_mse": min(r["test_mse"] for r in histories[method]), **options}
    if ctx.is_main:
        hlines = {f"TV (λ={lam:g}) test": results["tv"]["test_mse"]} if needs_tv else None
        if histories:
            common.plot_curves(histories, [("mse", "MSE")], args.out / "curves.png", logy=True, hlines=hlines)
        if initial_d is not None:
            plot_d(initial_d, models["optnet-learn-d"].D.detach(), args.out / "learned-d.png")
        if needs_tv:
            models = {"tv": OptNetTV(SIGNAL_LENGTH, lam, learn_d=False, **SOLVER_OPTIONS, device=device, dtype=dtype), **models}
        test_on_device = [t.to(device) for t in test]
        plot_examples(models, test_on_device, args.out / "examples.png")
        plot_examples(models, test_on_device, args.out / "example.png", count=1)
        common.write_json(args.out / "results.json", results)
    return results


def plot_run(run_dir, out_dir) -> list:
    """Figures of a finished (or checkpointed) run in ``run_dir``, whose methods may come from separate commands:
    ``denoising-example.png`` (the first test signal: noisy, clean and every method's output),
    ``denoising-learned-d.png`` (learn-D's D at init and trained), ``denoising-curves.png`` and
    ``denoising-fine-tuned.png`` (the fine-tuned model's curves beside TV's test MSE); returns the paths."""
    from pathlib import Path

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    tv = json.loads((run_dir / "tv" / "results.json").read_text())
    lam, seed, device = tv["lambda"], tv["data"]["seed"], torch.device("cpu")
    models: dict[str, nn.Module] = {f"TV (λ={lam:g})": OptNetTV(SIGNAL_LENGTH, lam, learn_d=False, **SOLVER_OPTIONS,
                                                                  dtype=torch.float64)}
    histories, initial_d, written = {}, None, []
    for method in TRAINED:
        if not (run_dir / method / common.CHECKPOINT_FILE).is_file():
            continue
        state = common.load_checkpoint(run_dir / method / common.CHECKPOINT_FILE)
        options = state["fingerprint"]
        torch.manual_seed(seed)
        model = build(method, lam, device, common.DTYPES[options["dtype"]], options.get("init_noise", 0.0))
        if method == "optnet-learn-d":
            initial_d = model.D.detach().clone()
        model.load_state_dict(state["model"])
        models[f"{method} (epoch {state['epoch']})"] = model.double()
        histories[method] = state["history"]
    test = _signal_tensors(tv["data"]["n_test"], np.random.default_rng([seed, 1]), torch.float64)
    plot_examples(models, test, out_dir / "denoising-example.png", count=1)
    written.append(out_dir / "denoising-example.png")
    if initial_d is not None:
        plot_d(initial_d, models[next(k for k in models if k.startswith("optnet-learn-d"))].D.detach(),
               out_dir / "denoising-learned-d.png")
        written.append(out_dir / "denoising-learned-d.png")
    if histories:
        common.plot_curves(histories, [("mse", "test / train MSE")], out_dir / "denoising-curves.png", logy=True,
                           hlines={f"TV (λ={lam:g}) test": tv["test_mse"]})
        written.append(out_dir / "denoising-curves.png")
    if "optnet-tv-init" in histories:
        common.plot_curves({"optnet-tv-init": histories["optnet-tv-init"]}, [("mse", "test / train MSE")],
                           out_dir / "denoising-fine-tuned.png", hlines={f"TV (λ={lam:g}) test": tv["test_mse"]})
        written.append(out_dir / "denoising-fine-tuned.png")
    return written
