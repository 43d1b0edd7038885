"""Importance-sampled log-likelihood and ELBO of a trained flow VAE."""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm

from ..importance import log_mean_exp
from .model import FlowVAE

__all__ = [
    "evaluate",
    "image_log_likelihoods",
    "image_log_weights",
    "log_likelihood",
    "mean_and_se",
]


def image_log_weights(vae: FlowVAE, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``log p(x, z_k) − log q(z_k | x)`` for ``num_samples`` posterior draws per image.

    Parameters
    ----------
    vae : FlowVAE
    x : torch.Tensor
        Batch of images, ``(batch, data_dim)``, on the model's device and dtype.
    num_samples : int
        Draws per image.

    Returns
    -------
    torch.Tensor
        Shape ``(num_samples, batch)``.

    Examples
    --------
    >>> vae = FlowVAE(flow="planar", num_layers=2)
    >>> image_log_weights(vae, torch.zeros(3, 784), 5).shape
    torch.Size([5, 3])
    """
    log_lik, log_ratio = vae.log_weight_terms(x, num_samples)
    return log_lik + log_ratio


@torch.no_grad()
def log_likelihood(
    vae: FlowVAE, x: torch.Tensor, num_samples: int = 5000, chunk_size: int = 250
) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance-sampled ``log p(x)`` and the ELBO of each image.

    ``log p(x) ≈ log (1/K) Σ_k p(x, z_k) / q(z_k | x)``, ``z_k ~ q(z | x)``, a lower bound
    in expectation that tightens as K grows (Burda et al. 2016), and always ≥ the mean of
    the same log-weights (the ELBO estimate). The K draws are taken ``chunk_size`` at a
    time, so the forward passes' memory is bounded whatever K is (the K log weights per
    image are kept: 4 bytes each in float32).

    Parameters
    ----------
    vae : FlowVAE
    x : torch.Tensor
        Batch of images, ``(batch, data_dim)``.
    num_samples : int
        K, the number of importance samples per image (5000 in the papers).
    chunk_size : int
        Draws held in memory at once.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        Estimated ``log p(x)`` and ELBO (mean log-weight), each of shape ``(batch,)``, nats.

    Examples
    --------
    >>> vae = FlowVAE(flow="iaf", num_layers=2)
    >>> log_px, elbo = log_likelihood(vae, torch.zeros(3, 784), num_samples=20)
    >>> bool((log_px >= elbo).all())
    True
    """
    if num_samples < 1 or chunk_size < 1:
        raise ValueError(
            f"num_samples and chunk_size must be >= 1, got {num_samples} and {chunk_size}"
        )
    log_w = torch.cat(
        [
            image_log_weights(vae, x, min(chunk_size, num_samples - start))
            for start in range(0, num_samples, chunk_size)
        ]
    )
    return log_mean_exp(log_w), log_w.mean(0)


def image_log_likelihoods(
    vae: FlowVAE,
    data: torch.Tensor,
    num_samples: int = 5000,
    batch_size: int = 100,
    chunk_size: int = 250,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`log_likelihood` of every image of a data set, a batch at a time, in eval mode.

    Parameters
    ----------
    vae : FlowVAE
    data : torch.Tensor
        Images ``(N, data_dim)`` (any dtype holding 0/1); moved batch by batch to the
        model's device and dtype.
    num_samples : int
        K per image.
    batch_size, chunk_size : int
        Images and draws per forward pass; memory ∝ ``batch_size * chunk_size``.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``log p̂(x)`` and the ELBO of each image, float64 of shape ``(N,)``, on the CPU.

    Examples
    --------
    >>> log_px, elbo = image_log_likelihoods(FlowVAE(), torch.zeros(3, 784), num_samples=10)
    >>> log_px.shape, bool((log_px >= elbo).all())
    (torch.Size([3]), True)
    """
    param = next(vae.parameters())
    was_training = vae.training
    vae.eval()
    log_px, elbo = [], []
    for start in tqdm(range(0, len(data), batch_size), desc="eval", disable=not progress):
        x = data[start : start + batch_size].to(device=param.device, dtype=param.dtype)
        lp, el = log_likelihood(vae, x, num_samples, chunk_size)
        log_px.append(lp.cpu())
        elbo.append(el.cpu())
    vae.train(was_training)
    return torch.cat(log_px).double(), torch.cat(elbo).double()


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean of `values` and its standard error across them (NaN for a single value).

    Examples
    --------
    >>> mean_and_se(torch.tensor([1.0, 2.0, 3.0]))
    (2.0, 0.5773502691896258)
    """
    values = values.double()
    se = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return float(values.mean()), se


def evaluate(
    vae: FlowVAE, data: torch.Tensor, num_samples: int = 5000, **options: Any
) -> dict[str, float]:
    """Test −log p(x) (importance sampling with K draws) and −ELBO, in nats, with errors.

    Takes the arguments of `image_log_likelihoods`: `num_samples` (K per image) and, as
    `options`, `batch_size`, `chunk_size` and `progress`.

    Returns
    -------
    dict
        ``nll`` and ``nll_se`` (mean of −log p̂(x) over images and its standard error
        across images), ``neg_elbo`` and ``neg_elbo_se``, ``num_images``, ``num_samples``.

    Examples
    --------
    >>> vae = FlowVAE()
    >>> m = evaluate(vae, torch.zeros(4, 784), num_samples=10)
    >>> m["nll"] <= m["neg_elbo"]
    True
    """
    log_px, elbo = image_log_likelihoods(vae, data, num_samples, **options)
    nll, nll_se = mean_and_se(-log_px)
    neg_elbo, neg_elbo_se = mean_and_se(-elbo)
    return {
        "nll": nll,
        "nll_se": nll_se,
        "neg_elbo": neg_elbo,
        "neg_elbo_se": neg_elbo_se,
        "num_images": len(log_px),
        "num_samples": num_samples,
    }
