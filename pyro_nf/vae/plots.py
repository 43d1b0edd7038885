"""PNG grids of images (matplotlib is an optional dependency)."""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path

import torch

from .checkpoint import atomic_write

__all__ = ["save_image_grid"]


def save_image_grid(images: torch.Tensor, path: str | Path, title: str, ncols: int = 10) -> bool:
    """Save 28×28 images (rows of 784 values in [0, 1]) as a PNG grid.

    Returns ``False`` with a warning, and writes nothing, when matplotlib is not installed
    (install the ``plot`` extra: ``pip install pyro-nf[plot]``). The file is written
    atomically (`atomic_write`): a failed write raises `WriteError` and leaves an
    existing file as it was.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> save_image_grid(torch.rand(20, 784), pathlib.Path(tempfile.mkdtemp()) / "g.png", "x")
    True
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn(
            f"matplotlib is not installed, so {path} was not written; "
            "install it with `pip install pyro-nf[plot]`",
            stacklevel=2,
        )
        return False
    # numpy, not tensors: matplotlib's array conversion of a tensor warns under numpy 2
    images = images.detach().to("cpu", torch.float32).numpy()
    nrows = math.ceil(len(images) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols, nrows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image in zip(axes.flat, images, strict=False):
        ax.imshow(image.reshape(28, 28), cmap="gray_r", vmin=0.0, vmax=1.0)
    fig.suptitle(title)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(png.getbuffer()))
    return True
