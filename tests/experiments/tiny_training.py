"""Tiny training problems shared by the training, resume and DDP tests."""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from optlayers import OptNet
from optlayers.experiments import common, hard_constraints

DTYPE = torch.float64


def tiny_problem(seed: int = 0, n_train: int = 48, n_test: int = 16) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    G, h = hard_constraints.hidden_polytope(4, np.random.default_rng(seed))
    G_t, h_t = torch.tensor(G, dtype=DTYPE), torch.tensor(h, dtype=DTYPE)
    gen = torch.Generator().manual_seed(seed)
    return hard_constraints.make_data(G_t, h_t, n_train, gen), hard_constraints.make_data(G_t, h_t, n_test, gen)


def per_sample(model: nn.Module, batch: list[Tensor]) -> dict[str, Tensor]:
    p, z = batch
    return {"loss": ((model(p) - z) ** 2).mean(-1)}


def train_tiny(out, epochs: int, *, resume: bool = False, seed: int = 0, batch_size: int = 16,
               ctx: common.DistContext = common.DistContext(), lr: float = 0.05, fixed_q: float = 1.0,
               loss_fn=per_sample) -> tuple[nn.Module, list[dict]]:
    train, test = tiny_problem(seed)
    torch.manual_seed(seed)
    model = OptNet(2, n_ineq=5, fixed_q=fixed_q, dtype=DTYPE)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    options = {"lr": lr, "fixed_q": fixed_q, "dtype": str(DTYPE)}
    cfg = common.TrainConfig(out, epochs, batch_size, seed, resume=resume, progress=False, name="tiny", options=options)
    history = common.fit(model, optimizer, train, test, loss_fn, cfg, device=torch.device("cpu"), ctx=ctx)
    return model, history
