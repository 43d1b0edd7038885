"""Whether a fitted guide can be trusted: PSIS k-hat at the end of `fit`, at a bounded cost,
and the guide's summaries corrected by the same draws.

After training, `fit` draws from the guide, computes the log weights
``log p(x, z) - log q(z)`` and their PSIS k-hat (`pyro_nf.importance.khat_from_log_weights`,
the package's one implementation), and turns it into a plain verdict with what to try.
How many draws is decided by their measured cost: a probe of 32 draws, then 128, then as
many more (up to `TARGET_DRAWS`) as fit in `TIME_FRACTION` of the fit's time; fewer than
`MIN_DRAWS` leave k-hat to chance, so it is then reported as unaffordable, not noisy.
Where k-hat means nothing (a subsampled model, a point-estimate guide, sites the guide does
not draw) the verdict says why. Nothing here raises for a model or a guide, nor warns: a
high k-hat is information about the posterior, reported in `FitResult` and on the
``pyro_nf`` logger.

The draws are kept with their weights (`pyro_nf.Reweighted`, `FitResult.reweighted`):
PSIS-corrected moments and quantiles at no further cost, where the weights are worth
reading (k-hat below 1 and an effective sample size of at least `MIN_ESS`). Measured on
the robust set (docs/robust.md, "Corrected summaries from every fit"), they bring the
short tails of the ELBO's guide within 10% where its own are not, and change nothing a
bar can see elsewhere. The guide itself is not changed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuideList
from pyro.poutine.trace_struct import Trace
from pyro.poutine.util import prune_subsample_sites
from torch import Tensor

from pyro_nf.autoguides import AutoFlow
from pyro_nf.checks import check_int
from pyro_nf.fitting.estimators import supports_stl
from pyro_nf.importance import check_psis_draws, khat_from_log_weights
from pyro_nf.log_weights import LogWeights, Prototype, full_data_problem
from pyro_nf.reweighting import KHAT_TRUNCATE, Reweighted, model_sites, weighted_draws
from pyro_nf.structured.delegate import structured_part
from pyro_nf.summaries import fixed_random_state, guide_device

__all__ = [
    "CORRECTION_FRACTION",
    "KHAT_GOOD",
    "KHAT_USABLE",
    "MAX_KEPT_VALUES",
    "MIN_DRAWS",
    "MIN_ESS",
    "TARGET_DRAWS",
    "TIME_FRACTION",
    "VERDICTS",
    "Trust",
    "check_khat_samples",
    "judge_fit",
    "verdict_of",
]

logger = logging.getLogger("pyro_nf")

#: k-hat below this: the guide is close to the posterior (Vehtari et al., 2024).
KHAT_GOOD = 0.5
#: k-hat above this: the guide misses posterior mass; tails and moments are not to be trusted.
KHAT_USABLE = 0.7
#: Draws taken where they are cheap: k-hat's own error is small at a few thousand.
TARGET_DRAWS = 4000
#: Fewest draws worth a k-hat: 500 estimate it reliably up to 0.63 (S > 10^(1 / (1 - k))).
MIN_DRAWS = 500
#: The check's share of the fit's time, and the least it is allowed (a few model runs).
#: A quarter: where a draw is a costly model run (garch, 1000 returns, 13 ms a draw) it
#: buys about 600 draws, where a tenth bought 300, too few for any k-hat.
TIME_FRACTION, MIN_BUDGET = 0.25, 0.2
#: Fewest effective draws for corrected summaries: their Monte-Carlo error is then 0.03
#: posterior sd in a mean and 0.02-0.05 in a log sd (kurtosis 3-10), inside the 0.1 / 10%
#: bars of docs/robust.md, where the raw guide's summaries have none. Measured on garch:
#: at 470-550 effective draws the corrected log sds came out 0.10 (raw 0.05-0.07); at
#: 1250-3100 within 0.013-0.044 (docs/robust.md, "Corrected summaries from every fit").
MIN_ESS = 1000
#: Where k-hat says the tails may be short (0.5 to 1) but the draws' effective sample size
#: is below `MIN_ESS`, more are drawn (up to `TARGET_DRAWS`) while the check's time stays
#: within this share of the fit's: the fit and its corrected summaries within 1.75 times
#: the fit's time. At the whole fit's time, garch (12-13 ms a draw) took 2.0-2.3 times the
#: previous default's in pairs, its fits' own times varying by a fifth.
CORRECTION_FRACTION = 0.75
#: Most values kept (draws times values per draw) for the corrected summaries: 128 MB in
#: float64. A model with more (10 000 groups, 4000 draws) gets k-hat only.
MAX_KEPT_VALUES = 2**24
#: The probe sizes: the first times a draw, the second whether larger batches pay.
_PROBES = (32, 128)
#: The largest batch after the probes, where a batch of 128 drew cheaper per draw than
#: one of 32 (Python overhead, amortised by batching); else batches stay at 128, which
#: bounds the memory of models whose draws cost arithmetic (a matrix per draw).
_LARGE_BATCH = 1024

#: What `FitResult.verdict` says.
VERDICTS = ("good", "usable with care", "not to be trusted", "unchecked")


class Trust(NamedTuple):
    """What k-hat says of a fitted guide, as `FitResult` reports it.

    Attributes
    ----------
    khat : float or None
        PSIS k-hat of the guide's log weights; None where it was not computed.
    num_khat_samples : int
        Draws it rests on (0 where it was not computed).
    khat_time : float
        Seconds the check took.
    verdict : str
        One of `VERDICTS`.
    advice : str
        In plain words: what the verdict means and what to try, or why k-hat was not
        computed; and whether the draws' corrected summaries were kept, or why not.
    reweighted : Reweighted or None
        The check's draws with their Pareto-smoothed weights, where worth reading.

    Examples
    --------
    >>> Trust(0.3, 4000, 0.1, "good", "", None).verdict
    'good'
    """

    khat: float | None
    num_khat_samples: int
    khat_time: float
    verdict: str
    advice: str
    reweighted: Reweighted | None


def check_khat_samples(num_khat_samples: object) -> int | None:
    """`fit`'s ``num_khat_samples`` checked: None (chosen by cost), 0 (off) or at least 21.

    Examples
    --------
    >>> check_khat_samples(None), check_khat_samples(0), check_khat_samples(2000)
    (None, 0, 2000)
    >>> check_khat_samples(10)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: num_khat_samples=10 is too few draws for PSIS k-hat...
    """
    if num_khat_samples is None:
        return None
    count = check_int("num_khat_samples", num_khat_samples, minimum=0)
    return count if count == 0 else check_psis_draws("num_khat_samples", count)


def verdict_of(khat: float) -> str:
    """The verdict on a k-hat: `"good"` below 0.5, `"usable with care"` to 0.7, else (NaN
    and inf included) `"not to be trusted"`.

    Examples
    --------
    >>> verdict_of(0.2), verdict_of(0.6), verdict_of(1.2), verdict_of(-math.inf)
    ('good', 'usable with care', 'not to be trusted', 'good')
    """
    if khat < KHAT_GOOD:
        return "good"
    if khat <= KHAT_USABLE:
        return "usable with care"
    return "not to be trusted"


def judge_fit(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    *,
    fit_time: float,
    num_khat_samples: int | None = None,
    estimator: str = "elbo",
    particles: int = 1,
) -> Trust:
    """PSIS k-hat of a fitted guide and its verdict, at a cost bounded by the fit's time.

    The draws come from a fixed random stream (the caller's is left as it was), batched in
    a particle plate, by vmap or one at a time as `pyro_nf.log_weights.LogWeights` decides
    (the drawer of `pyro_nf.psis_khat` too, decided once here for all the passes). With
    ``num_khat_samples=None`` their number follows their measured cost (see the module's
    docstring); an int takes that many whatever they cost; 0 takes none.

    Parameters
    ----------
    model, guide, args, kwargs
        The fitted model and guide and their arguments, as given to `fit`.
    fit_time : float
        Seconds the fit took: the check's budget is `TIME_FRACTION` of it (at least
        `MIN_BUDGET`).
    num_khat_samples : int, optional
        Draws to take (see above).
    estimator : str
        The fit's estimator, so the advice does not suggest the one already used.
    particles : int
        The fit's last particle count, so the advice suggests more.

    Returns
    -------
    Trust
        Never raises for the guide or the model: where k-hat cannot be computed, the
        verdict is `"unchecked"` and ``advice`` says why.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> from pyro.infer.autoguide import AutoNormal
    >>> def model():
    ...     pyro.sample("x", dist.Normal(0.0, 1.0))
    >>> pyro.clear_param_store()
    >>> trust = judge_fit(model, AutoNormal(model, init_scale=1.0), (), {}, fit_time=1.0)
    >>> trust.verdict, trust.num_khat_samples
    ('good', 4000)
    """
    if num_khat_samples == 0:
        text = "k-hat not computed (num_khat_samples=0)"
        return Trust(None, 0, 0.0, "unchecked", text, None)
    begun = time.perf_counter()
    budget = math.inf if num_khat_samples else max(TIME_FRACTION * fit_time, MIN_BUDGET)
    budgets = (budget, 0.0 if num_khat_samples else CORRECTION_FRACTION * fit_time)
    # Every guide run (the advice's too) draws from its own stream: a fit with the check
    # leaves the caller's random state as one without it.
    with fixed_random_state(guide_device(guide)), torch.no_grad():
        try:
            khat, count, text, posterior = _khat(
                model, guide, args, kwargs, num_khat_samples or TARGET_DRAWS, budgets
            )
            if khat is not None:
                posterior, note = _corrected(posterior, khat)
                verdict = verdict_of(khat)
                text = _advice(
                    khat, verdict, count, guide, args, kwargs, estimator, particles, note
                )
        except Exception as error:  # noqa: BLE001 - the fit is done; a diagnostic must not lose it
            khat, count, posterior = None, 0, None
            text = f"drawing failed ({type(error).__name__}: {error})"
    seconds = time.perf_counter() - begun
    if khat is None:
        logger.info("fit: k-hat not computed: %s", text)
        return Trust(None, 0, seconds, "unchecked", text, None)
    verdict = verdict_of(khat)
    level = logging.WARNING if verdict == "not to be trusted" else logging.INFO
    logger.log(level, "fit: k-hat %.2f (%d draws): %s", khat, count, text)
    return Trust(khat, count, seconds, verdict, text, posterior)


def _khat(
    model: Callable,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    target: int,
    budgets: tuple[float, float],
) -> tuple[float | None, int, str, Reweighted | None]:
    """k-hat, its draw count and the draws with their weights (None where too many values
    to keep), or None and why there is no k-hat. ``budgets``: seconds for k-hat, and in
    all for corrected summaries (`CORRECTION_FRACTION`)."""
    begun = time.perf_counter()
    # `_draws` bounds every pass (at most `_LARGE_BATCH`), vmapped ones too.
    log_weights = LogWeights(
        model, guide, args, kwargs, purpose="fit's k-hat draws", vmap_pass_size=None
    )
    reason = _why_not(log_weights.prototype, guide, args, kwargs)
    if reason is not None:
        return None, 0, reason, None
    sites = model_sites(log_weights.prototype.model)
    values = sum(site["value"].numel() for site in sites.values())
    kept = list(sites) if target * values <= MAX_KEPT_VALUES else []

    def draw(count: int) -> tuple[dict[str, Tensor], Tensor]:
        return log_weights.draws_and_log_weights(count, kept)

    draws, log_w, reason = _draws(draw, target, budgets[0])
    if reason is not None:
        return None, 0, reason, None
    khat = khat_from_log_weights(log_w)
    if not kept or not khat < KHAT_TRUNCATE:  # NaN too: weights that `_corrected` refuses
        return khat, log_w.numel(), "", None
    posterior = weighted_draws(draws, log_w, sites)
    left = budgets[1] - (time.perf_counter() - begun)
    short = khat >= KHAT_GOOD and posterior.ess < MIN_ESS  # k-hat 0.5-1: 1 and up left above
    # `_draws` probes with at least two draws: one missing draw is not worth a pass.
    if short and target - len(log_w) >= 2 and left > 0:
        more, more_log_w, _ = _draws(draw, target - len(log_w), left)
        logger.info(
            "fit: k-hat %.2f, %.0f effective draws of %d: %d more for corrected summaries",
            khat,
            posterior.ess,
            len(log_w),
            len(more_log_w),
        )
        log_w = torch.cat([log_w, more_log_w])
        draws = {name: torch.cat([draws[name], more[name]]) for name in draws}
        posterior = weighted_draws(draws, log_w, sites)
        khat = posterior.khat  # the smoothing's own fit: one Pareto fit, not two
    return khat, log_w.numel(), "", posterior


def _corrected(posterior: Reweighted | None, khat: float) -> tuple[Reweighted | None, str]:
    """The draws' corrected summaries where worth reading, and a sentence that says so or
    why not."""
    more = "pyro_nf.reweighted(model, guide, *args, num_draws=...) gives them"
    if khat >= KHAT_TRUNCATE or math.isnan(khat):  # -inf: equal weights, the guide exact
        return None, (
            f"No PSIS-corrected summaries: at k-hat {khat:.2f} the weights' Pareto tail has no mean"
        )
    if posterior is None:
        return None, (
            f"No PSIS-corrected summaries kept: more than {MAX_KEPT_VALUES} values in all; {more}"
        )
    if posterior.ess < MIN_ESS:
        return None, (
            f"No PSIS-corrected summaries: an effective sample size of {posterior.ess:.0f} "
            f"of {posterior.num_draws} draws is below {MIN_ESS}; {more} from more draws"
        )
    return posterior, (
        f"PSIS-corrected summaries in FitResult.reweighted (effective sample size "
        f"{posterior.ess:.0f} of {posterior.num_draws})"
    )


def _why_not(prototype: Prototype, guide: Callable, args: tuple, kwargs: dict) -> str | None:
    """Why log weights of this model and guide mean nothing; None where they are fine."""
    problem = full_data_problem(prototype.model, "k-hat after the fit")
    if problem is not None:
        return f"{problem}, to pyro_nf.psis_khat"
    missing = [name for name in _latent(prototype.model) if name not in prototype.guide.nodes]
    if missing:
        return (
            f"the guide does not draw the model's latent sites {missing} (left to "
            "enumeration or to the prior), so its log density is not the joint's"
        )
    with poutine.block():
        second = poutine.trace(guide).get_trace(*args, **kwargs)
    fixed = [name for name in _latent(prototype.guide) if _same_draw(prototype.guide, second, name)]
    if fixed:
        return (
            f"the guide is a point estimate at {fixed} (a Delta or MAP guide draws the same "
            "value every time): it has no spread whose tails k-hat could judge"
        )
    return None


def _latent(trace: Trace) -> list[str]:
    """The names of a trace's unobserved sample sites, subsample sites left out."""
    return [name for name, _ in prune_subsample_sites(trace).iter_stochastic_nodes()]


def _same_draw(first: Trace, second: Trace, name: str) -> bool:
    """Whether a continuous guide site took the same value in two runs (a point mass)."""
    site, other = first.nodes[name], second.nodes.get(name)
    if site["fn"].support.is_discrete or other is None:
        return False
    return torch.equal(site["value"], other["value"])


def _draws(
    draw: Callable[[int], tuple[dict[str, Tensor], Tensor]], target: int, budget: float
) -> tuple[dict[str, Tensor], Tensor, str | None]:
    """Up to `target` draws and log weights in `budget` seconds: the probes, then the rest
    at the cheaper probe's rate; with a reason where fewer than `MIN_DRAWS` were
    affordable."""
    chunks: list[tuple[dict[str, Tensor], Tensor]] = []
    rates: list[float] = []
    spent = 0.0
    for size in _PROBES:
        size = min(size, target - sum(len(log_w) for _, log_w in chunks))
        if size < 2 or (rates and spent + size * rates[-1] > budget):
            break
        begun = time.perf_counter()
        chunks.append(draw(size))
        seconds = time.perf_counter() - begun
        spent += seconds
        rates.append(seconds / size)
    drawn = sum(len(log_w) for _, log_w in chunks)
    rate = max(min(rates), 1e-9)  # a clock too coarse to see a probe reads as free
    affordable = max(budget - spent, 0.0) / rate  # inf without a budget
    more = target - drawn if affordable >= target - drawn else int(affordable)
    reason = None
    if drawn + more < min(MIN_DRAWS, target):
        more, reason = (
            0,
            (
                f"too costly: {MIN_DRAWS} draws, the fewest that k-hat needs, would take about "
                f"{MIN_DRAWS * rate:.3g} s at {1e3 * rate:.3g} ms a draw, more than the "
                f"{budget:.3g} s allowed ({TIME_FRACTION:.0%} of the fit); give fit "
                "num_khat_samples, or call pyro_nf.psis_khat"
            ),
        )
    amortised = len(rates) == len(_PROBES) and rates[1] < 0.7 * rates[0]
    batch = _LARGE_BATCH if amortised else _PROBES[-1]
    while more > 0:
        size = min(batch, more)
        chunks.append(draw(size))
        more -= size
    draws = {name: torch.cat([part[name] for part, _ in chunks]) for name in chunks[0][0]}
    return draws, torch.cat([log_w for _, log_w in chunks]), reason


def _advice(
    khat: float,
    verdict: str,
    count: int,
    guide: Callable,
    args: tuple,
    kwargs: dict,
    estimator: str,
    particles: int,
    correction: str,
) -> str:
    """What a verdict means, in plain words, with what to try where the fit falls short
    (given the fit's estimator and particle count), and the sentence on the corrected
    summaries (`_corrected`)."""
    if verdict == "good":
        return (
            f"k-hat {khat:.2f} < {KHAT_GOOD}: the guide is close to the posterior (k-hat "
            f"cannot see a mode the guide never found). {correction}"
        )
    reliable = 1 - 1 / math.log10(count)
    caveat = (
        f" ({count} draws estimate k-hat reliably only up to {reliable:.2f})"
        if khat > reliable and math.isfinite(khat)
        else ""
    )
    tries = "; ".join(_what_to_try(guide, args, kwargs, estimator, particles))
    if verdict == "usable with care":
        return (
            f"k-hat {khat:.2f} in {KHAT_GOOD}-{KHAT_USABLE}: usable with care; means are "
            f"fine, tails and sds may be short{caveat}. {correction}. To do better: {tries}"
        )
    return (
        f"k-hat {khat:.2f} > {KHAT_USABLE}: do not trust this fit's tails or moments; the "
        f"guide misses posterior mass{caveat}. {correction}. Try: {tries}"
    )


def _what_to_try(
    guide: Callable, args: tuple, kwargs: dict, estimator: str, particles: int
) -> list[str]:
    """The remedies that apply to this guide and a fit with `estimator` at `particles`.

    Examples
    --------
    >>> from pyro.infer.autoguide import AutoNormal
    >>> for remedy in _what_to_try(AutoNormal(lambda: None), (), {}, "stl", particles=32)[:2]:
    ...     print(remedy)
    a flow guide (AutoSplineFlow(model)) where a Gaussian or hand-written one is
    num_particles=128 (the fit drew 32; gradient noise cuts tails)
    """
    parts = list(guide) if isinstance(guide, AutoGuideList) else [guide]
    layers = [text for text in map(_layers, parts) if text is not None]
    stl = estimator != "iw" and supports_stl(guide, args, kwargs)
    # First: on garch200 and small hierarchical models the short tails came from gradient
    # noise, not from the family (docs/robust.md, "Short tails from gradient noise"). On
    # radon a structured fit at 32 particles left log sigma_b's sd 8-16% short; the
    # path-derivative gradient at 128 particles and lr=1e-2 put it within 10% at all 5
    # seeds (5-7% short), in fewer steps than at the default 3e-3; 256 plain particles at
    # lr=1e-2 at 4 seeds of 5 (docs/hierarchical.md, "Radon's log sigma_b").
    if particles < 32:
        tries = ["num_particles=32 (gradient noise cuts tails)"]
    elif structured_part(guide) is not None:
        drew = f"(the fit drew {particles}; gradient noise cuts the globals' tails)"
        if not stl:
            tries = [f"num_particles={8 * particles} with lr=1e-2 {drew}"]
        elif estimator == "stl":
            tries = [f"num_particles={4 * particles} with lr=1e-2 {drew}"]
        else:
            tries = [f'estimator="stl" with num_particles={4 * particles} and lr=1e-2 {drew}']
    else:
        tries = [
            f"num_particles={4 * particles} (the fit drew {particles}; gradient noise cuts tails)"
        ]
    family = "a flow guide (AutoSplineFlow(model)) where a Gaussian or hand-written one is"
    if not layers:  # no flow: its family, not the noise, is the likelier cause
        tries.insert(0, family)
    else:
        tries.append(f"more flow layers ({'; '.join(layers)})")
        tries += [family] if len(layers) < len(parts) else []
    if stl:
        tries.append('estimator="iw" with num_particles=8 (its guide covers the mass)')
    if structured_part(guide) is None and isinstance(guide, AutoFlow):
        tries.append("exact draws by NUTS in the flow's space (neutra_mcmc)")
    else:
        tries.append("exact draws by NUTS (nuts_mcmc)")
    return tries


def _layers(guide: Callable) -> str | None:
    """A flow guide's layer counts, as its arguments name them; None for other guides."""
    structured = structured_part(guide)
    if structured is not None:
        inner = structured.global_guide
        now = "" if inner is None else f", now {inner.flow_options.get('num_layers')}"
        return f"num_layers{now}; local_layers, now {structured.local_layers}"
    if isinstance(guide, AutoFlow):
        return f"num_layers, now {guide.flow_options.get('num_layers')}"
    return None
