"""Radon's globals with the counties integrated out (`benchmarks.radon_collapsed`)."""

import json

import pyro
import pyro.distributions as dist
import pytest
import torch

from benchmarks import radon
from benchmarks.radon_collapsed import (
    collapsed_log_likelihood,
    collapsed_model,
    county_sums,
    main,
)

pytestmark = pytest.mark.usefixtures("fresh_pyro_state")

GLOBALS = {"mu_a": 1.3, "mu_b": -0.6, "sigma_a": 0.35, "sigma_b": 0.4, "sigma_y": 0.75}


def log_joint(model, data, values):
    conditioned = pyro.poutine.condition(model, data=values)
    return pyro.poutine.trace(conditioned).get_trace(data).log_prob_sum()


def conditional_log_density(data, g, a, b):
    """log p(a, b | y, globals): per county a Gaussian, prior times likelihood."""
    sums = county_sums(data)
    var_y = g["sigma_y"] ** 2
    precision = torch.zeros(radon.NUM_COUNTIES, 2, 2, dtype=torch.float64)
    precision[:, 0, 0] = 1 / g["sigma_a"] ** 2 + sums["n"] / var_y
    precision[:, 0, 1] = precision[:, 1, 0] = sums["x"] / var_y
    precision[:, 1, 1] = 1 / g["sigma_b"] ** 2 + sums["xx"] / var_y
    shift = torch.stack(
        [
            g["mu_a"] / g["sigma_a"] ** 2 + sums["y"] / var_y,
            g["mu_b"] / g["sigma_b"] ** 2 + sums["xy"] / var_y,
        ],
        -1,
    )
    mean = torch.linalg.solve(precision, shift.unsqueeze(-1)).squeeze(-1)
    law = dist.MultivariateNormal(mean, precision_matrix=precision)
    return law.log_prob(torch.stack([a, b], -1)).sum()


def test_collapsed_joint_is_the_full_joint_over_the_counties_conditional():
    """log p(y, g) = log p(y, g, a, b) - log p(a, b | y, g), at any a, b."""
    data = radon.load_radon()
    g = {name: torch.tensor(value, dtype=torch.float64) for name, value in GLOBALS.items()}
    collapsed = log_joint(collapsed_model, data, g)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):
        a, b = torch.randn(2, radon.NUM_COUNTIES, generator=generator, dtype=torch.float64)
        full = log_joint(radon.model, data, g | {"a": a, "b": b})
        assert full - conditional_log_density(data, g, a, b) == pytest.approx(
            collapsed.item(), abs=1e-6
        )


def test_collapsed_log_likelihood_takes_a_batch_of_globals():
    sums = county_sums(radon.load_radon())
    values = [torch.tensor([v, 1.1 * v], dtype=torch.float64) for v in GLOBALS.values()]
    batched = collapsed_log_likelihood(sums, *values)
    one = [collapsed_log_likelihood(sums, *(v[k] for v in values)) for k in range(2)]
    assert batched.shape == (2,)
    assert torch.allclose(batched, torch.stack(one))


def test_main_prints_and_writes_each_fit(tmp_path, capsys):
    out = tmp_path / "collapsed.json"
    argv = ["--particles", "4", "--seeds", "0", "--num-steps", "20", "--draws", "300"]
    main([*argv, "--out", str(out)])
    (row,) = json.loads(out.read_text())
    assert row["particles"] == 4 and row["steps"] == 20
    assert set(row["errors"]) == set(radon.GLOBALS)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("| particles | seed |") and printed[1].startswith("| 4 | 0 |")
