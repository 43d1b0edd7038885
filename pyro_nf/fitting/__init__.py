"""`fit` and its parts: one concept per module.

`loop` (the training loop, `fit`), `result` (`FitResult`), `arguments` (checks before any
setup), `objective` (the loss, batched one way decided at setup), `estimators` (ELBO,
path-derivative and importance-weighted objectives), `particles` (`ParticleEffort`),
`threads` (`ThreadChoice`, `restored_threads`, `choose_threads`), `schedule`
(`Schedule`, `ScheduleState`), `averaging` (`IterateAverage`), `subsampling` (a minibatch
loss's plate, found at setup), `drift` (`ParameterDrift`: whether parameters still move),
`guard` (the non-finite guard and `NonFiniteLossError`), `inputs` (non-finite data named),
`runaway` (the improper-posterior warning) and `trust` (k-hat after the fit and its
verdict, `judge_fit`).

The package is named `fitting`, not `fit`: a subpackage `pyro_nf.fit` would replace the
function `pyro_nf.fit` as an attribute of `pyro_nf` once imported.
"""

from pyro_nf.fitting.guard import NonFiniteLossError
from pyro_nf.fitting.loop import fit
from pyro_nf.fitting.result import FitResult
from pyro_nf.fitting.runaway import ImproperPosteriorWarning
from pyro_nf.fitting.schedule import Schedule
from pyro_nf.fitting.threads import ThreadChoice, choose_threads, restored_threads

__all__ = [
    "FitResult",
    "ImproperPosteriorWarning",
    "NonFiniteLossError",
    "Schedule",
    "ThreadChoice",
    "choose_threads",
    "fit",
    "restored_threads",
]
