"""When the structured local-global guide replaces the joint flow: the rule, and its record.

The joint flow (`AutoFlow`) is the better guide for small hierarchical models (eight
schools: every correlation learned, at a few ms a step). It stops being usable as the
plates grow: on the normal-normal model the default spline guide took 10x AutoNormal's
time at 100 groups (116 s against 12 s, 603k parameters) and went NaN at 1000 and 2000;
and it cannot hold a subsampled plate's locals at all. So the structured form is chosen
where a plate holding latent sites is subsampled or has at least `LARGE_PLATE_SIZE`
members. Every `AutoFlow` applies the rule when it is set up (``structured="auto"``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pyro.poutine.trace_struct import Trace

__all__ = ["LARGE_PLATE_SIZE", "StructureChoice", "check_structured", "choose_structure"]

logger = logging.getLogger("pyro_nf")

#: Members from which a plate of local latent sites makes the structured form the default.
#: 50: on radon (85 counties) the joint spline flow took 150-280 s to its step limit, 7-13x
#: AutoNormal's 22 s, against 15-18 s for the structured form, whose globals were closer to
#: NUTS; on the normal-normal model at 20 and 50 groups the joint flow took 22-42 s, the
#: structured 9-12 s, as accurate or more (docs/hierarchical.md, "Radon through the default
#: guide"). Eight schools (8) stays joint: below 20 groups nothing was measured.
LARGE_PLATE_SIZE = 50


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

    Examples
    --------
    >>> choice = StructureChoice(False, (), "structured=False given")
    >>> choice.structured, choice.form
    (False, 'joint')
    """

    structured: bool
    plates: tuple[str, ...]
    reason: str

    @property
    def form(self) -> str:
        """``"structured"`` or ``"joint"``, as saved states record it."""
        return "structured" if self.structured else "joint"


def check_structured(structured: object) -> bool | str:
    """``structured`` itself where it is ``"auto"``, True or False; else a ValueError.

    Examples
    --------
    >>> check_structured("auto")
    'auto'
    >>> check_structured("yes")
    Traceback (most recent call last):
    ...
    ValueError: structured must be 'auto', True or False, got 'yes'
    """
    if not (isinstance(structured, bool) or structured == "auto"):
        raise ValueError(f"structured must be 'auto', True or False, got {structured!r}")
    return structured


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
        Logged on the ``pyro_nf`` logger: at INFO where the rule decided, at DEBUG where
        the form was forced (the caller's own choice is no news to them).

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
    check_structured(structured)
    deciding = []
    for _, site in trace.iter_stochastic_nodes():
        for frame in site["cond_indep_stack"]:
            full_size = frame.full_size or frame.size
            if frame.size != full_size or full_size >= large_plate_size:
                if frame.name not in deciding:
                    deciding.append(frame.name)
    if structured != "auto":
        plates = tuple(deciding) if structured else ()
        choice = StructureChoice(structured, plates, f"structured={structured} given")
        logger.debug("guide form: %s", choice.reason)
        return choice
    if deciding:
        reason = (
            f"plate(s) {deciding} hold latent sites and are subsampled or have at least "
            f"{large_plate_size} members: the structured local-global guide"
        )
    else:
        reason = (
            f"no plate of latent sites is subsampled or has {large_plate_size} members: "
            "the joint flow"
        )
    choice = StructureChoice(bool(deciding), tuple(deciding), reason)
    logger.info("guide form: %s", choice.reason)
    return choice
