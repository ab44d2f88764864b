"""Two CPU processes (gloo) under DistributedDataParallel follow the single-process trajectory."""
import os
import socket

import torch
import torch.multiprocessing as mp

from optlayers.experiments import common
from tiny_training import train_tiny

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE))
    torch.set_num_threads(1)
    ctx, _ = common.init_distributed("cpu")
    try:
        model, _ = train_tiny(out, epochs=2, ctx=ctx)
        torch.save(model.state_dict(), os.path.join(out, f"final-rank{rank}.pt"))
    finally:
        common.close_distributed(ctx)


def test_ddp_matches_single_process(tmp_path):
    single, single_history = train_tiny(tmp_path / "single", epochs=2)
    (tmp_path / "ddp").mkdir()
    mp.spawn(_worker, args=(_free_port(), str(tmp_path / "ddp")), nprocs=WORLD_SIZE, join=True)
    for rank in range(WORLD_SIZE):
        state = torch.load(tmp_path / "ddp" / f"final-rank{rank}.pt", weights_only=True)
        for key, value in single.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-7, atol=1e-9)
    ddp_history = torch.load(tmp_path / "ddp" / common.CHECKPOINT_FILE, weights_only=True)["history"]
    for a, b in zip(ddp_history, single_history):
        assert abs(a["test_loss"] - b["test_loss"]) < 1e-9
