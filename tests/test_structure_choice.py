"""The default guides choose their form: the structured local-global guide where a plate of
local latent sites is subsampled or large, the joint flow elsewhere; everything a user relies
on works in the structured form, and what needs the joint form says how to get it."""

import io
import logging
import math
import pickle

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoGuideList
from pyro.infer.reparam import NeuTraReparam

from pyro_nf import (
    AutoFlow,
    AutoPlanarFlow,
    AutoSplineFlow,
    AutoStructuredFlow,
    fit,
    log_evidence,
    neutra_mcmc,
    psis_khat,
    to_inference_data,
)
from pyro_nf.structured.delegate import STRUCTURED_LR
from pyro_nf.structured.rule import LARGE_PLATE_SIZE
from tests.models import schools

pytestmark = pytest.mark.usefixtures("fresh_pyro_state")

#: Groups spread far apart, each measured with sd 0.5: a member's posterior sits near its
#: own datum, so a guide that mixed members up would show it.
Y = torch.linspace(-5.0, 5.0, 40)
LARGE = torch.linspace(-5.0, 5.0, LARGE_PLATE_SIZE + 20)


def model(y, batch_size=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    tau = pyro.sample("tau", dist.HalfNormal(10.0))
    with pyro.plate("groups", len(y), subsample_size=batch_size) as j:
        a = pyro.sample("a", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(a, 0.5), obs=y[j])


def noisy_model(y, batch_size=None):
    """`model` with the noise's scale unknown too."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    tau = pyro.sample("tau", dist.HalfNormal(10.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("groups", len(y), subsample_size=batch_size) as j:
        a = pyro.sample("a", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(a, sigma), obs=y[j])


def indexed_model(y, index=None):
    """The user chooses the members of each step."""
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    tau = pyro.sample("tau", dist.HalfNormal(10.0))
    with pyro.plate("groups", len(y), subsample=index) as j:
        a = pyro.sample("a", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(a, 0.5), obs=y[j])


def indexed_plates(y, index=None):
    return pyro.plate("groups", len(y), subsample=index)


#: Draws behind `median` (each covers every member: 500, the default, costs seconds).
FEW_DRAWS = {"num_summary_samples": 100}


def _svi(guide, steps, *args, lr=0.05, model_fn=model):
    svi = SVI(model_fn, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    return [svi.step(*args) for _ in range(steps)]


def _tracks_the_data(values, y=Y):
    """Members' values follow their own data (0.92-0.997 after 60 steps over seeds; a guide
    that mixed members up would score near 0)."""
    return bool(torch.corrcoef(torch.stack([values, y]))[0, 1] > 0.8)


# ---- the choice --------------------------------------------------------------------------


def test_a_subsampled_plate_takes_the_structured_form_and_says_so(caplog):
    guide = AutoSplineFlow(model)
    with caplog.at_level(logging.INFO, logger="pyro_nf"):
        guide(Y, 10)
    assert guide.structure.structured and guide.structure.plates == ("groups",)
    assert isinstance(guide.structured_guide, AutoStructuredFlow)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("guide form")]
    assert said == [f"guide form: {guide.structure.reason}"]  # once: not its globals' guide too
    assert "subsampled" in said[0] and "'groups'" in said[0]


def test_a_large_plate_takes_the_structured_form():
    guide = AutoFlow(model, flow="planar")
    assert guide(LARGE)["a"].shape == (len(LARGE),)
    assert guide.structure.structured and guide.structure.plates == ("groups",)


def test_eight_schools_keeps_the_joint_form():
    guide = AutoSplineFlow(schools)
    guide()
    assert not guide.structure.structured and guide.structured_guide is None
    assert guide.get_posterior().event_shape == (10,)  # one flow over mu, tau and theta


def test_forcing_either_form():
    joint = AutoPlanarFlow(model, structured=False)
    joint(LARGE)
    assert joint.structured_guide is None and joint.loc.shape == (len(LARGE) + 2,)
    structured = AutoPlanarFlow(schools, structured=True)
    assert structured()["theta"].shape == (8,)
    assert structured.structure.reason == "structured=True given"
    assert isinstance(structured.structured_guide, AutoStructuredFlow)


def test_the_joint_form_refuses_a_subsampled_plate_and_names_the_way_out():
    with pytest.raises(ValueError, match="subsampled plate 'groups'.*structured=True"):
        AutoPlanarFlow(model, structured=False)(Y, 10)


@pytest.mark.parametrize("structured", ["yes", None, 1])
def test_a_bad_structured_argument_is_refused_where_given(structured):
    with pytest.raises(ValueError, match="structured must be 'auto', True or False"):
        AutoFlow(model, structured=structured)


def test_the_structured_form_is_refused_for_a_model_without_a_plate_of_latent_sites():
    def plateless():
        pyro.sample("x", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="no plate of the model holds a latent site.*'auto'"):
        AutoPlanarFlow(plateless, structured=True)()


def test_a_hundred_thousand_members_never_build_the_joint_form():
    y = torch.zeros(100_000)
    guide = AutoPlanarFlow(model)
    assert guide(y, 50)["a"].shape == (50,)
    own = [name for name, _ in guide.named_parameters() if not name.startswith("structured_")]
    assert own == [] and not hasattr(guide, "flow")


def test_the_structured_learning_rate():
    assert AutoSplineFlow(model, structured=True).default_lr == STRUCTURED_LR
    guide = AutoSplineFlow(model)
    assert guide.default_lr == guide.flow_spec.lr  # before set-up: not known yet
    guide(Y, 10)
    assert guide.default_lr == STRUCTURED_LR


# ---- training ----------------------------------------------------------------------------


def test_plain_svi_trains_the_chosen_structured_form_on_minibatches():
    guide = AutoPlanarFlow(model, **FEW_DRAWS)
    losses = _svi(guide, 60, Y, 10)
    # Started at the collapsed Laplace approximation: the minibatch loss need not fall,
    # but it must not run away.
    assert sum(losses[-10:]) < 1.1 * sum(losses[:10])
    median = guide.median(Y, 10)
    assert median["a"].shape == (len(Y),)  # every member, not the minibatch
    assert _tracks_the_data(median["a"])


def test_fit_trains_the_chosen_structured_form_on_minibatches():
    guide = AutoPlanarFlow(model, **FEW_DRAWS)
    result = fit(model, guide, Y, 10, num_steps=60, progress=False, seed=0)
    # The globals start at their collapsed Laplace approximation, so the minibatch loss
    # need not fall: check the fit ran and the members follow the data.
    assert result.num_steps == 60 and all(math.isfinite(loss) for loss in result.losses)
    assert _tracks_the_data(guide.median(Y, 10)["a"])


def test_a_guide_list_part_takes_the_structured_form_with_the_lists_plates():
    guide = AutoGuideList(noisy_model)
    guide.append(AutoPlanarFlow(poutine.block(noisy_model, hide=["sigma"]), **FEW_DRAWS))
    guide.append(AutoDelta(poutine.block(noisy_model, expose=["sigma"])))
    _svi(guide, 60, Y, 10, model_fn=noisy_model)
    assert guide[0].structure.structured
    trace = poutine.trace(guide).get_trace(Y, 10)
    members = trace.nodes["groups"]["value"]  # one subsample, the list's: the model replays it
    assert trace.nodes["a"]["value"].shape == members.shape == (10,)
    median = guide.median(Y, 10)
    assert _tracks_the_data(median["a"])
    copy = pickle.loads(pickle.dumps(guide))
    torch.testing.assert_close(copy.median(Y, 10)["a"], median["a"])


def test_a_guide_list_part_whose_locals_depend_on_another_parts_site_is_refused():
    guide = AutoGuideList(model)
    guide.append(AutoPlanarFlow(poutine.block(model, hide=["mu"])))
    guide.append(AutoDelta(poutine.block(model, expose=["mu"])))
    with pytest.raises(ValueError, match="prior of the local site 'a' depends on a latent site"):
        guide(Y, 10)


def test_create_plates_gives_the_users_members_and_the_whole_plate_to_predict():
    guide = AutoPlanarFlow(indexed_model, create_plates=indexed_plates)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        index = torch.randperm(len(Y), generator=generator)[:10]
        _svi(guide, 1, Y, index, model_fn=indexed_model)
    assert guide.structure.structured
    assert guide(Y, torch.tensor([3, 5]))["a"].shape == (2,)
    predicted = Predictive(indexed_model, guide=guide, num_samples=50)(Y)
    assert predicted["a"].shape == (50, len(Y))
    assert _tracks_the_data(predicted["a"].mean(0))


# ---- saving ------------------------------------------------------------------------------


def _structured_and_joint():
    """A structured guide of `model` fitted on minibatches, and a joint one (both set up)."""
    structured = AutoPlanarFlow(model, **FEW_DRAWS)
    _svi(structured, 20, Y, 10)
    joint = AutoPlanarFlow(model, structured=False)
    joint(Y)
    return structured, joint


def test_a_structured_state_loads_into_a_structured_guide_set_up_on_the_full_data():
    structured, _ = _structured_and_joint()
    buffer = io.BytesIO()
    torch.save(structured.state_dict(), buffer)
    pyro.clear_param_store()
    other = AutoPlanarFlow(model, structured=True, **FEW_DRAWS)
    other(Y)  # the full plate: the saved shapes are the plate's, not the minibatch's
    other.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False))
    assert other.state_dict()["_extra_state"]["signature"]["structure"] == "structured"
    torch.testing.assert_close(other.median(Y)["a"], structured.median(Y)["a"])


def test_a_state_of_the_other_form_is_refused_both_ways():
    structured, joint = _structured_and_joint()
    with pytest.raises(ValueError, match="form: saved 'structured', this guide 'joint'"):
        joint.load_state_dict(structured.state_dict())
    with pytest.raises(
        ValueError, match="form: saved 'joint', this guide 'structured'.*structured="
    ):
        structured.load_state_dict(joint.state_dict())


@pytest.mark.parametrize("saved", ["structured", "joint"])
def test_a_param_store_of_the_other_form_is_refused(tmp_path, saved):
    arguments = {"structured": (Y, 10), "joint": (Y,)}  # "auto" takes the form on minibatches
    AutoPlanarFlow(model, structured=saved == "structured")(*arguments[saved])
    pyro.get_param_store().save(tmp_path / "store.pt")
    pyro.clear_param_store()
    pyro.get_param_store().load(tmp_path / "store.pt")
    other = "joint" if saved == "structured" else "structured"
    message = f"form: saved '{saved}', this guide '{other}' \\(build it with structured="
    with pytest.raises(ValueError, match=message):
        AutoPlanarFlow(model, structured=saved == "joint")(*arguments[other])


def test_pickling_round_trips_the_draws():
    guide = AutoPlanarFlow(model)
    _svi(guide, 20, Y, 10)
    copy = pickle.loads(pickle.dumps(guide))
    assert copy.structure == guide.structure
    draws = []
    for g in (guide, copy):
        pyro.set_rng_seed(3)
        draws.append(g(Y)["a"])
    torch.testing.assert_close(draws[0], draws[1])


# ---- diagnostics, NeuTra and the joint form's own methods --------------------------------


def test_to_inference_data_gives_one_dimension_per_member():
    guide = AutoPlanarFlow(model)
    _svi(guide, 20, Y, 10)
    idata = to_inference_data(model, guide, Y, num_samples=20)
    assert idata.posterior["a"].dims == ("chain", "draw", "groups")
    assert idata.posterior["a"].shape == (1, 20, len(Y))
    with pytest.raises(ValueError, match="to_inference_data: .* 'groups' \\(10 of 40.*full data"):
        to_inference_data(model, guide, Y, 10, num_samples=20)


def test_psis_khat_and_log_evidence_on_the_full_data_and_refused_under_subsampling():
    guide = AutoPlanarFlow(model)
    _svi(guide, 20, Y, 10)
    assert math.isfinite(psis_khat(model, guide, Y, num_samples=100))
    estimate = log_evidence(model, guide, Y, num_samples=200)
    assert estimate.log_evidence >= estimate.elbo
    for check in (psis_khat, log_evidence):
        with pytest.raises(ValueError, match=f"{check.__name__}: .*subsamples.*batch_size=None"):
            check(model, guide, Y, 10, num_samples=100)


def test_the_joint_forms_methods_name_the_structured_form_and_the_way_out():
    guide = AutoPlanarFlow(model)
    guide(Y, 10)
    for method in ("get_posterior", "get_transform", "get_base_dist", "_loc_scale"):
        with pytest.raises(RuntimeError, match=f"{method}: .*structured form.*structured=False"):
            getattr(guide, method)()
    with pytest.raises(RuntimeError, match="laplace: .*structured=False"):
        _ = guide.laplace
    with pytest.raises(RuntimeError, match="get_transform: .*structured=False"):
        NeuTraReparam(guide).reparam(model)(Y)


@pytest.mark.parametrize("kind", ["auto", "AutoStructuredFlow"])
def test_neutra_mcmc_refuses_the_structured_form(kind):
    guide = AutoPlanarFlow(model) if kind == "auto" else AutoStructuredFlow(model, flow="planar")
    guide(LARGE)
    with pytest.raises(ValueError, match="neutra_mcmc: .*structured form.*structured=False"):
        neutra_mcmc(model, guide, LARGE, num_samples=5, progress=False)


def test_a_particle_plate_around_the_structured_form_is_refused_naming_the_way_out():
    def model(y):
        tau = pyro.sample("tau", dist.HalfNormal(2.0))
        with pyro.plate("groups", len(y)):
            a = pyro.sample("a", dist.Normal(0.0, tau))
            pyro.sample("y", dist.Normal(a, 1.0), obs=y)

    y = torch.randn(120)
    guide = AutoSplineFlow(model)
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), elbo)
    with pytest.raises(NotImplementedError, match="vectorize_particles"):
        svi.step(y)
    assert guide.structure.structured
    loss = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO(num_particles=4)).step(y)
    assert math.isfinite(loss)
