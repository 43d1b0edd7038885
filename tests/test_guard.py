"""The non-finite guard: snapshots, restores, and the error it raises."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_nf.fitting.guard import (
    NonFiniteGuard,
    NonFiniteLossError,
    SiteProblem,
    find_nonfinite_site,
)

LOSSES = [3.0, 2.0]


def make_guard(data_notes=()):
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    problem = SiteProblem("site_a", "log density", "nan")
    return {"x": x}, NonFiniteGuard(lambda: problem, data_notes)


def test_finite_steps_take_snapshots_and_nan_gradients_are_named():
    params, guard = make_guard()
    x = params["x"]
    x.sum().backward()
    guard.check(1.0, params, step=2, losses=LOSSES)
    assert torch.equal(guard.snapshot["x"], x.detach())
    x.grad.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 3: non-finite gradient at sample site "
                       "'site_a'; non-finite gradients of x") as info:  # fmt: skip
        guard.check(1.0, params, step=3, losses=LOSSES)
    assert info.value.losses == [3.0, 2.0] and info.value.parameters == ["x"]
    assert torch.equal(x.detach(), torch.tensor([1.0, 2.0]))  # finite: left as it was


def test_non_finite_parameters_are_restored():
    params, guard = make_guard()
    x = params["x"]
    x.sum().backward()
    guard.check(1.0, params, step=0, losses=[])
    with torch.no_grad():
        x.fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match="non-finite parameters"):
        guard.evaluation_failed(RuntimeError("boom"), params, step=1, losses=LOSSES)
    assert torch.equal(x.detach(), torch.tensor([1.0, 2.0]))


def test_other_evaluation_errors_are_left_to_the_caller():
    params, guard = make_guard()
    guard.evaluation_failed(RuntimeError("a bug in the model"), params, step=0, losses=[])
    with pytest.raises(NonFiniteLossError, match="invalid values"):
        error = ValueError("... found invalid values: tensor(nan)")
        guard.evaluation_failed(error, params, step=1, losses=LOSSES)


def test_at_the_setup_the_error_says_what_is_wrong_not_to_lower_the_lr():
    params, guard = make_guard(data_notes=("argument 'y' holds 1 NaN (first at index (3,))",))
    with pytest.raises(NonFiniteLossError, match="before any step: the data are not finite: "
                       "argument 'y' holds 1 NaN") as info:  # fmt: skip
        guard.evaluation_failed(RuntimeError("cholesky failed"), params, step=0, losses=[])
    assert "smaller lr" not in str(info.value)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_an_interrupted_update_is_rolled_back():
    params, guard = make_guard()
    x = params["x"]
    x.sum().backward()
    guard.check(1.0, params, step=0, losses=[])
    with pytest.raises(KeyboardInterrupt), guard.updating(params), torch.no_grad():
        x.add_(5.0)
        raise KeyboardInterrupt
    assert torch.equal(x.detach(), torch.tensor([1.0, 2.0]))


def test_the_diagnosis_names_a_site_and_never_raises():
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.factor("bad", torch.tensor(float("nan")))

    def guide():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    def broken():
        raise RuntimeError("not even a trace")

    assert find_nonfinite_site(model, guide, (), {}) == SiteProblem("bad", "log density", "nan")
    assert find_nonfinite_site(broken, guide, (), {}) is None

    def observed():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(x, 1.0), obs=torch.tensor([0.0, float("inf")]))

    problem = find_nonfinite_site(observed, guide, (), {})
    assert problem == SiteProblem("y", "observed value", "inf")
    assert problem.describe() == "the observed value of sample site 'y' is inf"
