"""`pyro-nf vae` fails safe: one `pyro-nf: error: ...` line, a non-zero exit, no traceback,
and an existing checkpoint left byte for byte as it was."""

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_nf.cli import main
from pyro_nf.vae import FlowVAE, load_binarized_mnist
from pyro_nf.vae.checkpoint import FORMAT

NET = ["--flow", "planar", "--layers", "2", "--latent", "8", "--hidden", "32"]
NET += ["--flow-hidden", "16", "--batch-size", "50", "--eval-samples", "0", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-epoch run on 100 images, and the data file it was trained on."""
    root = tmp_path_factory.mktemp("trained")
    mnist = load_binarized_mnist()
    data = root / "tiny.npz"
    np.savez(data, train=mnist["train"][:100], valid=mnist["valid"][:10], test=mnist["test"][:10])
    torch.manual_seed(0)
    argv = ["vae", "train", *NET, "--epochs", "1", "--data", str(data), "--out", str(root / "run")]
    assert main(argv) == 0
    return root / "run", data


@pytest.fixture
def run(trained, tmp_path, capsys):
    """A fresh copy of the trained run; its checkpoint's bytes are checked after the test."""
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    before = (copy / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    yield copy
    assert (copy / "checkpoint.pt").read_bytes() == before


def _resume(run: Path, data: Path, *extra: str) -> list[str]:
    return ["vae", "train", *NET, "--data", str(data), "--out", str(run), "--resume", *extra]


def _fails(argv: list[str], message: str, capsys) -> str:
    """Run the CLI; assert a non-zero exit and exactly one error line matching `message`."""
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse's own rejections
        code = stop.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code not in (0, None), err
    assert len(lines) == 1 and lines[0].startswith("pyro-nf: error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in err and "weights_only" not in err
    return lines[0]


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if any training step runs."""

    def forward(self, x, **kwargs):
        raise AssertionError("a training step ran")

    monkeypatch.setattr(FlowVAE, "forward", forward)


# --- damaged checkpoints: read by `eval` and by `train --resume` ------------------------


def _damage(run: Path, how: str) -> None:
    path = run / "checkpoint.pt"
    good = path.read_bytes()
    damaged = {
        "garbage": b"this is not a checkpoint\n" * 40,
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "zero-filled": bytes(len(good)),
    }[how]
    path.write_bytes(damaged)


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty", "zero-filled"])
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_damaged_checkpoint(trained, tmp_path, capsys, how, command, no_training):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    _damage(run, how)
    before = (run / "checkpoint.pt").read_bytes()
    argv = ["vae", "eval", "--out", str(run)] if command == "eval" else _resume(run, trained[1])
    _fails(argv, r"checkpoint.pt is not a readable pyro-nf checkpoint \(damaged", capsys)
    assert (run / "checkpoint.pt").read_bytes() == before


def _rewrite_without(run: Path, key: str) -> None:
    path = run / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state[key]
    torch.save(state, path)


@pytest.mark.parametrize(
    "key, message",
    [
        ("optimizer", r"lacks the checkpoint entries \['optimizer'\]"),
        ("format", f"is not a '{FORMAT}' \\(found None\\)"),
    ],
)
def test_checkpoint_missing_keys(trained, tmp_path, capsys, key, message, no_training):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    _rewrite_without(run, key)
    before = (run / "checkpoint.pt").read_bytes()
    _fails(_resume(run, trained[1]), message, capsys)
    _fails(["vae", "eval", "--out", str(run)], message, capsys)
    assert (run / "checkpoint.pt").read_bytes() == before


def test_checkpoint_missing_config_entries(trained, tmp_path, capsys, no_training):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    path = run / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]["latent_dim"]
    torch.save(state, path)
    before = path.read_bytes()
    _fails(["vae", "eval", "--out", str(run)], r"lacks the config entries \['latent_dim'\]", capsys)
    assert path.read_bytes() == before


# --- a diverging run ------------------------------------------------------------------


def _diverge(monkeypatch):
    original = FlowVAE.forward

    def forward(self, x, **kwargs):
        return original(self, x, **kwargs) * float("nan")

    monkeypatch.setattr(FlowVAE, "forward", forward)


def test_diverged_resumed_run_keeps_its_checkpoint(run, trained, capsys, monkeypatch):
    _diverge(monkeypatch)
    _fails(
        _resume(run, trained[1], "--epochs", "2"),
        r"training diverged at epoch 2, step 1: non-finite loss or gradient \(loss=nan\).*"
        r"checkpoint.pt still holds epoch 1\. Try a smaller --lr",
        capsys,
    )


def test_diverged_new_run_says_no_checkpoint_was_written(
    run, trained, tmp_path, capsys, monkeypatch
):
    _diverge(monkeypatch)
    new = tmp_path / "new"
    argv = ["vae", "train", *NET, "--data", str(trained[1]), "--out", str(new)]
    _fails(
        argv, "no checkpoint was written to .*new \\(the run diverged in its first epoch\\)", capsys
    )
    assert not (new / "checkpoint.pt").exists()


# --- --out ------------------------------------------------------------------------------


def test_out_is_a_file(run, trained, capsys, no_training):
    argv = ["vae", "train", *NET, "--data", str(trained[1]), "--out", str(run / "checkpoint.pt")]
    _fails(argv, "--out .*checkpoint.pt' is a file, not a directory", capsys)


def test_out_below_a_file(run, trained, capsys, no_training):
    argv = ["vae", "train", *NET, "--data", str(trained[1]), "--out", str(run / "checkpoint.pt/x")]
    _fails(argv, r"--out .* is not a writable directory \(Not a directory\)", capsys)


def test_out_not_writable(run, trained, capsys, no_training):
    if Path("/sys").is_dir():  # refuses writes even to root, unlike a chmod-ed directory
        out = "/sys/pyro-nf-run"
    else:
        out = str(run)
        run.chmod(0o500)
    try:
        argv = ["vae", "train", *NET, "--data", str(trained[1]), "--out", out]
        _fails(argv, "--out .* is not a writable directory", capsys)
    finally:
        run.chmod(0o755)


# --- options out of range -------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--flow-lr-scale", "0", "--flow-lr-scale .*> 0.*got 0.0"),
        ("--flow-lr-scale", "-0.1", "--flow-lr-scale .*> 0"),
        ("--eval-samples", "-5", r"--eval-samples \(0 skips the evaluation\) .*>= 0"),
        ("--lr", "0", "--lr .*> 0"),
        ("--lr", "nan", "--lr .*> 0.*got nan"),
        ("--lr", "abc", "vae train: argument --lr: invalid float value: 'abc'"),
        ("--lr-decay", "0", "--lr-decay .*> 0.*<= 1"),
        ("--lr-decay", "1.5", "--lr-decay .*> 0.*<= 1"),
        ("--warmup", "-1", r"--warmup \(0 switches the KL warm-up off\) .*>= 0"),
        ("--warmup-start", "0", "--warmup-start .*> 0.*<= 1"),
        ("--iwae", "0", r"--iwae \(1 trains on the ELBO\) .*>= 1"),
        ("--epochs", "0", "--epochs .*>= 1"),
        ("--batch-size", "0", "--batch-size .*>= 1"),
        ("--layers", "0", "--layers .*>= 1"),
        ("--latent", "-3", "--latent .*>= 1"),
        ("--hidden", "0", "--hidden .*ints >= 1"),
        ("--flow-hidden", "-1", "--flow-hidden .*ints >= 1"),
        ("--train-subset", "0", "--train-subset .*>= 1"),
        ("--eval-subset", "0", "--eval-subset .*>= 1"),
        ("--seed", "-1", "--seed .*>= 0"),
    ],
)
def test_train_option_out_of_range(run, trained, capsys, option, value, message, no_training):
    _fails(_resume(run, trained[1], option, value), message, capsys)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--eval-samples", "-5", "--eval-samples .*>= 1.*got -5"),
        ("--eval-samples", "0", "--eval-samples .*>= 1.*got 0"),
        ("--eval-subset", "0", "--eval-subset .*>= 1"),
        ("--seed", "-2", "--seed .*>= 0"),
    ],
)
def test_eval_option_out_of_range(run, capsys, option, value, message):
    _fails(["vae", "eval", "--out", str(run), option, value], message, capsys)
    assert not (run / "eval_test.json").exists()


# --- resuming with another recipe -----------------------------------------------------


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--lr", "0.01", r"--lr 0.001 \(now 0.01\)"),
        ("--batch-size", "20", r"--batch-size 50 \(now 20\)"),
        ("--seed", "3", r"--seed 0 \(now 3\)"),
        ("--data", None, r"--data '.*tiny.npz' \(now '.*other.npz'\)"),
    ],
)
def test_resume_with_another_recipe_is_refused(run, trained, capsys, option, value, message):
    if option == "--data":
        value = str(run.parent / "other.npz")
        shutil.copy(trained[1], value)
    line = _fails(_resume(run, trained[1], "--epochs", "2", option, value), message, capsys)
    assert "--force-resume" in line
    assert not (run / "eval_test.json").exists()


def test_resume_with_another_architecture_is_refused(run, trained, capsys, no_training):
    argv = _resume(run, trained[1], "--epochs", "2", "--latent", "4")
    _fails(argv, r"--latent 8 \(now 4\); pass the same architecture", capsys)


def test_resume_with_fewer_epochs_is_refused(trained, tmp_path, capsys, no_training):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    path = run / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state["epoch"] = 3
    torch.save(state, path)
    before = path.read_bytes()
    _fails(
        _resume(run, trained[1], "--epochs", "2"), "3 epochs already, more than --epochs 2", capsys
    )
    assert path.read_bytes() == before


@pytest.mark.slow
def test_force_resume_continues_with_the_new_recipe(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    argv = _resume(run, trained[1], "--epochs", "2", "--lr", "0.002", "--force-resume")
    assert main(argv) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and state["config"]["lr"] == 0.002
    assert [h["lr"] for h in state["history"]] == pytest.approx([1e-3, 2e-3])
    capsys.readouterr()
    _fails(
        ["vae", "train", *NET, "--force-resume"],
        "--force-resume only applies with --resume",
        capsys,
    )
