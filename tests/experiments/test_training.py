import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from optlayers.experiments import common
from tiny_training import train_tiny


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_tiny_training_lowers_the_loss(tmp_path):
    _, history = train_tiny(tmp_path, epochs=3)
    assert history[-1]["test_loss"] < 0.5 * history[0]["test_loss"]
    assert [r["epoch"] for r in history] == [0, 1, 2, 3]
    rows = json.loads((tmp_path / common.METRICS_JSON).read_text())
    assert rows[-1]["train_loss"] == history[-1]["train_loss"]
    assert (tmp_path / common.METRICS_CSV).read_text().splitlines()[0].startswith("epoch,")


def test_resume_continues_exactly(tmp_path):
    straight, straight_history = train_tiny(tmp_path / "a", epochs=3)
    train_tiny(tmp_path / "b", epochs=1)
    torch.manual_seed(1234)  # the resumed run must not depend on the RNG state it starts with
    resumed, resumed_history = train_tiny(tmp_path / "b", epochs=3, resume=True)
    for key, value in _params(straight).items():
        torch.testing.assert_close(_params(resumed)[key], value, rtol=0, atol=0)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(resumed_history) == drop(straight_history)


def test_checkpoint_loads_with_weights_only(tmp_path):
    train_tiny(tmp_path, epochs=1)
    state = torch.load(tmp_path / common.CHECKPOINT_FILE, weights_only=True)
    assert state["epoch"] == 1 and set(state) >= {"model", "optimizer", "rng", "history"}
    assert not list(tmp_path.glob("*.tmp")), "the atomic write must not leave temporary files"


def test_existing_checkpoint_needs_resume_and_same_options(tmp_path):
    train_tiny(tmp_path, epochs=1)
    with pytest.raises(common.UsageError, match="pass --resume"):
        train_tiny(tmp_path, epochs=2)
    with pytest.raises(common.UsageError, match="batch_size: checkpoint 16, this run 8"):
        train_tiny(tmp_path, epochs=2, resume=True, batch_size=8)


@pytest.mark.parametrize(("option", "value", "message"), [
    ("lr", 0.01, "lr: checkpoint 0.05, this run 0.01"),
    ("fixed_q", 2.0, "fixed_q: checkpoint 1.0, this run 2.0"),
])
def test_resume_refuses_a_changed_option_and_names_it(tmp_path, option, value, message):
    train_tiny(tmp_path, epochs=1)
    with pytest.raises(common.UsageError, match=message):
        train_tiny(tmp_path, epochs=2, resume=True, **{option: value})


def test_run_options_keep_what_changes_results():
    args = argparse.Namespace(out=Path("x"), resume=True, no_progress=True, epochs=3, device="cpu", batch_size=5,
                              n_train=10, seed=0, lr=None, dtype="float32", conv_width=64, models=["a"], quick=False)
    assert common.run_options(args, lr=0.1) == {"conv_width": 64, "dtype": "float32", "lr": 0.1, "quick": False}


_KILLED_CHILD = textwrap.dedent("""
    import sys, time
    import torch
    sys.path.insert(0, {tests!r})
    import tiny_training

    steps = 0

    def per_sample(model, batch):
        global steps
        steps += torch.is_grad_enabled()  # count training steps, not evaluations
        if steps == {kill_at} and torch.is_grad_enabled():  # in the middle of epoch 2: say so, then wait to be killed
            open({marker!r}, "w").close()
            time.sleep(120)
        return tiny_training.per_sample(model, batch)

    tiny_training.train_tiny({out!r}, epochs=3, loss_fn=per_sample)
""")


def test_resume_after_sigkill_mid_epoch_ends_as_an_uninterrupted_run(tmp_path):
    straight, straight_history = train_tiny(tmp_path / "straight", epochs=3)
    out, marker = tmp_path / "killed", tmp_path / "mid-epoch-2"
    batches_per_epoch = 3  # 48 training examples in batches of 16
    code = _KILLED_CHILD.format(tests=str(Path(__file__).parent), out=str(out), marker=str(marker),
                                kill_at=batches_per_epoch + 2)
    child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, f"the child run ended early with status {child.returncode}"
            assert time.monotonic() < deadline, "the child run never reached epoch 2"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert torch.load(out / common.CHECKPOINT_FILE, weights_only=True)["epoch"] == 1
    resumed, resumed_history = train_tiny(out, epochs=3, resume=True)
    for key, value in _params(straight).items():
        torch.testing.assert_close(_params(resumed)[key], value, rtol=0, atol=0)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(resumed_history) == drop(straight_history)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "f.json"
    common.write_json(path, {"a": 1})

    def fail(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        common.atomic_write_bytes(path, fail)
    assert json.loads(path.read_text()) == {"a": 1} and len(list(tmp_path.iterdir())) == 1
    (tmp_path / "plain").write_bytes(b"")
    assert path.stat().st_mode == (tmp_path / "plain").stat().st_mode, "same permissions as a file open() creates"


def test_mask_unsolved_drops_nan_rows_from_loss_and_gradient():
    pred = torch.tensor([[1.0, 2.0], [float("nan"), float("nan")], [0.5, 0.0]], requires_grad=True)
    target = torch.zeros(3, 2)
    masked, unsolved = common.mask_unsolved(pred, target)
    assert unsolved.tolist() == [0.0, 1.0, 0.0]
    (masked - target).square().sum().backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[1].abs().sum() == 0
    torch.testing.assert_close(pred.grad[[0, 2]], 2 * pred.detach()[[0, 2]])


def test_mnist_loss_masks_an_unsolved_qp():
    from optlayers.experiments import mnist

    torch.manual_seed(0)
    model = mnist.Classifier(True, 20, dtype=torch.float64)
    solve = model.head.forward
    model.head.forward = lambda p: torch.cat([solve(p[:2]), torch.full_like(p[2:3], float("nan")), solve(p[3:])])
    out = mnist._per_sample(model, [torch.randn(5, 20, dtype=torch.float64), torch.arange(5)])
    assert out["unsolved"].tolist() == [0.0, 0.0, 1.0, 0.0, 0.0] and out["loss"][2] == 0 and out["error"][2] == 1
    out["loss"].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_inexact_derivatives_are_counted_per_epoch_and_said_once(capsys):
    """A training epoch's ``InexactDerivativeWarning``s (one per batch whose derivative is inexact)
    become one line on stderr; other warnings are shown as they come."""
    import warnings

    from optlayers import InexactDerivativeWarning
    from optlayers.experiments.common import counted_inexact_derivatives

    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        with counted_inexact_derivatives("demo epoch 1", 5) as counted:
            for i in range(3):
                warnings.warn(f"the derivative at elements {i} is inexact", InexactDerivativeWarning)
            warnings.warn("something else", UserWarning)
        with counted_inexact_derivatives("demo epoch 2", 5):
            pass
        warnings.warn("the derivative of the QP is inexact", InexactDerivativeWarning)  # outside: shown again
    assert counted.count == 3
    assert [str(w.message) for w in shown] == ["something else", "the derivative of the QP is inexact"]
    err = capsys.readouterr().err
    assert err.count("the derivative was inexact") == 1
    assert "demo epoch 1: the derivative was inexact in 3 of 5 training batches" in err
    assert "the first: the derivative at elements 0 is inexact" in err


def test_an_inexact_derivatives_explanation_is_said_once_per_run(capsys):
    import warnings

    from optlayers import InexactDerivativeWarning
    from optlayers.experiments.common import counted_inexact_derivatives

    explained: set[str] = set()
    messages = ["the derivative at elements 0 is inexact: a row (ratio 0.5). Why it is so.",
                "the derivative at elements 3 is inexact: a row (ratio 0.7). Why it is so.",
                "the derivative at elements 1 is inexact: another reason (5e9). Why that one is so."]
    for epoch, message in enumerate(messages, 1):
        with counted_inexact_derivatives(f"epoch {epoch}", 4, explained=explained):
            warnings.warn(message, InexactDerivativeWarning)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith("the first: the derivative at elements 0 is inexact: a row (ratio 0.5). Why it is so.)")
    assert lines[1].endswith("the first: the derivative at elements 3 is inexact: a row (ratio 0.7); explained above)")
    assert lines[2].endswith("elements 1 is inexact: another reason (5e9). Why that one is so.)")  # another explanation
