"""Which latent sites are local to which plate, and how a member's values pack into one row.

A plate's members each get one event: the unconstrained values of all the member's local
sites, flattened and concatenated (a county's intercept and slope together). `LocalSite`
maps a site's unconstrained tensor (its plate's axis anywhere) to rows ``(members, size)``
and back; `LocalPlate` holds a plate's sites and the columns each takes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pyro.distributions.transforms import Transform, biject_to
from torch import Tensor

__all__ = ["LocalPlate", "LocalSite"]


@dataclass
class LocalSite:
    """One local latent site: its support transform and the shape of one member's values.

    Parameters
    ----------
    name : str
        Site name.
    transform : Transform
        Map from the real unconstrained values to the site's support.
    event_dim : int
        The site's event dimensions (constrained).
    plate_axis : int
        Axis of the plate in the site's unconstrained tensor, counted from the right.
    member_shape : tuple of int
        Shape of one member's unconstrained values (the tensor without the plate axis).
    noncentred : bool
        Whether the site's value is ``loc + scale * u`` with its prior's ``loc`` and
        ``scale`` (a location-scale prior depending on other latent sites).
    gaussian : bool
        Whether that prior is Normal (so that a Gaussian factor times the prior is
        Gaussian: the plate's members are drawn as prior times factor).

    Examples
    --------
    >>> import torch
    >>> from pyro.distributions import constraints
    >>> site = LocalSite("a", biject_to(constraints.real), 0, -1, (), False)
    >>> u = site.unpack(torch.arange(3.0).reshape(3, 1))
    >>> u.tolist(), site.pack(u).shape
    ([0.0, 1.0, 2.0], torch.Size([3, 1]))
    """

    name: str
    transform: Transform
    event_dim: int
    plate_axis: int
    member_shape: tuple[int, ...]
    noncentred: bool
    gaussian: bool = False

    @property
    def size(self) -> int:
        """Unconstrained values per member."""
        return math.prod(self.member_shape)

    def unpack(self, rows: Tensor) -> Tensor:
        """Rows ``(members, size)`` -> the site's unconstrained tensor."""
        moved = rows.reshape((rows.shape[0],) + self.member_shape)
        return moved.movedim(0, self.plate_axis + moved.dim())

    def pack(self, unconstrained: Tensor) -> Tensor:
        """The site's unconstrained tensor -> rows ``(members, size)``."""
        return unconstrained.movedim(self.plate_axis, 0).reshape(-1, self.size)


@dataclass
class LocalPlate:
    """A plate whose members carry local latent sites, packed member by member.

    Parameters
    ----------
    name : str
        Plate name.
    dim : int
        The plate's batch dimension (negative), as in the model.
    size : int
        Full number of members.
    sites : list of LocalSite
        The local sites in the model's order.

    Examples
    --------
    >>> from pyro.distributions import constraints
    >>> real = biject_to(constraints.real)
    >>> plate = LocalPlate("g", -1, 5, [LocalSite("a", real, 0, -1, (), False),
    ...                                 LocalSite("b", real, 1, -2, (2,), False)])
    >>> plate.dim_total, [plate.columns[name] for name in ("a", "b")]
    (3, [slice(0, 1, None), slice(1, 3, None)])
    """

    name: str
    dim: int
    size: int
    sites: list[LocalSite] = field(default_factory=list)

    @property
    def dim_total(self) -> int:
        """Unconstrained values per member, all sites together."""
        return sum(site.size for site in self.sites)

    @property
    def columns(self) -> dict[str, slice]:
        """Each site's columns in a member's row."""
        columns, start = {}, 0
        for site in self.sites:
            columns[site.name] = slice(start, start + site.size)
            start += site.size
        return columns

    @property
    def gaussian_factor(self) -> bool:
        """Whether every site is non-centred with a Normal prior: the members are then
        drawn as their prior times a Gaussian factor (`pyro_nf.structured.factor`)."""
        return all(site.noncentred and site.gaussian for site in self.sites)

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Shape of a per-member parameter: the members on the plate's axis, then the row
        (so that Pyro's plate reads only the subsample's rows)."""
        return self.param_shape_of(self.dim_total)

    def param_shape_of(self, width: int) -> tuple[int, ...]:
        """Shape of a per-member parameter of ``width`` numbers per member."""
        return (self.size,) + (1,) * (-self.dim - 1) + (width,)

    def batch_view(self, rows: Tensor) -> Tensor:
        """Rows ``(members, dim_total)`` viewed with the plate on its own axis."""
        return rows.reshape((rows.shape[0],) + (1,) * (-self.dim - 1) + (rows.shape[-1],))


def local_site(
    name: str, site: dict, plate_dim: int, noncentred: bool, gaussian: bool = False
) -> LocalSite:
    """The `LocalSite` of a traced site in a plate at ``plate_dim``.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> site = {"fn": dist.LogNormal(0.0, 1.0).expand([4, 3]), "value": torch.ones(4, 3)}
    >>> local_site("s", site, -2, False).member_shape
    (3,)
    """
    fn = site["fn"]
    transform = biject_to(fn.support)
    unconstrained = transform.inv(site["value"])
    axis = plate_dim - transform.domain.event_dim
    shape = tuple(unconstrained.movedim(axis, 0).shape[1:])
    return LocalSite(name, transform, fn.event_dim, axis, shape, noncentred, gaussian)
