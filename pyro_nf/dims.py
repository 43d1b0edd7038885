"""ArviZ dimension names of a Pyro site's draws: one name per dimension, the same in every
export (`pyro_nf.to_inference_data`, `pyro_nf.Reweighted`, `pyro_nf.neutra_mcmc`).

Kept apart from `pyro_nf.diagnostics` so that `fit`, whose result holds a `Reweighted`,
does not import ArviZ (about a second) before anything is exported.
"""

from __future__ import annotations

__all__ = ["site_dims"]


def site_dims(name: str, site: dict, num_dims: int) -> list[str]:
    """ArviZ dimension names of a site's value (one draw of it, ``num_dims`` dimensions):
    a plate's name where a vectorised plate holds the dimension, else ``{name}_dim_{i}``.

    Shared by every export of draws to ArviZ (`to_inference_data`, `pyro_nf.reweighted`,
    `pyro_nf.neutra_mcmc`), so one site's dimensions bear one name everywhere.

    Parameters
    ----------
    name : str
        The site's name.
    site : dict
        The site in a trace (its distribution and plates are read).
    num_dims : int
        The number of dimensions of one draw of its value.

    Examples
    --------
    >>> import pyro, torch
    >>> import pyro.distributions as dist
    >>> from pyro import poutine
    >>> def model():
    ...     with pyro.plate("groups", 3):
    ...         pyro.sample("x", dist.Normal(torch.zeros(3, 2), 1.0).to_event(1))
    >>> trace = poutine.trace(model).get_trace()
    >>> site_dims("x", trace.nodes["x"], 2)
    ['groups', 'x_dim_1']
    """
    dims = [f"{name}_dim_{i}" for i in range(num_dims)]
    batch_dims = len(site["fn"].batch_shape)
    for frame in site["cond_indep_stack"]:
        if frame.vectorized and batch_dims + frame.dim >= 0:
            dims[batch_dims + frame.dim] = frame.name
    return dims
