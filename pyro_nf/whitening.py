"""The whitening map of a flow guide: the fixed affine map its flow posterior ends with.

A flow guide's posterior over the unconstrained latent vector is ``z = W(loc + scale *
f(eps))``, with ``W`` a `Whitening`: the identity for a plain start, and for a Laplace
start ``x -> m + L x``, with ``m`` the mode and ``L`` the lower Cholesky factor of the
inverse Hessian there (NumPyro's ``LowerCholeskyAffine``), or a diagonal ``L`` where the
Hessian was taken diagonally. One object, built once from the start, so that the posterior
is assembled one way whatever the start.
"""

from __future__ import annotations

import torch
from pyro.nn import PyroModule
from torch import Tensor

from pyro_nf.laplace import LaplaceApproximation

__all__ = ["Whitening"]


class Whitening(PyroModule):
    """The affine map ``x -> shift + L x`` with a fixed lower-triangular ``L``.

    Follows the flow-layer protocol: ``whitening(x, inverse=False) -> (y, log|det J|)``,
    the log-determinant that of the forward map either way. Its tensors are buffers, so
    they follow the guide across devices and no optimiser sees them.

    Parameters
    ----------
    shift : Tensor, optional
        ``m``, shape ``(dim,)``; None (with ``scale``) for the identity.
    scale : Tensor, optional
        ``L``: a positive vector (a diagonal ``L``), or a lower-triangular matrix with a
        positive diagonal; None for the identity.

    Examples
    --------
    >>> w = Whitening(torch.tensor([1.0, 2.0]), torch.tensor([[2.0, 0.0], [1.0, 3.0]]))
    >>> y, log_det = w(torch.ones(2))
    >>> y.tolist(), round(float(log_det.exp()), 4)  # det L = 6
    ([3.0, 6.0], 6.0)
    >>> x, _ = w(y, inverse=True)
    >>> x.tolist(), w.kind, Whitening().kind
    ([1.0, 1.0], 'dense', 'identity')
    """

    def __init__(self, shift: Tensor | None = None, scale: Tensor | None = None) -> None:
        super().__init__()
        self.kind = "identity" if scale is None else ("diagonal" if scale.dim() == 1 else "dense")
        if scale is not None:
            # Not persistent: a guide saves them with the start they belong to.
            self.register_buffer("shift", shift.detach(), persistent=False)
            self.register_buffer("scale", scale.detach(), persistent=False)

    @classmethod
    def of(cls, laplace: LaplaceApproximation | None) -> Whitening:
        """The whitening a start gives: the identity without a Laplace approximation.

        Examples
        --------
        >>> Whitening.of(None).kind
        'identity'
        """
        if laplace is None:
            return cls()
        scale = laplace.scale if laplace.scale_tril is None else laplace.scale_tril
        return cls(laplace.loc, scale)

    def forward(self, x: Tensor, inverse: bool = False) -> tuple[Tensor, Tensor]:
        """``(W x, log|det W|)``, or with ``inverse`` ``(W^-1 x, log|det W|)``."""
        if self.kind == "identity":
            return x, x.new_zeros(x.shape[:-1])
        log_det = self.diagonal().log().sum(-1).expand(x.shape[:-1])
        if not inverse:
            return self.shift + self.linear(x), log_det
        if self.kind == "diagonal":
            return (x - self.shift) / self.scale, log_det
        y = torch.linalg.solve_triangular(
            self.scale, (x - self.shift).unsqueeze(-1), upper=False
        ).squeeze(-1)
        return y, log_det

    def linear(self, x: Tensor) -> Tensor:
        """``L x`` for a batch of vectors ``x``."""
        if self.kind == "identity":
            return x
        return x * self.scale if self.kind == "diagonal" else x @ self.scale.T

    def diagonal(self) -> Tensor:
        """The diagonal of ``L`` (ones for the identity)."""
        if self.kind == "dense":
            return torch.diagonal(self.scale)
        return self.scale

    def marginal_scale(self, scale: Tensor) -> Tensor:
        """The marginal standard deviations of ``W(loc + scale * eps)``, ``eps ~ N(0, I)``.

        Examples
        --------
        >>> w = Whitening(torch.zeros(2), torch.tensor([[2.0, 0.0], [1.0, 3.0]]))
        >>> w.marginal_scale(torch.ones(2)).pow(2).tolist()  # the rows' squared norms
        [4.0, 10.0]
        """
        # The rows of linear(diag(scale)) are L's columns times scale: sum over them.
        return self.linear(torch.diag_embed(scale)).pow(2).sum(-2).sqrt()
