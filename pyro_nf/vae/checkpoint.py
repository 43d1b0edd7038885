"""Atomic file writes and weights-only checkpoints."""

from __future__ import annotations

import errno
import io
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import torch

__all__ = [
    "FORMAT",
    "KEYS",
    "WriteError",
    "atomic_write",
    "load_checkpoint",
    "save_checkpoint",
    "write_json",
]


class WriteError(OSError):
    """An output file could not be written; its message is one line naming the file, the
    cause and what to do.

    ``errno``, ``strerror`` and ``filename`` are those of the failure; `remedy` is what
    fixes the cause (free space, or make the directory writable). `advice` says what to do
    (by default the remedy); `result` holds what was computed but not saved (``None`` if
    nothing was), so that a failed write loses nothing.

    Examples
    --------
    >>> import errno
    >>> err = WriteError("runs/a/m.json", OSError(errno.ENOSPC, "No space left on device"))
    >>> print(err)
    could not write runs/a/m.json: no space left on device; free space on that disk
    >>> err.errno == errno.ENOSPC
    True
    """

    def __init__(
        self, path: str | Path, cause: OSError, advice: str = "", result: Any = None
    ) -> None:
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        full = cause.errno in (errno.ENOSPC, errno.EDQUOT)
        self.remedy = "free space on that disk" if full else "make that directory writable"
        self.advice = advice or self.remedy
        self.result = result

    def __str__(self) -> str:
        reason = str(self.strerror)
        return f"could not write {self.filename}: {reason[:1].lower()}{reason[1:]}; {self.advice}"


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write a file so that readers see either the old or the complete new content.

    ``write`` fills a temporary file in the same directory, which is flushed, fsynced and
    then moved over `path` with `os.replace`. If anything fails, the temporary file
    is removed and an existing ``path`` is left untouched.

    Raises
    ------
    WriteError
        If the file system refuses (a full disk, a read-only directory...).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.bin"
    >>> atomic_write(p, lambda f: f.write(b"hello"))
    >>> p.read_bytes()
    b'hello'
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise WriteError(path, err) from err
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise WriteError(path, err) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: What a flow VAE checkpoint says it is (its ``"format"`` entry).
FORMAT = "pyro-nf flow VAE checkpoint, version 1"

#: The entries every flow VAE checkpoint holds.
KEYS = ("format", "model", "optimizer", "config", "epoch", "updates", "history")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Atomically save a checkpoint made of tensors and plain containers only.

    Adds the ``"format"`` entry that `load_checkpoint` checks.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "ckpt.pt"
    >>> save_checkpoint({"epoch": 3, "w": torch.ones(2)}, p)
    >>> load_checkpoint(p, keys=("epoch", "w"))["epoch"]
    3
    """
    # Serialised in memory first: torch's zip writer turns a failed write (a full disk)
    # into a RuntimeError ("unexpected pos") that hides the cause.
    buffer = io.BytesIO()
    torch.save({**state, "format": FORMAT}, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", keys: Sequence[str] = KEYS
) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, with ``torch.load(weights_only=True)``.

    Raises
    ------
    FileNotFoundError
        If there is no file at `path`.
    ValueError
        If the file is not such a checkpoint (damaged, truncated, empty, written by another
        program) or lacks one of `keys`.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "ckpt.pt"
    >>> _ = p.write_bytes(bytes(100))
    >>> load_checkpoint(p)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: ...ckpt.pt is not a readable pyro-nf checkpoint (damaged, truncated or ...
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {str(path)!r}: train first (pyro-nf vae train --out DIR) or "
            "point --out at the directory of an earlier run"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise
    except Exception as err:
        # Damaged files raise KeyError, EOFError, RuntimeError or UnpicklingError, whose
        # texts suggest weights_only=False (running arbitrary code): report the kind only.
        raise ValueError(
            f"{path} is not a readable pyro-nf checkpoint (damaged, truncated or written by "
            f"another program: {type(err).__name__}); train again, or resume from a copy"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} is not a {FORMAT!r} (found {found!r})")
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(f"{path} lacks the checkpoint entries {missing}; train again")
    return state


def write_json(obj: Any, path: str | Path) -> None:
    """Atomically write `obj` as indented JSON.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.json"
    >>> write_json({"nll": 90.5}, p)
    >>> p.read_text()
    '{\\n  "nll": 90.5\\n}\\n'
    """
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
