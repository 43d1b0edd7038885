"""The radon data, its two models, and the NUTS reference shipped in benchmarks/results."""

import doctest
import json

import numpy as np
import pyro
import pytest
import torch
from pyro.ops.stats import effective_sample_size

from benchmarks import radon
from benchmarks.radon import (
    GLOBALS,
    LOCALS,
    NUM_COUNTIES,
    REFERENCE,
    SHIPPED_RADON,
    load_radon,
    load_reference,
    model,
    noncentred_model,
    noncentred_potential,
    run_nuts,
)


def test_the_shipped_data_loads_with_its_checksums():
    data = load_radon()
    assert data["county"].dtype == torch.int64 and data["log_radon"].dtype == torch.float64
    assert data["county"].bincount().tolist().count(0) == 0
    assert data["county"].shape == data["floor"].shape == data["log_radon"].shape == (919,)


def _write(path, **changes):
    with np.load(SHIPPED_RADON) as npz:
        arrays = {key: npz[key] for key in npz.files}
    arrays.update(changes)
    arrays = {key: value for key, value in arrays.items() if value is not None}
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"floor": None}, "missing array 'floor'"),
        ({"log_radon": np.zeros(900, np.float32)}, r"'log_radon' has shape \(900,\)"),
        ({"county": np.zeros(919, np.float32)}, "'county' has dtype float32"),
        ({"county": np.arange(919) % 84}, "does not hold exactly 0..84"),
        ({"floor": np.full(919, 2.0)}, "'floor' holds values other than 0/1"),
        ({"log_radon": np.full(919, np.nan)}, "'log_radon' holds non-finite values"),
    ],
)
def test_a_bad_file_is_refused_with_what_is_wrong(tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        load_radon(_write(tmp_path / "radon.npz", **changes))


def test_a_missing_or_unreadable_file_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_radon(tmp_path / "nowhere.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_radon(tmp_path / "junk.npz")


def _log_joint(program, values, data):
    trace = pyro.poutine.trace(pyro.condition(program, values)).get_trace(data)
    return trace.log_prob_sum()


def test_the_potential_and_the_centred_model_are_the_noncentred_models_log_joint():
    data = load_radon()
    potential = noncentred_potential(data)
    points = torch.randn(3, 5 + 2 * NUM_COUNTIES, generator=torch.Generator().manual_seed(0))
    model_minus_potential, centred_minus_noncentred = [], []
    for x in points.double():
        sigma = x[2:5].exp()
        z_a, z_b = x[5:].reshape(2, NUM_COUNTIES)
        values = dict(zip(("mu_a", "mu_b"), x[:2], strict=True))
        values.update(zip(("sigma_a", "sigma_b", "sigma_y"), sigma, strict=True))
        noncentred = _log_joint(noncentred_model, {**values, "z_a": z_a, "z_b": z_b}, data)
        model_minus_potential.append(noncentred + x[2:5].sum() + potential({"x": x}))
        a, b = x[0] + sigma[0] * z_a, x[1] + sigma[1] * z_b
        centred = _log_joint(model, {**values, "a": a, "b": b}, data)
        # a = mu_a + sigma_a z_a: p(a) da = p(z_a) dz_a, so log p(a) = log p(z_a) - log sigma_a
        jacobian = NUM_COUNTIES * (x[2] + x[3])
        centred_minus_noncentred.append(centred + jacobian - noncentred)
    assert torch.allclose(torch.stack(model_minus_potential), model_minus_potential[0])
    assert torch.allclose(torch.stack(centred_minus_noncentred), torch.zeros(3).double())


def test_the_reference_has_converged_chains_and_every_latent():
    record = json.loads(REFERENCE.read_text())
    assert record["chains"] >= 4 and record["draws_per_chain"] >= 2000
    assert record["divergences"] == [0] * record["chains"]
    sites = record["sites"]
    assert set(sites) == set(GLOBALS) | set(LOCALS)
    for name, site in sites.items():
        r_hat, ess = np.ravel(site["r_hat"]), np.ravel(site["ess_bulk"])
        assert r_hat.max() < 1.01, name
        assert ess.min() > 400, name
        assert np.shape(site["mean"]) == ((NUM_COUNTIES,) if name in LOCALS else ())
    reference = load_reference()
    assert (reference.sd["a"] > 0).all() and float(reference.sd["log_sigma_y"]) > 0


@pytest.mark.slow
def test_a_short_nuts_run_agrees_with_the_reference_on_the_globals():
    chains, _ = run_nuts(load_radon(), num_chains=1, warmup=100, draws=100, seed=11)
    reference = load_reference()
    for name in GLOBALS:
        x = chains[name][0]
        ess = effective_sample_size(x[None, :, None], chain_dim=0, sample_dim=1)[0]
        error = (x.mean() - reference.mean[name]) / reference.sd[name]
        ratio = (x.std() / reference.sd[name]).log()
        assert abs(error) < 4 / ess.sqrt(), (name, error, ess)
        assert abs(ratio) < 4 / (2 * ess).sqrt() + 0.05, (name, ratio, ess)


def test_the_docstring_examples_run():
    result = doctest.testmod(radon, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 5 and result.failed == 0


def test_run_nuts_counts_divergences_as_mcmc_diagnostics_does():
    """The count read from the kernel while it runs equals `MCMC.diagnostics()`'s."""
    from pyro.infer import MCMC, NUTS

    data = load_radon()
    _, divergences = run_nuts(data, num_chains=1, warmup=20, draws=20, seed=1)
    pyro.set_rng_seed(1)
    kernel = NUTS(potential_fn=noncentred_potential(data), target_accept_prob=0.9)
    start = torch.randn(5 + 2 * NUM_COUNTIES, dtype=torch.float64)
    mcmc = MCMC(kernel, 20, 20, initial_params={"x": start}, disable_progbar=True)
    mcmc.run()
    expected = len(mcmc.diagnostics()["divergences"]["chain 0"])
    assert divergences == [expected] and expected > 0  # a short warm-up diverges
