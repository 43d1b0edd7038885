"""Bad input is refused where it is given, with the argument, the value and what is accepted."""

import math
import re
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_nf import AutoFlow, AutoIAFFlow, AutoPlanarFlow, AutoSplineFlow, build_flow
from pyro_nf.checks import LARGE_FLOW_PARAMETERS, check_int, check_positive

pytestmark = pytest.mark.usefixtures("fresh_pyro_state")


def model():
    loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.sample("y", dist.Normal(loc, 1.0).to_event(1), obs=torch.ones(2))


LAYERS = "num_layers must be >= 1 and <= 1000 (an int)"
WIDTHS = "hidden_dims must be a non-empty sequence of ints >= 1"
SCALE = "init_scale must be > 0 and <= 1e+06 (a finite number)"
BINS = "count_bins must be >= 2 (an int)"
BOUND = "bound must be > 0 (a finite number)"
SUMMARY = "num_summary_samples must be >= 1 (an int)"

GUIDE_ARGUMENTS = [
    ({"num_layers": 0}, ValueError, f"{LAYERS}, got 0"),
    ({"num_layers": -2}, ValueError, f"{LAYERS}, got -2"),
    ({"num_layers": 10**9}, ValueError, f"{LAYERS}, got 1000000000"),
    ({"num_layers": True}, TypeError, f"{LAYERS}, got True (bool)"),
    ({"num_layers": "3"}, TypeError, f"{LAYERS}, got '3' (str)"),
    ({"num_layers": 2.5}, TypeError, f"{LAYERS}, got 2.5 (float)"),
    ({"num_layers": 2.0}, TypeError, f"{LAYERS}, got 2.0 (float)"),
    ({"hidden_dims": []}, ValueError, f"{WIDTHS}, e.g. (32, 32), got []"),
    ({"hidden_dims": "32"}, TypeError, f"{WIDTHS}, e.g. (32, 32), got '32' (str)"),
    ({"hidden_dims": 32}, TypeError, f"{WIDTHS}, e.g. (32, 32), got 32 (int)"),
    ({"hidden_dims": [32, 0]}, ValueError, f"{WIDTHS}, e.g. (32, 32), got [32, 0]"),
    ({"hidden_dims": [32.5]}, TypeError, f"{WIDTHS}, e.g. (32, 32), got [32.5]"),
    ({"hidden_dims": [True]}, TypeError, f"{WIDTHS}, e.g. (32, 32), got [True]"),
    ({"init_scale": 0.0}, ValueError, f"{SCALE}, got 0.0"),
    ({"init_scale": -1}, ValueError, f"{SCALE}, got -1"),
    ({"init_scale": math.inf}, ValueError, f"{SCALE}, got inf"),
    ({"init_scale": math.nan}, ValueError, f"{SCALE}, got nan"),
    ({"init_scale": 1e30}, ValueError, f"{SCALE}, got 1e+30"),
    ({"init_scale": "0.1"}, TypeError, f"{SCALE}, got '0.1' (str)"),
    ({"init_scale": True}, TypeError, f"{SCALE}, got True (bool)"),
    ({"count_bins": 0}, ValueError, f"{BINS}, got 0"),
    ({"count_bins": 1}, ValueError, f"{BINS}, got 1"),
    ({"count_bins": 4.0}, TypeError, f"{BINS}, got 4.0 (float)"),
    ({"bound": -1}, ValueError, f"{BOUND}, got -1"),
    ({"bound": 0}, ValueError, f"{BOUND}, got 0"),
    ({"bound": math.inf}, ValueError, f"{BOUND}, got inf"),
    ({"bound": "3"}, TypeError, f"{BOUND}, got '3' (str)"),
    ({"tails": "linaer"}, ValueError, "tails must be one of ('identity', 'linear'), got 'linaer'"),
    ({"num_summary_samples": 0}, ValueError, f"{SUMMARY}, got 0"),
    ({"num_summary_samples": 100.0}, TypeError, f"{SUMMARY}, got 100.0 (float)"),
    ({"num_bins": 4}, ValueError, "does not take option(s) num_bins; it accepts: hidden_dims, "),
    ({"warm_start": "map"}, ValueError, "warm_start must be 'laplace' or None, got 'map'"),
    ({"noncentered": "yes"}, ValueError, "noncentered must be 'auto', True or False"),
]


@pytest.mark.parametrize(
    "arguments, error, message", GUIDE_ARGUMENTS, ids=[repr(a) for a, _, _ in GUIDE_ARGUMENTS]
)
def test_spline_guide_refuses_bad_arguments_at_construction(arguments, error, message):
    with pytest.raises(error, match=re.escape(message)):
        AutoSplineFlow(model, **arguments)


@pytest.mark.parametrize(
    "guide_class, option, accepted",
    [(AutoPlanarFlow, "count_bins", "none"), (AutoIAFFlow, "bound", "hidden_dims")],
)
def test_options_are_checked_per_family(guide_class, option, accepted):
    message = f"does not take option(s) {option}; it accepts: {accepted}"
    with pytest.raises(ValueError, match=re.escape(message)):
        guide_class(model, **{option: 3})


def test_model_must_be_callable():
    with pytest.raises(TypeError, match="model must be a callable Pyro model, got str"):
        AutoFlow("model")


def test_good_arguments_are_kept_as_given():
    guide = AutoSplineFlow(
        model, num_layers=1, hidden_dims=(8, 8), count_bins=4, bound=5, tails="identity"
    )
    guide()
    assert len(guide.flow.layers) == 1
    layer = guide.flow.layers[0]
    assert [linear.out_features for linear in layer.arn.layers[:-1]] == [8, 8]
    assert layer.count_bins == 4 and layer.bound == 5.0 and layer.tails == "identity"
    default = AutoSplineFlow(model, num_layers=1)
    default()
    assert default.flow.layers[0].tails == "linear"  # the guides' default


QUANTILES = [
    ([math.nan], ValueError, "got [nan]"),
    ([0.5, 1.5], ValueError, "got [0.5, 1.5]"),
    ([-0.1], ValueError, "got [-0.1]"),
    ([], ValueError, "got []"),
    (0.5, ValueError, "got 0.5"),
    ([[0.5]], ValueError, "got [[0.5]]"),
    ("0.5", TypeError, "got '0.5' (str)"),
    (["a"], TypeError, "got ['a'] (list)"),
]


@pytest.mark.parametrize(
    "quantiles, error, message", QUANTILES, ids=[repr(q) for q, *_ in QUANTILES]
)
def test_quantiles_refuse_bad_probabilities_before_any_set_up(quantiles, error, message):
    guide = AutoPlanarFlow(model)
    accepted = "quantiles must be a 1-D sequence of numbers in [0, 1], "
    with pytest.raises(error, match=re.escape(accepted + message)):
        guide.quantiles(quantiles)
    assert guide.prototype_trace is None  # refused before the warm start ran


@pytest.mark.parametrize(
    "dim, error, message",
    [(0, ValueError, "dim must be >= 1 (an int), got 0"), (2.5, TypeError, "got 2.5 (float)")],
)
def test_build_flow_checks_the_dimension(dim, error, message):
    with pytest.raises(error, match=re.escape(message)):
        build_flow("planar", dim)


def test_a_large_flow_warns_with_its_size_and_how_to_reduce_it():
    with pytest.warns(
        UserWarning, match=r"'spline' flow on 800 dimensions has ([\d,]+) param"
    ) as record:
        flow = build_flow("spline", 800)
    count = sum(parameter.numel() for parameter in flow.parameters())
    assert count > LARGE_FLOW_PARAMETERS
    message = str(record[0].message)
    assert f"{count:,} parameters" in message
    assert "num_layers=1" in message and "count_bins=4" in message and "'planar'" in message


def test_a_flow_below_the_size_limit_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_flow("spline", 50)


@pytest.mark.parametrize(
    "value, number",
    [(torch.tensor(3), 3), (3, 3)],
)
def test_check_int_takes_integer_scalars(value, number):
    assert check_int("n", value, minimum=1) == number


def test_check_positive_takes_scalar_tensors():
    assert check_positive("scale", torch.tensor(0.5)) == 0.5
