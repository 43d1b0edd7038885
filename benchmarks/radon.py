"""The Minnesota radon data, its varying-intercepts-and-slopes model, and a NUTS reference.

Gelman & Hill's (2006, ch. 13) model of log radon in 919 homes of 85 counties, the county's
intercept and floor slope drawn from a population whose scales are unknown::

    mu_a, mu_b ~ Normal(0, 10)
    sigma_a, sigma_b, sigma_y ~ HalfNormal(2)       (log radon spans about 6 units)
    a_j ~ Normal(mu_a, sigma_a),  b_j ~ Normal(mu_b, sigma_b)          j < 85
    y_i ~ Normal(a[county_i] + b[county_i] * floor_i, sigma_y)        i < 919

`model` is written centred, as a user would write it; `noncentred_model` is its twin with
`a = mu_a + sigma_a * z_a` (and `b` alike), which NUTS samples without the funnel's
divergences. The reference (`main`) runs NUTS on the non-centred twin and stores the
posterior means and sds of every latent in the centred model's coordinates (`mu_a`, `mu_b`,
`log_sigma_a`, `log_sigma_b`, `log_sigma_y`, `a`, `b`), with split r-hat and bulk ESS, in
`benchmarks/results/radon_reference.json`; `load_reference` reads it back as
`benchmarks.exact_hierarchical.Moments`, which `benchmarks.exact_hierarchical.score` takes.

Usage::

    nohup python -m benchmarks.radon > radon.log 2>&1 &     # 4 chains, 1000 + 2000 each
    python -m benchmarks.radon --chains 2 --warmup 300 --draws 300 --out /tmp/radon.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from benchmarks.exact_hierarchical import Moments

#: The copy shipped with the package (provenance in ``pyro_nf/data/README.md``).
SHIPPED_RADON = Path(__file__).resolve().parents[1] / "pyro_nf" / "data" / "radon_mn.npz"

#: sha256 of ``array.tobytes()`` for each array of the shipped file.
SHIPPED_SHA256 = {
    "county": "7147d040eb170f97f850188e33190acaa226c732a139d551b43b71fd83b0d05c",
    "floor": "e8e282e472bc412910eab32bf665bada1c802b8c004758c3b5fafa9d936d0d71",
    "log_radon": "d89b79e33b378ff8a4e56e8e11f6d3889aa84fa4b7a216683f94e5e775a802be",
}

#: Where `main` writes the NUTS reference by default.
REFERENCE = Path(__file__).resolve().parent / "results" / "radon_reference.json"

NUM_HOMES, NUM_COUNTIES = 919, 85
MU_SCALE, SIGMA_SCALE = 10.0, 2.0

#: Latents in the centred model's unconstrained coordinates: the globals, then the counties'.
GLOBALS = ("mu_a", "mu_b", "log_sigma_a", "log_sigma_b", "log_sigma_y")
LOCALS = ("a", "b")

_EXPECTED = (
    "expected arrays 'county' (integers 0..84, every county present), 'floor' (0/1) and "
    "'log_radon' (finite), each of shape (919,)"
)


def load_radon(path: str | Path | None = None) -> dict[str, Tensor]:
    """Load and validate the radon data as float64 tensors (``county`` as int64).

    Parameters
    ----------
    path : str or Path, optional
        An ``.npz`` with arrays ``county``, ``floor`` and ``log_radon`` (others are
        ignored); default: the copy shipped with the package, whose arrays are also checked
        against their published sha256 hashes.

    Returns
    -------
    dict of str to torch.Tensor
        ``county`` (int64, 0-based), ``floor`` and ``log_radon`` (float64), each of length 919.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    ValueError
        If it is not a readable ``.npz``, or an array is missing or has the wrong shape or
        values (the message names the array and what was expected), or (shipped file) its
        checksum does not match.

    Examples
    --------
    >>> data = load_radon()
    >>> data["county"].max().item(), data["log_radon"].shape
    (84, torch.Size([919]))
    """
    file = SHIPPED_RADON if path is None else Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"radon data file {str(file)!r} does not exist")
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in ("county", "floor", "log_radon") if key in npz}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise ValueError(f"{file}: not a readable .npz file ({err}); {_EXPECTED}") from err
    for key in ("county", "floor", "log_radon"):
        if key not in arrays:
            raise ValueError(f"{file}: missing array {key!r}; {_EXPECTED}")
        if arrays[key].shape != (NUM_HOMES,):
            raise ValueError(f"{file}: array {key!r} has shape {arrays[key].shape}; {_EXPECTED}")
    _check_values(file, arrays)
    if path is None:
        _check_hashes(file, arrays)
    return {
        "county": torch.as_tensor(arrays["county"].astype(np.int64)),
        "floor": torch.as_tensor(arrays["floor"].astype(np.float64)),
        "log_radon": torch.as_tensor(arrays["log_radon"].astype(np.float64)),
    }


def _check_values(file: Path, arrays: dict[str, np.ndarray]) -> None:
    county, floor, log_radon = arrays["county"], arrays["floor"], arrays["log_radon"]
    if not np.issubdtype(county.dtype, np.integer):
        raise ValueError(f"{file}: array 'county' has dtype {county.dtype}; {_EXPECTED}")
    if np.unique(county).tolist() != list(range(NUM_COUNTIES)):
        raise ValueError(f"{file}: array 'county' does not hold exactly 0..84; {_EXPECTED}")
    if not np.isin(floor, (0, 1)).all():
        raise ValueError(f"{file}: array 'floor' holds values other than 0/1; {_EXPECTED}")
    if not np.isfinite(log_radon).all():
        raise ValueError(f"{file}: array 'log_radon' holds non-finite values; {_EXPECTED}")


def _check_hashes(file: Path, arrays: dict[str, np.ndarray]) -> None:
    for key, expected in SHIPPED_SHA256.items():
        digest = hashlib.sha256(np.ascontiguousarray(arrays[key]).tobytes()).hexdigest()
        if digest != expected:
            raise ValueError(
                f"{file}: checksum mismatch for array {key!r} (sha256 {digest}, expected "
                f"{expected}); the shipped data file is corrupted, reinstall pyro-nf"
            )


def model_globals(dtype: torch.dtype) -> tuple[Tensor, ...]:
    """The five global sites, drawn from their priors: ``mu_a, mu_b, sigma_a, sigma_b,
    sigma_y`` (shared by `model`, `noncentred_model` and
    `benchmarks.radon_collapsed.collapsed_model`)."""
    zero = torch.zeros((), dtype=dtype)
    mu_a = pyro.sample("mu_a", dist.Normal(zero, MU_SCALE))
    mu_b = pyro.sample("mu_b", dist.Normal(zero, MU_SCALE))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(zero + SIGMA_SCALE))
    sigma_b = pyro.sample("sigma_b", dist.HalfNormal(zero + SIGMA_SCALE))
    sigma_y = pyro.sample("sigma_y", dist.HalfNormal(zero + SIGMA_SCALE))
    return mu_a, mu_b, sigma_a, sigma_b, sigma_y


def _likelihood(a: Tensor, b: Tensor, sigma_y: Tensor, data: dict[str, Tensor]) -> None:
    county, floor = data["county"], data["floor"]
    with pyro.plate("homes", len(county)):
        mean = a[..., county] + b[..., county] * floor
        pyro.sample("y", dist.Normal(mean, sigma_y), obs=data["log_radon"])


def model(data: dict[str, Tensor]) -> None:
    """Varying intercepts and slopes, centred: ``a_j ~ Normal(mu_a, sigma_a)``, and so on.

    Examples
    --------
    >>> trace = pyro.poutine.trace(model).get_trace(load_radon())
    >>> trace.nodes["a"]["value"].shape, trace.nodes["y"]["value"].shape
    (torch.Size([85]), torch.Size([919]))
    """
    mu_a, mu_b, sigma_a, sigma_b, sigma_y = model_globals(data["log_radon"].dtype)
    with pyro.plate("counties", NUM_COUNTIES, dim=-1):
        a = pyro.sample("a", dist.Normal(mu_a, sigma_a))
        b = pyro.sample("b", dist.Normal(mu_b, sigma_b))
    _likelihood(a, b, sigma_y, data)


def noncentred_model(data: dict[str, Tensor]) -> None:
    """The non-centred twin of `model`: ``a = mu_a + sigma_a * z_a``, ``z_a ~ Normal(0, 1)``
    (``b`` alike), with ``a`` and ``b`` recorded as deterministic sites.

    Examples
    --------
    >>> trace = pyro.poutine.trace(noncentred_model).get_trace(load_radon())
    >>> trace.nodes["z_a"]["value"].shape, trace.nodes["a"]["value"].shape
    (torch.Size([85]), torch.Size([85]))
    """
    dtype = data["log_radon"].dtype
    mu_a, mu_b, sigma_a, sigma_b, sigma_y = model_globals(dtype)
    with pyro.plate("counties", NUM_COUNTIES, dim=-1):
        standard = dist.Normal(torch.zeros((), dtype=dtype), 1.0)
        z_a = pyro.sample("z_a", standard)
        z_b = pyro.sample("z_b", standard)
    a = pyro.deterministic("a", mu_a + sigma_a * z_a)
    b = pyro.deterministic("b", mu_b + sigma_b * z_b)
    _likelihood(a, b, sigma_y, data)


def centred_draws(samples: dict[str, Tensor]) -> dict[str, Tensor]:
    """Draws of the non-centred twin (``z_a``, ``z_b`` and the globals) in the centred
    model's unconstrained coordinates (`GLOBALS` and `LOCALS`), any leading shape.

    Examples
    --------
    >>> draws = {name: torch.ones(3) for name in ("mu_a", "mu_b", "sigma_a", "sigma_b",
    ...                                            "sigma_y")}
    >>> draws.update(z_a=torch.ones(3, 85), z_b=torch.zeros(3, 85))
    >>> out = centred_draws(draws)
    >>> out["a"][0, 0].item(), out["log_sigma_y"].tolist()
    (2.0, [0.0, 0.0, 0.0])
    """
    out = {name: samples[name] for name in ("mu_a", "mu_b")}
    for name in ("sigma_a", "sigma_b", "sigma_y"):
        out[f"log_{name}"] = samples[name].log()
    out["a"] = samples["mu_a"][..., None] + samples["sigma_a"][..., None] * samples["z_a"]
    out["b"] = samples["mu_b"][..., None] + samples["sigma_b"][..., None] * samples["z_b"]
    return out


def noncentred_potential(data: dict[str, Tensor]) -> Callable[[dict[str, Tensor]], Tensor]:
    """`noncentred_model`'s negative log joint, up to a constant, as a function of
    ``{"x": x}`` with ``x = (mu_a, mu_b, log sigma_a, log sigma_b, log sigma_y, z_a, z_b)``
    (175 numbers; the log-scale Jacobians included): the same posterior as Pyro's
    trace of the model (a test checks it), without the tracing at every step that made NUTS on
    the model several times slower.

    Examples
    --------
    >>> potential = noncentred_potential(load_radon())
    >>> potential({"x": torch.zeros(175, dtype=torch.float64)}).shape
    torch.Size([])
    """
    county, floor, y = data["county"], data["floor"], data["log_radon"]

    def potential(params: dict[str, Tensor]) -> Tensor:
        x = params["x"]
        log_sigma = x[2:5]
        sigma = log_sigma.exp()
        z = x[5:].reshape(2, NUM_COUNTIES)
        a, b = x[:2, None] + sigma[:2, None] * z
        residual = (y - a[county] - b[county] * floor) / sigma[2]
        log_joint = (
            -0.5 * (x[:2] / MU_SCALE).pow(2).sum()
            - 0.5 * (sigma / SIGMA_SCALE).pow(2).sum()
            + log_sigma.sum()  # d sigma = sigma d log sigma
            - 0.5 * z.pow(2).sum()
            - 0.5 * residual.pow(2).sum()
            - len(y) * log_sigma[2]
        )
        return -log_joint

    return potential


def run_nuts(
    data: dict[str, Tensor], num_chains: int, warmup: int, draws: int, seed: int = 0
) -> tuple[dict[str, Tensor], list[int]]:
    """NUTS on `noncentred_model` (through `noncentred_potential`), chains one after the
    other, chain ``c`` seeded ``seed + c`` and started from ``x ~ N(0, I)``.

    Returns the draws in the centred coordinates, each of shape ``(num_chains, draws, ...)``,
    and each chain's number of divergent transitions after warm-up.
    """
    from pyro.infer import MCMC, NUTS

    chains, divergences = [], []
    counted: list[int] = []

    def count_divergences(kernel: NUTS, samples: object, stage: str, i: int) -> None:
        # The kernel's own count, read while it runs: `MCMC.diagnostics()` also computes
        # every site's r-hat and ESS, its memory growing as the draws squared (+860 MB
        # at 1500 draws; 4 chains of 8000 ran out of 24 GB).
        if stage == "Sample":
            counted[:] = [len(kernel.diagnostics()["divergences"])]

    for chain in range(num_chains):
        counted.clear()
        pyro.set_rng_seed(seed + chain)
        kernel = NUTS(potential_fn=noncentred_potential(data), target_accept_prob=0.9)
        start = torch.randn(5 + 2 * NUM_COUNTIES, dtype=torch.float64)
        mcmc = MCMC(
            kernel,
            num_samples=draws,
            warmup_steps=warmup,
            initial_params={"x": start},
            disable_progbar=True,
            hook_fn=count_divergences,
        )
        mcmc.run()
        x = mcmc.get_samples()["x"]
        samples = dict(zip(("mu_a", "mu_b"), x[:, :2].T, strict=True))
        samples.update(zip(("sigma_a", "sigma_b", "sigma_y"), x[:, 2:5].exp().T, strict=True))
        samples["z_a"], samples["z_b"] = x[:, 5:].reshape(-1, 2, NUM_COUNTIES).unbind(1)
        chains.append(centred_draws(samples))
        divergences.append(counted[-1] if counted else 0)
        print(f"chain {chain}: step size {kernel.step_size:.3f}, ", end="")
        print(f"{divergences[-1]} divergences", flush=True)
    return {name: torch.stack([c[name] for c in chains]) for name in chains[0]}, divergences


def summarise(chains: dict[str, Tensor]) -> dict[str, dict[str, list[float] | float]]:
    """Mean, sd, rank-normalised split r-hat and bulk ESS (ArviZ's) of every site, from
    draws of shape ``(chains, draws, ...)``; scalars stay scalars, vectors become lists."""
    import arviz

    dataset = arviz.convert_to_dataset({name: value.numpy() for name, value in chains.items()})
    r_hat, ess = arviz.rhat(dataset), arviz.ess(dataset, method="bulk")
    summary = {}
    for name, value in chains.items():
        flat = value.reshape(-1, *value.shape[2:])
        stats = {
            "mean": flat.mean(0),
            "sd": flat.std(0),
            "r_hat": torch.as_tensor(r_hat[name].values),
            "ess_bulk": torch.as_tensor(ess[name].values),
        }
        summary[name] = {key: v.tolist() for key, v in stats.items()}
    return summary


def load_reference(path: str | Path = REFERENCE) -> Moments:
    """The NUTS reference's means and sds as `Moments` (float64 tensors), for
    `benchmarks.exact_hierarchical.score`.

    Examples
    --------
    >>> reference = load_reference()
    >>> sorted(reference.mean), reference.sd["a"].shape
    (['a', 'b', 'log_sigma_a', 'log_sigma_b', 'log_sigma_y', 'mu_a', 'mu_b'], torch.Size([85]))
    """
    sites = json.loads(Path(path).read_text())["sites"]
    mean = {name: torch.tensor(site["mean"], dtype=torch.float64) for name, site in sites.items()}
    sd = {name: torch.tensor(site["sd"], dtype=torch.float64) for name, site in sites.items()}
    return Moments(mean, sd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=2000, help="kept draws per chain")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REFERENCE)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    chains, divergences = run_nuts(load_radon(), args.chains, args.warmup, args.draws, args.seed)
    summary = summarise(chains)
    worst_r_hat = max(max(np.ravel(s["r_hat"])) for s in summary.values())
    least_ess = min(min(np.ravel(s["ess_bulk"])) for s in summary.values())
    record = {
        "model": "NUTS on benchmarks.radon.noncentred_model; moments in model's coordinates",
        "chains": args.chains,
        "warmup": args.warmup,
        "draws_per_chain": args.draws,
        "seed": args.seed,
        "seconds": round(time.perf_counter() - start, 1),
        "divergences": divergences,
        "max_r_hat": worst_r_hat,
        "min_ess_bulk": least_ess,
        "sites": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{args.out}: max r-hat {worst_r_hat:.4f}, min bulk ESS {least_ess:.0f}, ", end="")
    print(f"{record['seconds']:.0f} s")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
