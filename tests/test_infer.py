"""fit(): accuracy on conjugate models, the schedule, particles, the NaN guard, STL gradients."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDiagonalNormal, AutoNormal, init_to_value

from pyro_nf import AutoFlow, AutoIAFFlow, AutoPlanarFlow, AutoSplineFlow
from pyro_nf.batching import Batching
from pyro_nf.fitting import FitResult, NonFiniteLossError, Schedule, fit
from pyro_nf.fitting.estimators import make_elbo
from pyro_nf.fitting.objective import Objective

DATA = torch.tensor([0.8, 1.9, 1.2, 0.4, 1.6])


def normal_model(data=DATA):
    """x ~ N(0, 1), data_i ~ N(x, 1): posterior N(sum / (n + 1), 1 / (n + 1))."""
    x = pyro.sample("x", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(x, 1.0), obs=data)


POST_MEAN = DATA.sum().item() / (len(DATA) + 1)
POST_SD = (1 / (len(DATA) + 1)) ** 0.5


pytestmark = pytest.mark.usefixtures("fresh_pyro_state")


@pytest.mark.slow
def test_fit_recovers_conjugate_posterior_and_converges():
    guide = AutoNormal(normal_model)
    result = fit(normal_model, guide, num_steps=4000, progress=False, seed=0)
    assert isinstance(result, FitResult)
    assert result.converged and result.num_steps < 4000
    assert len(result.losses) == result.num_steps and result.wall_time > 0
    assert result.lr < 1e-2 * 0.3**2  # decayed from AutoNormal's default 1e-2
    loc, scale = guide.locs.x.item(), guide.scales.x.item()
    assert abs(loc - POST_MEAN) < 0.05 and abs(scale - POST_SD) < 0.05
    # log p(data) = log N(data; 0, I + 11^T); the ELBO is below it and close for an exact family
    cov = torch.eye(len(DATA)) + 1.0
    log_z = dist.MultivariateNormal(torch.zeros(len(DATA)), cov).log_prob(DATA).item()
    assert log_z - 0.05 < result.elbo < log_z + 0.05


def test_default_learning_rates():
    flow_guide = AutoFlow(normal_model, flow="spline")
    assert fit(normal_model, flow_guide, num_steps=1, progress=False).lr == flow_guide.default_lr
    pyro.clear_param_store()
    assert fit(normal_model, AutoNormal(normal_model), num_steps=1, progress=False).lr == 1e-2
    pyro.clear_param_store()
    optim = pyro.optim.Adam({"lr": 0.02})
    result = fit(
        normal_model, AutoNormal(normal_model), num_steps=1, optimizer=optim, progress=False
    )
    assert result.lr == 0.02


def test_the_guides_rate_is_read_after_its_set_up():
    """An AutoFlow that takes the structured form at its first call trains at that form's
    rate, not at the flow family's it reported before the call."""

    def model():
        tau = pyro.sample("tau", dist.HalfNormal(1.0))
        with pyro.plate("groups", 50, subsample_size=10):
            a = pyro.sample("a", dist.Normal(0.0, tau))
            pyro.sample("y", dist.Normal(a, 1.0), obs=torch.zeros(10))

    guide = AutoSplineFlow(model)
    before = guide.default_lr
    result = fit(model, guide, num_steps=1, progress=False, num_khat_samples=0)
    assert guide.structure.structured
    assert result.lr == guide.default_lr != before


def test_schedule_anneals_the_last_steps():
    schedule = Schedule(window=1000, anneal_fraction=0.5, anneal_to=0.1)
    result = fit(normal_model, AutoNormal(normal_model), num_steps=100, lr=1e-2,
                 schedule=schedule, progress=False)  # fmt: skip
    assert not result.converged and result.num_steps == 100
    assert math.isclose(result.lr, 1e-2 * 0.1 ** (49 / 50), rel_tol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(estimator="score"), "estimator"),
        (dict(num_steps=0), "num_steps"),
        (dict(lr=-1.0), "lr"),
        (dict(optimizer=torch.optim.Adam([torch.zeros(1)])), "optimizer"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        fit(normal_model, AutoNormal(normal_model), progress=False, **kwargs)


def test_schedule_validates():
    with pytest.raises(ValueError, match="decay"):
        Schedule(decay=1.5)


@pytest.mark.slow
def test_vectorised_particles_and_fallback():
    guide = AutoNormal(normal_model)
    result = fit(normal_model, guide, num_steps=200, num_particles=8, progress=False, seed=0)
    assert result.num_steps == 200

    def scalar_model():  # python control flow on a value: cannot be vectorised
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        scale = 1.0 if x > -10 else 2.0
        pyro.sample("obs", dist.Normal(x, scale), obs=torch.tensor(1.0))

    pyro.clear_param_store()
    guide = AutoNormal(scalar_model)
    with pytest.warns(UserWarning, match="one at a time"):
        fit(scalar_model, guide, num_steps=300, num_particles=2, lr=0.05, progress=False, seed=0)
    assert abs(guide.locs.x.item() - 0.5) < 0.15


def nan_after(num_finite_calls, record):
    """A model whose log density turns NaN from its ``num_finite_calls``-th call on."""
    calls = []

    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(x, 1.0), obs=torch.tensor(1.0))
        if len(calls) == num_finite_calls:  # the parameters this failing step starts from
            record.update(
                {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}
            )
        calls.append(None)
        if len(calls) > num_finite_calls:
            pyro.factor("boom", torch.tensor(float("nan")))

    model.calls = calls
    return model


def test_nan_loss_stops_and_keeps_last_finite_parameters():
    record = {}
    model = nan_after(30, record)
    guide = AutoNormal(model)
    guide()  # sets up the guide (one model call)
    model.calls.clear()
    with pytest.raises(NonFiniteLossError, match="step 30.*'boom'") as info:
        fit(model, guide, num_steps=100, num_particles=1, progress=False, seed=0)
    assert info.value.step == 30 and info.value.site == "boom"
    assert len(info.value.losses) == 30 and all(math.isfinite(v) for v in info.value.losses)
    store = dict(pyro.get_param_store().named_parameters())
    assert record and all(torch.equal(store[k], v) for k, v in record.items())
    assert all(torch.isfinite(v).all() for v in store.values())


def test_nan_gradient_names_the_parameters():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.factor("kink", (x - x).sqrt())  # finite value, NaN gradient

    with pytest.raises(NonFiniteLossError, match="gradient") as info:
        fit(model, AutoNormal(model), num_steps=10, progress=False)
    assert info.value.step == 0 and "AutoNormal.locs.x" in info.value.parameters


class PoisonedSGD(torch.optim.SGD):
    """SGD whose ``bad_step``-th update writes NaN into the parameters."""

    bad_step = 20

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.count = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.count += 1
        if self.count == self.bad_step:
            self.before = [p.clone() for g in self.param_groups for p in g["params"]]
        super().step(closure)
        if self.count == self.bad_step:
            for group in self.param_groups:
                for p in group["params"]:
                    p.fill_(float("nan"))


def test_non_finite_parameters_are_restored_from_the_snapshot():
    optimizers = []

    def make(params, lr):
        optimizers.append(PoisonedSGD(params, lr))
        return optimizers[-1]

    guide = AutoNormal(normal_model)
    with pytest.raises(NonFiniteLossError) as info:
        fit(normal_model, guide, num_steps=100, optimizer=make, progress=False, seed=0)
    assert info.value.step == PoisonedSGD.bad_step
    params = [p for g in optimizers[0].param_groups for p in g["params"]]
    assert all(torch.isfinite(p).all() for p in params)
    # restored to the parameters the poisoning update started from
    assert len(info.value.losses) == PoisonedSGD.bad_step
    assert all(torch.equal(p, b) for p, b in zip(params, optimizers[0].before, strict=True))


def gaussian_target():
    mean = torch.tensor([1.0, -2.0])

    def model():
        pyro.sample("z", dist.Normal(mean, 0.5).to_event(1))

    return model, mean


def grad_samples(model, guide, estimator, reps=40):
    elbo = make_elbo(estimator, num_particles=1, vectorize=False)
    elbo.differentiable_loss(model, guide)  # set up the guide's parameters
    params = [p for p in guide.parameters()]
    rows = []
    for _ in range(reps):
        loss = elbo.differentiable_loss(model, guide)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads if g is not None]))
    return torch.stack(rows)


@pytest.mark.parametrize("guide_cls", [AutoIAFFlow, AutoSplineFlow])
def test_stl_gradient_variance_vanishes_at_the_optimum(guide_cls):
    # q is exactly the target: loc and scale at the posterior's, the flow at the identity
    model, mean = gaussian_target()
    pyro.set_rng_seed(0)
    guide = guide_cls(model, init_loc_fn=init_to_value(values={"z": mean}), init_scale=0.5)
    standard = grad_samples(model, guide, "elbo").var(0).sum()
    stl = grad_samples(model, guide, "stl").var(0).sum()
    assert standard > 1.0
    assert stl < 1e-3 * standard
    # scoring with detached parameters leaves the guide's own parameters intact
    assert all(isinstance(p, torch.nn.Parameter) for p in guide.parameters())


@pytest.mark.parametrize("guide_cls", [AutoDiagonalNormal, AutoNormal, AutoIAFFlow])
def test_stl_gradient_is_unbiased(guide_cls):
    model, _ = gaussian_target()
    pyro.set_rng_seed(1)
    guide = guide_cls(model)
    guide()
    with torch.no_grad():  # move the guide away from the optimum
        for name, param in guide.named_parameters():
            if "loc" in name:
                param.add_(0.5)

    def mean_grad(estimator):
        elbo = make_elbo(estimator, num_particles=20000, vectorize=True)
        params = list(guide.parameters())
        grads = torch.autograd.grad(elbo.differentiable_loss(model, guide), params)
        return torch.cat([g.reshape(-1) for g in grads])

    standard, stl = mean_grad("elbo"), mean_grad("stl")
    assert standard.abs().max() > 0.3
    assert torch.allclose(standard, stl, atol=0.1, rtol=0.05)


@pytest.mark.slow
def test_stl_fit_matches_the_posterior():
    guide = AutoNormal(normal_model)
    fit(normal_model, guide, num_steps=3000, estimator="stl", progress=False, seed=0)
    assert abs(guide.locs.x.item() - POST_MEAN) < 0.05
    assert abs(guide.scales.x.item() - POST_SD) < 0.05


@pytest.mark.parametrize("estimator", ["stl", "iw"])
def test_stl_and_iw_reject_unsupported_guides(estimator):
    def model():
        pyro.sample("rate", dist.Gamma(2.0, 1.0))

    def guide():
        a = pyro.param("a", torch.tensor(2.0), constraint=dist.constraints.positive)
        pyro.sample("rate", dist.Gamma(a, 1.0))

    with pytest.raises(NotImplementedError, match="'rate'.*Gamma"):
        fit(model, guide, num_steps=5, estimator=estimator, progress=False)


@pytest.mark.slow
def test_auto_estimator_switches_to_stl_at_the_first_decay(monkeypatch):
    import pyro_nf.fitting.objective as objective

    made = []

    def recording_make_elbo(estimator, num_particles, vectorize, max_plate_nesting, **options):
        made.append((estimator, num_particles))
        return make_elbo(estimator, num_particles, vectorize, max_plate_nesting, **options)

    monkeypatch.setattr(objective, "make_elbo", recording_make_elbo)
    result = fit(
        normal_model,
        AutoNormal(normal_model),
        num_steps=4000,
        num_particles=1,
        estimator="auto",
        progress=False,
        seed=0,
    )
    assert result.converged and made == [("elbo", 1), ("stl", 1)]

    def model():
        pyro.sample("rate", dist.Gamma(2.0, 1.0))

    def guide():  # a Gamma site cannot be scored with detached parameters: stays "elbo"
        a = pyro.param("a", torch.tensor(2.0), constraint=dist.constraints.positive)
        pyro.sample("rate", dist.Gamma(a, 1.0))

    made.clear()
    result = fit(model, guide, num_steps=4000, lr=0.05, estimator="auto", progress=False, seed=0)
    assert result.lr < 0.05 and made and {estimator for estimator, _ in made} == {"elbo"}


class RecordingAdam(torch.optim.Adam):
    """Adam that keeps a copy of the parameters after every step."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.iterates = []

    def step(self, closure=None):
        out = super().step(closure)
        self.iterates.append(torch.cat([p.detach().reshape(-1) for p in self._params()]))
        return out

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]


@pytest.mark.parametrize("average", [True, False])
def test_parameters_end_at_the_mean_of_the_plateau_iterates(average):
    optimizers = []

    def make(params, lr):
        optimizers.append(RecordingAdam(params, lr))
        return optimizers[-1]

    schedule = Schedule(window=50, num_decays=0, average=average)
    result = fit(
        normal_model,
        AutoNormal(normal_model),
        num_steps=2000,
        lr=0.05,
        optimizer=make,
        schedule=schedule,
        estimator="elbo",
        progress=False,
        seed=0,
    )
    assert result.converged  # after a plateau of 2 windows at the initial lr
    optim = optimizers[0]
    final = torch.cat([p.detach().reshape(-1) for p in optim._params()])
    iterates = torch.stack(optim.iterates)
    assert len(iterates) == result.num_steps
    plateau_mean = iterates[-2 * schedule.window :].mean(0)
    if average:
        assert torch.allclose(final, plateau_mean, atol=1e-12)
        assert not torch.allclose(final, iterates[-1], atol=1e-3)
    else:
        assert torch.equal(final, iterates[-1])


def test_default_particles_follow_the_effort_rule(fresh_pyro_state):
    result = fit(normal_model, AutoNormal(normal_model), num_steps=300, progress=False)
    steps = [step for step, _ in result.particle_schedule]
    counts = [count for _, count in result.particle_schedule]
    assert steps == sorted(steps) and steps[0] == 0 and counts[0] == 1
    assert all(count & (count - 1) == 0 and count <= 256 for count in counts)  # powers of two
    assert counts[-1] == result.num_particles


def _unbatchable():  # control flow on a value: neither a plate nor vmap can batch it
    v = pyro.sample("v", dist.Normal(0.0, 1.0))
    scale = v.exp() if v < 10 else torch.tensor(1.0)
    pyro.sample("u", dist.Normal(torch.zeros(3), scale).to_event(1))


def test_particles_are_batched_by_vmap_where_no_particle_plate_fits(fresh_pyro_state):
    def unplated():  # ``torch.zeros(3)`` does not broadcast with a particle dimension on v
        v = pyro.sample("v", dist.Normal(0.0, 1.0))
        pyro.sample("u", dist.Normal(torch.zeros(3), v.exp()).to_event(1), obs=torch.ones(3))

    guide = AutoPlanarFlow(unplated)
    objective = Objective(unplated, guide, (), {}, "elbo")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # still batched: nothing to warn of
        objective.setup(particles=4)
        batched = torch.stack([objective.loss(4)[0] for _ in range(300)]).detach()
    assert objective.batching is Batching.VMAP
    # The same loss as particles drawn one at a time (Pyro's Trace_ELBO), within noise.
    elbo = Trace_ELBO(num_particles=4)
    looped = torch.tensor([elbo.loss(unplated, guide) for _ in range(300)])
    error = math.hypot(batched.std(), looped.std()) / math.sqrt(300)
    assert abs(float(batched.mean() - looped.mean())) < 4 * error


def test_default_particles_are_one_where_the_model_does_not_vectorise(fresh_pyro_state):
    unbatched = _unbatchable

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback to one particle is silent
        result = fit(unbatched, AutoNormal(unbatched), num_steps=5, progress=False, seed=0)
    assert result.num_particles == 1 and len(result.losses) == 5


def test_a_given_count_is_drawn_one_at_a_time_where_the_model_does_not_vectorise(
    fresh_pyro_state,
):
    unbatched = _unbatchable
    guide = AutoNormal(unbatched)
    with pytest.warns(UserWarning, match="drawing the 2 particles one at a time"):
        result = fit(unbatched, guide, num_steps=5, num_particles=2, progress=False, seed=0)
    assert result.num_particles == 2 and result.particle_schedule == [(0, 2)]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(num_steps=2.5), TypeError, "num_steps must be an integer >= 1, got 2.5"),
        (dict(num_steps=True), TypeError, "num_steps must be an integer >= 1, got True"),
        (dict(num_steps="10"), TypeError, "num_steps must be an integer >= 1, got '10'"),
        (dict(num_particles=0), ValueError, "num_particles must be an integer >= 1, got 0"),
        (dict(num_particles=2.0), TypeError, "num_particles must be an integer >= 1, got 2.0"),
        (dict(lr=float("inf")), ValueError, "lr must be a positive finite number, got inf"),
        (dict(lr=float("nan")), ValueError, "lr must be a positive finite number, got nan"),
        (dict(lr="0.1"), TypeError, "lr must be a positive finite number, got '0.1'"),
        (dict(lr=True), TypeError, "lr must be a positive finite number, got True"),
        (dict(max_time=0), ValueError, "max_time must be a positive finite number, got 0"),
        (dict(max_time=-1.0), ValueError, "max_time must be a positive finite number"),
        (dict(schedule="plateau"), TypeError, "schedule must be a pyro_nf.Schedule"),
    ],
)
def test_arguments_are_checked_before_the_guide_is_set_up(kwargs, error, message):
    guide = AutoNormal(normal_model)
    with pytest.raises(error, match=message.replace("(", r"\(").replace(".", r"\.")):
        fit(normal_model, guide, progress=False, **kwargs)
    assert guide.prototype_trace is None  # the guide never ran


class FakeClock:
    """``time.perf_counter`` advancing by ``tick`` seconds at every call."""

    def __init__(self, tick):
        self.now, self.tick = 0.0, tick

    def perf_counter(self):
        self.now += self.tick
        return self.now


def test_max_time_ends_the_fit_within_a_step(monkeypatch):
    import pyro_nf.fitting.loop as loop

    clock = FakeClock(tick=0.01)
    monkeypatch.setattr(loop, "time", clock)
    result = fit(normal_model, AutoNormal(normal_model), num_steps=5000, num_particles=1,
                 max_time=3.0, progress=False, seed=0)  # fmt: skip
    assert result.stop_reason == "max_time" and not result.converged
    assert result.num_steps < 5000
    assert result.wall_time <= 3.0 + result.step_time + 0.05  # the clock's ticks in between
    # the anneal followed the time budget: the last steps ran at a rate near anneal_to
    assert result.lr < 1e-2 * 0.15


def test_result_records_where_the_time_went(capsys):
    result = fit(normal_model, AutoNormal(normal_model), num_steps=30, num_particles=4,
                 progress=True, seed=0)  # fmt: skip
    assert result.setup_time > 0 and len(result.step_times) == 29
    assert result.step_time == sorted(result.step_times)[14]
    assert result.particle_schedule == [(0, 4)] and result.stop_reason == "num_steps"
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line == result.summary()
    assert line.startswith("fit: 30 steps, num_steps,") and "particles 4" in line


def interrupting_model(at_call):
    calls = []

    def model():
        calls.append(None)
        if len(calls) == at_call:
            raise KeyboardInterrupt
        normal_model()

    return model


def test_interrupt_hands_back_the_result_so_far():
    model = interrupting_model(at_call=13)
    guide = AutoNormal(model)
    with pytest.raises(KeyboardInterrupt) as info:
        fit(model, guide, num_steps=100, num_particles=1, progress=False, seed=0)
    result = info.value.fit_result
    assert isinstance(result, FitResult) and result.stop_reason == "interrupted"
    # one model call sets the guide up, one per step after: the 13th call is step 11
    assert result.num_steps == 11 and len(result.losses) == 11
    assert all(math.isfinite(v) for v in result.losses)
    assert all(torch.isfinite(p).all() for p in guide.parameters())


class InterruptedSGD(torch.optim.SGD):
    """SGD interrupted by Ctrl-C half-way through its 5th update."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        self.count = 0

    @torch.no_grad()
    def step(self, closure=None):
        self.count += 1
        params = [p for g in self.param_groups for p in g["params"]]
        if self.count == 5:
            self.before = [p.clone() for p in params]
            params[0].add_(1.0)  # a partial update
            raise KeyboardInterrupt
        super().step(closure)


def test_an_interrupted_update_is_undone():
    optimizers = []

    def make(params, lr):
        optimizers.append(InterruptedSGD(params, lr))
        return optimizers[-1]

    with pytest.raises(KeyboardInterrupt) as info:
        fit(normal_model, AutoNormal(normal_model), num_steps=20, optimizer=make,
            num_particles=1, progress=False, seed=0)  # fmt: skip
    assert info.value.fit_result.num_steps == 4
    params = [p for g in optimizers[0].param_groups for p in g["params"]]
    assert all(torch.equal(p, b) for p, b in zip(params, optimizers[0].before, strict=True))


def test_a_new_particle_count_keeps_the_guessed_plate_nesting():
    objective = Objective(normal_model, AutoNormal(normal_model), (), {}, "elbo")
    objective.setup(particles=2)
    guessed = objective.elbo.max_plate_nesting
    objective.loss(8)
    assert math.isfinite(guessed) and objective.elbo.max_plate_nesting == guessed


class ModelBug(Exception):
    """An exception of the user's own model."""


def failing_on_call(at_call):
    calls = []

    def model():
        calls.append(None)
        if len(calls) == at_call:
            raise ModelBug(f"call {at_call}")
        normal_model()

    return model


@pytest.mark.parametrize("num_particles", [4, None])
def test_a_one_off_exception_from_the_model_propagates(num_particles):
    model = failing_on_call(at_call=30)
    with pytest.raises(ModelBug, match="call 30"):
        fit(model, AutoNormal(model), num_steps=100, num_particles=num_particles,
            progress=False, seed=0)  # fmt: skip


def test_the_batching_is_decided_once_and_recorded(fresh_pyro_state):
    result = fit(normal_model, AutoNormal(normal_model), num_steps=5, num_particles=4,
                 progress=False, seed=0)  # fmt: skip
    assert result.batching == "plate"
    with pytest.warns(UserWarning, match="one at a time"):
        result = fit(_unbatchable, AutoNormal(_unbatchable), num_steps=5, num_particles=2,
                     progress=False, seed=0)  # fmt: skip
    assert result.batching == "loop"


def subsampled_mean_model(data):
    """A 1-D mean, the data in minibatches of 10."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data), subsample_size=10) as index:
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=data[index])


def test_iw_refuses_a_subsampled_plate_and_the_elbo_does_not():
    data = 3.0 + torch.randn(200, generator=torch.Generator().manual_seed(0))
    guide = AutoNormal(subsampled_mean_model)
    message = r"estimator='iw' cannot fit a model with a subsampled plate \('data': 10 of 200"
    with pytest.raises(ValueError, match=message + r".*Use estimator='elbo' or 'stl'"):
        fit(subsampled_mean_model, guide, data, num_steps=5, num_particles=8, estimator="iw",
            progress=False)  # fmt: skip
    for estimator in ("elbo", "stl"):
        result = fit(subsampled_mean_model, guide, data, num_steps=5, estimator=estimator,
                     progress=False)  # fmt: skip
        assert result.num_steps == 5


def threads_seen(record):
    """`normal_model` that records torch's thread count at every call."""

    def model():
        record.append(torch.get_num_threads())
        normal_model()

    return model


def test_threads_are_chosen_by_measurement_and_the_callers_count_restored(fresh_pyro_state):
    record = []
    model = threads_seen(record)
    torch.set_num_threads(2)  # the autouse fixture restores the count it found
    # num_khat_samples=0: the k-hat check after the fit would call the model too
    result = fit(model, AutoNormal(model), num_steps=20, num_particles=1, progress=False,
                 num_khat_samples=0)  # fmt: skip
    assert torch.get_num_threads() == 2
    assert set(result.thread_times) == {1, 2} and all(t > 0 for t in result.thread_times.values())
    fastest = min(result.thread_times, key=result.thread_times.get)
    assert result.num_threads == fastest and record[-1] == fastest
    # one model call a step: steps 1-6 interleave the counts, three each, 7-19 keep the faster
    assert record[-19:-13] == [2, 1, 2, 1, 2, 1] and set(record[-13:]) == {fastest}
    assert f"threads {fastest}" in result.summary()


def test_a_given_thread_count_is_used_and_the_callers_restored_on_errors(fresh_pyro_state):
    record = []
    model = threads_seen(record)
    torch.set_num_threads(2)
    result = fit(model, AutoNormal(model), num_steps=10, num_threads=1, progress=False)
    assert result.num_threads == 1 and result.thread_times == {} and set(record) == {1}
    assert torch.get_num_threads() == 2
    failing = failing_on_call(at_call=5)
    with pytest.raises(ModelBug):
        fit(failing, AutoNormal(failing), num_steps=10, num_threads=1, progress=False)
    assert torch.get_num_threads() == 2
    with pytest.raises(ModelBug):  # measuring when it raises
        fit(failing_on_call(5), AutoNormal(failing), num_steps=10, progress=False)
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        fit(model, AutoNormal(model), num_threads=0, progress=False)


def test_one_thread_is_not_measured(fresh_pyro_state):
    result = fit(normal_model, AutoNormal(normal_model), num_steps=10, progress=False)
    assert result.num_threads == 1 and result.thread_times == {}
