"""Loading and validating binarized-MNIST-style ``.npz`` files."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["SHIPPED_MNIST", "SHIPPED_SHA256", "SPLITS", "load_binarized_mnist"]

#: The fixed-binarization MNIST shipped with the package (see ``pyro_nf/data/README.md``).
SHIPPED_MNIST = Path(__file__).resolve().parent.parent / "data" / "binarized_mnist.npz"

#: Split names every data file must contain.
SPLITS = ("train", "valid", "test")

#: sha256 of ``array.tobytes()`` for each split of the shipped file.
SHIPPED_SHA256 = {
    "train": "43490d4d6ac9002727af4426d8748609fdb7e4094fa65ad8d681ea60082a7a5a",
    "valid": "069b4f0beb389b776478c3e872b4df71c95ac4be64d7cbe6d32e24ebac8e6d5e",
    "test": "ca0294c3b8d984c7a1dc891015a8eea6f37bae59a34e35ea0fc8c47110a8dd86",
}

_EXPECTED = (
    "each of 'train', 'valid', 'test' must be a uint8 array of shape (N, 784) with values 0/1"
)


def load_binarized_mnist(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """Load and validate binarized MNIST (or any ``.npz`` with the same layout).

    Parameters
    ----------
    path : str or Path, optional
        An ``.npz`` file with arrays ``train``, ``valid`` and ``test``, each ``uint8`` of
        shape ``(N, 784)`` holding 0/1. Default: the copy shipped with the package, whose
        arrays are also checked against their published sha256 hashes.

    Returns
    -------
    dict of str to numpy.ndarray
        The three splits, as stored (``uint8``).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a readable ``.npz``, a split is missing, has the wrong shape,
        dtype or values, or (shipped file) its checksum does not match.

    Examples
    --------
    >>> data = load_binarized_mnist()
    >>> data["train"].shape, data["test"].dtype
    ((50000, 784), dtype('uint8'))
    """
    shipped = path is None
    file = SHIPPED_MNIST if shipped else Path(path)
    if not file.is_file():
        hint = (
            "the package data is missing; reinstall pyro-nf or pass --data PATH"
            if shipped
            else "pass an existing .npz file, or omit --data to use the shipped binarized MNIST"
        )
        problem = "is a directory, not a file" if file.is_dir() else "does not exist"
        raise FileNotFoundError(f"data file {str(file)!r} {problem}: {hint}")
    try:
        with np.load(file, allow_pickle=False) as npz:
            found = list(npz.files)
            data = {key: npz[key] for key in SPLITS if key in found}
    except ValueError as err:
        # numpy reads any file that is neither .npz nor .npy as a pickle, which it refuses
        # with advice to load it unsafely; the cause is that the file holds no plain arrays.
        raise ValueError(
            f"{file}: not a readable .npz file (not a zip of plain .npy arrays); {_EXPECTED}"
        ) from err
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(f"{file}: not a readable .npz file ({err}); {_EXPECTED}") from err
    missing = [key for key in SPLITS if key not in data]
    if missing:
        raise ValueError(
            f"{file}: missing array(s) {', '.join(map(repr, missing))} (found {found}); {_EXPECTED}"
        )
    for key, array in data.items():
        _validate(file, key, array)
        if shipped:
            digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
            if digest != SHIPPED_SHA256[key]:
                raise ValueError(
                    f"{file}: checksum mismatch for array {key!r} (sha256 {digest}, expected "
                    f"{SHIPPED_SHA256[key]}); the shipped data file is corrupted, reinstall "
                    "pyro-nf"
                )
    return data


def _validate(file: Path, key: str, array: np.ndarray) -> None:
    if array.dtype != np.uint8:
        raise ValueError(f"{file}: array {key!r} has dtype {array.dtype}; {_EXPECTED}")
    if array.ndim != 2 or array.shape[1] != 784 or array.shape[0] == 0:
        raise ValueError(f"{file}: array {key!r} has shape {array.shape}; {_EXPECTED}")
    if array.max() > 1:
        bad = np.unique(array[array > 1])[:5].tolist()
        raise ValueError(f"{file}: array {key!r} holds values {bad} besides 0/1; {_EXPECTED}")
