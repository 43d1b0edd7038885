"""How far a guide's posterior is from reference draws (NUTS, say), in posterior sds."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import arviz as az
import numpy as np
import pandas as pd

from pyro_nf.checks import check_int
from pyro_nf.diagnostics import _numpy, to_inference_data

__all__ = ["compare_to_mcmc"]


def _draws_from_idata(idata: az.InferenceData) -> dict[str, np.ndarray]:
    posterior = idata.posterior
    return {
        name: np.asarray(posterior[name].values).reshape(-1, *posterior[name].shape[2:])
        for name in posterior.data_vars
    }


def _reference_draws(reference: Any) -> dict[str, np.ndarray]:
    if isinstance(reference, az.InferenceData):
        return _draws_from_idata(reference)
    if hasattr(reference, "get_samples"):  # pyro.infer.MCMC
        reference = reference.get_samples()
    if not isinstance(reference, Mapping):
        raise TypeError(
            "mcmc_samples must be a dict of draws (site name to an array of shape "
            "(draws, ...) or (chains, draws, ...)), a pyro.infer.MCMC object or an "
            f"arviz.InferenceData; got {type(reference).__name__}"
        )
    return {name: _numpy(value) for name, value in reference.items()}


def _approximation_draws(
    approximation: az.InferenceData | Callable,
    model: Callable | None,
    args: tuple,
    kwargs: dict,
    num_samples: int,
) -> dict[str, np.ndarray]:
    if isinstance(approximation, az.InferenceData):
        return _draws_from_idata(approximation)
    if not callable(approximation):
        raise TypeError(
            "approximation must be an arviz.InferenceData or a fitted guide, got "
            f"{type(approximation).__name__}"
        )
    model = model if model is not None else getattr(approximation, "model", None)
    if model is None:
        raise ValueError("compare_to_mcmc: pass model= along with a guide")
    check_int("num_samples", num_samples, minimum=2)
    idata = to_inference_data(
        model, approximation, *args, num_samples=num_samples, observed_data=False, **kwargs
    )
    return _draws_from_idata(idata)


def _compared_names(
    reference: Mapping, approx: Mapping, var_names: str | Sequence[str] | None
) -> list[str]:
    """The variables to compare: ``var_names``, else those both hold (warning of the rest)."""
    if var_names is not None:
        names = [var_names] if isinstance(var_names, str) else list(var_names)
        missing = {
            side: [name for name in names if name not in draws]
            for side, draws in (("the reference", reference), ("the approximation", approx))
        }
        for side, absent in missing.items():
            if absent:
                raise ValueError(f"compare_to_mcmc: var_names {absent} not in {side}")
        return names
    common = [name for name in reference if name in approx]
    if not common:
        raise ValueError(
            f"compare_to_mcmc: no variable in common; the reference has {sorted(reference)}, "
            f"the approximation {sorted(approx)}"
        )
    only_reference = sorted(set(reference) - set(approx))
    only_approx = sorted(set(approx) - set(reference))
    if only_reference or only_approx:
        warnings.warn(
            f"compare_to_mcmc: comparing {common} only; not compared, held by the reference "
            f"only: {only_reference}, by the approximation only: {only_approx}. Pass "
            "var_names= to choose the variables",
            stacklevel=3,
        )
    return common


def _checked_draws(side: str, name: str, draws: np.ndarray, shape: tuple) -> np.ndarray:
    """``draws`` as ``(num_draws, *shape)``, from ``(draws, *shape)`` or ``(chains, draws,
    *shape)``, with at least two draws, all finite; else a ValueError naming ``name``."""
    if draws.ndim >= 2 and draws.shape[2:] == shape and draws.shape[1:] != shape:
        draws = draws.reshape(-1, *shape)  # chains pooled
    if draws.ndim == 0 or draws.shape[1:] != shape:
        raise ValueError(
            f"compare_to_mcmc: variable {name!r} has shape {shape} per draw in the "
            f"approximation, but {side}'s draws have shape {draws.shape}; expected "
            f"(draws, *{shape}) or (chains, draws, *{shape})"
        )
    if not (np.issubdtype(draws.dtype, np.number) or draws.dtype == bool):
        raise TypeError(f"compare_to_mcmc: {side}'s draws of {name!r} are not numbers")
    if len(draws) < 2:
        raise ValueError(f"compare_to_mcmc: {side} has {len(draws)} draw(s) of {name!r}; need 2")
    bad = int(np.size(draws) - np.isfinite(draws).sum())
    if bad:
        raise ValueError(
            f"compare_to_mcmc: {side}'s draws of {name!r} hold {bad} non-finite value(s) "
            "(NaN or inf); drop those draws or find why the sampler produced them"
        )
    return draws


def _flat_names(name: str, shape: tuple[int, ...]) -> list[str]:
    if not shape:
        return [name]
    return [f"{name}[{', '.join(map(str, index))}]" for index in np.ndindex(*shape)]


def _moment_rows(name: str, ref: np.ndarray, draws: np.ndarray) -> dict[str, list[float]]:
    """Reference mean and sd, then the approximation's, per scalar parameter of ``name``."""
    stats = [
        array.reshape(-1)
        for array in (ref.mean(0), ref.std(0, ddof=1), draws.mean(0), draws.std(0, ddof=1))
    ]
    labels = _flat_names(name, ref.shape[1:])
    return {label: [float(stat[i]) for stat in stats] for i, label in enumerate(labels)}


def compare_to_mcmc(
    approximation: az.InferenceData | Callable,
    mcmc_samples: Any,
    *args: Any,
    model: Callable | None = None,
    num_samples: int = 4000,
    var_names: Sequence[str] | None = None,
    **kwargs: Any,
) -> pd.DataFrame:
    """Error of a guide's posterior means and sds, in units of a reference posterior's sd.

    Parameters
    ----------
    approximation : arviz.InferenceData or guide
        Draws from the guide (see `to_inference_data`), or a fitted guide, from which
        ``num_samples`` draws are taken (with ``model``, ``*args``, ``**kwargs``).
    mcmc_samples : dict, pyro.infer.MCMC or arviz.InferenceData
        The reference draws, e.g. ``mcmc.get_samples()``: per variable, an array of shape
        ``(draws, ...)`` or ``(chains, draws, ...)`` (chains are pooled). NaN or inf in
        either side's draws is an error naming the variable.
    *args, **kwargs
        The model's arguments, when ``approximation`` is a guide.
    model : callable, optional
        The model, when ``approximation`` is a guide; default ``guide.model``.
    num_samples : int
        Draws from the guide, when ``approximation`` is a guide.
    var_names : sequence of str, optional
        The variables to compare, each held by both sides. Default: those both hold,
        with a warning naming the variables held by one side only.

    Returns
    -------
    pandas.DataFrame
        One row per scalar parameter (``theta[0]``, ... as in ``arviz.summary``) of the
        variables compared, with the reference's ``ref_mean`` and ``ref_sd``, the
        guide's ``mean`` and ``sd``, ``mean_error = (mean - ref_mean) / ref_sd`` and
        ``sd_error = (sd - ref_sd) / ref_sd``.

    Examples
    --------
    >>> draws = {"x": np.random.default_rng(0).normal(1.0, 2.0, size=(4000,))}
    >>> reference = {"x": np.random.default_rng(1).normal(1.0, 2.0, size=(4, 1000))}
    >>> table = compare_to_mcmc(az.from_dict(posterior={"x": draws["x"][None]}), reference)
    >>> bool(table.loc["x", "mean_error"] ** 2 < 0.01)
    True
    """
    approx = _approximation_draws(approximation, model, args, kwargs, num_samples)
    reference = _reference_draws(mcmc_samples)
    rows = {}
    for name in _compared_names(reference, approx, var_names):
        shape = approx[name].shape[1:]
        draws = _checked_draws("the approximation", name, approx[name], shape)
        ref = _checked_draws("the reference", name, reference[name], shape)
        rows.update(_moment_rows(name, ref, draws))
    table = pd.DataFrame.from_dict(
        rows, orient="index", columns=["ref_mean", "ref_sd", "mean", "sd"]
    )
    table["mean_error"] = (table["mean"] - table["ref_mean"]) / table["ref_sd"]
    table["sd_error"] = (table["sd"] - table["ref_sd"]) / table["ref_sd"]
    return table
