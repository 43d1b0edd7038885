"""The README's demo runs and reports both guides."""

from pyro_nf import demo


def test_demo_prints_both_guides_and_every_site(capsys):
    demo.main(["--steps", "30", "--no-progress"])
    out = capsys.readouterr().out
    assert "AutoNormal: ELBO" in out and "AutoSplineFlow: ELBO" in out
    for site in ("intercept", "slope", "noise"):
        assert out.count(f"{site}: median") == 2
