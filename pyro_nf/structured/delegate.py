"""An `AutoFlow` in the structured form: the `AutoStructuredFlow` it hands its work to.

Every `AutoFlow` applies `pyro_nf.structured.rule.choose_structure` when it is set up,
before it builds anything of the joint form. Where the rule (or ``structured=True``)
picks the structured form, the guide builds one `AutoStructuredFlow` with its own flow,
flow options, ``init_loc_fn``, ``init_scale`` and ``create_plates``, holds it as its
submodule ``structured_guide`` and hands it every call, summary and parameter (so
`state_dict`, pickling and Pyro's param store carry it). What only the joint form has,
one flow over the joint latent vector (`AutoFlow.get_posterior`, `get_transform`,
`_loc_scale`, the Laplace start, NeuTra), raises `joint_only`'s error instead.
"""

from __future__ import annotations

import weakref
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide

from .guide import DEFAULT_LR, AutoStructuredFlow
from .rule import check_structured, choose_structure

# With the rule's two functions: all that `AutoFlow` reads of its structured form (one
# lazy import, as `pyro_nf.structured` imports `pyro_nf.autoguides`).
__all__ = [
    "STRUCTURED_LR",
    "PlatesOf",
    "attach_structured",
    "check_no_hidden_parents",
    "check_structured",
    "choose_structure",
    "joint_only",
    "keep_own_master",
    "structured_part",
]

#: Adam's rate for the structured form: the rate `pyro_nf.fit` gives `AutoStructuredFlow`
#: (its ``default_lr``), the one docs/hierarchical.md measures it at.
STRUCTURED_LR = DEFAULT_LR


def attach_structured(guide: Any, args: tuple, kwargs: dict) -> AutoStructuredFlow:
    """Build ``guide``'s structured form, hold it as ``guide.structured_guide``, set it up.

    Parameters
    ----------
    guide : AutoFlow
        The guide, its prototype traced.
    args, kwargs
        The model's arguments.

    Returns
    -------
    AutoStructuredFlow
        Built from the guide's flow and options; its globals' `AutoFlow` with
        ``structured=False``.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro_nf import AutoFlow
    >>> def model():
    ...     with pyro.plate("groups", 200):
    ...         pyro.sample("a", dist.Normal(0.0, 1.0))
    >>> pyro.clear_param_store()
    >>> guide = AutoFlow(model, flow="planar")
    >>> guide()["a"].shape, type(guide.structured_guide).__name__  # set up by attach_structured
    (torch.Size([200]), 'AutoStructuredFlow')
    """
    if not guide._prototype_frames:
        raise ValueError(
            f"{type(guide).__name__}(structured=True): no plate of the model holds a latent "
            "site, so the structured form has no members to give parameters to; leave "
            "structured='auto' (the default), which takes the joint flow here"
        )
    summaries = {}
    if guide.num_summary_samples is not None:
        summaries["num_summary_samples"] = guide.num_summary_samples
    structured = AutoStructuredFlow(
        guide.raw_model,
        flow=guide.flow_spec,
        init_loc_fn=guide.init_loc_fn,
        init_scale=guide._init_scale,
        create_plates=PlatesOf(guide),
        **summaries,
        **(guide.flow_options | {"num_layers": guide._num_layers_asked}),
    )
    guide.structured_guide = structured
    keep_own_master(structured)
    with torch.enable_grad():  # it finds hierarchical sites by autograd, even from median()
        structured._setup_prototype(*args, **kwargs)
    check_no_hidden_parents(guide, args, kwargs)
    return structured


def check_no_hidden_parents(guide: Any, args: tuple, kwargs: dict) -> None:
    """Refuse local sites whose prior depends on a latent site hidden from the guide.

    The structured guide reads each local site's prior by running the model inside the
    guide; a latent site hidden from it (``poutine.block``, as for a part of Pyro's
    `AutoGuideList` whose other part guides that site) is then drawn from its own prior
    there, not at the value the rest of the guide drew, and the guide would train to a
    wrong answer. Such a dependence shows as a local site's log density that changes
    between two runs of the model replaying every site the guide sees.
    """
    structured = guide.structured_guide
    with torch.no_grad(), poutine.block():
        first = poutine.trace(guide.raw_model).get_trace(*args, **kwargs)
        again = poutine.trace(poutine.replay(guide.raw_model, trace=first)).get_trace(
            *args, **kwargs
        )
    for plate in structured.local_plates.values():
        for site in plate.sites:
            value = first.nodes[site.name]["value"]
            densities = [t.nodes[site.name]["fn"].log_prob(value) for t in (first, again)]
            if not torch.allclose(*densities, rtol=1e-5, atol=1e-6):
                raise ValueError(
                    f"{type(guide).__name__}: the prior of the local site {site.name!r} "
                    "depends on a latent site hidden from this guide (by poutine.block, "
                    "e.g. one another part of an AutoGuideList guides). The structured "
                    "form reads that prior by running the model inside the guide, where "
                    "the hidden site would be drawn from its own prior: let this guide see "
                    f"the sites {site.name!r} depends on (hide fewer sites from it)"
                )


class PlatesOf:
    """The plates a guide's structured form uses: where the guide is part of a composite
    guide (Pyro's `AutoGuideList`), the composite's, which it creates once per call for
    all its parts (its plates draw the subsamples the model replays); else those of the
    guide's ``create_plates``, if any.

    A plain object holding the guide (as a module, the guide would become a submodule of
    its own submodule); it pickles with the structured guide.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro_nf import AutoFlow
    >>> guide = AutoFlow(lambda: pyro.sample("x", dist.Normal(0.0, 1.0)))
    >>> PlatesOf(guide)()  # no composite, no create_plates
    []
    """

    def __init__(self, guide: Any) -> None:
        self.guide = guide

    def __call__(self, *args: Any, **kwargs: Any) -> list:
        if self.guide.master is not None:
            return list(getattr(self.guide.master(), "plates", {}).values())
        if self.guide.create_plates is None:
            return []
        plates = self.guide.create_plates(*args, **kwargs)
        return [plates] if isinstance(plates, pyro.plate) else list(plates)


def keep_own_master(structured: AutoStructuredFlow) -> None:
    """Make the structured guide the master of the guides inside it, as when used alone.

    Pyro makes the outermost guide the master of every `AutoGuide` inside it (on
    assignment and on unpickling); the structured guide must stay its globals' guide's
    master, whose plates that guide reads.
    """
    structured.master = None
    master = weakref.ref(structured)
    for module in structured.modules():
        if module is not structured and isinstance(module, AutoGuide):
            module.master = master


def joint_only(guide: Any, method: str) -> RuntimeError:
    """The error for a method of the joint form called on a guide in the structured form.

    Examples
    --------
    >>> from pyro_nf.structured.rule import StructureChoice
    >>> class Guide:
    ...     structure = StructureChoice(True, ("groups",), "plate 'groups' is subsampled")
    >>> print(joint_only(Guide(), "get_transform"))  # doctest: +ELLIPSIS
    Guide.get_transform: ... the structured form (plate 'groups' is subsampled), ...
    """
    return RuntimeError(
        f"{type(guide).__name__}.{method}: this guide took the structured form "
        f"({guide.structure.reason}), which has no single flow over the joint latent "
        f"vector; {method} belongs to the joint form. Build the guide with "
        "structured=False for the joint form (not possible where local latent sites lie "
        "in a subsampled plate), or use the structured guide's median, quantiles and "
        "Predictive"
    )


def structured_part(guide: Any) -> AutoStructuredFlow | None:
    """The structured guide that does the work: the guide itself, or the one an `AutoFlow`
    in the structured form hands its calls to; None for any other guide.

    Examples
    --------
    >>> def model():
    ...     pyro.sample("x", pyro.distributions.Normal(0.0, 1.0))
    >>> structured_part(AutoGuide(model)) is None
    True
    """
    if isinstance(guide, AutoStructuredFlow):
        return guide
    part = getattr(guide, "structured_guide", None)
    return part if isinstance(part, AutoStructuredFlow) else None
