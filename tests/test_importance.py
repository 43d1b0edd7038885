"""What importance weights say: PSIS k-hat, the smoothed and truncated weights, and the log
evidence with its standard error."""

import math
import warnings

import arviz as az
import pytest
import torch

from pyro_nf.importance import (
    EQUAL_SPREAD,
    evidence_from_log_weights,
    khat_from_log_weights,
    log_mean_exp,
    pareto_smooth,
    truncate_log_weights,
)


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def test_khat_of_exact_generalised_pareto_weights_is_their_shape():
    # Weights drawn from a GPD with shape 0.5: every tail of them is a GPD of that shape.
    u = torch.rand(100_000, generator=_generator(0), dtype=torch.float64)
    weights = (u.pow(-0.5) - 1) / 0.5
    assert khat_from_log_weights(weights.log()) == pytest.approx(0.5, abs=0.1)


def test_khat_of_a_narrow_normal_proposal_is_one_minus_its_variance():
    # Target N(0, 1), proposal N(0, s^2), s < 1: the weights' tail index is 1 / (1 - s^2).
    scale = 0.8
    eps = torch.randn(20_000, generator=_generator(1), dtype=torch.float64)
    log_weights = eps.pow(2) * (1 - scale**2) / 2  # up to a constant
    assert khat_from_log_weights(log_weights) == pytest.approx(1 - scale**2, abs=0.1)


@pytest.mark.parametrize("num_draws", [21, 256, 4000])
def test_khat_agrees_with_arviz_psislw(num_draws):
    for seed in range(3):
        log_weights = torch.randn(num_draws, generator=_generator(seed), dtype=torch.float64)
        log_weights = log_weights * (0.5 + seed)
        with warnings.catch_warnings():  # arviz warns of a k-hat above 0.7
            warnings.simplefilter("ignore")
            _, reference = az.psislw(log_weights.numpy().copy())
        assert khat_from_log_weights(log_weights) == pytest.approx(float(reference), abs=1e-8)


def test_khat_reads_weights_spanning_less_than_the_threshold_as_equal():
    ramp = torch.linspace(0.0, 1.0, 100, dtype=torch.float64)
    assert khat_from_log_weights(5.0 + 0.5 * EQUAL_SPREAD * ramp) == -math.inf
    assert math.isfinite(khat_from_log_weights(5.0 + 2 * EQUAL_SPREAD * ramp))


def test_khat_of_non_finite_weights():
    log_weights = torch.randn(100, generator=_generator(2))
    with_nan, with_inf, with_zero = log_weights.clone(), log_weights.clone(), log_weights.clone()
    with_nan[3], with_inf[3], with_zero[3] = math.nan, math.inf, -math.inf
    assert math.isnan(khat_from_log_weights(with_nan))
    assert khat_from_log_weights(with_inf) == math.inf
    assert khat_from_log_weights(with_zero) == math.inf  # the guide draws off the model


def test_khat_needs_a_vector_of_enough_draws():
    with pytest.raises(ValueError, match=r"len\(log_weights\)=20 is too few draws"):
        khat_from_log_weights(torch.zeros(20))
    with pytest.raises(ValueError, match=r"1-D tensor .* shape \(10, 10\)"):
        khat_from_log_weights(torch.zeros(10, 10))


def test_evidence_and_its_error_of_lognormal_weights():
    # w = exp(sigma eps): E w = exp(sigma^2 / 2), Var w = (exp(sigma^2) - 1) exp(sigma^2).
    sigma, count = 0.5, 100_000
    log_weights = sigma * torch.randn(count, generator=_generator(3), dtype=torch.float64)
    estimate = evidence_from_log_weights(log_weights)
    expected_error = math.sqrt(math.exp(sigma**2) - 1) / math.sqrt(count)
    assert estimate.stderr == pytest.approx(expected_error, rel=0.05)
    assert abs(estimate.log_evidence - sigma**2 / 2) < 4 * expected_error
    assert estimate.elbo == pytest.approx(float(log_weights.mean()))
    assert estimate.num_samples == count


def test_the_standard_error_is_the_spread_of_repeated_estimates():
    sigma = 0.5
    log_weights = sigma * torch.randn(400, 1000, generator=_generator(4), dtype=torch.float64)
    estimates = [evidence_from_log_weights(row) for row in log_weights]
    spread = torch.tensor([e.log_evidence for e in estimates]).std()
    mean_error = sum(e.stderr for e in estimates) / len(estimates)
    assert float(spread) == pytest.approx(mean_error, rel=0.15)


def test_evidence_of_zero_weights_and_of_one_draw():
    none = evidence_from_log_weights(torch.full((5,), -math.inf))
    assert none.log_evidence == -math.inf and none.stderr == math.inf
    one = evidence_from_log_weights(torch.tensor([1.5]))
    assert one.log_evidence == 1.5 and one.stderr == math.inf
    some = evidence_from_log_weights(torch.tensor([0.0, -math.inf]))  # weights 1 and 0
    assert some.log_evidence == pytest.approx(math.log(0.5))


def test_log_mean_exp_does_not_overflow():
    log_weights = torch.tensor([[1000.0, -1000.0], [1000.0 + math.log(3.0), -1000.0]])
    assert torch.allclose(
        log_mean_exp(log_weights), torch.tensor([1000.0 + math.log(2.0), -1000.0])
    )
    assert torch.allclose(log_mean_exp(log_weights, dim=1), log_weights[:, 0] - math.log(2.0))


@pytest.mark.parametrize("num_draws", [21, 256, 4000])
def test_pareto_smoothed_weights_agree_with_arviz_psislw(num_draws):
    for seed in range(3):
        log_weights = torch.randn(num_draws, generator=_generator(seed), dtype=torch.float64)
        log_weights = 5.0 + log_weights * (0.5 + seed)
        with warnings.catch_warnings():  # arviz warns of a k-hat above 0.7
            warnings.simplefilter("ignore")
            reference, khat = az.psislw(log_weights.numpy().copy())
        smoothed = pareto_smooth(log_weights)
        assert smoothed.khat == pytest.approx(float(khat), abs=1e-8)
        reference = torch.as_tensor(reference)
        assert torch.allclose(smoothed.log_weights, reference, atol=1e-10)
        assert smoothed.ess == pytest.approx(float(1 / (reference * 2).exp().sum()))


def test_smoothing_tames_the_largest_weight_of_a_heavy_tail():
    # Pareto(1) weights: infinite mean, the largest of 2000 holds much of the raw mass.
    uniform = torch.rand(2000, generator=_generator(5), dtype=torch.float64)
    log_weights = -uniform.log()  # log of Pareto(1, 1) draws, 1 / u
    smoothed = pareto_smooth(log_weights)
    raw = torch.softmax(log_weights, 0)
    assert smoothed.khat > 0.7
    assert smoothed.log_weights.exp().max() <= raw.max() + 1e-12
    assert smoothed.log_weights.exp().sum().item() == pytest.approx(1.0)


def test_smoothing_equal_and_zero_weights():
    equal = pareto_smooth(torch.full((50,), 3.0))
    assert equal.khat == -math.inf and torch.allclose(
        equal.log_weights.exp(), torch.full((50,), 0.02, dtype=torch.float64)
    )
    log_weights = torch.randn(100, generator=_generator(6), dtype=torch.float64)
    log_weights[7] = -math.inf
    smoothed = pareto_smooth(log_weights)
    assert smoothed.log_weights[7] == -math.inf and smoothed.khat == math.inf
    assert smoothed.log_weights.exp().sum().item() == pytest.approx(1.0)
    for bad in (math.nan, math.inf):
        log_weights[7] = bad
        with pytest.raises(ValueError, match="NaN or \\+inf"):
            pareto_smooth(log_weights)


def test_truncated_weights_are_capped_at_sqrt_s_times_their_mean():
    log_weights = torch.randn(400, generator=_generator(7), dtype=torch.float64)
    log_weights[0] = 8.0  # one draw that would take 80% of the weight
    weights = truncate_log_weights(log_weights).exp()
    raw = log_weights.exp()
    cap = raw.mean() * math.sqrt(400)
    capped = raw.clamp(max=float(cap))
    assert torch.allclose(weights, capped / capped.sum())
    assert weights[0] < 0.3 < torch.softmax(log_weights, 0)[0]
    untouched = 0.01 * torch.randn(400, generator=_generator(8), dtype=torch.float64)
    assert torch.allclose(
        truncate_log_weights(untouched), untouched - torch.logsumexp(untouched, 0)
    )
