"""The fit-cost benchmark's ARMA(1,1) likelihood: the matrix form equals the recursion."""

import math

import torch

from benchmarks.fit_cost import _arma_residuals


def test_arma_residuals_match_the_recursion():
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(30, generator=gen, dtype=torch.float64)
    mu, phi, theta = 0.3, 0.6, -0.4
    expected = [y[0] - mu]
    for t in range(1, len(y)):
        expected.append(y[t] - mu - phi * (y[t - 1] - mu) - theta * expected[-1])
    mu_, phi_, theta_ = (torch.tensor(v, dtype=torch.float64) for v in (mu, phi, theta))
    got = _arma_residuals(y, mu_, phi_, theta_)
    assert torch.allclose(got, torch.stack(expected), atol=1e-12)
    # batched over particles: one row per parameter draw
    params = [torch.tensor([[v], [v]], dtype=torch.float64) for v in (mu, phi, theta)]
    assert torch.allclose(_arma_residuals(y, *params), torch.stack(expected).expand(2, -1))


def test_table_gives_each_guide_its_time_over_autonormals_on_the_same_model():
    from benchmarks.fit_cost import COLUMNS, robust, time_ratios

    base = {"mean_err": 0.05, "sd_err": 0.02, "steps": 10, "particles": 4}
    base.update(stop_reason="converged", setup_s=1.0)
    rows = [
        {**base, "model": "m", "guide": "AutoNormal", "seconds": 10.0},
        {**base, "model": "m", "guide": "AutoSplineFlow", "seconds": 15.0},
        {**base, "model": "other", "guide": "AutoSplineFlow", "seconds": 3.0},
    ]
    ratios = [r["time_ratio"] for r in time_ratios(rows)]
    assert ratios[:2] == [1.0, 1.5] and math.isnan(ratios[2])
    table = robust.markdown_table(time_ratios(rows), COLUMNS).splitlines()
    assert table[0].endswith("| time ratio |") and len(table) == 2 + len(rows)
    assert table[3].split("|")[-2].strip() == "1.50"


def test_draws_of_a_guide_in_non_centred_coordinates_are_taken_at_the_models_arguments():
    import pyro

    from benchmarks.fit_cost import robust
    from pyro_nf.autoguides import AutoSplineFlow
    from tests.models import SCHOOLS_SIGMA, SCHOOLS_Y, schools

    def model(y, sigma):
        schools(y, sigma)

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoSplineFlow(model, warm_start=None, noncentered=True)
    guide(SCHOOLS_Y, SCHOOLS_SIGMA)
    supports = {
        name: site["fn"].support for name, site in guide.prototype_trace.iter_stochastic_nodes()
    }
    draws = robust.guide_draws(guide, supports, 64, (SCHOOLS_Y, SCHOOLS_SIGMA))
    assert draws["theta"].shape == (64, 8) and bool(torch.isfinite(draws["theta"]).all())
