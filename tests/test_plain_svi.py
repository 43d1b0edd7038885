"""The plain-SVI benchmark and the tail-correction study: their weighting, their draws'
log weights, and a tiny end-to-end run of each on the years regression (exact moments).

Runtime: about 1 minute on 2 cores.
"""

import json

import pyro
import pyro.distributions as dist
import pytest
import torch

from benchmarks import plain_svi, tail_correction
from benchmarks.plain_svi import moment_errors, recipe_optimizer, robust
from benchmarks.tail_correction import psis_weights, weighted_draws
from pyro_nf import AutoSplineFlow


def test_weighted_moments_use_the_weights():
    draws = torch.tensor([[0.0], [1.0], [10.0]], dtype=torch.float64)
    ref = {"mean": torch.tensor([0.5]).double(), "sd": torch.tensor([0.5]).double()}
    weights = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    assert moment_errors(draws, ref, weights) == pytest.approx((0.0, 0.0), abs=1e-12)
    mean_err, sd_err = moment_errors(draws, ref)  # uniform: the outlier counts
    assert mean_err == pytest.approx((11 / 3 - 0.5) / 0.5) and sd_err > 1.0


def test_recipe_rate_falls_to_its_final_fraction():
    optim = recipe_optimizer(0.01, 200, final_lr=0.05)
    assert optim.pt_optim_args["lr"] == 0.01
    assert optim.pt_optim_args["lrd"] ** 200 == pytest.approx(0.05)


def test_draws_carry_their_own_log_weights():
    torch.set_default_dtype(torch.float64)
    try:

        def model():
            pyro.sample("x", dist.LogNormal(0.5, 0.7))

        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoSplineFlow(model, init_scale=0.5, warm_start=None)
        log_w, draws = weighted_draws(robust.Problem("lognormal", model, ()), guide, 50, chunk=16)
        # log p(x) - log q(x) in constrained space equals the same difference in log x
        log_p = dist.Normal(0.5, 0.7).log_prob(draws[:, 0])
        log_q = guide.get_posterior().log_prob(draws)
        assert torch.allclose(log_w, log_p - log_q, atol=1e-6)
    finally:
        torch.set_default_dtype(torch.float32)


def test_psis_weights_are_normalised_and_flag_heavy_tails():
    gen = torch.Generator().manual_seed(0)
    light, light_khat = psis_weights(0.1 * torch.randn(2000, generator=gen, dtype=torch.float64))
    heavy = torch.distributions.Pareto(1.0, 1.0).sample((2000,)).log().double()
    assert light.sum().item() == pytest.approx(1.0) and light_khat < 0.5
    assert psis_weights(heavy)[1] > 0.7


def test_both_benchmarks_run_on_a_tiny_setting(tmp_path):
    try:
        small = ["--models", "years", "--num-draws", "300", "--fit-steps", "20"]
        out = tmp_path / "plain.json"
        plain_svi.main([*small, "--steps", "20", "--snippet-steps", "20", "--out", str(out)])
        rows = json.loads(out.read_text())["rows"]
        assert [r["method"] for r in rows] == ["snippet", "recipe", "fit"]
        assert all(r["steps"] <= 20 and r["seconds"] > 0 for r in rows)
        assert {r["reference"] for r in rows} == {"exact"}
        out = tmp_path / "tail.json"
        tail_correction.main([*small, "--iw-steps", "10", "--chunk", "100", "--out", str(out)])
        rows = json.loads(out.read_text())["rows"]
        assert [r["correction"] for r in rows] == ["raw", "raw+psis", "iw", "iw+psis"]
        assert all(0 < r["psis_ess"] <= 300 and r["added_ratio"] >= 0 for r in rows)
        assert rows[0]["added_s"] == 0.0 and rows[2]["iw_steps"] <= 10
    finally:
        torch.set_default_dtype(torch.float32)
