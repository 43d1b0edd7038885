"""Test models shared by several test modules, in float64."""

import pyro
import pyro.distributions as dist
import torch

f64 = torch.float64
SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=f64)
SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=f64)


def schools(y=SCHOOLS_Y, sigma=SCHOOLS_SIGMA):
    """Eight schools, centred: the joint has a funnel and no mode.

    Examples
    --------
    >>> from pyro import poutine
    >>> poutine.trace(schools).get_trace().nodes["theta"]["value"].shape
    torch.Size([8])
    """
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=f64), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(5.0, dtype=f64)))
    with pyro.plate("schools", len(y)):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def funnel(dim: int = 4):
    """Neal's funnel, normalised (log Z = 0): the neck is 40 times narrower than the mouth.

    Examples
    --------
    >>> from pyro import poutine
    >>> poutine.trace(funnel).get_trace().nodes["x"]["value"].shape
    torch.Size([4])
    """
    v = pyro.sample("v", dist.Normal(torch.tensor(0.0, dtype=f64), 3.0))
    pyro.sample("x", dist.Normal(torch.zeros(dim, dtype=f64), (v / 2).exp()).to_event(1))
