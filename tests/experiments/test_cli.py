"""The command line: bad options end with exit status 2 and a message naming the option; tiny runs end to end."""
import json

import numpy as np
import pytest

from optlayers import cli
from optlayers.experiments import common, mnist
from optlayers.experiments.idx import write_idx


def _usage_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("option,value,expected", [
    ("--epochs", "-1", "expected a positive integer, got '-1'"),
    ("--epochs", "two", "expected a positive integer, got 'two'"),
    ("--batch-size", "0", "expected a positive integer, got '0'"),
    ("--lr", "nan", "expected a positive finite number, got 'nan'"),
    ("--seed", "-3", "expected an integer >= 0, got '-3'"),
    ("--dtype", "float16", "invalid choice: 'float16'"),
])
def test_bad_numbers_and_choices_name_the_option(capsys, tmp_path, option, value, expected):
    err = _usage_error(capsys, ["experiment", "sudoku", option, value, "--out", str(tmp_path)])
    assert f"argument {option}" in err and expected in err


def test_unknown_experiment_lists_the_choices(capsys):
    err = _usage_error(capsys, ["experiment", "chess"])
    assert "invalid choice: 'chess'" in err and "sudoku" in err and "denoising" in err


@pytest.mark.parametrize("device,expected", [
    ("tpu", "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    ("gpu0", "--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu0'"),
])
def test_unknown_device(capsys, tmp_path, device, expected):
    err = _usage_error(capsys, ["experiment", "sudoku", "--device", device, "--out", str(tmp_path)])
    assert expected in err


def test_cuda_without_cuda(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    err = _usage_error(capsys, ["experiment", "denoising", "--device", "cuda", "--out", str(tmp_path)])
    assert "--device 'cuda' asks for CUDA" in err and "use --device cpu" in err


def test_resume_without_checkpoint(capsys, tmp_path):
    err = _usage_error(capsys, ["experiment", "hard-constraints", "--resume", "--out", str(tmp_path / "nothing")])
    assert "--resume: no checkpoint.pt under --out" in err and "drop --resume" in err


def test_data_dir_that_does_not_exist(capsys, tmp_path):
    err = _usage_error(capsys, ["experiment", "mnist", "--data-dir", str(tmp_path / "absent"), "--out", str(tmp_path / "o")])
    assert "--data-dir" in err and "is not a directory" in err


def test_data_dir_missing_files(capsys, tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    err = _usage_error(capsys, ["experiment", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "has no train-labels-idx1-ubyte or train-labels-idx1-ubyte.gz" in err


def test_data_dir_with_a_corrupt_file(capsys, tmp_path):
    for stem in mnist.IDX_FILES.values():
        write_idx(tmp_path / stem, np.zeros((2, 28, 28) if "images" in stem else (2,), np.uint8))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"not idx")
    err = _usage_error(capsys, ["experiment", "mnist", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "--data-dir:" in err and "is not an IDX file" in err


def test_fashion_mnist_needs_data_dir(capsys, tmp_path):
    err = _usage_error(capsys, ["experiment", "mnist", "--dataset", "fashion-mnist", "--out", str(tmp_path)])
    assert "--dataset fashion-mnist needs --data-dir" in err


def test_hard_constraints_needs_three_hidden_constraints(capsys, tmp_path):
    err = _usage_error(capsys, ["experiment", "hard-constraints", "--n-true", "2", "--out", str(tmp_path)])
    assert "--n-true must be >= 3" in err


def test_existing_run_needs_resume(capsys, tmp_path):
    (tmp_path / "optnet").mkdir()
    common.save_checkpoint(tmp_path / "optnet" / common.CHECKPOINT_FILE, {"format": common.CHECKPOINT_FORMAT})
    err = _usage_error(capsys, ["experiment", "hard-constraints", "--epochs", "1", "--n-train", "4", "--n-test", "4",
                                "--no-progress", "--out", str(tmp_path)])
    assert "exists; pass --resume to continue it" in err


def test_cli_run_writes_outputs_and_resumes(capsys, tmp_path):
    argv = ["experiment", "hard-constraints", "--n-train", "40", "--n-test", "20", "--batch-size", "20",
            "--no-progress", "--out", str(tmp_path)]
    assert cli.main([*argv, "--epochs", "1"]) == 0
    first = json.loads(capsys.readouterr().out)
    for name in ("results.json", "constraints.png", "loss.png", "optnet/metrics.json", "optnet/metrics.csv",
                 "optnet/checkpoint.pt"):
        assert (tmp_path / name).is_file(), name
    assert cli.main([*argv, "--epochs", "2", "--resume"]) == 0
    second = json.loads(capsys.readouterr().out)
    history = json.loads((tmp_path / "optnet" / common.METRICS_JSON).read_text())
    assert [row["epoch"] for row in history] == [0, 1, 2]
    assert second["initial_test_mse"] == first["initial_test_mse"] and second["epochs"] == 2
    err = _usage_error(capsys, [*argv, "--epochs", "3", "--resume", "--lr", "0.01"])
    assert "lr: checkpoint 0.05, this run 0.01" in err
    err = _usage_error(capsys, [*argv, "--epochs", "3", "--resume", "--dtype", "float32"])
    assert "dtype: checkpoint 'float64', this run 'float32'" in err
    # fewer epochs than the checkpoint holds: refused (it had trained nothing and labelled the
    # results with the smaller count)
    err = _usage_error(capsys, [*argv, "--epochs", "1", "--resume"])
    assert "holds 2 trained epochs, more than --epochs 1; resume with --epochs 2 or more" in err
    assert json.loads((tmp_path / "results.json").read_text())["epochs"] == 2


def test_mnist_from_idx_files_the_test_writes(capsys, tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "data").mkdir()
    for stem in mnist.IDX_FILES.values():
        n = 30 if stem.startswith("train") else 10
        array = rng.integers(0, 256, (n, 28, 28)) if "images" in stem else rng.integers(0, 10, n)
        write_idx(tmp_path / "data" / f"{stem}.gz", array.astype(np.uint8))
    argv = ["experiment", "mnist", "--data-dir", str(tmp_path / "data"), "--dataset", "fashion-mnist", "--epochs", "1",
            "--batch-size", "10", "--no-progress", "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    results = json.loads(capsys.readouterr().out)
    assert results["source"] == "idx" and results["n_train"] == 30 and results["n_test"] == 10
    # an accuracy over the 10 test digits, the last epoch's row of the run's own metrics
    accuracy = results["optnet"]["test_accuracy"]
    assert round(accuracy * 10) == pytest.approx(accuracy * 10) and (tmp_path / "out" / "curves.png").is_file()
    history = json.loads((tmp_path / "out" / "optnet" / "metrics.json").read_text())
    assert accuracy == pytest.approx(1.0 - history[-1]["test_error"])


def test_denoising_methods_from_separate_commands_make_one_record_and_figures(capsys, tmp_path, monkeypatch):
    """Two commands sharing --out with their own batch sizes: the report reads each method's own settings.
    (TV's λ searched over two values, not --quick's five: each is a QP solve, and the search is not what is checked.)"""
    from optlayers.experiments import denoising, report

    monkeypatch.setattr(denoising, "QUICK_LAMBDA_GRID", denoising.QUICK_LAMBDA_GRID[1:3])
    out = tmp_path / "run"
    argv = ["experiment", "denoising", "--quick", "--n-train", "3", "--n-test", "3", "--epochs", "1", "--no-progress",
            "--out", str(out)]
    assert cli.main([*argv, "--methods", "tv", "fc", "optnet-tv-init", "--batch-size", "3"]) == 0
    assert cli.main([*argv, "--methods", "optnet-learn-d", "--batch-size", "2", "--d-penalty", "0.01"]) == 0
    capsys.readouterr()
    record = report.results_record("denoising", out, "two commands", "abc")
    assert record["settings"]["optnet_learn_d"]["batch_size"] == 2 and record["settings"]["fc"]["batch_size"] == 3
    assert record["settings"]["optnet_learn_d"]["d_penalty"] == 0.01
    history = json.loads((out / "optnet-tv-init" / common.METRICS_JSON).read_text())
    assert record["measured"]["optnet_fine_tuned"] == history[-1]["test_mse"]
    written = report.main(["figures", str(out), "--out", str(tmp_path / "figures")])
    assert written == 0
    for name in ("denoising-example.png", "denoising-learned-d.png", "denoising-curves.png", "denoising-fine-tuned.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 0


def test_out_naming_a_file_is_refused_up_front(capsys, tmp_path):
    """--out naming a file had failed with NotADirectoryError after the first evaluation."""
    afile = tmp_path / "afile"
    afile.write_text("")
    err = _usage_error(capsys, ["experiment", "hard-constraints", "--epochs", "1", "--out", str(afile)])
    assert f"--out must be a folder (made if missing), got the file {afile}" in err


def test_mnist_says_when_it_has_fewer_images_than_asked_for(capsys, tmp_path, monkeypatch):
    """Without --data-dir the bundled digits hold 4,000 / 1,000 images: asking for more trained on
    those without a word at the time (results.json recorded it)."""
    rng = np.random.default_rng(0)
    few = (rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 10, 20), rng.integers(0, 256, (10, 28, 28)),
           rng.integers(0, 10, 10))
    monkeypatch.setattr(mnist, "load_data", lambda *args: few)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(common, "fit", stop)
    with pytest.raises(Stop):
        cli.main(["experiment", "mnist", "--n-train", "30", "--n-test", "5", "--no-progress", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert ("mnist: 30 training and 5 test images asked for, 20 and 10 there (the bundled digits; pass --data-dir "
            "for the full set): using those") in err


@pytest.mark.parametrize("name", ["hard-constraints", "mnist", "denoising", "sudoku"])
def test_help_gives_each_option_its_defaults(capsys, name):
    """The sizes give the experiment's full and --quick defaults, the other options their own."""
    import importlib

    from optlayers.experiments import EXPERIMENTS

    module = importlib.import_module(EXPERIMENTS[name])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["experiment", name, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert f"training epochs (default: {module.FULL['epochs']}; with --quick: {module.QUICK['epochs']})" in text
    assert "(default: 0)" in text and "(default: float64)" in text
    assert text.count("(default: runs/") == 1  # --out's own text, not doubled


@pytest.mark.parametrize("name,option,value", [("mnist", "--models", "optnet"), ("sudoku", "--models", "conv"),
                                               ("denoising", "--methods", "fc")])
def test_a_model_named_twice_is_refused_up_front(capsys, tmp_path, name, option, value):
    err = _usage_error(capsys, ["experiment", name, option, value, value, "--out", str(tmp_path)])
    assert f"argument {option}: {value} given more than once" in err
    assert not any(tmp_path.iterdir())  # nothing trained


def test_quick_9x9_sudoku_takes_its_own_smoke_sizes():
    from optlayers.experiments import sudoku
    parser = cli.build_parser()
    quick_4x4 = sudoku.sizes(parser.parse_args(["experiment", "sudoku", "--quick"]))
    quick_9x9 = sudoku.sizes(parser.parse_args(["experiment", "sudoku", "--quick", "--box", "3"]))
    assert quick_4x4 == tuple(sudoku.QUICK[k] for k in ("epochs", "batch_size", "n_train", "n_test", "conv_width"))
    assert quick_9x9 == tuple(sudoku.QUICK_9X9[k] for k in ("epochs", "batch_size", "n_train", "n_test", "conv_width"))
    assert sudoku.sizes(parser.parse_args(["experiment", "sudoku", "--quick", "--box", "3", "--epochs", "5"]))[0] == 5
