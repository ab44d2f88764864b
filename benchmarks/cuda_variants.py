"""A/B of the QP solve's variants on CUDA, in one process: forward + backward milliseconds
(median), iterations, and the distance of the solution and of the gradient of ⟨w, z⟩ w.r.t. p to
the plain eager solve's. The variants:

- ``eager``, ``eager-graphs``: the eager step launched operation by operation, and the same
  replayed from a CUDA graph (``engine.graphed.EAGER_GRAPHS``), no factor inverted: no
  compilation at all;
- ``compiled``, ``compiled-magma``: ``compile=True`` (the step one CUDA graph replay) with no
  factor inverted, with torch's default batched Cholesky on CUDA (cuSOLVER) and with MAGMA's
  (``torch.backends.cuda.preferred_linalg_library``);
- ``inverted``, ``inverted-magma``: the same with every KKT factor up to order ``--n`` inverted
  (``engine.kkt.CUDA_INVERTED_MAX_N``), so that every solve with it is a batched product;
- ``eager-graphs-inverted``: ``eager-graphs`` with every factor up to order ``--n`` inverted;
- ``eager-graphs-inverted-calls``, ``inverted-calls``: ``eager-graphs-inverted`` and ``inverted``
  with the solve's parts outside the iterations (equilibration, start, derivatives'
  factorisation, backward) replayed from CUDA graphs too (``engine.graphed.GRAPHED_CALLS``).

Each variant sets its switches explicitly (whatever the package's defaults are); they are
restored at the end.

    python benchmarks/cuda_variants.py [--batch 128] [--n 100] [--dtypes float64,float32] [--repeats 10]
                                       [--variants eager,eager-graphs,...] [--device cuda] [--json FILE]

On the CPU (``--device cpu``, for checking the script) ``inverted`` raises ``INVERTED_MAX_N``
instead, the CPU's own limit, and the variants that need CUDA (graphs, MAGMA) are skipped.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.problems import random_qp  # noqa: E402
from optlayers import solve_qp  # noqa: E402
from optlayers.engine import graphed, kkt  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32}
VARIANTS = {"eager": (False, False, False, "default", False), "eager-graphs": (False, True, False, "default", False),
            "eager-graphs-inverted": (False, True, True, "default", False),
            "eager-graphs-inverted-calls": (False, True, True, "default", True),
            "compiled": (True, False, False, "default", False), "compiled-magma": (True, False, False, "magma", False),
            "inverted": (True, False, True, "default", False), "inverted-magma": (True, False, True, "magma", False),
            "inverted-calls": (True, False, True, "default", True)}
"""name: (compile, eager graphs, inverted factors, CUDA linear algebra library, graphed calls)."""
CUDA_ONLY = ("eager-graphs", "eager-graphs-inverted", "eager-graphs-inverted-calls", "compiled-magma", "inverted-magma",
             "inverted-calls")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--dtypes", default="float64,float32", help="comma-separated, of float64 and float32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    for flag, choices in (("dtypes", DTYPES), ("variants", VARIANTS)):
        names = getattr(args, flag).split(",")
        unknown = sorted(set(names) - set(choices))
        if unknown:
            parser.error(f"--{flag}: unknown {unknown}; choose from {', '.join(choices)}")
        setattr(args, flag, names)
    if min(args.batch, args.n, args.repeats) < 1:
        parser.error(f"--batch, --n and --repeats must be positive, got {args.batch}, {args.n}, {args.repeats}")
    return args


def _limit_name(device: torch.device) -> str:
    return "CUDA_INVERTED_MAX_N" if device.type == "cuda" else "INVERTED_MAX_N"


def _set_variant(eager_graphs: bool, limit: int, library: str, device: torch.device, calls: bool = False) -> None:
    """Sets the switches of a variant (``limit``: the inversion limit of ``device``; ``calls``: the
    solve's parts outside the iterations graphed too), and drops the CUDA graphs captured under
    others (a changed inversion limit recompiles: the compiled code guards on it)."""
    graphed.EAGER_GRAPHS, graphed.GRAPHED_CALLS = eager_graphs, calls
    setattr(kkt, _limit_name(device), limit)
    if device.type == "cuda":
        torch.backends.cuda.preferred_linalg_library(library)
    graphed._GRAPHS.captured.clear()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_backward(tensors, weights, compile: bool):
    Q, p, G, h, A, b = tensors
    p = p.detach().clone().requires_grad_(True)
    sol = solve_qp(Q, p, G, h, A, b, compile=compile)
    (grad,) = torch.autograd.grad((sol.z * weights).sum(), p)
    return sol, grad


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch sees no CUDA device")
    as_found = (graphed.EAGER_GRAPHS, getattr(kkt, _limit_name(device)), "default", device, graphed.GRAPHED_CALLS)  # restored at the end
    uninverted = 0 if device.type == "cuda" else kkt.INVERTED_MAX_N  # CUDA: no factor inverted; the CPU: its own limit
    problem = random_qp(args.batch, args.n, args.n, 0, seed=0).tensors()
    rows = []
    try:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            tensors = [None if t is None else t.to(dtype=dtype, device=device) for t in problem]
            weights = torch.randn(args.batch, args.n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
            weights = weights.to(dtype=dtype, device=device)
            _set_variant(False, uninverted, "default", device)  # the plain eager solve
            reference, reference_grad = forward_backward(tensors, weights, compile=False)
            for variant in args.variants:
                compile, eager_graphs, inverted, library, calls = VARIANTS[variant]
                if variant in CUDA_ONLY and device.type != "cuda":
                    continue
                _set_variant(eager_graphs, max(args.n, uninverted) if inverted else uninverted, library, device, calls)
                for _ in range(2):  # compilation and capture
                    sol, grad = forward_backward(tensors, weights, compile=compile)
                times = []
                for _ in range(args.repeats):
                    _sync(device)
                    start = time.perf_counter()
                    sol, grad = forward_backward(tensors, weights, compile=compile)
                    _sync(device)
                    times.append(time.perf_counter() - start)
                rows.append({"variant": variant, "dtype": dtype_name, "batch": args.batch, "n": args.n,
                             "fwd_bwd_ms": 1e3 * statistics.median(times), "iterations": int(sol.iterations.max()),
                             "z_vs_eager": float((sol.z - reference.z).detach().abs().max()),
                             "grad_vs_eager": float((grad - reference_grad).abs().max())})
                row = rows[-1]
                print(f"{row['dtype']}  {row['batch']:4d} x {row['n']:<4d} {row['variant']:15s}  {row['fwd_bwd_ms']:8.2f} ms  {row['iterations']:3d} iterations  "
                      f"|z - z_eager| {row['z_vs_eager']:.1e}  |grad - grad_eager| {row['grad_vs_eager']:.1e}", flush=True)
                if args.json:  # after every row: a step cut by its time limit keeps what it measured
                    _write(args.json, device, rows)
    finally:
        _set_variant(*as_found)
    if args.json:
        _write(args.json, device, rows)
    return rows


def _write(path: Path, device: torch.device, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    path.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
