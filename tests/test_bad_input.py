"""Bad input is refused where it is given, with the argument, the value and what is accepted;
bad data, a start of zero density and an improper posterior are named for what they are."""

import math
import re
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoNormal, init_to_value

from pyro_nf import (
    AutoFlow,
    AutoIAFFlow,
    AutoPlanarFlow,
    AutoSplineFlow,
    NonFiniteLossError,
    build_flow,
    fit,
)
from pyro_nf.checks import LARGE_FLOW_PARAMETERS, check_int, check_positive
from pyro_nf.fitting import ImproperPosteriorWarning

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


def mean_model(y, x=None):
    """y_i ~ N(b x_i, 1), or N(b, 1) without x."""
    b = pyro.sample("b", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(b if x is None else b * x, 1.0), obs=y)


def with_nan(values, index, value=float("nan")):
    values = values.clone()
    values[index] = value
    return values


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoSplineFlow])
def test_non_finite_data_are_named_at_setup(guide_class):
    y = with_nan(torch.linspace(-1.0, 1.0, 20), 3)
    message = (
        "before any step: the data are not finite: argument 'y' holds 1 NaN (first at index (3,))"
    )
    with pytest.raises(NonFiniteLossError, match=re.escape(message)) as info:
        fit(mean_model, guide_class(mean_model), y, num_steps=20, progress=False)
    assert info.value.step == 0 and info.value.losses == []
    assert "smaller lr" not in str(info.value)


def test_a_non_finite_covariate_is_named_as_a_keyword_argument():
    x = with_nan(torch.linspace(1.0, 2.0, 20), 5, float("inf"))
    message = "argument 'x' holds 1 infinite (first at index (5,))"
    with pytest.raises(NonFiniteLossError, match=re.escape(message)):
        fit(mean_model, AutoNormal(mean_model), torch.zeros(20), x=x, num_steps=20, progress=False)


def test_a_non_finite_observed_value_inside_the_model_is_named():
    def model():
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(b, 1.0).expand([2]).to_event(1),
                    obs=torch.tensor([0.5, float("nan")]))  # fmt: skip

    message = "the data are not finite: the observed value of sample site 'obs' is nan"
    with pytest.raises(NonFiniteLossError, match=re.escape(message)):
        fit(model, AutoNormal(model), num_steps=20, progress=False)


def test_masked_missing_values_are_fitted_without_a_word():
    y = with_nan(torch.linspace(-1.0, 1.0, 20), 3)

    def model(y):
        b = pyro.sample("b", dist.Normal(0.0, 10.0))
        observed = ~y.isnan()
        with pyro.plate("data", len(y)), pyro.poutine.mask(mask=observed):
            pyro.sample("y", dist.Normal(b, 1.0), obs=torch.where(observed, y, 0.0))

    result = fit(model, AutoNormal(model), y, num_steps=20, progress=False)
    assert result.num_steps == 20


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoSplineFlow])
def test_a_log_density_of_minus_infinity_at_the_start_is_named(guide_class):
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.factor("wall", torch.where(x < 100.0, -math.inf, 0.0))

    message = "the model's log density is -inf at the guide's starting point (sample site 'wall')"
    with pytest.raises(NonFiniteLossError, match=re.escape(message)) as info:
        fit(model, guide_class(model), num_steps=20, progress=False)
    assert info.value.step == 0 and "smaller lr" not in str(info.value)


FLAT = dist.ImproperUniform(constraints.real, (), ())
AT_ZERO = init_to_value(values={name: torch.tensor(0.0) for name in ("x", "a", "b")})


def flat_and_unused():
    """x has a flat prior and no likelihood: its posterior is improper."""
    pyro.sample("x", FLAT)
    m = pyro.sample("m", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.Normal(m, 1.0), obs=torch.tensor(0.5))


def flat_sum(y):
    """y ~ N(a + b, 1) with flat priors on a and b: a - b is not identified."""
    a, b = pyro.sample("a", FLAT), pyro.sample("b", FLAT)
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(a + b, 1.0), obs=y)


def flat_mean(y):
    """y ~ N(a, 1) with a flat prior on a: proper."""
    a = pyro.sample("a", FLAT)
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(a, 1.0), obs=y)


Y = torch.randn(20, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "model, args, particles, site",
    [(flat_and_unused, (), 8, "x"), (flat_sum, (Y,), 128, "a")],
    ids=["improper", "unidentified"],
)
def test_an_improper_or_unidentified_posterior_is_warned_about_once(model, args, particles, site):
    guide = AutoSplineFlow(model, init_loc_fn=AT_ZERO)
    with pytest.warns(ImproperPosteriorWarning) as record:
        try:
            fit(model, guide, *args, num_steps=400, num_particles=particles, progress=False,
                seed=1)  # fmt: skip
        except NonFiniteLossError:  # a flow running away may overflow after the warning
            pass
    warned = [w for w in record if w.category is ImproperPosteriorWarning]
    assert len(warned) == 1
    text = str(warned[0].message)
    assert "posterior looks improper or unidentified" in text and f"'{site}' from" in text


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoSplineFlow])
def test_a_flat_prior_with_a_proper_posterior_is_not_warned_about(guide_class):
    result = fit(flat_mean, guide_class(flat_mean, init_loc_fn=AT_ZERO), Y, num_steps=300,
                 progress=False, seed=0)  # fmt: skip
    assert result.num_steps == 300
