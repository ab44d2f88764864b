"""optlayers.solve_cone vs diffcp on the same batch of random cone programs (all five cone types).

Times the forward solve and the adjoint (VJP) of the same loss on the CPU, and the batched dense
derivative on CUDA when available. Prints a table, the ratios of the default (``solver="auto"``), of
``solver="ipm"`` and of ``solver="clarabel"`` to diffcp's dense mode with a Clarabel forward, and writes JSON.
With ``--compiled``, also ``solver="ipm"`` with ``compile=True`` (its compilation in an untimed first call).
The methods are timed in ``--repeats`` rounds, each method once a round (a forward, then the adjoint
of its solution), in the rounds' orders of ``interleaved.round_orders``: a drift of the shared
machine's speed falls on every method alike, not between them.

    PYTHONPATH=src python benchmarks/bench_cone.py --batch 128 --repeats 5 --out bench_cone.json
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the benchmarks package
from benchmarks import machine  # noqa: E402
from benchmarks.interleaved import round_orders  # noqa: E402
from benchmarks.qp_benchmark import _git_commit  # noqa: E402
from optlayers.cone import ConeSpec, refine, solve_cone  # noqa: E402
from optlayers.cone.derivative import Point  # noqa: E402
from optlayers.cone.testing import random_program  # noqa: E402

SPEC = ConeSpec(zero=14, nonneg=30, soc=[10, 10, 10], psd=[4], exp=4)  # m = 96
N = 48
WARM_PERTURBATION = 1e-3  # warm-start rows: the previous call saw data perturbed by this relative amount


def timed(fn, repeats: int) -> tuple[tuple[float, float], object]:
    """(wall, CPU) seconds over ``repeats`` runs, and the last result (see ``_summary``)."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        (wall, cpu), out = _once(fn)
        walls.append(wall)
        cpus.append(cpu)
    return _summary(walls, cpus), out


def _once(fn) -> tuple[tuple[float, float], object]:
    start, start_cpu = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - start, time.process_time() - start_cpu), out


def _summary(walls: list[float], cpus: list[float]) -> tuple[float, float]:
    """The machine is shared, so the wall time is the minimum (least noisy); the CPU time (all
    threads, ``time.process_time``) is the median and does not depend on the load."""
    return min(walls), sorted(cpus)[len(cpus) // 2]


@dataclasses.dataclass
class Method:
    """A row of the table: ``forward()`` solves (returning what ``adjoint`` takes), ``adjoint(out)``
    differentiates the loss at that solution (returning what ``row`` takes), ``row(out, grads)``
    gives the row's "solved", "x" and "grad_c"."""

    forward: object
    adjoint: object
    row: object


def time_in_rounds(methods: dict[str, Method], rounds: int) -> dict[str, dict]:
    """Each method's row: its forward and adjoint timed once a round for ``rounds`` rounds, the
    methods in the orders of ``round_orders`` (wall: the minimum, CPU: the median), with its
    ``row`` of the last round."""
    times = {name: ([], [], [], []) for name in methods}
    last = {}
    for _, order in round_orders(list(methods), rounds):
        for name in order:
            method, (fw, fc, aw, ac) = methods[name], times[name]
            (wall, cpu), out = _once(method.forward)
            fw.append(wall)
            fc.append(cpu)
            (wall, cpu), grads = _once(lambda: method.adjoint(out))
            aw.append(wall)
            ac.append(cpu)
            last[name] = (out, grads)
    rows = {}
    for name, (fw, fc, aw, ac) in times.items():
        (forward_s, forward_cpu_s), (adjoint_s, adjoint_cpu_s) = _summary(fw, fc), _summary(aw, ac)
        rows[name] = {"forward_s": forward_s, "adjoint_s": adjoint_s, "forward_cpu_s": forward_cpu_s,
                      "adjoint_cpu_s": adjoint_cpu_s, **methods[name].row(*last[name])}
    return rows


def optlayers_method(data, solver: str, mode: str, device: str = "cpu", warm: bool = False,
                     compile: bool = False) -> Method:
    """``compile``: ``solve_cone(compile=True)``, compiled here in an untimed first call."""
    A, b, c, v = (t.to(device) for t in data)
    previous = solve_cone(*perturbed(A, b, c), SPEC, solver=solver) if warm else None

    def forward():
        A_ = A.detach().requires_grad_()
        b_, c_ = b.detach().requires_grad_(), c.detach().requires_grad_()
        return A_, b_, c_, solve_cone(A_, b_, c_, SPEC, solver=solver, mode=mode, warm_start=previous, compile=compile)

    def adjoint(out):
        (out[-1].x * v).sum().backward()
        return out[2].grad

    def row(out, grad_c):
        return {"solved": int((out[-1].status == 0).sum()), "grad_c": grad_c.detach().cpu().numpy(),
                "x": out[-1].x.detach().cpu().numpy()}

    if compile:
        adjoint(forward())  # the compilation, untimed
    return Method(forward, adjoint, row)


def ratios(row: dict, reference: dict) -> dict:
    """Forward + adjoint time of ``row`` over that of ``reference``, in wall and in CPU time."""
    return {"wall": (row["forward_s"] + row["adjoint_s"]) / (reference["forward_s"] + reference["adjoint_s"]),
            "cpu": (row["forward_cpu_s"] + row["adjoint_cpu_s"]) / (reference["forward_cpu_s"] + reference["adjoint_cpu_s"])}


def perturbed(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The data one training step earlier: a relative change of WARM_PERTURBATION."""
    gen = torch.Generator().manual_seed(2)
    return tuple(t * (1 + WARM_PERTURBATION * torch.randn(t.shape, generator=gen, dtype=t.dtype).to(t.device))
                 for t in (A, b, c))


def diffcp_method(data, mode: str, solve_method: str, eps: float | None = None, warm: bool = False) -> Method:
    import diffcp

    A, b, c, v = (t.numpy() for t in data)
    As = [sp.csc_matrix(a) for a in A]
    cone = SPEC.scs_cone()
    kwargs = {} if eps is None else {"eps": eps}
    if warm:
        Ap, bp, cp = (t.numpy() for t in perturbed(*(torch.as_tensor(t) for t in (A, b, c))))
        xs, ys, ss = diffcp.solve_and_derivative_batch([sp.csc_matrix(a) for a in Ap], list(bp), list(cp),
                                                       [cone] * len(As), mode=mode, solve_method=solve_method,
                                                       **kwargs)[:3]
        kwargs["warm_starts"] = list(zip(xs, ys, ss))
    zeros_m = [np.zeros(A.shape[1]) for _ in As]

    def forward():
        return diffcp.solve_and_derivative_batch(As, list(b), list(c), [cone] * len(As), mode=mode,
                                                 solve_method=solve_method, **kwargs)

    def adjoint(out):
        return out[4](list(v), zeros_m, zeros_m)[2]

    def row(out, dcs):
        xs, ys, ss = out[:3]
        return {"solved": kkt_solved(data[:3], xs, ys, ss), "grad_c": np.stack(dcs), "x": np.stack(xs)}

    return Method(forward, adjoint, row)


def kkt_solved(data, xs, ys, ss) -> int:
    """How many of diffcp's answers pass our SOLVED test: relative KKT residual (primal, dual, gap, as
    SCS measures them) at most ``refine.SOLVED_TOL``. diffcp returns no statuses (with a Clarabel
    forward it does not look at Clarabel's), so its "solved" is measured, not taken from it."""
    A, b, c = data
    as_tensor = lambda parts: torch.as_tensor(np.stack(parts), dtype=A.dtype)  # noqa: E731
    point = Point(SPEC, A, None, as_tensor(xs), as_tensor(ys), as_tensor(ss), torch.ones(len(xs), dtype=torch.bool))
    return int((refine.kkt_residual(point, b, c) <= refine.SOLVED_TOL).sum())


def batch_scaling(batches: list[int], repeats: int, device: str) -> list[dict]:
    """Forward time per problem of the batched interior point method and of Clarabel's per-problem
    threads, for several batch sizes (the batched solver pays a fixed cost per iteration)."""
    out = []
    print(f"\nforward only, per problem, on {device} (ipm) / CPU threads (clarabel):")
    for batch in batches:
        A, b, c, _, _, _, _ = random_program(SPEC, N, batch=batch, seed=3)
        for solver in ("ipm", "clarabel"):
            here = device if solver == "ipm" else "cpu"
            data = tuple(t.to(here) for t in (A, b, c))
            (wall, _), sol = timed(lambda: solve_cone(*data, SPEC, solver=solver, on_failure="ignore"), repeats)
            solved = int((sol.status == 0).sum())
            print(f"  batch {batch:5d} {solver:9s} {wall:8.3f} s  {1e3 * wall / batch:7.2f} ms/problem  solved {solved}")
            out.append({"batch": batch, "solver": solver, "device": here, "forward_s": wall, "solved": solved})
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="rounds, each method timed once a round")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads (default: torch's, one per core; the batched interior point "
                             "method solves that many slices of the batch in parallel threads)")
    parser.add_argument("--out", default="bench_cone.json")
    parser.add_argument("--compiled", action="store_true",
                        help="add a row for solver='ipm' with compile=True (compiled in an untimed first call: "
                             "about a minute and a half with a cold inductor cache)")
    parser.add_argument("--scaling", type=lambda s: [int(v) for v in s.split(",") if v], default=[16, 128, 512],
                        help="batch sizes of the forward-only scaling table (comma separated; empty to skip)")
    parser.add_argument("--without-psd", action="store_true",
                        help="the programs without their PSD cone (m = 86): on CUDA the interior point step of such "
                             "programs is replayed from a CUDA graph (docs/cone.md)")
    return parser.parse_args(argv)


def metadata(args: argparse.Namespace) -> dict:
    """The run's settings and machine, written as the JSON's ``meta`` and printed."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": _git_commit(),
            "cpu": machine.cpu_model(), "preload": machine.preloaded(), "torch": torch.__version__, "threads": args.threads, "batch": args.batch,
            "m": SPEC.size, "n": N, "cones": str(SPEC), "repeats": args.repeats, "compiled_row": args.compiled}


def main(argv: list[str] | None = None) -> None:
    global SPEC
    args = parse_args(argv)
    if args.without_psd:
        SPEC = dataclasses.replace(SPEC, psd=[])
    if args.threads != torch.get_num_threads():  # torch.set_num_threads also breaks batched LU with more than
        torch.set_num_threads(args.threads)  # one thread on MKL builds (pytorch/pytorch#142815): only when asked
    device = "cuda" if torch.cuda.is_available() else "cpu"
    A, b, c, _, x_true, _, _ = random_program(SPEC, N, batch=args.batch, seed=0)
    v = torch.randn(args.batch, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    data = (A, b, c, v)
    methods = {f"optlayers {solver} dense": optlayers_method(data, solver, "dense") for solver in ("scs", "auto", "ipm", "clarabel")}
    if args.compiled:
        methods["optlayers ipm dense, compiled"] = optlayers_method(data, "ipm", "dense", compile=True)
    methods["optlayers scs dense, warm start"] = optlayers_method(data, "scs", "dense", warm=True)
    try:
        for mode in ("dense", "lsqr"):
            methods[f"diffcp SCS eps=1e-4 (default) {mode}"] = diffcp_method(data, mode, "SCS")
        methods["diffcp SCS eps=1e-8 dense"] = diffcp_method(data, "dense", "SCS", 1e-8)
        methods["diffcp Clarabel dense"] = diffcp_method(data, "dense", "Clarabel")
        methods["diffcp SCS eps=1e-4 dense, warm start"] = diffcp_method(data, "dense", "SCS", warm=True)
    except ImportError as err:
        print(f"diffcp skipped: {err}")
    if torch.cuda.is_available():
        methods["optlayers ipm dense (CUDA)"] = optlayers_method(data, "ipm", "dense", "cuda")
        methods["optlayers clarabel dense (CUDA derivative)"] = optlayers_method(data, "clarabel", "dense", "cuda")
    else:
        print("CUDA not available: the CUDA row is skipped")
    rows = time_in_rounds(methods, args.repeats)
    reference = rows["optlayers scs dense"]["grad_c"]
    print(f"{'method':45s} {'forward s':>10s} {'adjoint s':>10s} {'total s':>9s} {'total CPU s':>12s} {'solved':>7s} "
          f"{'max |x - x*|':>13s} {'max |dc - dc_ref|':>18s}")
    print("(x* is the known solution; dc_ref is the gradient w.r.t. c from the first row; solved: our status SOLVED, "
          "for diffcp its answers whose relative KKT residual passes the same test, 1e-6)")
    table = []
    for name, row in rows.items():
        err_x = float(np.abs(row["x"] - x_true.numpy()).max())
        err_g = float(np.abs(row["grad_c"] - reference).max())
        total = row["forward_s"] + row["adjoint_s"]
        total_cpu = row["forward_cpu_s"] + row["adjoint_cpu_s"]
        print(f"{name:45s} {row['forward_s']:10.3f} {row['adjoint_s']:10.3f} {total:9.3f} {total_cpu:12.3f} {row['solved']:7d} "
              f"{err_x:13.1e} {err_g:18.1e}")
        table.append({"method": name, "forward_s": row["forward_s"], "adjoint_s": row["adjoint_s"],
                      "forward_cpu_s": row["forward_cpu_s"], "adjoint_cpu_s": row["adjoint_cpu_s"],
                      "solved": row["solved"], "max_x_error": err_x, "max_grad_c_diff": err_g})
    if "diffcp Clarabel dense" in rows:  # the yardstick: diffcp's dense mode with a Clarabel forward
        reference = rows["diffcp Clarabel dense"]
        for name in ("optlayers auto dense", "optlayers ipm dense", "optlayers ipm dense, compiled", "optlayers clarabel dense"):
            if name not in rows:
                continue
            ratio = ratios(rows[name], reference)
            print(f"{name} / diffcp Clarabel dense: {ratio['wall']:.2f} (wall), {ratio['cpu']:.2f} (CPU)")
            next(r for r in table if r["method"] == name)["ratio_to_diffcp_clarabel_dense"] = ratio
    scaling = batch_scaling(args.scaling, args.repeats, device)
    meta = metadata(args)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": table, "batch_scaling": scaling}, f, indent=2)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
