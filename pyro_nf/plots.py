"""Plots for fitted guides: the ELBO trace, and guide draws against reference draws.

Needs matplotlib, an optional dependency: ``pip install 'pyro-nf[plot]'``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import arviz as az
import numpy as np

from pyro_nf.fitting import FitResult

__all__ = ["plot_elbo", "plot_pair"]


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "pyro_nf.plots needs matplotlib: pip install 'pyro-nf[plot]' (or matplotlib)"
        ) from None
    return plt


def plot_elbo(result: FitResult | Sequence[float], ax: Any = None, window: int = 100) -> Any:
    """Plot the ELBO of every step and its moving average.

    Parameters
    ----------
    result : FitResult or sequence of float
        A `pyro_nf.fit()` result, or its loss history.
    ax : matplotlib Axes, optional
        Where to draw; default a new figure.
    window : int
        Width of the moving average.

    Returns
    -------
    matplotlib Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> ax = plot_elbo([3.0, 2.0, 1.5, 1.2], window=2)
    >>> ax.get_ylabel()
    'ELBO'
    """
    losses = np.asarray(result.losses if isinstance(result, FitResult) else result, dtype=float)
    if ax is None:
        ax = _pyplot().subplots(figsize=(6, 3.5))[1]
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, -losses, color="C0", alpha=0.3, lw=0.8, label="per step")
    if len(losses) >= window:
        smooth = np.convolve(-losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1 :], smooth, color="C0", label=f"mean of {window} steps")
        low, high = np.percentile(smooth, [1, 100])
        ax.set_ylim(low - 0.1 * (high - low + 1e-9), high + 0.1 * (high - low + 1e-9))
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO")
    ax.legend(loc="lower right")
    return ax


def plot_pair(
    approximation: az.InferenceData,
    reference: az.InferenceData | Mapping[str, Any],
    var_names: Sequence[str] | None = None,
    labels: tuple[str, str] = ("guide", "reference"),
    **pair_kwargs: Any,
) -> Any:
    """Pair plot of guide draws over reference (e.g. NUTS) draws, through ArviZ.

    Parameters
    ----------
    approximation : arviz.InferenceData
        Guide draws, from `pyro_nf.diagnostics.to_inference_data()`.
    reference : arviz.InferenceData or dict
        Reference draws: an InferenceData, or a dict of arrays whose first axis indexes
        draws (e.g. ``mcmc.get_samples()``).
    var_names : sequence of str, optional
        Variables to show; default those both hold.
    labels : (str, str)
        Legend labels of the two sets of draws.
    **pair_kwargs
        Passed to `arviz.plot_pair()`.

    Returns
    -------
    numpy array of matplotlib Axes

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> rng = np.random.default_rng(0)
    >>> draws = {"a": rng.normal(size=(1, 200)), "b": rng.normal(size=(1, 200))}
    >>> axes = plot_pair(az.from_dict(posterior=draws), {k: v[0] + 0.5 for k, v in draws.items()})
    """
    _pyplot()
    if not isinstance(reference, az.InferenceData):
        reference = az.from_dict(posterior={k: np.asarray(v)[None] for k, v in reference.items()})
    if var_names is None:
        var_names = [v for v in approximation.posterior.data_vars if v in reference.posterior]
    if not var_names:
        raise ValueError("plot_pair: the two sets of draws have no variable in common")
    common = dict(var_names=list(var_names), kind="scatter", **pair_kwargs)
    axes = az.plot_pair(
        reference, scatter_kwargs={"color": "C1", "alpha": 0.3, "label": labels[1]}, **common
    )
    az.plot_pair(
        approximation,
        ax=axes,
        scatter_kwargs={"color": "C0", "alpha": 0.3, "label": labels[0]},
        **common,
    )
    first = np.atleast_1d(axes).ravel()[0]
    first.legend(loc="best")
    return axes
