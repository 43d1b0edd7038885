"""Benchmark suite: target normalisers, the KL estimator, and a tiny end-to-end run.

Runtime: about 1 minute on 2 cores.
"""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from benchmarks.evaluate import draw_from_guide, kl_estimate, moment_errors
from benchmarks.guides import main
from benchmarks.targets import (
    TARGETS,
    EnergyTarget,
    get_target,
    grid_log_z,
    log_funnel,
    make_gaussian,
)


@pytest.mark.parametrize("name", ["u1", "u2", "u3", "u4", "mixture"])
def test_two_dimensional_log_z_matches_quadrature(name):
    target = get_target(name)
    lo, hi = (-7.0, 7.0) if name in ("u1", "mixture") else (-14.0, 14.0)
    assert grid_log_z(target.log_density, lo, hi, 1401) == pytest.approx(target.log_z, abs=1e-6)


def test_gaussian_log_z_is_the_normaliser():
    spec = make_gaussian()
    target = get_target("gauss50")
    precision = spec.precision.double()
    exact = torch.distributions.MultivariateNormal(spec.mean.double(), precision_matrix=precision)
    z = exact.sample((20,))
    ours = target.log_density(z) - target.log_z
    assert torch.allclose(ours, exact.log_prob(z), atol=1e-3)
    assert float(spec.eigenvalues.max() / spec.eigenvalues.min()) == pytest.approx(1000.0)
    assert spec.mean.abs().min() > 0.5  # centred away from the origin


def test_funnel_is_normalised_product_of_its_conditionals():
    torch.manual_seed(0)
    v = 3.0 * torch.randn(50)
    x = torch.exp(v / 2).unsqueeze(-1) * torch.randn(50, 9)
    z = torch.cat([v.unsqueeze(-1), x], dim=-1)
    expected = (
        dist.Normal(0.0, 3.0).log_prob(v)
        + dist.Normal(0.0, 1.0).log_prob(x / torch.exp(v / 2).unsqueeze(-1)).sum(-1)
        - 9 * v / 2
    )
    assert get_target("funnel").log_z == 0.0
    assert torch.allclose(log_funnel(z), expected, atol=1e-4)
    # the Pyro model has the same joint, batched over draws
    conditioned = pyro.poutine.condition(get_target("funnel").model, {"v": v, "x": x})
    trace = pyro.poutine.trace(conditioned).get_trace()
    sites = [site for site in trace.nodes.values() if site["type"] == "sample"]
    model_log_p = sum(site["fn"].log_prob(site["value"]) for site in sites)
    assert torch.allclose(model_log_p, expected, atol=1e-4)


def test_kl_of_the_exact_posterior_is_zero():
    target = EnergyTarget("std", 2, lambda z: -0.5 * z.pow(2).sum(-1), math.log(2 * math.pi))

    def exact_guide():
        pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    draws = draw_from_guide(target.model, exact_guide, 1000, max_plate_nesting=0)
    kl, se = kl_estimate(draws.log_weights, target.log_z)
    assert abs(kl) < 1e-5 and se < 1e-5
    assert draws.values["z"].shape == (1000, 2)


def test_kl_of_a_too_narrow_guide_is_positive_and_exact():
    target = EnergyTarget("std", 1, lambda z: -0.5 * z.pow(2).sum(-1), 0.5 * math.log(2 * math.pi))

    def narrow_guide():
        pyro.sample("z", dist.Normal(torch.zeros(1), 0.5).to_event(1))

    pyro.set_rng_seed(0)
    draws = draw_from_guide(target.model, narrow_guide, 20000, max_plate_nesting=0)
    kl, se = kl_estimate(draws.log_weights, target.log_z)
    exact = math.log(1 / 0.5) + 0.5**2 / 2 - 0.5  # KL(N(0, 0.25) || N(0, 1))
    assert abs(kl - exact) < 4 * se + 1e-3


def test_moment_errors_are_zero_on_identical_draws_and_scale_with_shift():
    draws = {"a": torch.randn(500, 3)}
    assert moment_errors(draws, draws) == {"max_mean_error_sd": 0.0, "max_sd_rel_error": 0.0}
    shifted = moment_errors({"a": draws["a"] + 2 * draws["a"].std(0)}, draws)
    assert shifted["max_mean_error_sd"] == pytest.approx(2.0)


def test_unknown_target_names_the_choices():
    with pytest.raises(ValueError, match="unknown target 'u9'.*'u1'"):
        get_target("u9")
    assert set(TARGETS) >= {"u1", "u2", "u3", "u4", "funnel", "gauss50", "mixture"}


@pytest.mark.slow
def test_tiny_run_writes_table_json_and_figure(tmp_path, capsys):
    argv = ["--targets", "u1", "eight_schools", "--guides", "planar", "pyro-planar", "AutoNormal"]
    argv += ["--steps", "4", "--draws", "300", "--out", str(tmp_path), "--no-progress"]
    argv += ["--nuts-samples", "40"]
    results = main(argv)
    table = capsys.readouterr().out
    assert "u1" in table and "eight_schools" in table and "bars" in table
    saved = json.loads((tmp_path / "guides.json").read_text())
    assert len(saved["rows"]) == 6
    for row in saved["rows"]:
        assert row["sec_per_step"] > 0
        if row["target"] == "u1":  # KL >= 0 up to Monte-Carlo error
            assert row["kl"] > -4 * row["kl_se"]
        else:
            assert row["max_sd_rel_error"] >= 0
    ratios = {(r["target"], r["ours"], r["pyro"]) for r in results["speed_ratios"]}
    assert ("u1", "planar", "pyro-planar") in ratios
    assert (tmp_path / "guides.png").exists()
    assert any(path.name.startswith("nuts_eight_schools") for path in tmp_path.iterdir())


def test_several_seeds_report_medians_and_ranges(tmp_path, capsys):
    argv = ["--targets", "u1", "--guides", "planar", "pyro-planar", "--steps", "3"]
    argv += ["--draws", "300", "--out", str(tmp_path), "--no-progress", "--seeds", "3"]
    results = main(argv)
    assert sorted(row["seed"] for row in results["rows"]) == [0, 0, 1, 1, 2, 2]
    ratios = [r["ratio"] for r in results["speed_ratios"]]
    assert len(ratios) == 3  # one interleaved pair per seed
    (summary_ratio,) = results["summary_speed_ratios"]
    assert summary_ratio["ratio"] == sorted(ratios)[1]
    for row in results["summary"]:
        kls = sorted(r["kl"] for r in results["rows"] if r["guide"] == row["guide"])
        assert (row["kl_min"], row["kl"], row["kl_max"]) == pytest.approx(kls)
        assert row["num_seeds"] == 3
    table = capsys.readouterr().out
    assert "medians over 3 seeds" in table
    assert f"[{kls[0]:.3f}-{kls[2]:.3f}]" in table  # the range of the last guide checked


@pytest.mark.parametrize("family", ["iaf", pytest.param("spline", marks=pytest.mark.slow)])
def test_pyro_counterpart_has_the_same_network_widths_on_a_model_target(family):
    from benchmarks.guide_specs import get_guide_spec

    target = get_target("funnel")  # a Pyro model: its dimension is known only to the guides

    def widths(layer):  # hidden layers; the output's size is the family's parameter count
        return [m.weight.shape for m in layer.arn.modules() if isinstance(m, torch.nn.Linear)][:-1]

    with pyro.settings.context(module_local_params=True):
        ours, _ = get_guide_spec(family).build(target.model, target.init_loc_fn())
        theirs, _ = get_guide_spec(f"pyro-{family}").build(target.model, target.init_loc_fn())
        ours()
        theirs()
    assert widths(ours.flow.layers[0]) == widths(theirs.transform.parts[0]) == [(34, 10), (34, 34)]
