"""The OptNet paper's experiments, run by ``optlayers experiment NAME``.

Thin clients of the library: they import :mod:`optlayers`, the library never imports them.
Each module exposes ``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args, ctx, device)``.
"""

EXPERIMENTS = {
    "hard-constraints": "optlayers.experiments.hard_constraints",
    "sudoku": "optlayers.experiments.sudoku",
    "denoising": "optlayers.experiments.denoising",
    "mnist": "optlayers.experiments.mnist",
}
"""Experiment name on the command line → module."""
