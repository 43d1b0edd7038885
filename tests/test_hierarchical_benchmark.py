"""The hierarchical benchmark, in a tiny setting: rows, scores, the table and the bars."""

import doctest
import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import hierarchical
from benchmarks.exact_hierarchical import simulate
from benchmarks.hierarchical import Case, bars, format_table, main, run_case
from pyro_nf.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def _finite_errors(row):
    return all(math.isfinite(v) for errors in row["errors"].values() for v in errors.values())


def test_main_subsampled_rows_in_fresh_processes(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["--groups", "40", "--full-batch-max", "20", "--batch-size", "10", "--no-radon"]
    rows = main([*argv, "--num-steps", "5", "--samples", "30", "--out", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [row["guide"] for row in rows] == ["structured", "autonormal"]
    for row in rows:
        assert row["batch_size"] == 10 and row["steps"] == 5 and not row["nan"]
        assert row["peak_mb"] >= 0 and row["wall_s"] > 0
        assert sorted(row["errors"]) == ["log_tau", "mu", "theta"] and _finite_errors(row)
    assert rows[1]["params"] == 2 * 40 + 4  # AutoNormal: a loc and a scale per latent
    printed = capsys.readouterr().out
    assert "| structured | 40 | 10 | 0 |" in printed
    assert "normal J=40 seed 0: wall time <= 2x AutoNormal's" in printed


@pytest.mark.parametrize("guide", ["structured", "autonormal"])
def test_radon_rows_score_every_site(guide):
    row = run_case(Case(guide, "radon", num_steps=5, samples=30))
    assert sorted(row["errors"]) == sorted(hierarchical.SITES["radon"]) and _finite_errors(row)
    assert row["groups"] == 85 and row["steps"] == 5 and row["samples"] == 30
    # The structured guide's draws are weighted too (k-hat and corrected moments).
    assert (row["corrected"] is None) == (guide == "autonormal")
    assert (row["khat"] is None) == (guide == "autonormal")
    if guide == "structured":
        assert sorted(row["corrected"]) == sorted(row["errors"])


def test_default_draws_by_problem_and_size():
    assert Case("structured", "radon").draws == hierarchical.DRAWS["radon"]
    assert Case("structured", groups=100).draws == hierarchical.DRAWS["normal"]
    assert Case("structured", groups=100_000).draws == 1000  # at most MAX_VALUES values
    assert Case("structured", groups=100, samples=7).draws == 7


def test_weighted_score_matches_reweighted_draws():
    """Weighted moments equal those of the draws repeated in proportion to their weights."""
    data = simulate(20)
    reference = hierarchical.exact_moments(data)
    draws = {"mu": torch.tensor([0.0, 1.0, 2.0]), "tau": torch.tensor([1.0, 2.0, 4.0])}
    weights = torch.tensor([1.0, 2.0, 1.0])
    repeated = {name: value.repeat_interleave(2 * weights.long()) for name, value in draws.items()}
    weighted = hierarchical.score(draws, reference, ["mu", "log_tau"], weights=weights)
    plain = hierarchical.score(repeated, reference, ["mu", "log_tau"])
    n = len(repeated["mu"])  # the plain sd divides by n - 1, the weighted one by n
    for site in ("mu", "log_tau"):
        assert weighted[site]["mean_error"] == pytest.approx(plain[site]["mean_error"])
        assert weighted[site]["log_sd_ratio"] == pytest.approx(
            plain[site]["log_sd_ratio"] + 0.5 * math.log((n - 1) / n)
        )


def test_autonormal_draws_cover_every_member_under_subsampling(fresh_pyro_state):
    """AutoNormal's draws come from its parameters: every group, at its loc and scale."""
    model = hierarchical.exact_hierarchical.model
    guide = hierarchical.GUIDES["autonormal"](model)
    data = simulate(30)
    hierarchical.fit(model, guide, *data, 5, num_steps=2, progress=False)
    draws, posterior = hierarchical.guide_draws(guide, model, data, 4000)
    assert posterior is None
    assert draws["theta"].shape == (4000, 30) and bool((draws["tau"] > 0).all())
    loc, scale = guide.locs.theta.detach(), guide.scales.theta.detach()
    tolerance = 5 * float(scale.max()) / math.sqrt(4000)
    assert torch.allclose(draws["theta"].mean(0), loc, atol=tolerance)
    assert torch.allclose(draws["theta"].std(0), scale, rtol=0.1)


def test_bars_fail_on_nan_slow_fits_and_large_errors():
    bad = {"mean_error": 0.2, "log_sd_ratio": 0.0}
    good = {"mean_error": -0.05, "log_sd_ratio": -0.09}
    errors = {"mu": good, "log_tau": bad, "theta": good}
    rows = [
        {"guide": "structured", "problem": "normal", "groups": 10, "seed": 0, "nan": False}
        | {"wall_s": 5.0, "errors": errors},
        {"guide": "autonormal", "problem": "normal", "groups": 10, "seed": 0, "nan": False}
        | {"wall_s": 2.0, "errors": errors},
        {"guide": "structured", "problem": "normal", "groups": 20, "seed": 0, "nan": True}
        | {"wall_s": 1.0, "errors": None},
    ]
    result = bars(rows)
    assert result["normal J=10 seed 0: mu within 0.1 sd and 10%"]
    assert not result["normal J=10 seed 0: log_tau within 0.1 sd and 10%"]
    assert not result["normal J=10 seed 0: wall time <= 2x AutoNormal's"]
    assert not result["normal J=20 seed 0: no NaN"]
    assert not result["normal J=20 seed 0: theta within 0.1 sd and 10%"]
    table_row = rows[2] | {"batch_size": None, "steps": None, "params": 5, "peak_mb": 1.0}
    assert format_table([table_row], "normal").endswith("| NaN | NaN | NaN |")


def test_bench_hierarchical_through_the_cli(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "hierarchical", "--help"])
    assert exit_info.value.code == 0
    assert "pyro-nf bench hierarchical" in capsys.readouterr().out


def test_docstring_examples():
    result = doctest.testmod(hierarchical, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 4 and result.failed == 0
