"""Set-up of multi-process data-parallel training launched with ``torchrun``."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "init_distributed", "resolve_device"]


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"cpu"`` or ``"cuda"`` (``cuda:LOCAL_RANK`` under torchrun), checked to exist.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "--device cuda was requested but no CUDA device is available "
                "(torch.cuda.is_available() is False); use --device cpu or install a CUDA "
                "build of PyTorch"
            )
        return torch.device("cuda", local_rank)
    raise ValueError(f"--device must be 'cpu' or 'cuda', got {name!r}")


@dataclass
class DistContext:
    """Where this process runs: rank, world size and device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and shows progress (rank 0)."""
        return self.rank == 0

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every process."""
        if self.world_size == 1:
            return flag
        t = torch.tensor(float(flag), device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def close(self) -> None:
        """Tear down the process group if this context created one, once every process
        has arrived: gloo aborts a process whose peer tore the group down first
        ("terminate called without an active exception", seen on a loaded machine)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def init_distributed(device: str) -> DistContext:
    """Join the ``torchrun`` process group if ``WORLD_SIZE`` > 1 (gloo on CPU, NCCL on GPU).

    Reads the environment variables ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` that
    ``torchrun --nproc_per_node=N`` sets; without them this is a single process.

    Examples
    --------
    >>> ctx = init_distributed("cpu")  # not under torchrun
    >>> ctx.rank, ctx.world_size
    (0, 1)
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    torch_device = resolve_device(device, local_rank)
    if world_size > 1:
        if torch_device.type == "cuda":
            torch.cuda.set_device(torch_device)
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        except (ValueError, RuntimeError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"WORLD_SIZE={world_size} but this process could not join the others ({first}); "
                "launch with torchrun --nproc_per_node=N, or unset WORLD_SIZE for one process"
            ) from err
    return DistContext(rank, world_size, torch_device)


def _env_int(name: str, default: int) -> int:
    """The integer in environment variable `name` (set by torchrun), or `default`."""
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"environment variable {name}={value!r} is not an integer; let torchrun set it, "
            "or unset it for one process"
        ) from None
