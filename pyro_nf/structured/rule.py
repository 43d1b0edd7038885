"""When the structured local-global guide replaces the joint flow: the rule, and its record.

The joint flow (`AutoFlow`) is the better guide for small hierarchical models (eight
schools: every correlation learned, at a few ms a step). It stops being usable as the
plates grow: on the normal-normal model the default spline guide took 10x AutoNormal's
time at 100 groups (116 s against 12 s, 603k parameters) and went NaN at 1000 and 2000;
and it cannot hold a subsampled plate's locals at all. So the structured form is chosen
where a plate holding latent sites is subsampled or has at least `LARGE_PLATE_SIZE`
members.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pyro.poutine.trace_struct import Trace

__all__ = ["LARGE_PLATE_SIZE", "StructureChoice", "choose_structure"]

logger = logging.getLogger("pyro_nf")

#: Members from which a plate of local latent sites makes the structured form the default.
LARGE_PLATE_SIZE = 100


@dataclass(frozen=True)
class StructureChoice:
    """The form chosen for a model's guide, and why.

    Attributes
    ----------
    structured : bool
        True for `AutoStructuredFlow`, False for the joint `AutoFlow`.
    plates : tuple of str
        The plates that decided it (subsampled or large), empty for the joint form.
    reason : str
        One line saying why.
    """

    structured: bool
    plates: tuple[str, ...]
    reason: str


def choose_structure(
    trace: Trace, structured: bool | str = "auto", large_plate_size: int = LARGE_PLATE_SIZE
) -> StructureChoice:
    """Choose the joint or the structured form for a model, from one trace of it.

    Parameters
    ----------
    trace : Trace
        A trace of the model (a guide's prototype trace).
    structured : {"auto", True, False}
        ``"auto"``: the rule (structured where a plate holding latent sites is subsampled
        or has at least ``large_plate_size`` members); True or False force a form.
    large_plate_size : int
        The rule's threshold.

    Returns
    -------
    StructureChoice
        Also logged on the ``pyro_nf`` logger.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, torch
    >>> from pyro import poutine
    >>> def model():
    ...     tau = pyro.sample("tau", dist.HalfNormal(1.0))
    ...     with pyro.plate("groups", 500, subsample_size=50):
    ...         pyro.sample("a", dist.Normal(0.0, tau))
    >>> choice = choose_structure(poutine.trace(model).get_trace())
    >>> choice.structured, choice.plates
    (True, ('groups',))
    """
    if not (isinstance(structured, bool) or structured == "auto"):
        raise ValueError(f"structured must be 'auto', True or False, got {structured!r}")
    deciding = []
    for _, site in trace.iter_stochastic_nodes():
        for frame in site["cond_indep_stack"]:
            full_size = frame.full_size or frame.size
            if frame.size != full_size or full_size >= large_plate_size:
                if frame.name not in deciding:
                    deciding.append(frame.name)
    if structured == "auto":
        structured = bool(deciding)
        reason = (
            f"plate(s) {deciding} hold latent sites and are subsampled or have at least "
            f"{large_plate_size} members: the structured local-global guide"
            if structured
            else f"no plate of latent sites is subsampled or has {large_plate_size} members: "
            "the joint flow"
        )
    else:
        reason = f"structured={structured} given"
    choice = StructureChoice(structured, tuple(deciding) if structured else (), reason)
    logger.info("guide form: %s", choice.reason)
    return choice
