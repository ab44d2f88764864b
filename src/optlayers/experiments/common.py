"""Training loop, atomic checkpoints with exact resume, DDP, metrics files and plots, shared by every experiment.

Batching is done here (no DataLoader) so that one seeded ``torch.Generator`` decides the order of
the data: its state is checkpointed, so a resumed run sees exactly the batches an uninterrupted
run would have seen. Under ``torchrun`` every process draws the same global batch and takes its
strided share of it; the per-process loss is scaled so that DDP's gradient average equals the
gradient of the mean loss over the global batch, i.e. a run on k processes follows the same
trajectory as a single-process run.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from optlayers.status import InexactDerivativeWarning

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_JSON = "metrics.json"
METRICS_CSV = "metrics.csv"
CHECKPOINT_FORMAT = 2
"""Bumped when the checkpoint layout changes, so that an old file is refused with a clear message."""

DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_DTYPE = "float64"
"""QP layers are solved in float64 by default: interior point iterates lose accuracy in float32."""

PerSampleFn = Callable[[nn.Module, Sequence[Tensor]], dict[str, Tensor]]
"""``fn(model, batch) -> {"loss": (B,), other metrics: (B,)}``; ``loss`` must carry gradients."""


class UsageError(ValueError):
    """A problem with the user's options or files; the CLI prints its message without a traceback."""


# --------------------------------------------------------------------------- argument parsing
def _int_at_least(text: str, minimum: int, expected: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    return _int_at_least(text, 1, "a positive integer")


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


class Distinct(argparse.Action):
    """argparse action for a list option (``nargs="+"``): each value at most once (a model named twice
    would be trained twice into one folder, the second refused for the first's checkpoint)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        repeated = sorted({v for v in values if list(values).count(v) > 1})
        if repeated:
            parser.error(f"argument {option_string}: {', '.join(map(str, repeated))} given more than once")
        setattr(namespace, self.dest, values)


def add_common_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """Options every experiment has; sizes left at None take the experiment's full or --quick default."""
    parser.add_argument("--out", type=Path, default=Path(default_out), help=f"output directory (default: {default_out})")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="seed of data, initialisation and batch order")
    parser.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N' (under torchrun: one GPU per process)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=DEFAULT_DTYPE, help="floating point type of models and data")
    parser.add_argument("--epochs", type=positive_int, default=None, help="training epochs")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="global batch size (split across processes)")
    parser.add_argument("--lr", type=positive_float, default=None, help="learning rate (default: the paper's, per model)")
    parser.add_argument("--n-train", type=positive_int, default=None, help="training examples")
    parser.add_argument("--n-test", type=positive_int, default=None, help="test examples")
    parser.add_argument("--quick", action="store_true", help="small sizes that finish in a few minutes on a 2-core CPU")
    parser.add_argument("--resume", action="store_true", help="continue the runs checkpointed in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def pick(args: argparse.Namespace, name: str, full: Mapping[str, Any], quick: Mapping[str, Any]) -> Any:
    """The user's value of ``name`` if given, else the experiment's --quick or full default."""
    value = getattr(args, name, None)
    if value is not None:
        return value
    return (quick if args.quick else full)[name]


# --------------------------------------------------------------------------- devices and processes
@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, values: Tensor) -> Tensor:
        """Element-wise sum over processes (a no-op for one process)."""
        if self.active:
            values = values.clone()
            dist.all_reduce(values)
        return values


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    """``auto`` → CUDA if available else CPU; ``cuda`` under several processes → ``cuda:local_rank``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec!r} asks for CUDA but torch.cuda.is_available() is False; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise UsageError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    return device


def init_distributed(device_spec: str) -> tuple[DistContext, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Uses NCCL for CUDA devices and gloo for the CPU. Without ``WORLD_SIZE > 1`` this is a plain
    single-process run.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return DistContext(), resolve_device(device_spec)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(device_spec, local_rank)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistContext(rank, world_size, local_rank), device


def close_distributed(ctx: DistContext) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- files
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Scalar columns of ``rows`` (lists, e.g. parameter snapshots, are left to the JSON file)."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k, v in row.items() if k not in keys and isinstance(v, (int, float, str))]

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(path, lambda f: f.write(text.getvalue().encode()))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def check_resume(out: Path, resume: bool) -> None:
    """``out`` is a folder (or not there yet); with ``--resume`` it must hold a checkpoint of an earlier
    run (any of its models)."""
    if Path(out).exists() and not Path(out).is_dir():
        raise UsageError(f"--out must be a folder (made if missing), got the file {out}")
    if resume and not any(Path(out).rglob(CHECKPOINT_FILE)):
        raise UsageError(f"--resume: no {CHECKPOINT_FILE} under --out {out}; pass the --out of the run to "
                         "continue, or drop --resume to start a new run")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with ``weights_only=True``: checkpoints hold only tensors and plain containers."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} has checkpoint format {state.get('format')!r}, expected {CHECKPOINT_FORMAT}; start a new --out")
    return state


# --------------------------------------------------------------------------- training
@dataclass(frozen=True)
class TrainConfig:
    """One model's training run; ``out`` receives checkpoint.pt, metrics.json and metrics.csv."""

    out: Path
    epochs: int
    batch_size: int
    seed: int
    resume: bool = False
    progress: bool = True
    eval_batch_size: int = 1000
    name: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Every other setting that changes the run's results (learning rate, dtype, model options, ...): a checkpoint
    is resumed only by a run with the same values. Values must be plain ``str``/``int``/``float``/``bool``/``None``."""


def _rng_state(shuffle: torch.Generator, device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], shuffle: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    shuffle.set_state(state["shuffle"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _fingerprint(cfg: TrainConfig, n_train: int) -> dict[str, Any]:
    """What must match between a checkpoint and the run that resumes it."""
    return {"seed": cfg.seed, "batch_size": cfg.batch_size, "n_train": n_train, "name": cfg.name, **cfg.options}


def _check_fingerprint(path: Path, saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Stop with the names (and both values) of the options in which ``saved`` and ``current`` differ."""
    missing = object()
    differ = [k for k in sorted({*saved, *current}) if saved.get(k, missing) != current.get(k, missing)]
    if differ:
        shown = lambda d, k: repr(d[k]) if k in d else "(not set)"  # noqa: E731
        detail = "; ".join(f"{k}: checkpoint {shown(saved, k)}, this run {shown(current, k)}" for k in differ)
        raise UsageError(f"{path} was written with other options ({detail}); resume with the same options "
                         "or choose another --out")


def run_options(args: argparse.Namespace, **resolved: Any) -> dict[str, Any]:
    """The command-line options of ``args`` that change results, for :attr:`TrainConfig.options`.

    Options that only say where or how long to run (``--out``, ``--resume``, ``--no-progress``, ``--epochs``,
    ``--device``) are left out, as are the sizes the fingerprint already holds; ``resolved`` adds or overrides
    values a model resolves from its defaults (e.g. its learning rate when ``--lr`` is not given).
    """
    skip = {"out", "resume", "no_progress", "epochs", "device", "batch_size", "n_train", "seed",
            "command", "name", "module", "subparser", "models", "methods"}
    options = {}
    for key, value in sorted(vars(args).items()):
        if key in skip:
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        options[key] = value
    return {**options, **resolved}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Sequence[Tensor],
    per_sample: PerSampleFn,
    device: torch.device,
    ctx: DistContext = DistContext(),
    batch_size: int = 1000,
) -> dict[str, float]:
    """Mean of each per-sample metric over ``data``; processes share the work and sum their parts."""
    was_training = model.training
    model.eval()
    n = len(data[0])
    mine = torch.arange(ctx.rank, n, ctx.world_size)
    sums: dict[str, Tensor] = {}
    for start in range(0, len(mine), batch_size):
        idx = mine[start : start + batch_size]
        out = per_sample(model, [t[idx].to(device) for t in data])
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + value.detach().double().sum().cpu()
    keys = sorted(sums) if sums else sorted(per_sample(model, [t[:1].to(device) for t in data]))
    totals = ctx.sum(torch.stack([torch.as_tensor(sums.get(k, 0.0), dtype=torch.float64) for k in keys]))
    model.train(was_training)
    return {k: float(v) / n for k, v in zip(keys, totals)}


def _batches(n: int, batch_size: int, world_size: int, generator: torch.Generator) -> list[Tensor]:
    """A shuffled epoch of global batches; a final batch too small to give each process a sample is dropped."""
    perm = torch.randperm(n, generator=generator)
    return [perm[i : i + batch_size] for i in range(0, n, batch_size) if len(perm[i : i + batch_size]) >= world_size]


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_data: Sequence[Tensor],
    test_data: Sequence[Tensor],
    per_sample: PerSampleFn,
    cfg: TrainConfig,
    *,
    device: torch.device,
    ctx: DistContext = DistContext(),
    snapshot: Callable[[nn.Module], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` for ``cfg.epochs`` epochs and return the per-epoch metrics.

    Row 0 holds the test metrics before training. Each epoch ends with an atomic checkpoint (model,
    optimizer, RNG states, metrics) and rewritten metrics files; with ``cfg.resume`` a run continues
    from its checkpoint and produces exactly what an uninterrupted run would. ``snapshot(model)``
    may add JSON-serialisable values (e.g. learned constraints) to each row.
    """
    out = Path(cfg.out)
    ckpt_path = out / CHECKPOINT_FILE
    shuffle = torch.Generator().manual_seed(cfg.seed)
    n_train = len(train_data[0])
    fingerprint = _fingerprint(cfg, n_train)
    history: list[dict[str, Any]] = []
    start_epoch = 1
    if ckpt_path.exists():
        if not cfg.resume:
            raise UsageError(f"{ckpt_path} exists; pass --resume to continue it, or choose another --out")
        state = load_checkpoint(ckpt_path)
        _check_fingerprint(ckpt_path, state["fingerprint"], fingerprint)
        if state["epoch"] > cfg.epochs:  # nothing would train, and the results would be labelled with --epochs
            raise UsageError(f"{ckpt_path} holds {state['epoch']} trained epochs, more than --epochs {cfg.epochs}; "
                             f"resume with --epochs {state['epoch']} or more, or choose another --out")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"], shuffle, device)
        history = list(state["history"])
        start_epoch = state["epoch"] + 1

    train_model: nn.Module = model
    if ctx.active:
        ddp_ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ddp_ids)

    def record(row: dict[str, Any]) -> None:
        if snapshot is not None:
            row.update(snapshot(model))
        history.append(row)
        if ctx.is_main:
            save_checkpoint(ckpt_path, {
                "format": CHECKPOINT_FORMAT, "fingerprint": fingerprint, "epoch": row["epoch"],
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": _rng_state(shuffle, device), "history": history,
            })
            write_json(out / METRICS_JSON, history)
            write_csv(out / METRICS_CSV, history)
        ctx.barrier()

    if not history:
        test = evaluate(model, test_data, per_sample, device, ctx, cfg.eval_batch_size)
        record({"epoch": 0, **{f"test_{k}": v for k, v in test.items()}})
    from tqdm.auto import tqdm

    explained: set[str] = set()  # the inexact derivatives' explanations said in this run
    for epoch in range(start_epoch, cfg.epochs + 1):
        began = time.perf_counter()
        model.train()
        sums: dict[str, Tensor] = {}
        count = torch.zeros((), dtype=torch.float64)
        batches = _batches(n_train, cfg.batch_size, ctx.world_size, shuffle)
        bar = tqdm(batches, desc=f"{cfg.name} epoch {epoch}/{cfg.epochs}", leave=False, disable=not (cfg.progress and ctx.is_main))
        with counted_inexact_derivatives(f"{cfg.name} epoch {epoch}", len(batches), ctx.is_main, explained):
            for idx in bar:
                mine = idx[ctx.rank :: ctx.world_size]
                out_b = per_sample(train_model, [t[mine].to(device) for t in train_data])
                loss = out_b["loss"].sum() * (ctx.world_size / len(idx))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for key, value in out_b.items():
                    sums[key] = sums.get(key, 0.0) + value.detach().double().sum().cpu()
                count += len(mine)
                bar.set_postfix(loss=f"{float(out_b['loss'].detach().mean()):.4g}")
        keys = sorted(sums)
        totals = ctx.sum(torch.stack([*(torch.as_tensor(sums[k]) for k in keys), count]))
        train = {f"train_{k}": float(v / totals[-1]) for k, v in zip(keys, totals[:-1])}
        test = evaluate(model, test_data, per_sample, device, ctx, cfg.eval_batch_size)
        record({"epoch": epoch, **train, **{f"test_{k}": v for k, v in test.items()}, "seconds": time.perf_counter() - began})
    return history


class counted_inexact_derivatives:
    """A context in which the layers' ``InexactDerivativeWarning``s (one per batch whose derivative is
    inexact somewhere; docs/qp.md) are counted rather than shown, and said in one line on stderr
    at its end (``speak``: this process reports): how many of the ``batches`` had them, and the
    first's message. ``explained``: the explanations (a message's text after its first sentence)
    already said in this run, shared by its epochs' contexts: a message whose explanation is among
    them is said by its first sentence only (which names the elements and the measured ratio).
    Other warnings are shown as they come."""

    def __init__(self, what: str, batches: int, speak: bool = True, explained: set[str] | None = None) -> None:
        self.what, self.batches, self.speak = what, batches, speak
        self.count, self.first = 0, None
        self.explained = set() if explained is None else explained

    def __enter__(self) -> counted_inexact_derivatives:
        self._shown = warnings.showwarning
        self._filters = warnings.catch_warnings()
        self._filters.__enter__()
        warnings.simplefilter("always", InexactDerivativeWarning)

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
            if issubclass(category, InexactDerivativeWarning):
                self.count += 1
                self.first = self.first or str(message)
            else:
                self._shown(message, category, filename, lineno, file, line)
        warnings.showwarning = show
        return self

    def __exit__(self, *exc: object) -> None:
        self._filters.__exit__(*exc)  # restores the filters and showwarning
        if self.count and self.speak:
            sentence, _, explanation = self.first.partition(". ")
            said = explanation in self.explained
            self.explained.add(explanation)
            first = f"{sentence}; explained above" if said and explanation else self.first
            print(f"{self.what}: the derivative was inexact in {self.count} of {self.batches} training batches "
                  f"(optlayers.InexactDerivativeWarning; the first: {first})", file=sys.stderr)


def mask_unsolved(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of ``pred`` holding NaN (QPs a layer with ``on_failure="ignore"`` did not solve) replaced by ``target``.

    Those rows then add neither loss nor gradient. Returns ``(pred, unsolved)`` with ``unsolved`` a
    ``(B,)`` 0/1 tensor, to be reported as a metric so that failures stay visible.
    """
    solved = torch.isfinite(pred).flatten(1).all(1)
    mask = solved.view(-1, *([1] * (pred.dim() - 1)))
    return torch.where(mask, pred, target.detach()), (~solved).to(pred.dtype)


# --------------------------------------------------------------------------- reporting
def plot_curves(
    histories: Mapping[str, Sequence[Mapping[str, Any]]],
    panels: Sequence[tuple[str, str]],
    path: Path,
    *,
    logy: bool = False,
    hlines: Mapping[str, float] | None = None,
) -> None:
    """One panel per ``(metric, ylabel)``; in each, the train (dashed) and test (solid) curve of every model.

    ``hlines`` draws constant references (e.g. a non-learned baseline) in every panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (metric, ylabel) in zip(axes[0], panels):
        for i, (name, rows) in enumerate(histories.items()):
            color = f"C{i}"
            for split, style in (("train", "--"), ("test", "-")):
                pts = [(r["epoch"], r[f"{split}_{metric}"]) for r in rows if f"{split}_{metric}" in r]
                if pts:
                    ax.plot(*zip(*pts), style, color=color, label=f"{name} {split}")
        for j, (label, value) in enumerate((hlines or {}).items()):
            ax.axhline(value, color=f"C{len(histories) + j}", linestyle=":", label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        if logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def final(history: Sequence[Mapping[str, Any]], key: str) -> float:
    """``key`` in the last row that has it."""
    return next(r[key] for r in reversed(history) if key in r)
