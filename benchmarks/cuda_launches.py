"""Count the CUDA kernel launches of a QP solve on a GPU (torch.profiler), eager and compiled, and list
the kernels that take its device time; the same for its backward; and where the host's time of a
forward + backward goes (cProfile: the functions with the most cumulative time, a wait on the
device included where the host reads from it).

``benchmarks/kernels.py`` counts aten operations on the CPU, a machine-independent stand-in for
launches; this script measures the launches themselves on a CUDA device (CUDA graph replays
count as one launch each in the profiler's runtime events, their kernels as device events).

    python benchmarks/cuda_launches.py [--batch 128] [--n 100] [--json FILE]
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.problems import random_qp  # noqa: E402
from optlayers import solve_qp  # noqa: E402


TOP_KERNELS = 10
"""Kernels listed by device time: where a forward's device time goes (the Cholesky, the triangular
solves, inductor's fused kernels)."""
TOP_FUNCTIONS = 15
"""Functions listed by the host's cumulative time (cProfile)."""
PROFILED_CALLS = 20


def launches(fn, before=None) -> dict[str, int]:
    """Kernels run on the device and launch calls made by the host during ``fn()`` (``before()``, where
    given, called ahead of it outside the profile)."""
    if before is not None:
        before()
    fn()  # warm-up (and compilation)
    if before is not None:
        before()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    host = sum(1 for e in events if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch", "cudaLaunchKernelExC"))
    return {"device_kernels": len(kernels), "host_launch_calls": host,
            "device_busy_us": sum(e.time_range.elapsed_us() for e in kernels), "top_kernels": top_kernels(kernels)}


def top_kernels(kernels: list, count: int = TOP_KERNELS) -> list[dict]:
    """The ``count`` kernels (by name) that took the most device time, with their calls and microseconds."""
    totals: dict[str, list[float]] = {}
    for e in kernels:
        total = totals.setdefault(e.name, [0, 0.0])
        total[0] += 1
        total[1] += e.time_range.elapsed_us()
    ranked = sorted(totals.items(), key=lambda item: -item[1][1])[:count]
    return [{"name": name[:120], "calls": calls, "device_us": round(us, 1)} for name, (calls, us) in ranked]


def host_profile(fn, calls: int = PROFILED_CALLS, count: int = TOP_FUNCTIONS) -> list[dict]:
    """The ``count`` functions with the most cumulative host time over ``calls`` calls of ``fn``
    (after one warm-up call), in milliseconds per call, with their calls per call."""
    fn()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (primitive calls, calls, own, cumulative, callers)}
    ranked = sorted(stats.items(), key=lambda item: -item[1][3])
    rows = []
    for (filename, line, name), (_, ncalls, own, cumulative, _) in ranked[:count]:
        where = f"{Path(filename).name}:{line}" if line else filename
        rows.append({"function": f"{name} ({where})"[:120], "calls_per_call": ncalls / calls,
                     "cumulative_ms": 1e3 * cumulative / calls, "own_ms": 1e3 * own / calls})
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--json", type=Path, help="write the counts here")
    return parser.parse_args(argv)


def _print(what: str, row: dict) -> None:
    print(f"{what}: {row['device_kernels']} device kernels, {row['host_launch_calls']} host launch calls; "
          f"device busy {row['device_busy_us'] / 1e3:.2f} ms", flush=True)
    for kernel in row["top_kernels"]:
        print(f"  {kernel['device_us'] / 1e3:8.3f} ms  {kernel['calls']:5d} calls  {kernel['name']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_launches.py needs a CUDA device (none is available)", file=sys.stderr)
        return 2
    Q, p, G, h, A, b = (t.cuda() if t is not None else None for t in random_qp(args.batch, args.n, args.n, 0, seed=0).tensors())
    rows = {}
    for compiled in (False, True):  # each row printed and written as soon as it is measured
        name = "compiled" if compiled else "eager"
        p_ = p.clone().requires_grad_(True)
        holder = {}

        def forward() -> None:
            holder["sol"] = solve_qp(Q, p_, G, h, A, b, compile=compiled)

        def backward() -> None:  # of a forward made outside the profile
            holder["sol"].z.sum().backward(inputs=[p_])

        def forward_backward() -> None:
            forward()
            backward()
            torch.cuda.synchronize()

        counts = launches(forward)
        iterations = int(holder["sol"].iterations.max())
        row = rows[name] = {**counts, "iterations": iterations,
                            "device_kernels_per_iteration": counts["device_kernels"] / iterations}
        _print(f"{name} forward", row)
        print(f"  ({iterations} iterations; {row['device_kernels_per_iteration']:.0f} kernels per iteration, set-up included)")
        row["backward"] = launches(backward, before=forward)
        _print(f"{name} backward", row["backward"])
        row["host_profile"] = host_profile(forward_backward)
        print(f"{name} forward + backward, host time by function (ms per call, cumulative / own, calls per call):")
        for f in row["host_profile"]:
            print(f"  {f['cumulative_ms']:8.3f} {f['own_ms']:8.3f} {f['calls_per_call']:6.0f}  {f['function']}", flush=True)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"batch": args.batch, "n": args.n, "device": torch.cuda.get_device_name(), **rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
