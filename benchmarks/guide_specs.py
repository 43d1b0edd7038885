"""The guides under comparison: ours (default and deeper settings) and Pyro's built-ins.

Every guide is built from the same model with the same ``init_loc_fn`` (Pyro's flow guides
ignore it: their base is fixed at N(0, I)). Learning rates are per family: ours use
``guide.default_lr``; Pyro's AutoNormal, AutoMultivariateNormal, planar and radial stacks
use 1e-2; Pyro's autoregressive stacks use the same rate as our guide of the same family.
Pyro's flow stacks have the same kind and number of layers (and hidden widths) as our
default setting of that family, so the per-step times compare like with like.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from pyro.distributions import TransformModule
from pyro.distributions.transforms import (
    ComposeTransformModule,
    Permute,
    affine_autoregressive,
    affine_coupling,
    iterated,
    planar,
    radial,
    spline_autoregressive,
)
from pyro.infer.autoguide import (
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
    AutoNormalizingFlow,
)
from pyro.infer.autoguide.guides import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger

from pyro_nf import AutoFlow
from pyro_nf.flows import FLOWS, default_hidden_dims

__all__ = ["GUIDES", "GuideSpec", "get_guide_spec"]

#: Deeper setting of each of our families (the paper's K = 32 for planar/radial).
DEEP_OPTIONS: dict[str, dict[str, object]] = {
    "planar": {"num_layers": 32},
    "radial": {"num_layers": 32},
    "iaf": {"num_layers": 5},
    "spline": {"num_layers": 4, "count_bins": 16},
    "coupling": {"num_layers": 8},
}


@dataclass(frozen=True)
class GuideSpec:
    """How to build one benchmarked guide.

    Attributes
    ----------
    name : str
        Registry key, shown in the table.
    ours : bool
        Whether this is one of pyro_nf's guides.
    build : callable
        ``build(model, init_loc_fn) -> (guide, lr)``.
    counterpart : str or None
        The Pyro guide with the same kind and number of layers; steps of the two are
        interleaved and their per-step time ratio is reported.
    """

    name: str
    ours: bool
    build: Callable[[Callable, Callable], tuple[AutoGuide, float]]
    counterpart: str | None = None
    options: dict[str, object] = field(default_factory=dict)


def _ours(family: str, options: dict[str, object]):
    def build(model, init_loc_fn):
        guide = AutoFlow(model, flow=family, init_loc_fn=init_loc_fn, **options)
        return guide, guide.default_lr

    return build


def _pyro_flow(family: str):
    num_layers = FLOWS[family].num_layers
    lr = FLOWS[family].lr

    def layer(dim: int):
        # Widths from the latent dimension, which Pyro passes to init_transform_fn.
        hidden = list(default_hidden_dims(dim))
        if family == "iaf":
            return affine_autoregressive(dim, hidden_dims=hidden)
        if family == "spline":
            return spline_autoregressive(dim, hidden_dims=hidden, count_bins=8)
        return {"planar": planar, "radial": radial}[family](dim)

    def build(model, init_loc_fn):
        if family == "coupling":
            init_transform_fn = functools.partial(_pyro_coupling_stack, num_layers)
        else:
            init_transform_fn = functools.partial(iterated, num_layers, layer)
        return AutoNormalizingFlow(_with_init(model, init_loc_fn), init_transform_fn), lr

    return build


def _pyro_coupling_stack(num_layers: int, dim: int) -> TransformModule:
    # Pyro's AffineCoupling always moves the second part of the vector, so a reversal
    # between layers makes successive layers alternate halves, as our masks do.
    parts: list = []
    for i in range(num_layers):
        if i:
            parts.append(Permute(torch.arange(dim - 1, -1, -1)))
        parts.append(affine_coupling(dim, hidden_dims=list(default_hidden_dims(dim))))
    return ComposeTransformModule(parts)


def _with_init(model: Callable, init_loc_fn: Callable) -> Callable:
    # Pyro's flow guides hard-wire init_to_feasible, which cannot sample an improper flat
    # prior; an inner InitMessenger answers first. The init point only serves their
    # prototype trace (their base stays N(0, I)).
    return InitMessenger(init_loc_fn)(model)


def _auto_normal(model, init_loc_fn):
    return AutoNormal(model, init_loc_fn=init_loc_fn), 1e-2


def _auto_mvn(model, init_loc_fn):
    return AutoMultivariateNormal(model, init_loc_fn=init_loc_fn), 1e-2


def _auto_iaf_normal(model, init_loc_fn):
    return AutoIAFNormal(_with_init(model, init_loc_fn)), FLOWS["iaf"].lr


#: The flow families benchmarked: all but the empty flow, which has no layers to compare.
FAMILIES = [family for family in FLOWS if family != "none"]


def _all_specs() -> list[GuideSpec]:
    specs = []
    for family in FAMILIES:
        specs.append(GuideSpec(family, True, _ours(family, {}), counterpart=f"pyro-{family}"))
        deep = DEEP_OPTIONS[family]
        specs.append(GuideSpec(f"{family}-deep", True, _ours(family, deep), options=deep))
    specs += [
        GuideSpec("AutoNormal", False, _auto_normal),
        GuideSpec("AutoMultivariateNormal", False, _auto_mvn),
        GuideSpec("AutoIAFNormal", False, _auto_iaf_normal),
    ]
    specs += [GuideSpec(f"pyro-{family}", False, _pyro_flow(family)) for family in FAMILIES]
    return specs


GUIDES: dict[str, GuideSpec] = {spec.name: spec for spec in _all_specs()}


def get_guide_spec(name: str) -> GuideSpec:
    """Look up a benchmarked guide by name, with a helpful error for unknown names."""
    try:
        return GUIDES[name]
    except KeyError:
        valid = ", ".join(repr(key) for key in GUIDES)
        raise ValueError(f"unknown guide {name!r}; choose from {valid}") from None
