"""The flow-posterior VAE: a Bernoulli decoder and an amortized flow posterior."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..distribution import FlowDistribution
from ..importance import log_mean_exp
from .nets import Decoder, Encoder

__all__ = ["FlowVAE"]


class FlowVAE(nn.Module):
    """Variational autoencoder with a normalizing-flow posterior (Rezende & Mohamed 2015).

    ``p(z) = N(0, I)``, ``p(x | z) = Bernoulli(decoder(z))`` and
    ``q(z | x) = loc + scale ⊙ T(ε; h(x))``, ``ε ~ N(0, I)``, with ``T`` a flow whose
    layers read the encoder's context ``h(x)``: any family of `pyro_nf.flows.FLOWS`, built
    by `pyro_nf.flows.build_flow` with ``context_dim`` the width of ``h`` (``"none"``
    gives the diagonal-Gaussian baseline).

    `model` and `guide` are ordinary Pyro programs with a ``pyro.plate`` over the
    batch, usable with `pyro.infer.SVI`; they register the networks with
    ``pyro.module`` under ``name`` (call ``pyro.clear_param_store()`` before training a new
    instance with SVI). Calling the module returns the differentiable negative ELBO of a
    batch (summed over it), or with `beta`/`num_samples` the warmed-up or
    importance-weighted bound, which is what `pyro_nf.vae.train` optimises, also under
    ``DistributedDataParallel``.

    Parameters
    ----------
    data_dim : int
        Number of binary pixels (784 for MNIST).
    latent_dim : int
        Size of z (40 as in both papers).
    hidden_dims : sequence of int
        Hidden widths of the encoder MLP; the decoder mirrors them.
    flow : str
        A registered flow family (`pyro_nf.flows.FLOWS`); ``"none"`` for no flow.
    num_layers : int
        Number of flow layers.
    flow_hidden_dims : sequence of int
        Hidden widths of each flow layer's network, for the families with networks
        (planar and radial layers have none: their parameters come from one linear map
        of the context).
    name : str
        Prefix of the Pyro parameter names.

    Examples
    --------
    >>> import pyro
    >>> vae = FlowVAE(flow="planar", num_layers=4)
    >>> x = torch.bernoulli(torch.full((8, 784), 0.2))
    >>> pyro.clear_param_store()
    >>> svi = pyro.infer.SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}),
    ...                      pyro.infer.Trace_ELBO())
    >>> loss = svi.step(x)
    >>> vae(x).shape
    torch.Size([])
    """

    def __init__(
        self,
        data_dim: int = 784,
        latent_dim: int = 40,
        hidden_dims: Sequence[int] = (300, 300),
        flow: str = "none",
        num_layers: int = 10,
        flow_hidden_dims: Sequence[int] = (200, 200),
        name: str = "flow_vae",
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = {
            "data_dim": data_dim,
            "latent_dim": latent_dim,
            "hidden_dims": list(hidden_dims),
            "flow": flow,
            "num_layers": num_layers,
            "flow_hidden_dims": list(flow_hidden_dims),
            "name": name,
        }
        self.name = name
        self.latent_dim = latent_dim
        # The decoder first and the flow last, so that under one seed every flow starts
        # from the same encoder/decoder weights (a paired comparison with flow="none").
        self.decoder = Decoder(data_dim, latent_dim, hidden_dims)
        self.encoder = Encoder(
            data_dim, latent_dim, hidden_dims, flow, num_layers, flow_hidden_dims
        )

    def prior(self, like: torch.Tensor) -> dist.Distribution:
        """``N(0, I)`` over z, batched like ``like`` (shape ``(..., latent_dim)``)."""
        zeros = like.new_zeros(like.shape[:-1] + (self.latent_dim,))
        return dist.Normal(zeros, 1.0).to_event(1)

    def likelihood(self, z: torch.Tensor) -> dist.Distribution:
        """``p(x | z)``: independent Bernoulli pixels."""
        return dist.Bernoulli(logits=self.decoder(z)).to_event(1)

    def posterior(self, x: torch.Tensor) -> FlowDistribution:
        """``q(z | x)`` for a batch ``x`` of shape ``(batch, data_dim)``."""
        return self.encoder(x)

    def model(self, x: torch.Tensor) -> None:
        """Generative model ``p(x, z)`` for a batch of binary images."""
        pyro.module(f"{self.name}.decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior(x))
            pyro.sample("x", self.likelihood(z), obs=x)

    def guide(self, x: torch.Tensor) -> None:
        """Amortized flow posterior ``q(z | x)``."""
        pyro.module(f"{self.name}.encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.posterior(x))

    def log_weight_terms(
        self, x: torch.Tensor, num_samples: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``log p(x | z_k)`` and ``log p(z_k) − log q(z_k | x)`` for draws ``z_k ~ q(z | x)``.

        Their sum is the log importance weight of each draw; each has shape
        ``(num_samples, batch)``.

        Examples
        --------
        >>> vae = FlowVAE(latent_dim=4, hidden_dims=[16])
        >>> [t.shape for t in vae.log_weight_terms(torch.zeros(3, 784), num_samples=2)]
        [torch.Size([2, 3]), torch.Size([2, 3])]
        """
        z, log_q = self.posterior(x).rsample_and_log_prob((num_samples,))
        return self.likelihood(z).log_prob(x), self.prior(z).log_prob(z) - log_q

    def forward(self, x: torch.Tensor, beta: float = 1.0, num_samples: int = 1) -> torch.Tensor:
        """Differentiable negative training bound of the batch ``x``, summed over it.

        With the defaults this is the one-sample negative ELBO (what ``Trace_ELBO`` gives
        for `model` and `guide`, computed without tracing them). `beta` < 1 weights the
        KL term ``log p(z) − log q(z | x)`` by `beta` (the KL warm-up); `num_samples` = K
        > 1 gives the importance-weighted bound ``log (1/K) Σ_k w_k`` (IWAE).
        """
        log_lik, log_ratio = self.log_weight_terms(x, num_samples)
        log_w = log_lik + beta * log_ratio
        if num_samples == 1:
            return -log_w.sum()
        return -log_mean_exp(log_w).sum()

    @torch.no_grad()
    def sample(self, num_samples: int) -> torch.Tensor:
        """Pixel probabilities of images decoded from prior draws, ``(num_samples, data_dim)``."""
        like = next(self.parameters()).new_zeros(num_samples, self.latent_dim)
        return torch.sigmoid(self.decoder(self.prior(like).sample()))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel probabilities of ``x`` encoded (one posterior draw) and decoded."""
        return torch.sigmoid(self.decoder(self.posterior(x).rsample()))
