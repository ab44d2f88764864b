"""Count the compute kernels and host synchronisations of a QP solve (and of its backward).

Every aten operation that is not a view is one kernel launch on a GPU; an operation that
reads a tensor's value on the host (``item``, ``bool(tensor)``, ``nonzero``, boolean-mask
indexing) is a synchronisation that stalls the device. Both are machine-independent, so they
are counted on the CPU with a ``TorchDispatchMode``, with one intra-op thread so that the batch
is not sliced across threads. Views (unsqueeze, slice, transpose, ...) launch nothing, but each
is a dispatch like a kernel's, which an eager iteration on small problems pays on the host: they
are counted too (``views``).

Kernels per interior point iteration are measured as the difference between two forward
solves capped at different numbers of iterations, both before the host's first look at the
statuses (until then every iteration runs the whole batch, converged or not):
(kernels(max_iter = 2K) − kernels(max_iter = K)) / K. Set-up and the final factorisation cancel.
For the QP K = 2: at a cap of 6 the benchmarks' n = 10 problems, whose steps go 0.999 of the way to
the boundary (``qp.ipm.BALANCED_STEP_FRACTION``), come near enough to convergence that the end of the capped
solve does more (accurate gaps, smaller multipliers), which would be counted as the iterations'.

With ``--phases`` it also prints where those kernels go: each kernel is charged to the phase of
the solver's code that dispatched it (``PhaseCounter``: the Python call stack at the kernel), per
iteration (the same difference of two capped solves) and for one whole forward.

    python -m benchmarks.kernels [--batch 128] [--n 100] [--json FILE] [--phases] [--compiled]
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import itertools
import json
import sys
import types
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.problems import random_qp  # noqa: E402
from optlayers import ConeSpec, host, solve_cone, solve_qp  # noqa: E402
from optlayers.cone.testing import random_program  # noqa: E402

# Operations that read a device value on the host.
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "nonzero_static", "unique", "_unique2"}
# Operations that only relabel memory: no kernel.
_VIEW_OPS = {"detach", "alias", "_unsafe_view", "lift_fresh"}


class KernelCounter(TorchDispatchMode):
    """Counts non-view aten operations (kernels), view operations and host synchronisations, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: Counter[str] = Counter()
        self.views: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = func.overloadpacket.__name__
        if torch.Tag.view_copy not in func.tags and not func.is_view and name not in _VIEW_OPS:
            self.kernels[name] += 1
        else:
            self.views[name] += 1
        if name in _SYNC_OPS or (name in ("index", "index_put", "index_put_") and _has_bool_index(args)) or _to_host(name, kwargs):
            self.syncs[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def kernel_count(self) -> int:
        return sum(self.kernels.values())

    @property
    def view_count(self) -> int:
        return sum(self.views.values())

    @property
    def sync_count(self) -> int:
        return sum(self.syncs.values())


def _to_host(name: str, kwargs: dict | None) -> bool:
    """A copy to the CPU (on the CPU itself a plain copy, on a GPU a device-to-host transfer)."""
    device = (kwargs or {}).get("device")
    return name == "_to_copy" and device is not None and torch.device(device).type == "cpu"


def _has_bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (indices or ()))


CPU_SCHEDULE = False
"""With ``--cpu-schedule``: count on the CPU's own schedule instead (``host.cpu_schedule``: the host
looks after every iteration, the equilibration runs in cache-sized slices, the eager loop under
``torch.inference_mode``), what a CPU dispatches."""


def count(fn: Callable[[], object]) -> KernelCounter:
    """Run ``fn`` once under a fresh counter and return the counter. Call it with one intra-op
    thread (``main`` sets it) so that a batch is not sliced across threads. The solvers look at
    the statuses on the accelerators' schedule (``host.accelerator_schedule``; on the CPU they
    would look after every iteration) and run their steps as a GPU does (``host.cpu_schedule``: the
    equilibration of the whole batch at once, not in the CPU's cache-sized slices), so the counts
    are a GPU's."""
    schedule = contextlib.nullcontext() if CPU_SCHEDULE else host.accelerator_schedule()
    with schedule, KernelCounter() as counter:
        fn()
    return counter


# Where a kernel of the QP solver is charged: the functions below, found on the Python call stack
# at the kernel, each name a part of its phase ("" adds nothing). A function with markers is split
# further by the statement its frame is executing: the region from the first line that starts
# with a marker (in its source) to the next marker's line takes that marker's label, the lines
# before the first marker the function's own label.
Rule = tuple[str, tuple[tuple[str, str], ...]]
ITERATION_PHASES: dict[tuple[str, str], Rule] = {
    ("engine/loop.py", "_run"): ("loop: host looks, working batch", (("if isinstance(step, Steps)", ""),)),
    ("qp/ipm.py", "step"): ("", ()),
    ("engine/step.py", "newton_step"): ("newton_step: set-up", (
        ("f = factor_at(", "newton_step: factorisation"),
        ("minus_s_lam = torch.addcmul(", "newton_step: set-up"),
        ("dv = direction(minus_s_lam, res.r_i", "newton_step: predictor"),
        ("dw, alpha_aff = boundary(", "newton_step: predictor's step length"),
        ("if rules.centring", "newton_step: centring σμ"),
        ("b4 = torch.addcmul(", "newton_step: corrector's right-hand side"),
        ("dv = direction(b4,", "newton_step: corrector"),
        ("fraction = rules.step_fraction", "newton_step: step length"),
        ("if rules.merit", "newton_step: merit search"),
        ("return Step(dv, mv(data.Q, dv[:, :n]), alpha", "newton_step: Q dx"))),
    ("engine/step.py", "direction"): ("right-hand side", (
        ("dx, dnu, dlam = solve_reduced(", ""), ("pieces = ", "dλ, ds, joined"))),
    ("engine/kkt.py", "solve_reduced"): ("right-hand side", (
        ("dx, omega = _solve_regularised(", "first solve"), ("adaptive = ", "refinement"),
        ("dlam = mv(f.G", "dλ"))),
    ("qp/ipm.py", "assess"): ("assess: update", (("events, sound, running, can_raise = _certificates(", ""),
                                                ("unsound = running > sound", "assess: update"))),
    ("qp/ipm.py", "_certificates"): ("assess: certificates", ()),
    ("qp/ipm.py", "residuals"): ("residuals", ()),
    ("qp/ipm.py", "_mark_converged"): ("mark converged", ()),
}
"""The phases of one QP interior point iteration (``qp.ipm.step`` in ``engine.loop.run``, whose iterations ``engine.loop._run`` runs)."""

FORWARD_PHASES: dict[tuple[str, str], Rule] = {
    ("qp/solve.py", "solve_qp"): ("entry: checks, shapes", ()),
    ("qp/forward.py", "outputs"): ("value checks, structure", ()),
    ("qp/forward.py", "_scaling"): ("equilibration", ()),
    ("qp/ipm.py", "solve_scaled"): ("start", ()),
    ("qp/ipm.py", "start"): ("start", ()),
    ("engine/loop.py", "_run"): ("iterations", ()),
    ("qp/ipm.py", "iterate"): ("end of the solve", ()),
    ("qp/ipm.py", "derivative_factor"): ("derivatives' factorisation", ()),
    ("qp/forward.py", "_outputs"): ("outputs mapped back", ()),
}
"""The phases of one QP forward (``solve_qp``), one level deep (the innermost one on the stack)."""


class PhaseCounter(KernelCounter):
    """A ``KernelCounter`` that also charges each kernel to a phase of the solver's code (see
    ``ITERATION_PHASES``): ``phases`` counts kernels by phase, a phase being the labels of the
    ruled functions on the call stack, outermost first, joined by " / " (the innermost one only,
    with ``innermost``); "other" where none is on it."""

    def __init__(self, rules: dict[tuple[str, str], Rule], innermost: bool = False) -> None:
        super().__init__()
        self.rules, self.innermost = rules, innermost
        self.phases: Counter[str] = Counter()
        self._root = str(Path(inspect.getfile(inspect.unwrap(solve_qp))).parents[1])  # .../src/optlayers/qp/.. : the package's folder
        self._regions: dict[types.CodeType, tuple[str, list[tuple[int, str]]] | None] = {}

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):  # noqa: ANN001
        before = self.kernel_count
        out = super().__torch_dispatch__(func, types_, args, kwargs)
        if self.kernel_count > before:
            self.phases[self._phase(sys._getframe(1))] += 1
        return out

    def _region(self, code: types.CodeType) -> tuple[str, list[tuple[int, str]]] | None:
        """The label and the marked regions (first line, label) of a ruled function; None for others."""
        if code not in self._regions:
            key = next((k for k in self.rules if code.co_filename.endswith(k[0]) and code.co_name == k[1]), None)
            if key is None or not code.co_filename.startswith(self._root):
                self._regions[code] = None
            else:
                label, markers = self.rules[key]
                lines, first = inspect.getsourcelines(code)
                regions = []
                for marker, region in markers:
                    at = next((first + i for i, line in enumerate(lines) if line.strip().startswith(marker)), None)
                    if at is None:
                        raise ValueError(f"PhaseCounter: no line of {key[1]} ({key[0]}) starts with {marker!r}")
                    regions.append((at, region))
                self._regions[code] = (label, sorted(regions))
        return self._regions[code]

    def _phase(self, frame: types.FrameType | None) -> str:
        labels = []
        while frame is not None:
            region = self._region(frame.f_code)
            if region is not None:
                label, marked = region
                for line, name in marked:
                    if frame.f_lineno >= line:
                        label = name
                if label:
                    labels.append(label)
                    if self.innermost:
                        break
            frame = frame.f_back
        return " / ".join(reversed(labels)) or "other"


def qp_phases(batch: int, n: int, n_ineq: int, n_eq: int, window: int = 2) -> tuple[dict[str, float], dict[str, int]]:
    """Kernels per iteration by phase (``ITERATION_PHASES``, measured as ``qp_counts`` measures
    their total), and the kernels of one converging forward by phase (``FORWARD_PHASES``)."""
    qp = random_qp(batch, n, n_ineq, n_eq, seed=0)

    def capped(iterations: int) -> Counter[str]:
        with host.accelerator_schedule(), PhaseCounter(ITERATION_PHASES) as counter:
            solve_qp(*qp.tensors(), max_iter=iterations, on_failure="ignore")
        return counter.phases

    _warm_up(qp)
    low, high = capped(window), capped(2 * window)
    steps = ("newton_step", "assess", "residuals", "mark converged")  # in the order of ``ipm.step``
    phases = sorted(high | low, key=lambda phase: next((i for i, s in enumerate(steps) if phase.startswith(s)), len(steps)))
    per_iteration = {phase: (high[phase] - low[phase]) / window for phase in phases if high[phase] != low[phase]}
    Q, p, G, h, A, b = qp.tensors()
    p = p.clone().requires_grad_(True)  # as ``qp_counts``'s forward
    with host.accelerator_schedule(), PhaseCounter(FORWARD_PHASES, innermost=True) as counter:
        solve_qp(Q, p, G, h, A, b)
    return per_iteration, dict(counter.phases)


def _phase_table(title: str, counts: dict[str, float], places: int = 0) -> None:
    print(f"\n| {title} | kernels |\n|---|---|")
    for phase, kernels in counts.items():
        print(f"| {phase} | {kernels:.{places}f} |")
    print(f"| total | {sum(counts.values()):.{places}f} |")


@dataclass(frozen=True)
class QPCounts:
    batch: int
    n: int
    n_ineq: int
    n_eq: int
    iterations: int
    kernels_per_iteration: float
    views_per_iteration: float
    forward_kernels: int
    forward_syncs: int
    backward_kernels: int
    backward_syncs: int


def _warm_up(qp) -> None:  # noqa: ANN001
    """One iteration of a solve that keeps its derivatives' factorisation, so that the constants
    the solver makes once (cached) are not counted as the iterations' or a forward's."""
    Q, p, G, h, A, b = qp.tensors()
    solve_qp(Q, p.clone().requires_grad_(True), G, h, A, b, max_iter=1, on_failure="ignore")


def qp_counts(batch: int, n: int, n_ineq: int, n_eq: int, window: int = 2) -> QPCounts:
    """Kernels and views per iteration, and kernels and syncs of one converging forward and its backward."""
    qp = random_qp(batch, n, n_ineq, n_eq, seed=0)

    def capped(iterations: int) -> tuple[int, int]:
        counter = count(lambda: solve_qp(*qp.tensors(), max_iter=iterations, on_failure="ignore"))
        return counter.kernel_count, counter.view_count

    _warm_up(qp)
    (low_kernels, low_views), (high_kernels, high_views) = capped(window), capped(2 * window)
    p = qp.p.clone().requires_grad_(True)
    Q, _, G, h, A, b = qp.tensors()
    holder = {}

    def forward() -> None:
        holder["sol"] = solve_qp(Q, p, G, h, A, b)

    fwd = count(forward)
    sol = holder["sol"]
    bwd = count(lambda: sol.z.sum().backward())
    return QPCounts(batch, n, n_ineq, n_eq, int(sol.iterations.max()), (high_kernels - low_kernels) / window,
                    (high_views - low_views) / window, fwd.kernel_count, fwd.sync_count, bwd.kernel_count, bwd.sync_count)


def _launch_count(code: str) -> tuple[int, int]:
    """(fused kernels, library calls) that a piece of inductor's generated code launches."""
    import re

    fused = len(re.findall(r"^\s+cpp_fused_\w+\(", code, re.M)) + len(re.findall(r"\.run\(", code))
    library = len(re.findall(r"(?:extern_kernels\.\w+|torch\.ops\.(?:aten|optlayers_lapack)\.\w+\.\w+)\(", code))  # calls, not checks
    return fused, library


def _launches(code: str) -> dict[str, int]:
    """The fused kernels and library calls that inductor's generated ``code`` launches per call.

    A ``torch.cond`` (the refinement's further steps, ``engine.kkt.refines_on_device``) is two
    functions of the generated code, ``true_graph_i`` and ``false_graph_i``, of which a call runs
    one: ``fused``, ``library`` and ``total`` count the dearer of each pair, ``total_skipped`` the
    cheaper."""
    import re

    def function(name: str) -> str:
        """The text of the generated function ``name`` (its indented lines)."""
        lines = code[code.index(f"\ndef {name}(") + 1:].split("\n")
        return "\n".join([lines[0], *itertools.takewhile(lambda line: not line or line[0].isspace(), lines[1:])])

    fused, library = _launch_count(code[code.index("def call("):])
    skipped = fused + library
    for index in range(len(re.findall(r"^def true_graph_\d+\(", code, re.M))):
        branches = [_launch_count(function(f"{side}_graph_{index}")) for side in ("true", "false")]
        dearer = max(branches, key=sum)
        fused, library, skipped = fused + dearer[0], library + dearer[1], skipped + min(map(sum, branches))
    return {"fused": fused, "library": library, "total": fused + library, "total_skipped": skipped}


def compiled_launches(batch: int, n: int, n_ineq: int, n_eq: int) -> dict[str, int]:
    """Kernel launches of one iteration of the compiled path (``solve_qp(compile=True)``): the
    fused kernels and the library calls (batched products, Cholesky, triangular solves) in the
    code inductor generates for ``ipm.step``; (``backward_*``) of its first-order backward
    (``qp.autograd._compiled_vjp``) for the cotangent of z and gradients of all six data; and
    (``factorising_backward_*``) of the backward of a batch solved in chunks, which makes the
    derivatives' factorisation itself (``qp.autograd._factorising_vjp``: the forward's launches
    for it move there). Compiles three times (tens of seconds each)."""
    from torch._inductor.utils import run_and_get_code

    from optlayers.qp import autograd, ipm
    from optlayers.qp.problem import prepare_qp, qp_data
    from optlayers.qp.scaling import equilibrate

    flat, _ = prepare_qp(*random_qp(batch, n, n_ineq, n_eq, seed=0).tensors())
    data, scaling = equilibrate(qp_data(*flat))
    settings = ipm.default_settings(torch.float64, None, None, None)
    units = ipm.Units.of(scaling, data, settings)
    state, res = ipm.start(data, units, settings)
    step = torch.compile(ipm.step, fullgraph=True, dynamic=False)
    _, code = run_and_get_code(step, data, units, state, res, settings)
    launches = _launches(code[-1])
    leaves = [t.clone().requires_grad_(True) for t in flat]
    with torch.enable_grad():  # the saved tensors of a forward that kept its factor (eager: no compilation)
        z = autograd.QPSolveFn.apply(*leaves, settings, True, "ignore", (batch,))[0]
    vjp = torch.compile(autograd._compiled_vjp, fullgraph=True, dynamic=False)
    _, code = run_and_get_code(vjp, z.grad_fn.saved_tensors[autograd._STATUS_AT:], (torch.ones_like(z), None, None, None),
                               (True,) * 6, settings, torch.float64)
    launches.update({f"backward_{key}": value for key, value in _launches(code[-1]).items()})
    factorising = torch.compile(autograd._factorising_vjp, fullgraph=True, dynamic=False)
    _, code = run_and_get_code(factorising, z.grad_fn.saved_tensors[autograd._STATUS_AT:autograd._FACTOR_AT],
                               (torch.ones_like(z), None, None, None), (True,) * 6, settings, torch.float64, False)
    return {**launches, **{f"factorising_backward_{key}": value for key, value in _launches(code[-1]).items()}}


@dataclass(frozen=True)
class ConeCounts:
    batch: int
    m: int
    n: int
    kernels_per_iteration: float
    forward_kernels: int
    forward_syncs: int
    backward_kernels: int
    backward_syncs: int


CONE_SPEC = ConeSpec(zero=14, nonneg=30, soc=[10, 10, 10], psd=[4], exp=4)
"""The cone benchmark's programs (``bench_cone.py``): all five cone types, m = 96, with n = 48."""


def cone_counts(batch: int, n: int = 48, spec: ConeSpec = CONE_SPEC, window: int = 3) -> ConeCounts:
    """The same counts for ``solve_cone(solver="ipm")`` (its interior point method, then its
    Newton refinement) and its adjoint, on the cone benchmark's programs."""
    A, b, c, *_ = random_program(spec, n, batch=batch, seed=0)

    def capped(iterations: int) -> int:
        options = {"max_iter": iterations}
        return count(lambda: solve_cone(A, b, c, spec, solver="ipm", solver_options=options, on_failure="ignore",
                                        refine_steps=0)).kernel_count

    capped(1)  # a warm-up: the constants the cones make once (cached) are not counted as the iterations'
    per_iteration = (capped(2 * window) - capped(window)) / window
    A_ = A.clone().requires_grad_(True)
    holder = {}
    fwd = count(lambda: holder.setdefault("sol", solve_cone(A_, b, c, spec, solver="ipm")))
    sol = holder["sol"]
    bwd = count(lambda: sol.x.sum().backward())
    return ConeCounts(batch, spec.size, n, per_iteration, fwd.kernel_count, fwd.sync_count,
                      bwd.kernel_count, bwd.sync_count)


def compiled_cone_counts(batch: int, n: int = 48, spec: ConeSpec = CONE_SPEC) -> dict[str, object]:
    """The compiled path of the cone method (``solve_cone(solver="ipm", compile=True)``) on the cone
    benchmark's programs: the fused kernels and library calls of one iteration (the body of the
    ``while_loop`` in the code inductor generates for ``interior.solver._solved``, its Python
    wrapper), and per forward (without and with the refinement) the compiled calls and the aten
    operations and host synchronisations outside them (counted as ``count`` does, with the counter
    off inside the compiled calls). Compiles twice (minutes each)."""
    import re

    from torch._inductor.utils import run_and_get_code
    from torch.utils._python_dispatch import _disable_current_modes

    from optlayers.cone.interior import solver

    A, b, c, *_ = random_program(spec, n, batch=batch, seed=0)
    parts = tuple(solver.parts_of(spec))
    program, step_parts = solver._setup(A, b, c, None, spec, parts, workspace=False)
    traced = torch.compile(solver._solved, fullgraph=True, dynamic=False)
    _, code = run_and_get_code(traced, program, step_parts, parts, solver.ConeIPMSettings(compiled=True))
    body = re.search(r"^def while_loop_body_graph_0\(.*?(?=^def |^class )", code[-1], re.M | re.S).group(0)
    launches = _launches("def call(" + body)
    calls: list[str] = []
    real = solver.compiled

    def counted(fn: Callable, device_type: str, graphs: bool = False) -> Callable:
        compiled_fn = real(fn, device_type, graphs)

        def run(*args: object, **kwargs: object) -> object:
            calls.append(fn.__qualname__)
            with _disable_current_modes():  # what the compiled call runs is not counted
                return compiled_fn(*args, **kwargs)
        return run

    result: dict[str, object] = {f"iteration_{key}": value for key, value in launches.items()}
    solver.compiled = counted
    try:
        for name, options in (("method", {"refine_steps": 0}), ("forward", {})):
            solve = lambda: solve_cone(A, b, c, spec, solver="ipm", compile=True, on_failure="ignore", **options)  # noqa: E731
            solve()  # compiles (the refinement's own constants are made once, as in ``cone_counts``)
            calls.clear()
            counter = count(solve)
            result.update({f"{name}_compiled_calls": len(calls), f"{name}_outside_kernels": counter.kernel_count,
                           f"{name}_outside_syncs": counter.sync_count})
    finally:
        solver.compiled = real
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--json", type=Path, help="write the counts here")
    parser.add_argument("--compiled", action="store_true", help="also count the compiled path's launches (compiles)")
    parser.add_argument("--phases", action="store_true", help="also print where the QP's kernels go, by phase")
    parser.add_argument("--cpu-schedule", action="store_true",
                        help="count what the CPU dispatches on its own schedule, not a GPU's (see CPU_SCHEDULE)")
    args = parser.parse_args(argv)
    global CPU_SCHEDULE
    CPU_SCHEDULE = args.cpu_schedule
    torch.set_num_threads(1)  # one slice: the counts of the whole batch (1 is the safe setting, see README)
    rows = [qp_counts(args.batch, args.n, args.n, 0), qp_counts(args.batch, args.n, args.n, args.n // 2)]
    header = ("| batch | n | k | m | iterations | kernels / iteration | views / iteration | forward kernels | forward syncs "
              "| backward kernels | backward syncs |")
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in rows:
        print(f"| {r.batch} | {r.n} | {r.n_ineq} | {r.n_eq} | {r.iterations} | {r.kernels_per_iteration:.0f} | "
              f"{r.views_per_iteration:.0f} | "
              f"{r.forward_kernels} | {r.forward_syncs} | {r.backward_kernels} | {r.backward_syncs} |")
    if args.phases:
        for r in rows:
            per_iteration, forward = qp_phases(r.batch, r.n, r.n_ineq, r.n_eq)
            _phase_table(f"phase of an iteration (k = {r.n_ineq}, m = {r.n_eq})", per_iteration, 1)
            _phase_table(f"phase of a forward (k = {r.n_ineq}, m = {r.n_eq})", forward)
    cone = cone_counts(args.batch)
    print(f"\ncone programs (solver='ipm', all five cones), batch {cone.batch}, m = {cone.m}, n = {cone.n}: "
          f"{cone.kernels_per_iteration:.0f} kernels per iteration; forward {cone.forward_kernels} kernels, "
          f"{cone.forward_syncs} syncs; adjoint {cone.backward_kernels} kernels, {cone.backward_syncs} syncs")
    result = {"qp": [asdict(r) for r in rows], "cone": asdict(cone)}
    if args.compiled:
        result["qp_compiled"] = [compiled_launches(r.batch, r.n, r.n_ineq, r.n_eq) for r in rows]
        for r, launches in zip(rows, result["qp_compiled"]):
            print(f"compiled QP iteration (k = {r.n_ineq}, m = {r.n_eq}): {launches['total']} launches "
                  f"({launches['fused']} fused kernels, {launches['library']} library calls; "
                  f"{launches['total_skipped']} where the refinement's further steps are skipped); backward "
                  f"{launches['backward_total']} ({launches['backward_fused']} fused, {launches['backward_library']} library; "
                  f"{launches['backward_total_skipped']} skipped); backward of a batch in chunks, its factorisation "
                  f"included, {launches['factorising_backward_total']} ({launches['factorising_backward_fused']} fused, "
                  f"{launches['factorising_backward_library']} library)")
        result["cone_compiled"] = cone = compiled_cone_counts(args.batch)
        print(f"compiled cone iteration: {cone['iteration_total']} launches ({cone['iteration_fused']} fused kernels, "
              f"{cone['iteration_library']} library calls); forward without / with the refinement: "
              f"{cone['method_compiled_calls']} / {cone['forward_compiled_calls']} compiled calls, "
              f"{cone['method_outside_kernels']} / {cone['forward_outside_kernels']} aten operations and "
              f"{cone['method_outside_syncs']} / {cone['forward_outside_syncs']} syncs outside them")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
