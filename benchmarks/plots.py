"""PNG figures in the style of the OptNet paper's Figures 1 and 2 (matplotlib, Agg backend)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402

BAR_WIDTH = 0.8
LABELS = {"optlayers": "optlayers (batched)", "optlayers-serial": "optlayers (serialized: one problem per call)"}
"""Legend names where the solver's short name does not say enough (the paper's Figure 2 has both of ours)."""
HATCHES = {"optlayers-serial": "//"}
PHASE_STYLES = {"forward": "-", "backward": "--"}


def _timed(rows: list[dict], figure: str) -> list[dict]:
    return [row for row in rows if row["figure"] == figure and row["status"] == "ok"]


def _error_bars(stats: list[dict]) -> np.ndarray:
    """IQR as asymmetric error bars around the median."""
    return np.array([[s["median"] - s["q25"] for s in stats], [s["q75"] - s["median"] for s in stats]])


def _lines(ax, rows: list[dict], x_key: str, phases: tuple[str, ...]) -> None:
    for solver in dict.fromkeys(row["solver"] for row in rows):
        mine = sorted((row for row in rows if row["solver"] == solver), key=lambda row: row[x_key])
        for phase in phases:
            stats = [row["timings"][phase] for row in mine if phase in row["timings"]]
            if stats:
                xs = [row[x_key] for row in mine if phase in row["timings"]]
                ax.errorbar(xs, [s["median"] for s in stats], yerr=_error_bars(stats), capsize=3,
                            linestyle=PHASE_STYLES.get(phase, "-"), marker="o", label=f"{solver} {phase}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylabel("seconds per batch (median, IQR)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")


def figure1(rows: list[dict], path: Path) -> None:
    """Forward and backward time against n at batch 128, one panel per dtype (paper Fig. 1)."""
    dtypes = list(dict.fromkeys(row["dtype"] for row in rows))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        _lines(ax, [row for row in rows if row["dtype"] == dtype], "n", ("forward", "backward"))
        ax.set_xlabel("number of variables n (= inequalities)")
        ax.set_title(f"QP layer vs linear layer, batch {rows[0]['batch']}, {dtype}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure2(rows: list[dict], path: Path) -> None:
    """Forward time per batch size for every solver, grouped bars on a log axis (paper Fig. 2)."""
    batches = sorted({row["batch"] for row in rows})
    solvers = list(dict.fromkeys(row["solver"] for row in rows))
    width = BAR_WIDTH / len(solvers)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, solver in enumerate(solvers):
        by_batch = {row["batch"]: row["timings"]["forward"] for row in rows if row["solver"] == solver}
        xs = [i + (k - (len(solvers) - 1) / 2) * width for i, b in enumerate(batches) if b in by_batch]
        stats = [by_batch[b] for b in batches if b in by_batch]
        ax.bar(xs, [s["median"] for s in stats], width, yerr=_error_bars(stats), capsize=2,
               label=LABELS.get(solver, solver), hatch=HATCHES.get(solver))
    ax.set_xticks(range(len(batches)), [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_yscale("log")
    ax.set_ylabel("forward seconds per batch (median, IQR)")
    ax.set_title(f"n = {rows[0]['n']}, {rows[0]['n_ineq']} inequalities, {rows[0]['dtype']}")
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def figure_batch(rows: list[dict], path: Path) -> None:
    """Forward + backward time against batch size (the large-batch settings)."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    _lines(ax, rows, "batch", ("total",))
    ax.set_xlabel("batch size")
    ax.set_title(f"n = {rows[0]['n']}, {rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_figures(rows: list[dict], out: Path) -> list[Path]:
    """Write the figures whose settings were run; returns their paths."""
    written = []
    for figure, draw in (("fig1", figure1), ("fig2", figure2), ("batch", figure_batch)):
        timed = _timed(rows, figure)
        if figure == "fig2":
            timed = [row for row in timed if row["dtype"] == timed[0]["dtype"]] if timed else []
        if timed:
            draw(timed, out / f"{figure}.png")
            written.append(out / f"{figure}.png")
    return written
