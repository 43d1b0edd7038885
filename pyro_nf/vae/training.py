"""Training and evaluation runs of the flow VAE: checkpoints, resume, DDP, outputs."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm

from pyro_nf.fitting import NonFiniteLossError

from ..checks import check_int
from .checkpoint import WriteError, load_checkpoint, save_checkpoint, write_json
from .data import SPLITS, load_binarized_mnist
from .distributed import DistContext, init_distributed, resolve_device
from .evaluate import evaluate
from .model import FlowVAE
from .plots import save_image_grid
from .recipe import TrainConfig, Trainer, option

__all__ = [
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "WriteError",
    "evaluate_run",
    "train",
]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"

#: TrainConfig fields that fix the architecture; a resumed run must not change them.
ARCHITECTURE = ("flow", "num_layers", "latent_dim", "hidden_dims", "flow_hidden_dims")

#: TrainConfig fields of the recipe; a resumed run keeps them unless ``force_resume``.
RECIPE = (
    "data",
    "train_subset",
    "batch_size",
    "lr",
    "flow_lr_scale",
    "lr_decay",
    "warmup",
    "warmup_start",
    "iwae",
    "seed",
)


@dataclass
class TrainResult:
    """The trained model (on every process), the metrics written to ``metrics.json`` (the
    test metrics on rank 0 only) and this process's rank."""

    vae: FlowVAE
    metrics: dict[str, Any]
    rank: int = 0


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    # Seeding each epoch from (seed, epoch, rank) makes a resumed run draw exactly the
    # noise of an uninterrupted one without storing RNG states.
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _subset(array: np.ndarray, subset: int | None) -> torch.Tensor:
    if subset is not None:
        array = array[:subset]
    return torch.from_numpy(np.ascontiguousarray(array))


def _writable_dir(out: str) -> Path:
    """`out` as a directory this process can write into (created), checked before training."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out!r} is a file, not a directory; choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(
            f"--out {out!r} is not a writable directory ({err.strerror}); choose another --out"
        ) from None
    return path


def _saved_config(state: dict[str, Any], path: Path) -> TrainConfig:
    saved = state["config"]
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    missing = [name for name in fields if not isinstance(saved, dict) or name not in saved]
    if missing:
        raise ValueError(f"{path} lacks the config entries {missing}; train again")
    try:
        return TrainConfig(**{name: saved[name] for name in fields})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} holds an invalid config ({err}); train again") from None


def _same(name: str, a: Any, b: Any) -> bool:
    if name == "data":  # the same file, whichever way its path is written
        a, b = (None if d is None else str(Path(d).resolve()) for d in (a, b))
    return a == b


def _differences(names: tuple[str, ...], saved: TrainConfig, config: TrainConfig) -> str:
    pairs = [(option(n), getattr(saved, n), getattr(config, n)) for n in names]
    return ", ".join(f"{opt} {old!r} (now {new!r})" for opt, old, new in pairs)


def _resume_state(config: TrainConfig, path: Path, device: torch.device) -> dict[str, Any] | None:
    if not config.resume:
        if path.exists():
            raise FileExistsError(
                f"{path} already exists: pass --resume to continue that run, or choose "
                "another --out"
            )
        return None
    state = load_checkpoint(path, device)
    saved = _saved_config(state, path)
    where = f"--resume: the checkpoint in {path.parent} was trained with"
    changed = tuple(n for n in ARCHITECTURE if not _same(n, getattr(saved, n), getattr(config, n)))
    if changed:
        raise ValueError(
            f"{where} {_differences(changed, saved, config)}; pass the same architecture "
            "options (or none of them)"
        )
    changed = tuple(n for n in RECIPE if not _same(n, getattr(saved, n), getattr(config, n)))
    if changed and not config.force_resume:
        raise ValueError(
            f"{where} {_differences(changed, saved, config)}; pass the same values, or "
            "--force-resume to continue with the new ones"
        )
    if state["epoch"] > config.epochs:
        raise ValueError(
            f"{where} {state['epoch']} epochs already, more than --epochs {config.epochs}; "
            "raise --epochs to train longer"
        )
    return state


def _load_into(
    state: dict[str, Any], path: Path, vae: FlowVAE, optimizer: torch.optim.Optimizer | None = None
) -> None:
    try:
        vae.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: the saved state does not fit its config ({first})") from None


def train(config: TrainConfig) -> TrainResult:
    """Train a `FlowVAE` on binarized MNIST, writing outputs to `config.out`.

    Writes (rank 0 only) ``checkpoint.pt`` after every epoch (atomically), ``samples.png``,
    ``reconstructions.png`` and ``metrics.json``. Under ``torchrun`` (``WORLD_SIZE`` > 1)
    it trains with ``DistributedDataParallel`` and a ``DistributedSampler``. `--out` is
    checked to be a writable directory, and a resumed run to match its checkpoint, before
    any training.

    Raises
    ------
    NonFiniteLossError
        If a loss or gradient is NaN/inf; the update is not applied (the model keeps the
        last good parameters) and the last checkpoint, if any, is left as it was. The
        message names the epoch and step, the checkpoint kept and a smaller ``--lr``.
    KeyboardInterrupt
        On Ctrl-C, with a message saying which epoch the checkpoint holds.
    MemoryError
        If a training step does not fit in the device's memory; the message names the
        epoch and step, the checkpoint kept and a smaller ``--batch-size``.
    WriteError
        If a checkpoint cannot be written (full disk, read-only directory): the previous
        checkpoint is left as it was and the message says which epoch it holds. If the
        final outputs cannot be written, the error's ``result`` holds the metrics.

    Examples
    --------
    >>> import tempfile
    >>> cfg = TrainConfig(flow="planar", num_layers=2, epochs=1, train_subset=200,
    ...                   eval_subset=10, eval_samples=10, progress=False,
    ...                   out=tempfile.mkdtemp())
    >>> result = train(cfg)  # doctest: +SKIP
    """
    ctx = init_distributed(config.device)
    try:
        return _train(config, ctx)
    finally:
        ctx.close()


def _train(config: TrainConfig, ctx: DistContext) -> TrainResult:
    # The checkpoint is read before --out is created, so that a wrong --resume leaves
    # no empty directory behind.
    state = _resume_state(config, Path(config.out) / CHECKPOINT, ctx.device)
    out = _writable_dir(config.out)
    data = load_binarized_mnist(config.data)
    train_x = _subset(data["train"], config.train_subset).to(ctx.device)
    trainer = _setup(config, ctx, state, out / CHECKPOINT, train_x)
    history: list[dict[str, Any]] = [] if state is None else state["history"]
    sampler = DistributedSampler(
        range(len(train_x)),
        num_replicas=ctx.world_size,
        rank=ctx.rank,
        shuffle=True,
        seed=config.seed,
        drop_last=ctx.world_size > 1,
    )
    saved = len(history)  # epochs the checkpoint holds
    try:
        for epoch in range(len(history), config.epochs):
            history.append(_run_epoch(trainer, train_x, epoch, sampler, ctx, history))
            if ctx.is_main:
                _save(trainer, history, out / CHECKPOINT)
            saved = len(history)
        metrics: dict[str, Any] = {
            "config": config.to_dict(),
            "history": history,
            "world_size": ctx.world_size,
        }
        if ctx.is_main:
            _finish(trainer.vae, config, _subset(data["test"], config.eval_subset), metrics, out)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_interrupted(saved, config)) from None
    return TrainResult(trainer.vae, metrics, ctx.rank)


def _interrupted(saved: int, config: TrainConfig) -> str:
    """What an interrupted run leaves behind, and how to go on from it."""
    path = Path(config.out) / CHECKPOINT
    if saved == 0:
        return f"no epoch was finished, so no checkpoint was written to {config.out}"
    if saved < config.epochs:
        return f"{path} holds epoch {saved} of {config.epochs}: --resume continues from there"
    return (
        f"{path} holds epoch {saved} of {config.epochs}, the finished run: "
        f"pyro-nf vae eval --out {config.out} evaluates it"
    )


def _save(trainer: Trainer, history: list[dict[str, Any]], path: Path) -> None:
    """Save the checkpoint after epoch ``len(history)``; if that fails, say what is kept."""
    epoch = len(history)
    state = {
        "model": trainer.vae.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "config": trainer.config.to_dict(),
        "epoch": epoch,
        "updates": trainer.updates,
        "history": history,
    }
    try:
        save_checkpoint(state, path)
    except WriteError as err:
        if epoch > 1:
            kept = (
                f"it still holds epoch {epoch - 1} (epoch {epoch} was not saved): "
                f"{err.remedy}, or copy {path.parent} elsewhere, and continue with --resume"
            )
        else:
            kept = f"no epoch was saved: {err.remedy}, or pass another --out, and train again"
        raise WriteError(path, err, advice=kept) from err


def _setup(
    config: TrainConfig,
    ctx: DistContext,
    state: dict[str, Any] | None,
    path: Path,
    train_x: torch.Tensor,
) -> Trainer:
    torch.manual_seed(config.seed)
    trainer = Trainer(config.build_model().to(ctx.device), config)
    if state is None:
        trainer.vae.decoder.init_output_bias(train_x.double().mean(0))
    else:
        _load_into(state, path, trainer.vae, trainer.optimizer)
    if ctx.world_size > 1:
        trainer.module = DistributedDataParallel(trainer.vae)
    return trainer


def _run_epoch(
    trainer: Trainer,
    train_x: torch.Tensor,
    epoch: int,
    sampler: DistributedSampler,
    ctx: DistContext,
    history: list[dict[str, Any]],
) -> dict[str, Any]:
    """One pass over the (shuffled) training images; returns the epoch's history entry."""
    config = trainer.config
    sampler.set_epoch(epoch)
    torch.manual_seed(_epoch_seed(config.seed, epoch, ctx.rank))
    batches = torch.tensor(list(sampler)).split(config.batch_size)
    trainer.start_epoch(epoch, updates=history[-1]["updates"] if history else 0)
    desc = f"epoch {epoch + 1}/{config.epochs}"
    bar = tqdm(batches, desc=desc, disable=not (config.progress and ctx.is_main))
    dtype = next(trainer.vae.parameters()).dtype
    total, count, start = 0.0, 0, time.perf_counter()
    for step, index in enumerate(bar):
        x = train_x[index].to(dtype)
        try:
            total -= trainer.step(x, ctx.all_true)
        except NonFiniteLossError as err:
            raise _diverged(err, epoch, step, history, trainer) from None
        except torch.OutOfMemoryError as err:
            raise _out_of_memory(err, epoch, step, history, trainer) from None
        count += len(x)
        bar.set_postfix(bound=f"{total / count:.2f}", refresh=False)
    seconds = time.perf_counter() - start
    return {
        "epoch": epoch + 1,
        "train_bound": total / count,
        "beta": config.beta(trainer.updates - 1),
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "updates": trainer.updates,
        "seconds": seconds,
        "images_per_s": count * ctx.world_size / seconds,
    }


def _diverged(
    err: NonFiniteLossError, epoch: int, step: int, history: list[dict[str, Any]], trainer: Trainer
) -> NonFiniteLossError:
    """The error for a diverged run: where, what the run directory still holds, what to try."""
    lr = trainer.config.lr
    retry = _retry(history, trainer.config.out, "--lr", f"{lr / 2:.3g} (half of {lr:g})")
    return NonFiniteLossError(
        f"training diverged at epoch {epoch + 1}, step {step + 1}: {err}; {retry}",
        step=step,
        site=None,
        parameters=err.parameters,
        losses=[],
    )


def _out_of_memory(
    err: torch.OutOfMemoryError,
    epoch: int,
    step: int,
    history: list[dict[str, Any]],
    trainer: Trainer,
) -> MemoryError:
    """The error for a step that did not fit in the device's memory, and what to try."""
    size = trainer.config.batch_size
    half = f"{max(size // 2, 1)} (half of {size})"
    cause = ". ".join(str(err).split(". ")[:2])  # "CUDA out of memory. Tried to allocate ..."
    retry = _retry(history, trainer.config.out, "--batch-size", half)
    if trainer.config.iwae > 1:
        retry += " (or a smaller --iwae)"
    return MemoryError(f"out of memory at epoch {epoch + 1}, step {step + 1} ({cause}); {retry}")


def _retry(history: list[dict[str, Any]], out: str, option: str, value: str) -> str:
    """What the run directory still holds after a failed step, and how to go on."""
    if history:
        return (
            f"{Path(out) / CHECKPOINT} still holds epoch {len(history)}, the last good state: "
            f"continue from it with a smaller {option}, e.g. --resume --force-resume "
            f"{option} {value}"
        )
    return (
        f"no checkpoint was written to {out} (the run stopped in its first epoch): train "
        f"again with a smaller {option}, e.g. {option} {value}"
    )


def _finish(
    vae: FlowVAE, config: TrainConfig, test_x: torch.Tensor, metrics: dict[str, Any], out: Path
) -> None:
    """Evaluate on test (unless `eval_samples` is 0), draw the pictures, write the metrics.

    Everything is computed before anything is written, the metrics first, so that a failed
    write loses none of it: the `WriteError` carries the metrics.
    """
    if config.eval_samples > 0:
        torch.manual_seed(config.seed)
        metrics["test"] = evaluate(
            vae, test_x, num_samples=config.eval_samples, progress=config.progress
        )
    samples = vae.sample(50)
    x = test_x[:25].to(samples)
    pairs = torch.stack([x, vae.reconstruct(x)], dim=1).reshape(-1, x.shape[-1])
    try:
        write_json(metrics, out / METRICS)
        save_image_grid(samples, out / "samples.png", "samples from the model")
        save_image_grid(pairs, out / "reconstructions.png", "test images | reconstructions")
    except WriteError as err:
        kept = f"{err.remedy}; the trained model is safe in {out / CHECKPOINT}"
        raise WriteError(err.filename, err, advice=kept, result=metrics) from err


def evaluate_run(
    out: str | Path,
    *,
    data: str | None = None,
    split: str = "test",
    eval_subset: int | None = None,
    eval_samples: int = 5000,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the checkpoint in `out` and write ``eval_<split>.json`` there.

    Returns the metrics of `pyro_nf.vae.evaluate` plus the run's config.

    Raises
    ------
    WriteError
        If ``eval_<split>.json`` cannot be written (a read-only run directory, a full
        disk); the error's ``result`` holds the metrics, so nothing computed is lost.

    Examples
    --------
    >>> evaluate_run("runs/vae", eval_subset=100, eval_samples=1000)  # doctest: +SKIP
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    check_int("--eval-samples", eval_samples, 1)
    check_int("--seed", seed, 0)
    if eval_subset is not None:
        check_int("--eval-subset", eval_subset, 1)
    out = Path(out)
    torch_device = resolve_device(device)
    state = load_checkpoint(out / CHECKPOINT, torch_device)
    vae = _saved_config(state, out / CHECKPOINT).build_model().to(torch_device)
    _load_into(state, out / CHECKPOINT, vae)
    images = _subset(load_binarized_mnist(data)[split], eval_subset)
    torch.manual_seed(seed)
    metrics = {
        **evaluate(vae, images, num_samples=eval_samples, progress=progress),
        "split": split,
        "epoch": state["epoch"],
        "config": state["config"],
    }
    path = out / f"eval_{split}.json"
    try:
        write_json(metrics, path)
    except WriteError as err:
        advice = f"{err.remedy}, or evaluate a writable copy of {out}; the metrics were not saved"
        raise WriteError(path, err, advice=advice, result=metrics) from err
    return metrics
