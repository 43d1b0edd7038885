"""The plain-SVI benchmark and the tail-correction study: their weighting and a tiny
end-to-end run of each on the years regression (exact moments); the weights themselves are
`pyro_nf.reweighted`'s (tests/test_reweighting.py).

Runtime: about 1 minute on 2 cores.
"""

import json
import math

import pytest
import torch

from benchmarks import plain_svi, tail_correction
from benchmarks.plain_svi import moment_errors, recipe_optimizer


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


def test_both_benchmarks_run_on_a_tiny_setting(tmp_path):
    try:
        small = ["--models", "years", "--num-draws", "300", "--fit-steps", "20"]
        out = tmp_path / "plain.json"
        plain = ["--steps", "20", "--snippet-steps", "20", "--psis-draws", "100"]
        plain_svi.main([*small, *plain, "--out", str(out)])
        rows = json.loads(out.read_text())["rows"]
        methods = ["snippet", "snippet+psis", "recipe", "recipe+psis", "fit", "fit+psis"]
        assert [r["method"] for r in rows] == methods
        assert all(r["seconds"] > p["seconds"] for p, r in zip(rows[::2], rows[1::2], strict=True))
        assert all(r["steps"] <= 20 and r["seconds"] > 0 for r in rows)
        assert {r["reference"] for r in rows} == {"exact"}
        out = tmp_path / "tail.json"
        tail = ["--iw-steps", "10", "--iw-models", "years", "--refine-models", "years"]
        tail += ["--more-draws", "400", "--strong-particles", "4", "--out", str(out)]
        tail_correction.main([*small, *tail])
        rows = json.loads(out.read_text())["rows"]
        labels = ["raw", "raw+psis", "fit", "raw+psis400", "iw8", "iw8+psis", "iw4", "iw4+psis"]
        # `fit`: the FitResult's own corrected summaries, or the raw guide's where none.
        rows[2]["correction"] = rows[2]["correction"].replace("fit (raw)", "fit")
        assert [r["correction"] for r in rows] == labels
        weighted = [r for r in rows if r.get("kept", True)]  # not the raw guide's `fit` row
        assert all(0 < r["psis_ess"] <= r["num_draws"] for r in weighted)
        assert all(r["added_ratio"] >= 0 for r in rows)
        assert rows[0]["added_s"] == 0.0 and rows[4]["iw_steps"] <= 10
    finally:
        torch.set_default_dtype(torch.float32)


def test_the_recipe_vmaps_the_structured_forms_particles(tmp_path):
    try:
        out = tmp_path / "nn100.json"
        argv = ["--models", "nn100", "--methods", "recipe", "--steps", "20"]
        plain_svi.main([*argv, "--particles", "4", "--num-draws", "200", "--out", str(out)])
        (row,) = json.loads(out.read_text())["rows"]
        assert row["particles"] == 4 and row["steps"] == 20 and row["reference"] == "exact"
        assert math.isfinite(row["mean_err"]) and math.isfinite(row["sd_err"])
    finally:
        torch.set_default_dtype(torch.float32)
