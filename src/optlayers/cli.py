"""Command line: ``optlayers demo`` and ``optlayers experiment NAME [options]``."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with defaults, for options only and where the default says something: not
    None or False, and not already said in the help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action)


def _sizes_in_help(parser: argparse.ArgumentParser, full: dict, quick: dict) -> None:
    """Append to the help of each option that an experiment sizes (left at None, then taken from
    its ``FULL`` or ``QUICK``) both of its defaults; None there is the whole data set."""
    for action in parser._actions:
        if action.dest in full and action.default is None and "default" not in (action.help or ""):
            shown = ["all" if v is None else v for v in (full[action.dest], quick[action.dest])]
            action.help = f"{action.help} (default: {shown[0]}; with --quick: {shown[1]})"


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
        sub = names.add_parser(name, help=module.DESCRIPTION, description=module.DESCRIPTION, formatter_class=_DefaultsShown)
        module.add_arguments(sub)
        _sizes_in_help(sub, module.FULL, module.QUICK)
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
