"""The non-finite guard: snapshots, restores, and the error it raises."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_nf.guard import NonFiniteGuard, NonFiniteLossError, find_nonfinite_site


def make_guard():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    losses = [3.0, 2.0]
    return x, NonFiniteGuard({"x": x}, losses, diagnose=lambda: "site_a")


def test_finite_steps_take_snapshots_and_nan_gradients_are_named():
    x, guard = make_guard()
    x.sum().backward()
    guard.check(1.0, step=2)
    assert torch.equal(guard.snapshot[0], x.detach())
    x.grad.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 3: non-finite gradient at sample site "
                       "'site_a'; non-finite gradients of x") as info:  # fmt: skip
        guard.check(1.0, step=3)
    assert info.value.losses == [3.0, 2.0] and info.value.parameters == ["x"]
    assert torch.equal(x.detach(), torch.tensor([1.0, 2.0]))  # finite: left as it was


def test_non_finite_parameters_are_restored():
    x, guard = make_guard()
    x.sum().backward()
    guard.check(1.0, step=0)
    with torch.no_grad():
        x.fill_(float("inf"))
    with pytest.raises(NonFiniteLossError, match="non-finite parameters"):
        guard.evaluation_failed(RuntimeError("boom"), step=1)
    assert torch.equal(x.detach(), torch.tensor([1.0, 2.0]))


def test_other_evaluation_errors_are_left_to_the_caller():
    x, guard = make_guard()
    guard.evaluation_failed(RuntimeError("a bug in the model"), step=0)  # returns
    with pytest.raises(NonFiniteLossError, match="invalid values"):
        guard.evaluation_failed(ValueError("... found invalid values: tensor(nan)"), step=0)


def test_an_interrupted_update_is_rolled_back():
    x, guard = make_guard()
    x.sum().backward()
    guard.check(1.0, step=0)
    with pytest.raises(KeyboardInterrupt), guard.updating(), torch.no_grad():
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

    assert find_nonfinite_site(model, guide, (), {}) == "bad"
    assert find_nonfinite_site(model, guide, (), {}) == "bad"
    assert find_nonfinite_site(broken, guide, (), {}) is None
