"""Peer benchmark of the batched QP layer: one run, the same problems, every installed solver.

    PYTHONPATH=src python -m benchmarks.qp_benchmark [--quick | --sweep] [--device cpu|cuda] [--dtype float64|float32|both]
                                                     [--threads N] [--solvers a,b] [--figures f,g] [--shapes BxN,...]
                                                     [--isolate [--rounds R] | --prepare] [--out DIR]

Settings follow the OptNet paper: Figure 1 (batch 128, n ∈ {10, 50, 100, 500}, QP layer vs a linear layer),
Figure 2 (n = 100, batch ∈ {1, 64, 128}, QP layer batched and serialized — one problem at a time — vs Gurobi,
CPLEX and OSQP), a set with equalities and, on a GPU, the target row (batch 128, n = 100 in float32 and
float64, our eager and compiled paths against the peers and a linear layer) and batches up to 2048. Writes a table to stdout, ``results.json``, ``table.md`` and PNG figures under ``--out``.

``--isolate`` measures each solver in a Python process of its own, one solver after another; with
``--rounds R`` the processes stay warm and take turns (``benchmarks/interleaved.py``): R rounds per
setting, each round every solver a few calls (``ROUND_BUDGET``), so that the machine's drift
over the run falls on every solver alike rather than between them. ``--malloc steady`` starts those
processes with glibc's allocator thresholds fixed (``machine.STEADY_MALLOC``): a process whose heap
is trimmed after each call's large tensors and grown again in the next took 1.2 times as long at
batch 128, n = 100 (BENCHMARKS.md, "The allocator's state"); the default keeps glibc's own, which
users run with. Every row records its process's page faults per call.

``--prepare`` checks and warms each solver with one untimed call per setting and times nothing: run
beside other work (one process per ``--shapes``), it compiles our compiled path into inductor's
on-disk caches, so that a timed run started afterwards does not spend its time limit compiling.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from benchmarks import interleaved, machine
from benchmarks.accuracy import Accuracy, gradient_error, kkt_accuracy, reference_gradients, reference_solutions
from benchmarks.plots import save_figures
from benchmarks.problems import QPBatch, random_qp
from benchmarks.solvers import SOLVER_NAMES, Solver, available_solvers
from benchmarks.timing import Budget, Clock, Stats, forward_backward_phases, forward_phase, repeat

DTYPES = {"float64": torch.float64, "float32": torch.float32}
ACCURACY_SAMPLE = 32
"""Accuracy is checked on the first 32 elements of each batch (solved with the whole batch, as timed):
the reference solver is sequential."""
FULL_BUDGET = Budget(warmup=1, min_repeats=3, max_repeats=10, seconds=3.0)
QUICK_BUDGET = Budget(warmup=1, min_repeats=2, max_repeats=3, seconds=0.5)
ROUND_BUDGET = Budget(warmup=0, min_repeats=1, max_repeats=5, seconds=0.3)
"""One solver's turn in a round of ``--rounds``: its calls are warm (the first round is preceded by one untimed call)."""
SEED = 0
GRADIENT_SEED = 1
"""Seed of the weights w of the accuracy check's loss ⟨w, z⟩."""
PEER_PACKAGES = ("torch", "numpy", "qpth", "proxsuite", "qpax", "jax", "cvxpylayers", "cvxpy", "diffcp", "scs", "gurobipy", "cplex",
                 "osqp", "clarabel")


@dataclass(frozen=True)
class Setting:
    """One batch of problems, solved by ``solvers`` (None: every available one) in ``dtype``."""

    figure: str
    batch: int
    n: int
    n_ineq: int
    n_eq: int
    dtype: str
    solvers: tuple[str, ...] | None = None


COMPILED_SOLVER = "optlayers-compiled"
"""Compiled per problem shape (tens of seconds each): run only where a setting lists it (the sweep)."""
SERIAL_SOLVER = "optlayers-serial"
"""Our solver called once per batch element: the paper's "serialized" line, drawn in Figure 2 only."""
FIGURE1_SOLVERS = ("optlayers", "linear", "qpth", "qplayer", "qpax", "qpax-1e-8")
GPU_SOLVERS = ("optlayers", "linear", "qpth", "qpax", "qpax-1e-8")
TARGET_SOLVERS = ("optlayers", "optlayers-compiled", "linear", "qpth", "qpax", "qpax-1e-8")
"""The target row's solvers: the GPU goal is a forward + backward at batch 128, n = 100 within a few
linear layers' time (ISSUE: ≤ 3 ms in float32, ≤ 5 ms in float64)."""


def full_settings(dtypes: list[str], large_batches: bool) -> list[Setting]:
    """The default run: Figures 1 and 2, equalities, and (on a GPU, or on the CPU with ``--no-caps``)
    the growth with the batch up to 2048, after the target row (batch 128, n = 100, compiled path included)."""
    settings = [Setting("target", 128, 100, 100, 0, dtype, TARGET_SOLVERS) for dtype in dtypes] if large_batches else []
    settings += [Setting("fig1", 128, n, n, 0, dtype, FIGURE1_SOLVERS) for dtype in dtypes for n in (10, 50, 100, 500)]
    settings += [Setting("fig2", batch, 100, 100, 0, "float64") for batch in (1, 64, 128) if "float64" in dtypes]
    settings += [Setting("equality", 128, 100, 100, 50, "float64")] if "float64" in dtypes else []
    if large_batches:
        settings += [Setting("batch", batch, 100, 100, 0, dtype, GPU_SOLVERS) for dtype in dtypes for batch in (512, 1024, 2048)]
    return settings


FIGURES = ("target", "fig1", "fig2", "equality", "batch", "sweep")
"""The figures a setting belongs to (``Setting.figure``); ``--figures`` selects among them."""
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
"""XLA's flags for one thread, set for qpax's workers under ``--threads 1`` (XLA's CPU backend otherwise
runs its operations on every core, where the other solvers are held to one)."""
SWEEP_SOLVERS = ("optlayers", "optlayers-compiled", "qplayer", "qplayer-parallel", "qpth", "qpax", "qpax-1e-8")
SWEEP_SHAPES = ((128, 10), (128, 50), (128, 100), (64, 100), (1, 100), (1, 10))
"""(batch, n) of the small-to-large sweep: float64, n inequalities, no equalities, fwd + bwd w.r.t. every input."""


def sweep_settings() -> list[Setting]:
    """Our solver (eager and compiled) against the differentiable peers from batch 1, n = 10 to batch 128, n = 100."""
    return [Setting("sweep", batch, n, n, 0, "float64", SWEEP_SOLVERS) for batch, n in SWEEP_SHAPES]


def quick_settings(dtypes: list[str], cuda: bool) -> list[Setting]:
    """A seconds-long run on tiny problems, for smoke tests."""
    settings = [Setting("fig1", 8, n, n, 0, dtype) for dtype in dtypes for n in (5, 10)]
    settings += [Setting("fig2", batch, 10, 10, 0, dtypes[0]) for batch in (1, 8)]
    settings += [Setting("equality", 8, 10, 10, 3, dtypes[0])]
    if cuda:
        settings += [Setting("batch", 64, 10, 10, 0, dtypes[0], GPU_SOLVERS)]
    return settings


def runs_in(solver: Solver, setting: Setting) -> bool:
    """Whether ``setting`` lists ``solver``; the float64-only solvers (looping over the batch in numpy) skip float32."""
    return listed_in(solver.name, solver.differentiable, setting)


def listed_in(name: str, differentiable: bool, setting: Setting) -> bool:
    """``runs_in`` for the solver of this name (differentiable or not)."""
    listed = name in setting.solvers if setting.solvers is not None else name != COMPILED_SOLVER
    serial_elsewhere = name == SERIAL_SOLVER and setting.figure != "fig2"
    return listed and not serial_elsewhere and (differentiable or setting.dtype == "float64")


class ProblemCache:
    """Problems and their reference solutions, generated once per shape and shared by every solver and dtype."""

    def __init__(self) -> None:
        self._problems: dict[tuple, tuple[QPBatch, object]] = {}

    def get(self, setting: Setting):
        key = (setting.batch, setting.n, setting.n_ineq, setting.n_eq)
        if key not in self._problems:
            qp = random_qp(*key, seed=SEED)
            self._problems[key] = (qp, reference_solutions(qp.subset(ACCURACY_SAMPLE)))
        return self._problems[key]


def _leaves(qp: QPBatch) -> QPBatch:
    return qp.map(lambda t: t.clone().requires_grad_())


def measure(solver: Solver, qp: QPBatch, budget: Budget, clock: Clock) -> dict[str, list[float]]:
    """Forward (and for layers backward and their sum; for a solver differentiated outside torch,
    ``value_and_grad``, only the sum) wall seconds of each call, and the process's
    CPU seconds over the forward (``forward_cpu``, solvers without gradients) or over forward and
    backward together (``total_cpu``): more than the wall time where the solver's other threads
    work or spin beside the caller's. ``page_faults``: one value, the process's minor page faults per
    call over these calls (warm-up included), where glibc's allocator trims and grows its heap
    between calls (``machine.STEADY_MALLOC``)."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    samples = _measured(solver, qp, budget, clock)
    separate = "total" in samples and "backward" not in samples  # value_and_grad: two repeats, forward and total
    calls = budget.warmup + len(samples["forward"]) + (budget.warmup + len(samples["total"]) if separate else 0)
    samples["page_faults"] = [(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / max(calls, 1)]
    return samples


def _measured(solver: Solver, qp: QPBatch, budget: Budget, clock: Clock) -> dict[str, list[float]]:
    """``measure``'s timings."""
    if not solver.differentiable:
        forward, forward_cpu = repeat(forward_phase(lambda: solver.solve(qp)), clock, budget)
        return {"forward": forward, "forward_cpu": forward_cpu}
    weights = torch.randn(qp.batch, qp.n, dtype=qp.p.dtype, device=qp.p.device)
    if solver.value_and_grad is not None:
        # outside torch's autograd: the forward and the gradient are one compiled call, whose forward is
        # not the forward timed alone (another compilation), so no backward is reported
        forward, _ = repeat(forward_phase(lambda: solver.solve(qp)), clock, budget)
        total, total_cpu = repeat(forward_phase(lambda: solver.value_and_grad(qp, weights)), clock, budget)
        return {"forward": forward, "total": total, "total_cpu": total_cpu}
    leaves = _leaves(qp)
    inputs = [t for t in leaves.tensors() if t is not None]
    forward, backward, total_cpu = repeat(forward_backward_phases(lambda: solver.solve(leaves), inputs, weights), clock, budget)
    total = [f + b for f, b in zip(forward, backward)]
    return {"forward": forward, "backward": backward, "total": total, "total_cpu": total_cpu}


def _stats(samples: dict[str, list[float]]) -> dict[str, dict]:
    return {phase: asdict(Stats.of(times)) for phase, times in samples.items()}


def check(solver: Solver, qp: QPBatch, reference) -> Accuracy | None:
    """Accuracy of the solver's answer to the whole batch, solved as the timed calls solve it (with
    gradients where they are taken), on its first ``ACCURACY_SAMPLE`` elements (those the reference
    solved), and how many elements of the whole batch came back non-finite (``failed``); None for the
    linear baseline, which solves nothing. For a differentiable solver also the error of its
    gradients of ⟨w, z⟩ w.r.t. p and h (w seeded) on those elements against the reference's own
    derivative (``accuracy.reference_gradients``). The whole batch, not the sample alone: a batch
    may be solved along another path than its first elements alone (in slices, chunks, another
    compiled specialisation)."""
    if solver.name == "linear":
        return None
    weights = torch.randn(qp.batch, qp.n, generator=torch.Generator().manual_seed(GRADIENT_SEED),
                          dtype=torch.float64).to(qp.p.dtype).to(qp.p.device)
    if solver.differentiable:
        z, grads = solver_gradients(solver, qp, weights)
    else:
        with torch.no_grad():
            z = solver.solve(qp).double().cpu().numpy()
    sample64 = qp.subset(ACCURACY_SAMPLE).to(torch.float64, "cpu")
    accuracy = kkt_accuracy(sample64, z[:ACCURACY_SAMPLE], reference)
    accuracy = replace(accuracy, failed=int((~np.isfinite(z).all(axis=1)).sum()))
    if not solver.differentiable:
        return accuracy
    error, count = gradient_error(tuple(g[:ACCURACY_SAMPLE] for g in grads),
                                  reference_gradients(sample64, reference, weights[:ACCURACY_SAMPLE].double().cpu().numpy()))
    return replace(accuracy, gradient=error, gradient_checked=count)


def solver_gradients(solver: Solver, qp: QPBatch, weights: torch.Tensor) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The solver's z and its gradients of ⟨weights, z⟩ w.r.t. p and h, as float64 arrays, computed
    as the timed calls compute them: a torch layer's forward with every input requiring gradients
    and its backward; a JAX solver's forward and its ``value_and_grad``."""
    if solver.value_and_grad is not None:  # JAX: z from the timed forward; gradients w.r.t. (Q, p, A, b, G, h)
        grads = solver.value_and_grad(qp, weights)[1]
        return (solver.solve(qp).double().cpu().numpy(),
                (np.asarray(grads[1], dtype=np.float64), np.asarray(grads[5], dtype=np.float64)))
    leaves = _leaves(qp)
    z = solver.solve(leaves)
    grad_p, grad_h = torch.autograd.grad((z * weights).sum(), (leaves.p, leaves.h), allow_unused=True)
    return z.detach().double().cpu().numpy(), tuple(np.full(t.shape, np.nan) if g is None else g.double().cpu().numpy()
                                                    for g, t in ((grad_p, leaves.p), (grad_h, leaves.h)))


def _error_note(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:300]


def run_one(solver: Solver, setting: Setting, problems: ProblemCache, device: torch.device, budget: Budget | None,
            capped: bool) -> dict:
    """One row of the results: timings and accuracy, or the reason there are none (the same problems appear
    in several figures; ``main`` measures each solver once per problem set and reuses the row). With
    ``budget`` None the row has no timings: the solver is checked and warmed by one untimed call, for
    ``--rounds`` to time it."""
    row = {**asdict(setting), "solver": solver.name, "device": str(device), "differentiable": solver.differentiable,
           "settings": solver.settings}
    del row["solvers"]
    qp64, reference = problems.get(setting)
    reason = solver.cap(qp64) if capped else None
    if reason:
        return {**row, "status": "skipped", "note": reason}
    qp = qp64.to(DTYPES[setting.dtype], device)
    try:
        accuracy = check(solver, qp, reference)
        warm = Budget(warmup=0, min_repeats=1, max_repeats=1, seconds=0.0)  # one call, its time unused
        samples = measure(solver, qp, warm if budget is None else budget, Clock(device))
    except Exception as error:  # a peer that fails is reported in its row, and the run goes on
        return {**row, "status": "error", "note": _error_note(error)}
    timings = {} if budget is None else {"timings": _stats(samples)}
    return {**row, "status": "ok", "note": "", **timings, "accuracy": None if accuracy is None else accuracy.as_dict()}


def _git_commit() -> str | None:
    try:
        # "-dirty" where the tree differs from the commit (a device machine's copy can carry an older commit's metadata)
        return subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7", "--exclude=*"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def metadata(args: argparse.Namespace, argv: list[str], missing: list[str]) -> dict:
    """Everything needed to reproduce or judge the numbers."""
    device = torch.device(args.device)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "PYTHONPATH=src python -m benchmarks.qp_benchmark " + " ".join(argv),
        "commit": _git_commit(),
        "cpu": machine.cpu_model(),
        "preload": machine.preloaded(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
        "xla_flags": os.environ.get("XLA_FLAGS"),
        "glibc_tunables": machine.malloc_tunables(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in PEER_PACKAGES},
        "missing": missing,
        "accuracy_sample": ACCURACY_SAMPLE,
        "budget": asdict(ROUND_BUDGET if args.rounds else QUICK_BUDGET if args.quick else FULL_BUDGET),
        "rounds": args.rounds,
        "prepare": args.prepare,
    }


def _seconds(row: dict, phase: str) -> str:
    stats = row.get("timings", {}).get(phase)
    if stats is None:
        return "—"
    return f"{stats['median']:.4g} [{stats['q25']:.3g}, {stats['q75']:.3g}]"


def _cpu_seconds(row: dict) -> str:
    timings = row.get("timings") or {}
    stats = timings.get("total_cpu") or timings.get("forward_cpu")
    return "—" if stats is None else f"{stats['median']:.4g}"


def _accuracy(row: dict, key: str) -> str:
    value = (row.get("accuracy") or {}).get(key)
    return "—" if value is None else f"{value:.1e}"


def _note(row: dict) -> str:
    failed = (row.get("accuracy") or {}).get("failed", 0)
    unsolved = f"{failed}/{row['batch']} elements unsolved (NaN)" if failed else ""
    return "; ".join(part for part in (row["note"], unsolved) if part)


TABLE_HEADER = ("figure", "n", "m", "p", "batch", "dtype", "solver", "forward s [IQR]", "backward s [IQR]",
                "fwd+bwd s [IQR]", "CPU s", "reps", "max KKT", "‖z−z*‖∞", "‖∇−∇*‖∞", "note")
"""``CPU s``: the median of the process's CPU seconds per call (forward + backward for layers)."""


def table_rows(rows: list[dict]) -> list[tuple[str, ...]]:
    """One line of strings per result row."""
    lines = []
    for row in rows:
        reps = row.get("timings", {}).get("forward", {}).get("repeats", "—")
        lines.append((row["figure"], str(row["n"]), str(row["n_ineq"]), str(row["n_eq"]), str(row["batch"]),
                      row["dtype"], row["solver"], _seconds(row, "forward"), _seconds(row, "backward"),
                      _seconds(row, "total"), _cpu_seconds(row), str(reps), _accuracy(row, "kkt"), _accuracy(row, "distance"),
                      _accuracy(row, "gradient"), _note(row)))
    return lines


def text_table(rows: list[dict]) -> str:
    """Fixed-width table for the terminal."""
    lines = [TABLE_HEADER, *table_rows(rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(TABLE_HEADER) - 1)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1] for line in lines)


def markdown_table(rows: list[dict]) -> str:
    """The same table in Markdown, for BENCHMARKS.md."""
    lines = [TABLE_HEADER, tuple("---" for _ in TABLE_HEADER), *table_rows(rows)]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny problems and few repetitions (smoke test)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="both", choices=[*DTYPES, "both"])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and solver threads (default: all cores)")
    parser.add_argument("--no-caps", action="store_true", help="run every solver at every size (can take hours)")
    parser.add_argument("--sweep", action="store_true", help="only the small-to-large sweep (SWEEP_SHAPES) against the "
                        "differentiable peers, our compiled path included")
    parser.add_argument("--solvers", default=None, help="comma-separated subset, e.g. optlayers,linear (default: all)")
    parser.add_argument("--isolate", action="store_true", help="each solver in a Python process of its own, one after "
                        "another (no solver beside another's threads, compiled code or heap)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="with --isolate: keep every solver's process warm and time them in turn, R rounds per "
                        "setting in an order that changes from round to round (benchmarks/interleaved.py)")
    parser.add_argument("--malloc", choices=("default", "steady"), default="default",
                        help="with --isolate: glibc's allocator thresholds in the solvers' processes, glibc's own "
                        "(default) or fixed (steady: no heap trimmed and grown again between calls)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # a --rounds worker (one solver)
    parser.add_argument("--figures", default=None,
                        help=f"comma-separated subset of the settings' figures, of {', '.join(FIGURES)} (default: all)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated BATCHxN, e.g. 128x100,1x10: only the settings of these shapes (default: all)")
    parser.add_argument("--prepare", action="store_true",
                        help="check and warm each solver once per setting (compiling it), time nothing")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmark"), help="output folder (default: runs/benchmark)")
    args = parser.parse_args(argv)
    if args.solvers is not None:
        unknown = sorted(set(args.solvers.split(",")) - set(SOLVER_NAMES))
        if unknown:
            parser.error(f"--solvers: unknown {unknown}; choose from {', '.join(SOLVER_NAMES)}")
    if args.rounds is not None and (args.rounds < 1 or not args.isolate):
        parser.error(f"--rounds: needs --isolate and a count of at least 1, got {args.rounds}"
                     + ("" if args.isolate else " without --isolate"))
    if args.serve and (args.solvers is None or "," in args.solvers):
        parser.error("--serve: a worker serves exactly one solver (--solvers NAME)")
    if args.figures is not None:
        args.figures = args.figures.split(",")
        unknown = sorted(set(args.figures) - set(FIGURES))
        if unknown:
            parser.error(f"--figures: unknown {unknown}; choose from {', '.join(FIGURES)}")
    if args.shapes is not None:
        try:
            args.shapes = [tuple(int(part) for part in shape.split("x")) for shape in args.shapes.split(",")]
        except ValueError:
            args.shapes = None
        if args.shapes is None or any(len(shape) != 2 or min(shape) < 1 for shape in args.shapes):
            parser.error("--shapes: expected comma-separated BATCHxN with positive integers, e.g. 128x100,1x10")
    if args.malloc == "steady" and not args.isolate:
        parser.error("--malloc steady: sets the allocator of the solvers' own processes; needs --isolate")
    if args.prepare and args.isolate:
        parser.error("--prepare: warms the solvers in this process; not with --isolate")
    return args


def measured_rows(args: argparse.Namespace, settings: list[Setting], solvers: list[Solver], device: torch.device) -> list[dict]:
    """Every solver in every setting it runs in, in this process."""
    problems, rows, measured = ProblemCache(), [], {}
    budget = None if args.prepare else QUICK_BUDGET if args.quick else FULL_BUDGET
    capped = not (args.quick or args.no_caps)
    for setting in settings:
        for solver in solvers:
            if not runs_in(solver, setting):
                continue
            key = (solver.name, setting.batch, setting.n, setting.n_ineq, setting.n_eq, setting.dtype)
            if key not in measured:
                measured[key] = run_one(solver, setting, problems, device, budget, capped)
            rows.append({**measured[key], "figure": setting.figure})
            print(text_table(rows[-1:]).splitlines()[1], flush=True)
    return rows


def _child_flags(args: argparse.Namespace) -> list[str]:
    """The flags a child process of ``--isolate`` is started with (its solver and output added by the caller)."""
    flags = ["--device", args.device, "--dtype", args.dtype, "--threads", str(args.threads)]
    flags += ["--quick"] * args.quick + ["--sweep"] * args.sweep + ["--no-caps"] * args.no_caps
    flags += ["--shapes", ",".join(f"{batch}x{n}" for batch, n in args.shapes)] if args.shapes else []
    return flags + (["--figures", ",".join(args.figures)] if args.figures else [])


def _in_order(rows: list[dict], settings: list[Setting], names: list[str]) -> list[dict]:
    """``rows`` in the order of a run in one process: by setting, then by solver."""
    place = {(s.figure, s.batch, s.n, s.n_ineq, s.n_eq, s.dtype): i for i, s in enumerate(settings)}
    rank = {name: i for i, name in enumerate(names)}
    return sorted(rows, key=lambda r: (place[r["figure"], r["batch"], r["n"], r["n_ineq"], r["n_eq"], r["dtype"]],
                                       rank[r["solver"]]))


class _Server:
    """A ``--serve`` worker's answers (``benchmarks/interleaved.py``): its one solver, checked and
    warmed per setting ("prepare"), then timed for one round at a time ("round")."""

    def __init__(self, args: argparse.Namespace) -> None:
        solvers, self.missing = available_solvers(args.solvers.split(","), args.threads)
        self.solver = solvers[0] if solvers else None
        self.device = torch.device(args.device)
        self.capped = not (args.quick or args.no_caps)
        self.problems = ProblemCache()

    def __call__(self, request: dict) -> dict:
        if request["ask"] == "hello":
            return {"missing": self.missing, "differentiable": None if self.solver is None else self.solver.differentiable}
        setting = Setting(**{**request["setting"], "solvers": tuple(request["setting"]["solvers"] or ()) or None})
        if request["ask"] == "prepare":
            return run_one(self.solver, setting, self.problems, self.device, None, self.capped)
        qp = self.problems.get(setting)[0].to(DTYPES[setting.dtype], self.device)
        try:
            return {"samples": measure(self.solver, qp, ROUND_BUDGET, Clock(self.device))}
        except Exception as error:  # reported in the solver's row; the run goes on
            return {"error": _error_note(error)}


def interleaved_rows(args: argparse.Namespace, settings: list[Setting]) -> tuple[list[dict], list[str]]:
    """``--isolate --rounds R``: one warm worker process per solver (this module with ``--serve``);
    per setting, each solver checked and warmed, then timed in R rounds whose order changes
    (``interleaved.round_orders``). Returns the rows in the order of a run in one process (their
    ``repeats``: all the round's calls together), and the lines of the solvers that did not import."""
    names = args.solvers.split(",") if args.solvers else list(SOLVER_NAMES)
    workers, missing, kinds = {}, [], {}
    for name in names:
        worker = interleaved.Worker(name, ["-m", "benchmarks.qp_benchmark", *_child_flags(args), "--solvers", name,
                                           "--serve"])
        hello = worker.ask({"ask": "hello"})
        missing += hello["missing"]
        if hello["differentiable"] is None:
            worker.close()
            continue
        workers[name] = worker
        kinds[name] = hello["differentiable"]
    rows, measured = [], {}
    try:
        for setting in settings:
            key = (setting.batch, setting.n, setting.n_ineq, setting.n_eq, setting.dtype)
            here = [name for name in workers if listed_in(name, kinds[name], setting)]
            for name in here:
                if (name, key) not in measured:
                    measured[name, key] = workers[name].ask({"ask": "prepare", "setting": asdict(setting)})
            timed = [name for name in here if measured[name, key]["status"] == "ok" and "timings" not in measured[name, key]]
            samples: dict[str, dict[str, list[float]]] = {name: {} for name in timed}
            for _, order in interleaved.round_orders(timed, args.rounds):
                for name in order:
                    if measured[name, key]["status"] != "ok":
                        continue
                    answer = workers[name].ask({"ask": "round", "setting": asdict(setting)})
                    if "error" in answer:
                        measured[name, key] = {**measured[name, key], "status": "error", "note": answer["error"]}
                        continue
                    for phase, times in answer["samples"].items():
                        samples[name].setdefault(phase, []).extend(times)
            for name in timed:
                if measured[name, key]["status"] == "ok":
                    measured[name, key] = {**measured[name, key], "timings": _stats(samples[name]), "rounds": args.rounds}
            for name in here:
                rows.append({**measured[name, key], "figure": setting.figure})
                print(text_table(rows[-1:]).splitlines()[1], flush=True)
    finally:
        for worker in workers.values():
            worker.close()
    return _in_order(rows, settings, names), missing


def isolated_rows(args: argparse.Namespace, settings: list[Setting]) -> tuple[list[dict], list[str]]:
    """``--isolate``: each solver measured by a Python process of its own (this module with
    ``--solvers NAME``), one after another, so that none runs beside another's threads (JAX's
    pool), compiled code or heap. Returns the rows in the order of a run in one process, and the
    lines of the solvers that did not import."""
    names = args.solvers.split(",") if args.solvers else list(SOLVER_NAMES)
    rows, missing = [], []
    for name in names:
        out = args.out / "isolated" / name
        subprocess.run([sys.executable, "-m", "benchmarks.qp_benchmark", *_child_flags(args), "--solvers", name,
                        "--out", str(out)], check=True)
        child = json.loads((out / "results.json").read_text())
        rows += child["results"]
        missing += child["meta"]["missing"]
    return _in_order(rows, settings, names), missing


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark; returns what it writes to ``results.json``."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    if args.threads != torch.get_num_threads():  # torch.set_num_threads also breaks batched LU with more than
        torch.set_num_threads(args.threads)  # one thread on MKL builds (pytorch/pytorch#142815): only when asked
    if args.threads == 1 and "XLA_FLAGS" not in os.environ:  # qpax's XLA takes every core unless told (before jax loads)
        os.environ["XLA_FLAGS"] = XLA_ONE_THREAD
    if args.serve:
        interleaved.serve(_Server(args))
        return {}
    dtypes = list(DTYPES) if args.dtype == "both" else [args.dtype]
    cuda = device.type == "cuda"
    if args.sweep:
        settings = sweep_settings()
    else:
        settings = quick_settings(dtypes, cuda) if args.quick else full_settings(dtypes, cuda or args.no_caps)
    if args.figures:
        settings = [s for s in settings if s.figure in args.figures]
    if args.shapes:
        settings = [s for s in settings if (s.batch, s.n) in args.shapes]
    if args.isolate:
        steady = machine.steady_malloc_children() if args.malloc == "steady" else contextlib.nullcontext()
        with steady:  # read by each solver's process at its start
            meta = metadata(args, argv, [])
            rows, meta["missing"] = (interleaved_rows if args.rounds else isolated_rows)(args, settings)
    else:
        solvers, missing = available_solvers(args.solvers.split(",") if args.solvers else None, args.threads)
        for line in missing:
            print(line, flush=True)
        meta = metadata(args, argv, missing)
        rows = measured_rows(args, settings, solvers, device)
    meta["load_average_at_end"] = os.getloadavg()
    results = {"meta": meta, "results": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text(markdown_table(rows) + "\n")
    if not args.prepare:  # rows without timings draw nothing
        save_figures(rows, args.out)
    print(text_table(rows))
    print(f"wrote {args.out / 'results.json'}, {args.out / 'table.md'} and figures to {args.out}")
    return results


if __name__ == "__main__":
    main()
