"""Torch's intra-op thread count chosen by measurement, and the caller's count kept.

Small models gain nothing from intra-op threads, and lose much where a core is shared
with another busy process (the benchmarks' "Threads" table in docs/benchmarks.md);
larger ones may gain. `ThreadChoice` times steps at torch's current count and at one
thread, interleaved (a shared machine's load drifts), and keeps the faster;
`restored_threads` gives the caller back its own setting whatever happens;
`choose_threads` does both for any repeatable piece of work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from pyro_nf.checks import check_int

__all__ = ["ThreadChoice", "choose_threads", "restored_threads"]

logger = logging.getLogger("pyro_nf")


@dataclass
class ThreadChoice:
    """Which intra-op thread count to run with: the faster of the candidates, timed.

    A policy: `count` is the thread count for the next step; `record(seconds)` takes
    that step's time. The candidates take turns, `probe_steps` steps each, and the one
    whose fastest step is fastest is `chosen` (ties go to the earlier candidate). Built
    by `ThreadChoice.measured` (torch's current count against one thread) or
    `ThreadChoice.fixed` (nothing to measure).

    Examples
    --------
    >>> choice = ThreadChoice(candidates=(2, 1), probe_steps=2)
    >>> for seconds in (0.04, 0.01, 0.03, 0.012):
    ...     _ = choice.record(seconds)
    >>> choice.chosen, choice.times
    (1, {2: 0.03, 1: 0.01})
    """

    candidates: tuple[int, ...]
    probe_steps: int = 3
    chosen: int | None = None
    times: dict[int, float] = field(default_factory=dict)
    _turn: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if len(set(self.candidates)) == 1:
            self.chosen = self.candidates[0]

    @classmethod
    def measured(cls, probe_steps: int = 3) -> ThreadChoice:
        """Torch's current thread count against one thread (nothing to time at one).

        Examples
        --------
        >>> ThreadChoice.measured().candidates == (torch.get_num_threads(), 1)
        True
        """
        return cls((torch.get_num_threads(), 1), probe_steps)

    @classmethod
    def fixed(cls, num_threads: int) -> ThreadChoice:
        """A count given by the caller: nothing is timed.

        Examples
        --------
        >>> ThreadChoice.fixed(3).chosen
        3
        """
        return cls((check_int("num_threads", num_threads, minimum=1),))

    @property
    def count(self) -> int:
        """The thread count to run the next step with."""
        if self.chosen is not None:
            return self.chosen
        return self.candidates[self._turn % len(self.candidates)]

    def record(self, seconds: float) -> int:
        """Take the time of a step run at `count`; the count for the next step."""
        if self.chosen is not None:
            return self.chosen
        count = self.count
        self.times[count] = min(self.times.get(count, seconds), seconds)
        self._turn += 1
        if self._turn == self.probe_steps * len(self.candidates):
            self.chosen = min(self.candidates, key=self.times.__getitem__)
            logger.info(
                "intra-op threads: %d chosen; fastest step %s",
                self.chosen,
                ", ".join(f"{1e3 * t:.3g} ms at {n}" for n, t in self.times.items()),
            )
        return self.count


@contextmanager
def restored_threads() -> Iterator[int]:
    """Run a block that may change torch's intra-op thread count; restore it after, also
    when the block raises. Yields the caller's count.

    Examples
    --------
    >>> before = torch.get_num_threads()
    >>> with restored_threads():
    ...     torch.set_num_threads(1)
    >>> torch.get_num_threads() == before
    True
    """
    threads = torch.get_num_threads()
    try:
        yield threads
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def choose_threads(work: Callable[[], object], probe_steps: int = 3) -> ThreadChoice:
    """Time `work()` at torch's current thread count and at one thread (interleaved,
    `probe_steps` calls each), and set torch to the faster. Call it inside
    `restored_threads` so that the caller's count comes back.

    Parameters
    ----------
    work : callable
        A small repeatable piece of the computation to come (a gradient evaluation, say).
    probe_steps : int
        Calls per thread count.

    Returns
    -------
    ThreadChoice
        Its `chosen` count is the one set, `times` the fastest call at each count.

    Examples
    --------
    >>> with restored_threads():
    ...     choice = choose_threads(lambda: torch.randn(64, 64) @ torch.randn(64, 64))
    ...     torch.get_num_threads() == choice.chosen
    True
    """
    choice = ThreadChoice.measured(probe_steps)
    while choice.chosen is None:
        torch.set_num_threads(choice.count)
        begun = time.perf_counter()
        work()
        choice.record(time.perf_counter() - begun)
    torch.set_num_threads(choice.chosen)
    return choice
