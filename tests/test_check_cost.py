"""`benchmarks.check_cost` runs and compares the two settings of the check on one guide."""

import torch

from benchmarks import check_cost
from pyro_nf.fitting import trust


def test_both_settings_run_on_one_guide_and_the_settings_are_restored():
    settings = trust.TIME_FRACTION, trust.CORRECTION_FRACTION
    try:
        argv = ["--model", "years", "--seeds", "0", "--repeats", "1", "--fit-steps", "20"]
        (line,) = check_cost.main(argv)
    finally:
        torch.set_default_dtype(torch.float32)
    assert (trust.TIME_FRACTION, trust.CORRECTION_FRACTION) == settings
    for name in ("previous", "current"):
        (row,) = line[name]
        assert row["check_s"] > 0 and row["draws"] > 0 and row["khat"] is not None
    assert line["ratio"][0] > 0 and line["fit_s"] > 0
