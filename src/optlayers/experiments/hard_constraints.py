"""Learning hidden hard constraints (the paper's illustrative example, in 2-D).

Targets are ``z* = argmin ½‖z‖² + pᵀz  s.t.  G* z ≤ h*`` for random ``p`` and a hidden polytope
``G* z ≤ h*``. An OptNet layer with Q = I and randomly initialised constraints is trained on
``(p, z*)`` pairs by MSE; the plots show the learned polytope converging to the hidden one.
A QP the solver does not solve adds no loss and is counted in the ``unsolved`` metric instead of
stopping the run.
"""
from __future__ import annotations

import argparse
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from optlayers import OptNet
from optlayers.experiments import common
from optlayers.qp.solve import solve_qp

DESCRIPTION = "learn hidden 2-D polytope constraints from (p, z*) pairs"
FULL = {"epochs": 30, "batch_size": 100, "lr": 0.05, "n_train": 2000, "n_test": 500}
QUICK = {"epochs": 10, "batch_size": 50, "lr": 0.05, "n_train": 500, "n_test": 200}
P_SCALE = 2.0
"""Std of the inputs p; with offsets h* ≈ 1 most targets -p are outside the polytope, so z* lies on its boundary."""
OFFSET_RANGE = (0.5, 1.5)
"""Distance of each hidden facet from the origin (the origin is strictly inside the hidden polytope)."""
MAX_ANGLE_GAP = 0.8 * math.pi
"""Largest angular gap between consecutive hidden normals: < π keeps the hidden polytope bounded."""
GRID_HALF_WIDTH = 3.5
GRID_POINTS = 201
"""The constraint error is measured on a GRID_POINTS² grid over [-GRID_HALF_WIDTH, GRID_HALF_WIDTH]²."""
SNAPSHOT_PANELS = 6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser, "runs/hard-constraints")
    parser.add_argument("--n-true", type=common.positive_int, default=4, help="hidden constraints (default 4)")
    parser.add_argument("--n-learned", type=common.positive_int, default=6, help="constraints of the OptNet layer (default 6)")
    parser.add_argument("--learn-q", action="store_true", help="also learn Q = LLᵀ + εI (default: Q = I is known)")


def hidden_polytope(n_constraints: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random bounded polytope ``{z : G z ≤ h}`` in 2-D containing the origin: G (m, 2), h (m,)."""
    if n_constraints < 3:
        raise common.UsageError(f"--n-true must be >= 3 for a bounded 2-D polytope, got {n_constraints}")
    while True:
        angles = np.sort(rng.uniform(0, 2 * math.pi, n_constraints))
        gaps = np.diff(np.concatenate([angles, angles[:1] + 2 * math.pi]))
        if gaps.max() < MAX_ANGLE_GAP:
            break
    G = np.stack([np.cos(angles), np.sin(angles)], 1)
    return G, rng.uniform(*OFFSET_RANGE, n_constraints)


def make_data(G: Tensor, h: Tensor, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` inputs p ~ N(0, P_SCALE² I) and their targets z*(p), each (n, 2)."""
    p = P_SCALE * torch.randn(n, 2, generator=generator, dtype=G.dtype)
    with torch.no_grad():
        z = solve_qp(torch.eye(2, dtype=G.dtype), p, G, h).z
    return p, z


def inside(G: np.ndarray, h: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Which of ``points`` (k, 2) satisfy ``G z ≤ h``."""
    return (points @ G.T <= h).all(1)


def constraint_error(G_true: np.ndarray, h_true: np.ndarray, G: np.ndarray, h: np.ndarray) -> float:
    """Area of the symmetric difference of the two polytopes (inside the grid), relative to the hidden one's area."""
    axis = np.linspace(-GRID_HALF_WIDTH, GRID_HALF_WIDTH, GRID_POINTS)
    points = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
    a, b = inside(G_true, h_true, points), inside(G, h, points)
    return float((a != b).sum() / a.sum())


def _snapshot(layer: OptNet) -> dict[str, Any]:
    with torch.no_grad():
        _, G, h, _, _ = layer.qp_data()
    return {"G": G.cpu().tolist(), "h": h.cpu().tolist()}


def plot_constraints(G_true: np.ndarray, h_true: np.ndarray, history: list[dict[str, Any]], path) -> None:
    """The hidden polytope (grey) and the learned one (red) at SNAPSHOT_PANELS epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = sorted({round(i * (len(history) - 1) / (SNAPSHOT_PANELS - 1)) for i in range(SNAPSHOT_PANELS)})
    axis = np.linspace(-GRID_HALF_WIDTH, GRID_HALF_WIDTH, GRID_POINTS)
    X, Y = np.meshgrid(axis, axis)
    points = np.stack([X, Y], -1).reshape(-1, 2)
    fig, axes = plt.subplots(1, len(picks), figsize=(3 * len(picks), 3.2), squeeze=False)
    true_margin = (points @ G_true.T - h_true).max(1).reshape(X.shape)
    for ax, i in zip(axes[0], picks):
        row = history[i]
        G, h = np.asarray(row["G"]), np.asarray(row["h"])
        ax.contourf(X, Y, true_margin, levels=[-np.inf, 0], colors=["0.8"])
        ax.contour(X, Y, (points @ G.T - h).max(1).reshape(X.shape), levels=[0], colors=["C3"])
        ax.set_title(f"epoch {row['epoch']}", fontsize=9)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("hidden constraints (grey) and learned constraints (red)", fontsize=10)
    fig.tight_layout()
    common.save_figure(fig, path)


def run(args: argparse.Namespace, ctx: common.DistContext, device: torch.device) -> dict[str, Any]:
    epochs, batch_size, lr = (common.pick(args, k, FULL, QUICK) for k in ("epochs", "batch_size", "lr"))
    n_train, n_test = common.pick(args, "n_train", FULL, QUICK), common.pick(args, "n_test", FULL, QUICK)
    dtype = common.DTYPES[args.dtype]
    G_np, h_np = hidden_polytope(args.n_true, np.random.default_rng(args.seed))
    G_true, h_true = torch.tensor(G_np, dtype=dtype), torch.tensor(h_np, dtype=dtype)
    generator = torch.Generator().manual_seed(args.seed)
    train = make_data(G_true, h_true, n_train, generator)
    test = make_data(G_true, h_true, n_test, generator)

    torch.manual_seed(args.seed)
    fixed_q = None if args.learn_q else 1.0
    layer = OptNet(2, n_ineq=args.n_learned, fixed_q=fixed_q, on_failure="ignore", failed_value=float("nan"),
                   device=device, dtype=dtype)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)

    def per_sample(model: nn.Module, batch: list[Tensor]) -> dict[str, Tensor]:
        p, z_true = batch
        z, unsolved = common.mask_unsolved(model(p), z_true)
        return {"loss": ((z - z_true) ** 2).mean(-1), "unsolved": unsolved}

    cfg = common.TrainConfig(args.out / "optnet", epochs, batch_size, args.seed, args.resume, not args.no_progress, name="optnet",
                             options=common.run_options(args, lr=lr))
    history = common.fit(layer, optimizer, train, test, per_sample, cfg, device=device, ctx=ctx, snapshot=_snapshot)
    last = history[-1]
    results = {
        "experiment": "hard-constraints",
        "quick": args.quick,
        "test_mse": last["test_loss"],
        "initial_test_mse": history[0]["test_loss"],
        "constraint_error": constraint_error(G_np, h_np, np.asarray(last["G"]), np.asarray(last["h"])),
        "initial_constraint_error": constraint_error(G_np, h_np, np.asarray(history[0]["G"]), np.asarray(history[0]["h"])),
        "test_unsolved_fraction": last["test_unsolved"],
        "max_train_unsolved_fraction": max(r.get("train_unsolved", 0.0) for r in history),
        "epochs": epochs,
    }
    if ctx.is_main:
        plot_constraints(G_np, h_np, history, args.out / "constraints.png")
        common.plot_curves({"optnet": history}, [("loss", "MSE")], args.out / "loss.png", logy=True)
        common.write_json(args.out / "results.json", results)
    return results
