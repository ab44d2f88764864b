"""Checks of user options and data, at the door: every message names the argument, what it must
be and what was given. The one place where the public entry points' inputs are checked; the
entry points prepare what passed (broadcasting, flattening, canonical cone data) where they are.

- ``options``: the primitives (integers, numbers, booleans, choices, fill values, tolerances).
- ``qp``: options of ``solve_qp``, ``QPFunction`` and the OptNet layers; the QP data (types,
  dtypes, devices, shapes, finite values, symmetric Q; Q positive definite where asked).
- ``cone``: options of ``solve_cone`` and ``ConeLayer``, with each solver's ``solver_options``;
  the cone program's data (types, dtypes, devices, shapes, cone sizes, finite values).

Three modules rather than one: together they are over 500 lines, and the primitives must import
nothing of the package, since a setting that uses them (``qp.relax.Relaxation``) is imported by
the QP checks. This ``__init__`` imports none of them, so that importing the primitives never
imports a solver. Outside, and why: ``ConeSpec`` and ``ConeIPMSettings`` check their fields in
their own ``__post_init__`` (the cone checks import both); ``solve_cone`` checks ``warm_start``
against ``ConeSolution``, which it defines.
"""
