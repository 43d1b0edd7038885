"""`pyro-nf vae` fails safe: one `pyro-nf: error: ...` line, a non-zero exit, no traceback,
and an existing checkpoint left byte for byte as it was."""

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_nf.cli import main
from pyro_nf.vae import FlowVAE, load_binarized_mnist
from pyro_nf.vae import checkpoint as checkpoint_module
from pyro_nf.vae import training as training_module
from pyro_nf.vae.checkpoint import FORMAT, load_checkpoint

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
        r"training diverged at epoch 2, step 1: non-finite loss \(nan\); .*checkpoint.pt "
        r"still holds epoch 1, the last good state: continue from it with a smaller --lr, "
        r"e.g. --resume --force-resume --lr 0.0005 \(half of 0.001\)$",
        capsys,
    )


def test_diverged_new_run_says_no_checkpoint_was_written(
    run, trained, tmp_path, capsys, monkeypatch
):
    _diverge(monkeypatch)
    new = tmp_path / "new"
    argv = ["vae", "train", *NET, "--data", str(trained[1]), "--out", str(new)]
    _fails(
        argv,
        r"no checkpoint was written to .*new \(the run stopped in its first epoch\): train "
        r"again with a smaller --lr, e.g. --lr 0.0005 \(half of 0.001\)$",
        capsys,
    )
    assert not (new / "checkpoint.pt").exists()


def test_huge_lr_diverges_with_one_line_not_a_tensor_dump(run, trained, capsys):
    # lr 1e6 drives the weights to where the decoder's logits are NaN; torch's argument
    # validation would stop the forward pass with a tensor dump before the finite check
    argv = _resume(run, trained[1], "--epochs", "3", "--lr", "1e6", "--force-resume")
    line = _fails(
        argv,
        r"training diverged at epoch 2, step \d+: non-finite .*checkpoint.pt still holds "
        r"epoch 1, .*--lr 5e\+05 \(half of 1e\+06\)$",
        capsys,
    )
    assert "Expected parameter" not in line and "tensor(" not in line
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1


def test_out_of_memory_names_the_step_and_a_smaller_batch(run, trained, capsys, monkeypatch):
    def forward(self, x, **kwargs):
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 74.51 GiB. GPU 0 has a total capacity of "
            "79.19 GiB of which 78.62 GiB is free. See documentation for Memory Management"
        )

    monkeypatch.setattr(FlowVAE, "forward", forward)
    _fails(
        _resume(run, trained[1], "--epochs", "2", "--iwae", "4", "--force-resume"),
        r"out of memory at epoch 2, step 1 \(CUDA out of memory. Tried to allocate 74.51 GiB\); "
        r".*checkpoint.pt still holds epoch 1, the last good state: continue from it with a "
        r"smaller --batch-size, e.g. --resume --force-resume --batch-size 25 \(half of 50\) "
        r"\(or a smaller --iwae\)$",
        capsys,
    )


def _interrupt(monkeypatch):
    """Ctrl-C in the first training step."""

    def forward(self, x, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(FlowVAE, "forward", forward)


def _interrupted(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert re.fullmatch(f"pyro-nf: interrupted: {message}\n", err), err


def test_interrupted_resumed_run_says_what_it_kept(run, trained, capsys, monkeypatch):
    _interrupt(monkeypatch)
    message = ".*checkpoint.pt holds epoch 1 of 2: --resume continues from there"
    _interrupted(_resume(run, trained[1], "--epochs", "2"), message, capsys)


def test_interrupted_new_run_says_nothing_was_saved(trained, tmp_path, capsys, monkeypatch):
    _interrupt(monkeypatch)
    argv = ["vae", "train", *NET, "--data", str(trained[1]), "--out", str(tmp_path / "new")]
    message = "no epoch was finished, so no checkpoint was written to .*new"
    _interrupted(argv, message, capsys)


def test_interrupted_final_evaluation_points_to_vae_eval(run, trained, capsys, monkeypatch):
    def evaluate(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(training_module, "evaluate", evaluate)
    argv = _resume(run, trained[1], "--epochs", "1", "--eval-samples", "5")
    message = ".*checkpoint.pt holds epoch 1 of 1, the finished run: pyro-nf vae eval --out .*"
    _interrupted(argv, message, capsys)


# --- a full disk, a read-only directory ------------------------------------------------


class _FillingFile:
    """A file on a disk that is full after `room` more bytes."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def _disk_full(monkeypatch, room=1000):
    """Every file opened for writing fills the disk after `room` bytes."""
    fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: _FillingFile(fdopen(fd, mode), room))


def _refuse(monkeypatch, name, code):
    """Creating the temporary file for `name` (as `atomic_write` does) fails with `code`."""
    mkstemp = tempfile.mkstemp

    def refusing(*args, **kwargs):
        if kwargs.get("prefix", "").startswith(f".{name}."):
            raise OSError(code, os.strerror(code), str(kwargs.get("dir")))
        return mkstemp(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module.tempfile, "mkstemp", refusing)


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_disk_full_during_a_checkpoint_save_keeps_the_last_one(run, trained, capsys, monkeypatch):
    _disk_full(monkeypatch)
    _fails(
        _resume(run, trained[1], "--epochs", "2"),
        r"could not write .*checkpoint.pt: no space left on device; it still holds epoch 1 "
        r"\(epoch 2 was not saved\): free space on that disk, or copy .*run elsewhere, and "
        r"continue with --resume$",
        capsys,
    )
    monkeypatch.undo()
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 1
    assert _leftovers(run) == []


def test_disk_full_during_the_first_save(trained, tmp_path, capsys, monkeypatch):
    _disk_full(monkeypatch)
    new = tmp_path / "new"
    argv = ["vae", "train", *NET, "--data", str(trained[1]), "--out", str(new)]
    _fails(
        argv,
        r"could not write .*checkpoint.pt: no space left on device; no epoch was saved: free "
        r"space on that disk, or pass another --out, and train again$",
        capsys,
    )
    assert list(new.iterdir()) == []


def test_eval_in_a_read_only_run_prints_its_metrics_then_says_why_not_saved(
    run, capsys, monkeypatch
):
    # Tests run as root, for whom a chmod-ed directory stays writable: refuse the write
    # as a read-only mount would.
    _refuse(monkeypatch, "eval_test.json", errno.EROFS)
    argv = ["vae", "eval", "--out", str(run), "--eval-samples", "3", "--eval-subset", "4"]
    argv += ["--no-progress"]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    metrics = json.loads(out)
    assert metrics["num_images"] == 4 and metrics["epoch"] == 1 and "config" not in metrics
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.fullmatch(
        r"pyro-nf: error: could not write .*eval_test.json: read-only file system; make that "
        r"directory writable, or evaluate a writable copy of .*run; the metrics were not saved\n",
        err,
    ), err
    assert not (run / "eval_test.json").exists() and _leftovers(run) == []


def test_train_whose_final_outputs_cannot_be_written_prints_them(
    trained, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    metrics_before = (run / "metrics.json").read_bytes()
    _refuse(monkeypatch, "metrics.json", errno.ENOSPC)
    argv = _resume(run, trained[1], "--epochs", "2", "--eval-samples", "3", "--eval-subset", "4")
    assert main(argv) == 1
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["history"][0]["epoch"] == 2 and summary["test"]["num_images"] == 4
    assert re.fullmatch(
        r"pyro-nf: error: could not write .*metrics.json: no space left on device; free space "
        r"on that disk; the trained model is safe in .*checkpoint.pt\n",
        err,
    ), err
    assert (run / "metrics.json").read_bytes() == metrics_before
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 2


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


# --- data, devices, processes --------------------------------------------------------


def test_data_is_a_directory(run, trained, capsys, no_training):
    argv = ["vae", "train", *NET, "--data", str(run), "--out", str(run.parent / "new")]
    _fails(argv, "data file .*run' is a directory, not a file", capsys)


def test_data_that_is_no_npz_gets_no_advice_to_unpickle(run, capsys, no_training):
    data = run.parent / "notes.npz"
    data.write_text("these are notes\n")
    argv = ["vae", "train", *NET, "--data", str(data), "--out", str(run.parent / "new")]
    line = _fails(argv, r"notes.npz: not a readable .npz file \(not a zip of plain", capsys)
    assert "pickle" not in line


@pytest.mark.parametrize(
    "env, message",
    [
        ({"WORLD_SIZE": "two"}, "environment variable WORLD_SIZE='two' is not an integer"),
        ({"LOCAL_RANK": "0.5"}, "environment variable LOCAL_RANK='0.5' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2 but this process could not join .*"),
    ],
)
def test_bad_torchrun_environment(run, trained, capsys, monkeypatch, env, message, no_training):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _fails(_resume(run, trained[1], "--epochs", "2"), message, capsys)


def test_eval_on_cuda_without_cuda(run, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _fails(["vae", "eval", "--out", str(run), "--device", "cuda"], "no CUDA device", capsys)


def test_resume_of_a_missing_run_creates_nothing(trained, tmp_path, capsys, no_training):
    missing = tmp_path / "missing"
    argv = ["vae", "train", *NET, "--data", str(trained[1]), "--out", str(missing), "--resume"]
    _fails(argv, "no checkpoint at .*missing/checkpoint.pt", capsys)
    assert not missing.exists()


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
