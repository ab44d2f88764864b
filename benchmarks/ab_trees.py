"""Time the QP layer (or the cone layer) of two source trees against each other on one machine, alternating them.

Timings on a shared machine drift by tens of percent between runs; what two versions of the code
cost relative to each other is measured by timing them in turn, many times, and keeping each
one's best. One warm worker process per tree (its ``src`` first on the path, one intra-op
thread unless ``--threads`` says otherwise) times rounds of ``QPFunction()(Q, p, G, h)`` forward + backward w.r.t. every input on
the paper's random QPs (``benchmarks/problems.py``, n inequalities, float64); the workers take
turns, each round in the opposite order to the last.

glibc's allocator makes a process's time depend on its history: at batch 128, n = 100 (compiled,
one thread) 3 of 8 processes trimmed the heap after the call's 10 MB tensors were freed and grew it
again in the next call, about 31,000 page faults a call against 1,000–2,500, and took about 1.2
times as long, whatever the code (BENCHMARKS.md, "The allocator's state"). Two workers, one in each
state, would compare the allocator, not the trees. So the workers run with glibc's thresholds fixed
(``--malloc steady``, the default: ``GLIBC_TUNABLES`` mmap_threshold 32 MiB, trim_threshold 256
MiB, ``machine.STEADY_MALLOC``; at two threads this steadies the time without removing the page
faults), and each line reports the page faults per call of both workers.

    python benchmarks/ab_trees.py OLD_TREE NEW_TREE --cases 1,10 1,10,compiled 128,10 --rounds 15

Each case is "batch,n" or "batch,n,compiled" (``QPFunction(compile=True)``, compiled in the
untimed warm-up), or "cone,batch" or "cone,batch,compiled": ``solve_cone(A, b, c, SPEC,
solver="ipm")`` (``compile=True``) on ``benchmarks/bench_cone.py``'s programs (its ``SPEC``, n =
``N``, ``random_program(..., seed=0)`` of the tree), forward and the adjoint of x and y. Prints each
tree's best time in milliseconds and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

try:
    from benchmarks import machine
except ImportError:  # run as a script: its own folder, not the repository, is on the path
    import machine

_WORKER = r'''
import json, resource, sys, time
tree = sys.argv[1]
sys.path[:0] = [tree + "/src", tree]
import torch
from benchmarks.problems import random_qp
from optlayers import QPFunction


def qp_run(batch, n, compiled):
    data = [t.clone().requires_grad_(True) for t in random_qp(batch, n, n, seed=0).tensors()[:4]]
    layer = QPFunction(verbose=-1, compile=compiled)

    def run():
        layer(*data).sum().backward()
    return run


def cone_run(batch, compiled):
    from benchmarks.bench_cone import N, SPEC
    from optlayers.cone import solve_cone
    from optlayers.cone.testing import random_program
    A, b, c = (t.clone().requires_grad_(True) for t in random_program(SPEC, N, batch=batch, seed=0)[:3])

    def run():
        sol = solve_cone(A, b, c, SPEC, solver="ipm", compile=compiled)
        (sol.x.sum() + sol.y.sum()).backward()
    return run


runs = {}
for line in sys.stdin:
    case = json.loads(line)
    key = (case["cone"], case["batch"], case["n"], case["compiled"])
    if key not in runs:
        run = cone_run(case["batch"], case["compiled"]) if case["cone"] else qp_run(case["batch"], case["n"], case["compiled"])
        for _ in range(3):  # warm-up (and a compiled case's compilation), untimed
            run()
        runs[key] = run
    times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(case["reps"]):
        start = time.perf_counter()
        runs[key]()
        times.append(time.perf_counter() - start)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / case["reps"]
    print(json.dumps([min(times), faults]), flush=True)
'''


def _case(text: str) -> dict:
    parts = text.split(",")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "compiled"):
        raise argparse.ArgumentTypeError(f"a case is 'batch,n', 'batch,n,compiled', 'cone,batch' or "
                                         f"'cone,batch,compiled', got {text!r}")
    cone = parts[0] == "cone"
    try:
        batch, n = (int(parts[1]), 0) if cone else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a case's batch and n are integers, got {text!r}") from None
    if batch < 1 or (not cone and n < 1):
        raise argparse.ArgumentTypeError(f"a case's batch and n are at least 1, got {text!r}")
    return {"cone": cone, "batch": batch, "n": n, "compiled": len(parts) == 3}


def _name(case: dict) -> str:
    shape = f"cone, batch {case['batch']}" if case["cone"] else f"({case['batch']}, {case['n']})"
    return f"{shape}{' compiled' if case['compiled'] else ''}"


def _own_extensions(env: dict[str, str], which: int) -> dict[str, str]:
    """``env`` with a torch extension folder of the worker's own (``TORCH_EXTENSIONS_DIR``, under the
    one given or torch's default): two trees whose C++ operators differ would otherwise build into,
    and load from, one folder at once."""
    base = env.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return dict(env, TORCH_EXTENSIONS_DIR=os.path.join(base, f"ab_trees_{which}"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path, help="the reference tree (a checkout of the repository)")
    parser.add_argument("new", type=Path, help="the tree to compare with it")
    parser.add_argument("--cases", type=_case, nargs="+", required=True)
    parser.add_argument("--rounds", type=int, default=15, help="rounds per tree (each keeps its best)")
    parser.add_argument("--reps", type=int, default=5, help="timed calls per round")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of each worker (default 1)")
    parser.add_argument("--malloc", choices=("steady", "default"), default="steady",
                        help="glibc's allocator thresholds in the workers: fixed (steady, the default) or glibc's own")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    if args.malloc == "steady":
        env = machine.with_steady_malloc(env)
    print(f"workers: {args.threads} intra-op thread(s), GLIBC_TUNABLES={env.get('GLIBC_TUNABLES')}", flush=True)
    workers = {tree: subprocess.Popen([sys.executable, "-c", _WORKER, str(tree.resolve())], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=_own_extensions(env, which))
               for which, tree in enumerate((args.old, args.new))}
    try:
        for case in args.cases:
            best = {tree: float("inf") for tree in workers}
            faults = {tree: 0.0 for tree in workers}
            for round_ in range(args.rounds):
                for tree in (args.old, args.new) if round_ % 2 == 0 else (args.new, args.old):
                    workers[tree].stdin.write(json.dumps({**case, "reps": args.reps}) + "\n")
                    workers[tree].stdin.flush()
                    seconds, per_call = json.loads(workers[tree].stdout.readline())
                    best[tree], faults[tree] = min(best[tree], seconds), max(faults[tree], per_call)
            print(f"{_name(case)}: {1e3 * best[args.old]:.2f} ms -> {1e3 * best[args.new]:.2f} ms "
                  f"(ratio {best[args.new] / best[args.old]:.2f}; page faults per call, most of a round: "
                  f"{faults[args.old]:.0f} -> {faults[args.new]:.0f})", flush=True)
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()


if __name__ == "__main__":
    main()
