"""Command line: ``optlayers demo`` and ``optlayers experiment NAME [options]``."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    """The parser with one sub-parser per experiment (their modules are imported here, not their extras)."""
    from optlayers.experiments import EXPERIMENTS

    parser = argparse.ArgumentParser(prog="optlayers", description="Differentiable optimization layers for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("demo", help="solve and differentiate a small batch of QPs")
    experiment = commands.add_parser("experiment", help="run one of the OptNet paper's experiments")
    names = experiment.add_subparsers(dest="name", required=True, metavar="NAME")
    for name, module_name in EXPERIMENTS.items():
        module = importlib.import_module(module_name)
        sub = names.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION)
        module.add_arguments(sub)
        sub.set_defaults(module=module, subparser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``optlayers`` script; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from optlayers.demo import run_demo

        run_demo()
        return 0
    from optlayers.experiments.common import UsageError, check_resume, close_distributed, init_distributed

    try:
        check_resume(args.out, args.resume)
        ctx, device = init_distributed(args.device)
    except UsageError as error:
        args.subparser.error(str(error))
    try:
        results = args.module.run(args, ctx, device)
    except UsageError as error:
        args.subparser.error(str(error))
    finally:
        close_distributed(ctx)
    if ctx.is_main:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
