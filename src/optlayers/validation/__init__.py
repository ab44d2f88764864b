"""Checks of user options and data, at the door: every message names the argument, what it must
be and what was given. The one place where the public entry points' inputs are checked; the
entry points prepare what passed (broadcasting, flattening, canonical cone data) where they are.

- ``options``: the primitives (integers, numbers, booleans, choices, fill values, tolerances).
- ``qp``: options of ``solve_qp``, ``QPFunction`` and the OptNet layers; the QP data (types,
  dtypes, devices, shapes, finite values, symmetric Q; Q positive definite where asked).
- ``cone``: options of ``solve_cone`` and ``ConeLayer``, with each solver's ``solver_options``;
  the cone program's data (types, dtypes, devices, shapes, cone sizes, finite values).

Three modules rather than one: together they are nearly 500 lines, and the primitives must import
nothing of the package, since the settings that use them (``qp.relax.Relaxation``) are imported by
the QP and cone checks. This ``__init__`` imports none of them, so that importing the primitives
never imports a solver.
"""
