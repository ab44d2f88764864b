"""Results as data: ``docs/results/<experiment>.json`` from a run's ``results.json``, and Markdown rows from those files.

    python -m optlayers.experiments.report write denoising RUN_DIR --command "..." --commit HASH [--out FILE]
    python -m optlayers.experiments.report table [--results-dir docs/results]
    python -m optlayers.experiments.report figures RUN_DIR [--out docs/figures]    (denoising)

Each file is ``{"command", "commit", "date", "settings": {...}, "measured": {...}, "paper": {...}}``;
``measured`` holds the final-epoch numbers under fixed keys (see ``MEASURED``), ``paper`` the OptNet paper's
values where it reports one. A denoising run is read from its per-method folders (``tv/results.json``,
``<method>/metrics.json`` and the checkpoint's option fingerprint), so its methods may come from separate commands
sharing one ``--out``.
"""
from __future__ import annotations

import argparse
import datetime
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

PAPER = {
    "denoising": {"tv": 16.5, "fc": 29.8, "optnet_learn_d": 53.3, "optnet_fine_tuned": 14.4},
    "sudoku": {"optnet_test_error": None, "conv_test_error": None, "conv_train_error": None,
               "note": "Figure 5 only (no table): OptNet's test error falls to about 0, the conv net's training "
                       "error falls well under its test error"},
    "mnist": {"fc_test_accuracy": None, "optnet_test_accuracy": None,
              "note": "no MNIST numbers in the paper; the aim is an OptNet head no worse than the FC net"},
}
"""The paper's Table 1 (test MSE) and what it says where it gives no number."""

DENOISING_METHODS = {"fc": "fc", "optnet-learn-d": "optnet_learn_d", "optnet-tv-init": "optnet_fine_tuned"}


def _denoising(run_dir: Path) -> tuple[dict, dict]:
    """From the per-method folders of ``run_dir``: the methods may have been trained by separate commands (in
    parallel, with their own batch size), so each one's settings come from its checkpoint's fingerprint."""
    from optlayers.experiments import common

    tv = json.loads((run_dir / "tv" / "results.json").read_text())
    results = json.loads((run_dir / "results.json").read_text())
    settings = {"n_train": tv["data"]["n_train"], "n_test": tv["data"]["n_test"],
                "noisy_test_mse": results["noisy_test_mse"], "tv_lambda": tv["lambda"]}
    measured = {"tv": tv["test_mse"]}
    for method, key in DENOISING_METHODS.items():
        if not (run_dir / method / common.METRICS_JSON).is_file():
            continue
        history = json.loads((run_dir / method / common.METRICS_JSON).read_text())
        fingerprint = common.load_checkpoint(run_dir / method / common.CHECKPOINT_FILE)["fingerprint"]
        measured[key] = history[-1]["test_mse"]
        settings[key] = {**{k: v for k, v in fingerprint.items() if k not in ("name", "n_train")},
                         "epochs": history[-1]["epoch"], "train_mse": history[-1]["train_mse"],
                         "best_test_mse": min(row["test_mse"] for row in history)}
    return settings, measured


def _sudoku(results: Mapping[str, Any]) -> tuple[dict, dict]:
    settings = {k: results[k] for k in ("n_train", "n_test", "epochs", "board")}
    settings.update({k: results[k] for k in ("batch_size", "conv_width") if k in results})
    measured = {}
    if "optnet" in results:
        measured["optnet_test_error"] = results["optnet"]["test_error"]
        measured["optnet_train_error"] = results["optnet"]["train_error"]
    if "conv" in results:
        measured["conv_test_error"] = results["conv"]["test_error"]
        measured["conv_train_error"] = results["conv"]["train_error"]
    return settings, measured


def _mnist(results: Mapping[str, Any]) -> tuple[dict, dict]:
    settings = {k: results[k] for k in ("n_train", "n_test", "epochs", "dataset", "source")}
    settings.update({k: results[k] for k in ("batch_size",) if k in results})
    measured = {f"{model}_test_accuracy": results[model]["test_accuracy"] for model in ("fc", "optnet") if model in results}
    return settings, measured


EXTRACT: dict[str, Callable[[Any], tuple[dict, dict]]] = {
    "denoising": _denoising, "sudoku": _sudoku, "mnist": _mnist,
}
MEASURED = {
    "denoising": ("tv", "fc", "optnet_learn_d", "optnet_fine_tuned"),
    "sudoku": ("optnet_test_error", "conv_test_error", "conv_train_error"),
    "mnist": ("fc_test_accuracy", "optnet_test_accuracy"),
}
"""The keys every results file must have in ``measured``."""


def _model_options(run_dir: Path) -> dict[str, Any]:
    """Each model's options (batch size, learning rate, dtype, ...) from its checkpoint's fingerprint,
    and the epochs it was trained (from its metrics)."""
    from optlayers.experiments import common

    options = {}
    for path in sorted(run_dir.glob(f"*/{common.CHECKPOINT_FILE}")):
        model = {k: v for k, v in common.load_checkpoint(path)["fingerprint"].items() if k != "name"}
        metrics = path.parent / common.METRICS_JSON
        if metrics.is_file():
            model["epochs"] = json.loads(metrics.read_text())[-1]["epoch"]
        options[path.parent.name] = model
    return options


def _with_model_folders(results: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """``results`` with the final epoch of every model folder of ``run_dir`` that it lacks: models may
    be trained into the same --out by separate commands (with their own dtype or width), and
    results.json names only those of the last command."""
    from optlayers.experiments import common

    merged = dict(results)
    for path in sorted(run_dir.glob(f"*/{common.METRICS_JSON}")):
        merged.setdefault(path.parent.name, json.loads(path.read_text())[-1])
    return merged


def results_record(experiment: str, run_dir: Path, command: str, commit: str) -> dict[str, Any]:
    """The record of ``run_dir/results.json`` (written by ``optlayers experiment``), dated by that file."""
    if experiment not in EXTRACT:
        raise ValueError(f"experiment must be one of {sorted(EXTRACT)}, got {experiment!r}")
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise ValueError(f"run_dir must hold results.json of a finished run, got {run_dir} without it")
    results = json.loads(path.read_text())
    if results.get("experiment") != experiment:
        raise ValueError(f"{path} is a {results.get('experiment')!r} run, expected {experiment!r}")
    settings, measured = EXTRACT[experiment](Path(run_dir) if experiment == "denoising"
                                             else _with_model_folders(results, Path(run_dir)))
    if experiment != "denoising":
        settings["models"] = _model_options(Path(run_dir))
    missing = [k for k in MEASURED[experiment] if k not in measured]
    if missing:
        raise ValueError(f"{path} lacks {missing}: run every model of the experiment into the same --out")
    newest = max(f.stat().st_mtime for f in Path(run_dir).rglob("*.json"))
    date = datetime.datetime.fromtimestamp(newest, datetime.timezone.utc).date().isoformat()
    return {"command": command, "commit": commit, "date": date, "settings": settings, "measured": measured,
            "paper": PAPER[experiment]}


def _number(value: Any, percent: bool) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f} %" if percent else f"{value:.2f}"


def markdown_rows(records: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """``| experiment | metric | paper | measured | n_train / n_test |`` rows, one per measured key."""
    rows = []
    for experiment, record in records.items():
        sizes = f"{record['settings']['n_train']:,} / {record['settings']['n_test']:,}"
        for key in MEASURED[experiment]:
            percent = experiment != "denoising"
            paper = record["paper"].get(key)
            rows.append(f"| {experiment} | `{key}` | {_number(paper, percent)} | "
                        f"**{_number(record['measured'][key], percent)}** | {sizes} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optlayers.experiments.report", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    write = commands.add_parser("write", help="write docs/results/<experiment>.json from a run")
    write.add_argument("experiment", choices=sorted(EXTRACT))
    write.add_argument("run_dir", type=Path)
    write.add_argument("--command", dest="run_command", required=True, help="the command(s) that produced the run")
    write.add_argument("--commit", required=True, help="the commit whose code produced the run")
    write.add_argument("--out", type=Path, default=None, help="default: docs/results/<experiment>.json")
    figures = commands.add_parser("figures", help="denoising figures (one test signal, learned D) from a run's checkpoints")
    figures.add_argument("run_dir", type=Path)
    figures.add_argument("--out", type=Path, default=Path("docs/figures"))
    table = commands.add_parser("table", help="Markdown table rows from the results files")
    table.add_argument("--results-dir", type=Path, default=Path("docs/results"))
    args = parser.parse_args(argv)
    if args.command == "write":
        try:
            record = results_record(args.experiment, args.run_dir, args.run_command, args.commit)
        except ValueError as error:
            parser.error(str(error))
        out = args.out or Path("docs/results") / f"{args.experiment}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {out}")
    elif args.command == "figures":
        from optlayers.experiments import denoising

        for path in denoising.plot_run(args.run_dir, args.out):
            print(f"wrote {path}")
    else:
        records = {name: json.loads((args.results_dir / f"{name}.json").read_text())
                   for name in EXTRACT if (args.results_dir / f"{name}.json").is_file()}
        if not records:  # a relative default read from elsewhere than the repository's root, say
            parser.error(f"no results in {args.results_dir} (none of {', '.join(f'{name}.json' for name in sorted(EXTRACT))}); "
                         "run from the repository's root or give --results-dir")
        print("\n".join(["| experiment | metric | paper | measured | training / test examples |",
                         "|---|---|---|---|---|", *markdown_rows(records)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
