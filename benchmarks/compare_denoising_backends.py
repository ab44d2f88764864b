"""An OptNet experiment through both derivatives: TV denoising learning D, QP layer vs cone layer.

The same OptNetTV layer (paper section 5.2, D learned from a random init) is trained from the
same initial D on the same batches in the same order, with the core QP solver (``solve_qp``: its
own interior point forward, implicit KKT backward; at its default tolerance and at the
experiment's 1e-8) and once per cone forward through ``solve_qp_cone`` (the QP as a cone program: batched ``ipm`` or Clarabel
forward, the homogeneous self-dual embedding's derivative backward). Reports the gradients'
agreement at the initial D, time per training step, unsolved elements, and the test MSE
after training. Prints a table and writes JSON.

    PYTHONPATH=src python benchmarks/compare_denoising_backends.py --out runs/compare_denoising.json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import time

import numpy as np
import torch

from optlayers import OptNetTV, solve_qp
from optlayers.cone.qp import solve_qp_cone
from optlayers.experiments.denoising import LEARN_D_LAMBDA, LEARNING_RATES, SIGNAL_LENGTH, make_signals

EXPERIMENT_TOL = 1e-8  # the experiment's QP tolerance (optlayers.experiments.denoising.SOLVER_OPTIONS)
BACKENDS = ("qp", "qp tol=1e-8", "cone ipm", "cone clarabel")  # "qp": the library's default tolerance


def solve(layer: OptNetTV, y: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's denoised signals (B, n) and the per-element status, through ``backend``."""
    Q, G, h = layer.qp_data()
    p = torch.cat([-y, torch.full((y.shape[0], layer.n_diff), layer.lam, dtype=y.dtype)], -1)
    if backend.startswith("qp"):
        tol = EXPERIMENT_TOL if backend.endswith("1e-8") else None
        sol = solve_qp(Q, p, G, h, tol=tol, max_iter=300, on_failure="ignore")
    else:
        sol = solve_qp_cone(Q, p, G, h, solver=backend.split()[1], on_failure="ignore")
    return sol.z[:, :layer.n], sol.status


def loss_and_status(layer: OptNetTV, noisy: torch.Tensor, clean: torch.Tensor, backend: str):
    x, status = solve(layer, noisy, backend)
    solved = status == 0
    return ((torch.where(solved.unsqueeze(-1), x, clean) - clean) ** 2).mean(), int((~solved).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default="compare_denoising.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    train = [torch.as_tensor(a) for a in make_signals(args.train, rng)][::-1]  # (noisy, clean)
    test = [torch.as_tensor(a) for a in make_signals(args.test, rng)][::-1]
    torch.manual_seed(0)
    initial = OptNetTV(SIGNAL_LENGTH, LEARN_D_LAMBDA, init="random", dtype=torch.float64)
    layers = {name: copy.deepcopy(initial) for name in BACKENDS}

    grads = {}
    for name, layer in layers.items():
        loss, _ = loss_and_status(layer, train[0][:args.batch], train[1][:args.batch], name)
        grads[name] = torch.autograd.grad(loss, layer.D)[0]
        layer.zero_grad()
    reference = grads["qp"]

    rows = {}
    for name, layer in layers.items():
        optimizer = torch.optim.Adam(layer.parameters(), lr=LEARNING_RATES["optnet-learn-d"])
        order = torch.randperm(args.train, generator=torch.Generator().manual_seed(1))
        steps, unsolved, start = 0, 0, time.perf_counter()
        for _ in range(args.epochs):
            for first in range(0, args.train, args.batch):
                index = order[first:first + args.batch]
                loss, failed = loss_and_status(layer, train[0][index], train[1][index], name)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                steps, unsolved = steps + 1, unsolved + failed
        step_s = (time.perf_counter() - start) / steps
        with torch.no_grad():
            test_loss, test_failed = loss_and_status(layer, test[0], test[1], name)
        rel = float((grads[name] - reference).abs().max() / reference.abs().max())
        moved = layer.D.detach() - layers["qp"].D.detach()
        rows[name] = {"step_s": step_s, "unsolved_train": unsolved, "unsolved_test": test_failed,
                      "test_mse": float(test_loss), "grad_rel_diff_at_init": rel,
                      "d_rel_diff_after": float(moved.abs().max() / layers["qp"].D.detach().abs().max())}
    print(f"{'backend':15s} {'s/step':>8s} {'unsolved':>9s} {'test MSE':>9s} {'grad diff @init':>16s} {'D diff after':>13s}")
    for name, row in rows.items():
        print(f"{name:15s} {row['step_s']:8.3f} {row['unsolved_train'] + row['unsolved_test']:9d} {row['test_mse']:9.2f} "
              f"{row['grad_rel_diff_at_init']:16.1e} {row['d_rel_diff_after']:13.1e}")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **vars(args),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "notes": "grad diff: max |dL/dD - dL/dD(qp)| / max |dL/dD(qp)| on the first batch at the initial D; "
                     "D diff after: the same for D after training, against the qp run"}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
