"""What a flow guide's saved parameters mean, and the check that they are loaded into the same.

A flow guide's parameters are numbers in a packing of the model's latent sites (their
order, shapes and supports), shaped by the flow's family and options and by the guide's
form (joint, or structured: see `pyro_nf.structured.delegate`), and learned in the
coordinates its start chose (non-centred or not, whitened by a Laplace start or not). The
same tensors loaded into a guide of another model, flow, form or start have the right
shapes often enough and a wrong meaning (two sites swapped, a spline's interval
rescaled), so a guide saves a description of itself beside its tensors, `GuideState`:
the signature (sites, flow and form), which must match on load, and the start, which the
load restores (the structured form has none: its guide's parameters are all it needs).

Both ways Pyro saves a guide carry it: the guide's ``state_dict`` (its ``_extra_state``)
and Pyro's param store, as ``<guide name>.state`` (the description encoded in a tensor)
beside ``<guide name>.whitening.*``, which ``pyro.get_param_store().save`` writes and
``load`` reads back. A guide set up while the store holds a loaded fit under its name
takes its start and parameters from there instead of computing them. With
``pyro.settings`` ``module_local_params`` a guide keeps nothing in the store.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn

from pyro_nf.laplace import LaplaceApproximation
from pyro_nf.noncentering import NonCentering, find_hierarchical_sites
from pyro_nf.starts import Start
from pyro_nf.whitening import Whitening

__all__ = ["GuideState", "check_saved", "saved_start", "site_signature"]


def site_signature(sites: Iterable[tuple[str, dict]]) -> dict[str, dict[str, Any]]:
    """Shape and support of each latent site (not a plate's subsample site), by name, in order.

    The shape is over whole plates: a subsampled plate's dimension counts its full size,
    so a guide fitted on minibatches and one set up on the full data agree.

    Parameters
    ----------
    sites : iterable of (str, dict)
        Sample sites, as a trace's ``iter_stochastic_nodes()`` gives them.

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> from pyro import poutine
    >>> def model():
    ...     pyro.sample("s", dist.HalfNormal(2.0))
    >>> site_signature(poutine.trace(model).get_trace().iter_stochastic_nodes())
    {'s': {'shape': [], 'support': 'GreaterThanEq(lower_bound=0.0)'}}
    """
    return {
        name: {"shape": _full_shape(site), "support": repr(site["fn"].support)}
        for name, site in sites
        if not site["infer"].get("is_auxiliary") and not site_is_subsample(site)
    }


def _full_shape(site: dict) -> list[int]:
    """The site's shape with each subsampled plate's dimension at the plate's full size."""
    shape = list(site["value"].shape)
    batch_end = len(shape) - len(site["fn"].event_shape)
    for frame in site["cond_indep_stack"]:
        axis = batch_end + frame.dim
        if frame.vectorized and 0 <= axis < batch_end and shape[axis] == frame.size:
            shape[axis] = frame.full_size or frame.size
    return shape


def _plain(value: object) -> Any:
    """``value`` as JSON reads it back (tuples as lists), so saved and computed compare."""
    return json.loads(json.dumps(value, default=repr))


@dataclass
class GuideState:
    """A flow guide's description of its parameters: what must match, and its start.

    Attributes
    ----------
    signature : dict
        ``sites`` (`site_signature` of the guide's prototype), ``flow`` (the family's
        name), ``flow_options`` (every option that shapes a parameter) and ``structure``
        (``"joint"`` or ``"structured"``; states saved before it was recorded are joint).
    start : dict or None
        The start's ``coordinates``, ``noncentred_sites``, ``kind`` (``"laplace"`` or
        ``"isotropic"``), ``scale`` and the Laplace approximation's ``laplace`` record
        (or None); None in the structured form.
    whitening : dict of str to Tensor
        The start's whitening map's tensors (none for the identity or the structured form).

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> from pyro_nf import AutoPlanarFlow
    >>> def model():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> pyro.clear_param_store()
    >>> guide = AutoPlanarFlow(model)
    >>> _ = guide()
    >>> state = GuideState.of(guide)
    >>> list(state.signature["sites"]), state.start["kind"], sorted(state.whitening)
    (['x'], 'laplace', ['scale', 'shift'])
    >>> GuideState.read(guide._pyro_name).start == state.start  # the store holds it too
    True
    >>> pyro.clear_param_store()
    """

    signature: dict[str, Any]
    start: dict[str, Any] | None
    whitening: dict[str, Tensor]

    @staticmethod
    def signature_of(guide: Any) -> dict[str, Any]:
        """The signature of a guide whose prototype is set up."""
        return _plain(
            {
                "sites": site_signature(guide.prototype_trace.iter_stochastic_nodes()),
                "flow": guide.flow_spec.name,
                "flow_options": {k: v for k, v in guide.flow_options.items() if v is not None},
                "structure": guide.structure.form,
            }
        )

    @classmethod
    def of(cls, guide: Any) -> GuideState:
        """The state of a set-up flow guide."""
        if guide.structure.structured:
            return cls(cls.signature_of(guide), None, {})
        start: Start = guide.start
        laplace, noncentering = start.laplace, start.noncentering
        record = None
        if laplace is not None:
            record = {
                "hessian": laplace.hessian,
                "optimizer": laplace.optimizer,
                "log_density": laplace.log_density,
                "iterations": laplace.iterations,
            }
        return cls(
            cls.signature_of(guide),
            _plain(
                {
                    "coordinates": start.coordinates,
                    "noncentred_sites": list(noncentering.sites) if noncentering else [],
                    "kind": "laplace" if laplace is not None else "isotropic",
                    "scale": start.scale,
                    "laplace": record,
                }
            ),
            dict(guide.whitening.named_buffers()),
        )

    def as_dict(self) -> dict[str, Any]:
        """The state as plain data and tensors (what ``state_dict``'s ``_extra_state``
        holds)."""
        return {"signature": self.signature, "start": self.start, "whitening": self.whitening}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> GuideState:
        """The state saved by `as_dict`."""
        return cls(state["signature"], state["start"], state["whitening"])

    def differences(self, signature: dict[str, Any]) -> list[str]:
        """How a guide's ``signature`` differs from the saved one, as ``what: saved ...,
        this guide ...`` phrases."""
        saved = {"structure": "joint"} | self.signature
        differences = _site_differences(saved["sites"], signature["sites"]) + [
            f"{what}: saved {saved[key]!r}, this guide {signature[key]!r}"
            for key, what in (("flow", "flow"), ("flow_options", "flow options"))
            if saved[key] != signature[key]
        ]
        if saved["structure"] != signature["structure"]:
            differences.append(
                f"form: saved {saved['structure']!r}, this guide {signature['structure']!r} "
                f"(build it with structured={saved['structure'] == 'structured'})"
            )
        return differences

    def restore_start(self, guide: Any) -> Start:
        """The saved start, in the coordinates and with the whitening it was learned in."""
        start, sites = self.start, self.start["noncentred_sites"]
        whitening = Whitening(**self.whitening)
        laplace = None
        if start["kind"] == "laplace":
            dense = whitening.kind == "dense"
            laplace = LaplaceApproximation(
                loc=whitening.shift,
                scale=whitening.scale
                if not dense
                else whitening.marginal_scale(torch.ones_like(whitening.shift)),
                scale_tril=whitening.scale if dense else None,
                converged=True,
                **start["laplace"],
            )
        noncentering = NonCentering(guide, sites) if sites else None
        restored = Start(guide._init_loc(), noncentering, laplace, start["scale"])
        restored.reason = f"{restored.label}: restored from a saved state"
        return restored

    def write(self, name: str) -> None:
        """Put the state and the whitening's tensors in Pyro's param store under ``name``.

        The tensors are the whitening's own buffers; none is a parameter any optimiser
        sees (no guide reads them through ``pyro.param``).
        """
        if not _uses_param_store():
            return
        plain = {"signature": self.signature, "start": self.start}
        codes = torch.tensor(list(json.dumps(plain).encode()), dtype=torch.float64)
        tensors = {"state": codes} | {f"whitening.{k}": v for k, v in self.whitening.items()}
        store = pyro.get_param_store()
        for key in [key for key in store.keys() if key.startswith(f"{name}.whitening.")]:
            del store[key]  # a restored start may have another kind of whitening
        for key, tensor in tensors.items():
            store[f"{name}.{key}"] = tensor
            tensor.requires_grad_(False)  # the store marks what it holds as trainable
        for key in [key for key, ref in _WRITTEN.items() if ref() is None]:
            del _WRITTEN[key]
        _WRITTEN[id(codes)] = weakref.ref(codes)

    @classmethod
    def read(cls, name: str) -> GuideState | None:
        """The state in Pyro's param store under ``name``, or None."""
        store = pyro.get_param_store()
        if f"{name}.state" not in store:
            return None
        codes = store.get_param(f"{name}.state").detach()
        plain = json.loads(bytes(codes.to(torch.uint8).tolist()).decode())
        prefix = f"{name}.whitening."
        whitening = {
            key[len(prefix) :]: store.get_param(key).detach()
            for key in store.keys()
            if key.startswith(prefix)
        }
        return cls(plain["signature"], plain["start"], whitening)

    @staticmethod
    def take_parameters(name: str, attribute: str, module: nn.Module) -> None:
        """Give ``module`` (held as ``attribute`` by the guide named ``name``) the values
        Pyro's param store holds for its parameters, and the store these parameters.

        What `pyro.nn.PyroParam` does for one parameter, for a submodule's: a guide set up
        after ``pyro.get_param_store().load`` continues from the loaded fit.
        """
        if not _uses_param_store():
            return
        store = pyro.get_param_store()
        for path, param in module.named_parameters(prefix=attribute):
            fullname = f"{name}.{path}"
            if fullname in store:
                saved = store.get_param(fullname).detach()
                if saved.shape != param.shape:
                    raise ValueError(
                        f"Pyro's param store holds {fullname!r} with shape "
                        f"{tuple(saved.shape)}, this guide's has {tuple(param.shape)}; call "
                        "pyro.clear_param_store() before fitting another guide under this name"
                    )
                with torch.no_grad():
                    param.copy_(saved)
            store[fullname] = param


def check_saved(guide: Any, saved: GuideState, how: str, args: tuple, kwargs: dict) -> None:
    """Refuse a saved state of another model or flow, or one the guide's options rule out,
    with one error naming every difference.

    Parameters
    ----------
    guide : AutoFlow
        The guide loading, its prototype set up.
    saved : GuideState
        What is loaded.
    how : str
        The way it is loaded, for the message.
    args, kwargs
        The model's arguments (read where the guide's coordinates are not chosen yet).

    Examples
    --------
    >>> import pyro.distributions as dist
    >>> from pyro_nf import AutoPlanarFlow
    >>> def model():
    ...     pyro.sample("a", dist.Normal(0.0, 1.0))
    ...     pyro.sample("b", dist.Normal(0.0, 1.0))
    >>> def swapped():
    ...     pyro.sample("b", dist.Normal(0.0, 1.0))
    ...     pyro.sample("a", dist.Normal(0.0, 1.0))
    >>> pyro.clear_param_store()
    >>> guide = AutoPlanarFlow(model)
    >>> _ = guide()
    >>> saved = GuideState.of(guide)
    >>> pyro.clear_param_store()
    >>> other = AutoPlanarFlow(swapped)
    >>> _ = other()
    >>> check_saved(other, saved, "load_state_dict", (), {})
    Traceback (most recent call last):
    ...
    ValueError: ... (site order: saved ['a', 'b'], this guide ['b', 'a']). ...
    >>> pyro.clear_param_store()
    """
    if guide.prototype_trace is None:
        raise RuntimeError(
            f"{type(guide).__name__}.{how}: the guide is not set up yet; call it once on "
            "the model's arguments, then load"
        )
    differences = saved.differences(GuideState.signature_of(guide))
    if saved.start is not None and not guide.structure.structured:
        differences += _start_differences(guide, saved.start, args, kwargs)
    if differences:
        raise ValueError(
            f"{type(guide).__name__} {how}: the saved state is of another guide "
            f"({'; '.join(differences)}). Build the guide for the same model (sites, "
            "shapes, supports, in the same order), with the same flow options and "
            "structured= / noncentered= / warm_start= choices, as the saved one; to fit "
            "another model instead, call pyro.clear_param_store() first"
        )


def saved_start(guide: Any, args: tuple, kwargs: dict) -> Start | None:
    """The start of a fit loaded into Pyro's param store under the guide's name, checked;
    None where there is none (or the fit is of the structured form, which has none).

    A state another guide wrote in this process (not loaded) is a leftover of that guide:
    the new guide replaces it and its parameters, as it replaces its own on a second
    set-up, and starts afresh.

    See `GuideState`'s example.
    """
    name = guide._pyro_name
    if not _uses_param_store():
        return None
    if _written_here(name):
        store = pyro.get_param_store()
        for key in [key for key in store.keys() if key.startswith(f"{name}.")]:
            del store[key]
        return None
    saved = GuideState.read(name)
    if saved is None:
        return None
    check_saved(guide, saved, "set-up from Pyro's param store", args, kwargs)
    return None if saved.start is None else saved.restore_start(guide)


def _start_differences(guide: Any, saved: dict, args: tuple, kwargs: dict) -> list[str]:
    """How a saved start contradicts the guide's ``noncentered=`` and ``warm_start=``."""
    differences = []
    if guide.noncentered != "auto":
        mine = "model"
        if guide.start is not None:
            mine = guide.start.coordinates
        elif guide.noncentered and find_hierarchical_sites(guide, *args, **kwargs):
            mine = "non-centred"
        if saved["coordinates"] != mine:
            differences.append(f"coordinates: saved {saved['coordinates']!r}, this guide {mine!r}")
    if guide.warm_start is None and saved["kind"] != "isotropic":
        differences.append(f"start: saved {saved['kind']!r}, this guide 'isotropic'")
    return differences


def _uses_param_store() -> bool:
    """Whether guides keep their parameters in Pyro's param store (not module-local)."""
    return not pyro.settings.get("module_local_params")


#: The state tensors guides wrote in this process, by id (a tensor's == is elementwise).
_WRITTEN: dict[int, weakref.ref] = {}


def _written_here(name: str) -> bool:
    """Whether the state in Pyro's param store under ``name`` was written by a guide in
    this process (rather than loaded, e.g. by ``pyro.get_param_store().load``)."""
    store = pyro.get_param_store()
    if f"{name}.state" not in store:
        return False
    codes = store.get_param(f"{name}.state").unconstrained()
    written = _WRITTEN.get(id(codes))
    return written is not None and written() is codes


def _site_differences(saved: dict, mine: dict) -> list[str]:
    if list(saved) != list(mine):
        if set(saved) == set(mine):
            return [f"site order: saved {list(saved)}, this guide {list(mine)}"]
        return [f"latent sites: saved {list(saved)}, this guide {list(mine)}"]
    return [
        f"site {name!r} {key}: saved {saved[name][key]}, this guide {mine[name][key]}"
        for name in saved
        for key in ("shape", "support")
        if saved[name][key] != mine[name][key]
    ]
