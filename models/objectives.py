"""Self-supervised objectives: the head(s) of each objective and its loss, behind one interface."""

from __future__ import annotations

import inspect
from typing import Any, cast

import torch
from torch import nn

from segassist.models.losses import IICBoundaryLoss, Pix2RepLoss, PixelBarlowTwinsLoss
from segassist.models.losses.pix2rep import check_pair, sample_valid_pixels
from segassist.models.runtime.configs import OBJECTIVES

__all__ = [
    "OBJECTIVES",
    "IICBoundaryObjective",
    "Objective",
    "Pix2RepBarlowObjective",
    "Pix2RepObjective",
    "build_objective",
    "projection_head",
]


def projection_head(in_channels: int, dim: int = 256, depth: int = 2) -> nn.Module:
    """Pix2Rep projection head g of 1×1 convolutions.

    ``depth`` convolutions: ``depth - 1`` blocks of (1×1 conv → BatchNorm → ReLU) then a 1×1
    conv to ``dim``; the default ``depth=2`` is C→256, BatchNorm, ReLU, 256→256. ``depth=0`` is
    the identity (the loss reads the backbone features).
    """
    if depth < 0:
        raise ValueError(f"projection depth must be >= 0, got {depth}.")
    if depth == 0:
        return nn.Identity()
    layers: list[nn.Module] = []
    channels = in_channels
    for _ in range(depth - 1):
        layers += [nn.Conv2d(channels, dim, 1), nn.BatchNorm2d(dim), nn.ReLU(inplace=True)]
        channels = dim
    layers.append(nn.Conv2d(channels, dim, 1))
    return nn.Sequential(*layers)


def _sample_and_project(
    head: nn.Module,
    z1: torch.Tensor,
    z2: torch.Tensor,
    valid: torch.Tensor,
    num_samples: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw the loss's pixels first, then project only those (the head is pointwise).

    The same maths as projecting every valid pixel and sampling afterwards, at a fraction of the
    cost (the 256-wide head on every pixel was ~70% of a pretraining step), except that the
    head's BatchNorm statistics come from the drawn pixels of each view.

    Returns:
        ``N×D×1×1`` projections of view 1 and view 2 (row n is the same pixel in both) and an
        all-true ``N×1×1×1`` mask, the shapes the pixel losses take.
    """
    v1, v2 = sample_valid_pixels(z1, z2, valid, num_samples)
    p1 = head(v1[:, :, None, None])
    p2 = head(v2[:, :, None, None])
    return p1, p2, torch.ones_like(p1[:, :1], dtype=torch.bool)


class Objective(nn.Module):
    """A self-supervised objective: its heads and its loss.

    ``forward(z1, z2, valid, image_warped) -> (loss, logs)`` with ``z1 = W_A(f(a1(x)))`` and
    ``z2 = f(W_A(a2(x)))`` (``B×C×H×W``), ``valid`` and ``image_warped = W_A(x)`` ``B×1×H×W``.
    ``logs`` holds Python floats (``"loss"`` always, plus per-objective terms and
    ``"valid_fraction"``). ``cluster_head`` is the 1×1 convolution ``C→K`` whose argmax is the cluster
    map, or ``None`` when clusters come from k-means on the features.
    """

    name: str = ""

    @property
    def cluster_head(self) -> nn.Conv2d | None:
        """The 1×1 convolution ``C→K`` of the cluster map, or ``None`` (k-means later)."""
        return None

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        valid: torch.Tensor,
        image_warped: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


class _ProjectedPixelObjective(Objective):
    """A pixel loss on projections of the same drawn pixels of both views (Pix2Rep, v1 and v2).

    Subclasses set ``projector`` (the head g) and ``loss`` (a pixel loss with ``num_samples``).
    """

    projector: nn.Module
    loss: Pix2RepLoss | PixelBarlowTwinsLoss

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        valid: torch.Tensor,
        image_warped: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        check_pair(z1, z2, valid)
        p1, p2, rows = _sample_and_project(self.projector, z1, z2, valid, self.loss.num_samples)
        loss = self.loss(p1, p2, rows)
        return loss, {"loss": float(loss.detach()), "valid_fraction": float(valid.float().mean())}


class Pix2RepObjective(_ProjectedPixelObjective):
    """Pix2Rep pixel InfoNCE (Seince et al.) behind a projection head.

    Args:
        feature_channels: ``C`` of the backbone.
        projection_dim: output width of the projection head.
        projection_depth: convolutions in the head (0 = none).
        num_samples: pixels drawn per batch by :class:`~segassist.models.losses.Pix2RepLoss`.
        temperature: InfoNCE temperature.
    """

    name = "pix2rep"

    def __init__(
        self,
        feature_channels: int,
        projection_dim: int = 256,
        projection_depth: int = 2,
        num_samples: int = 1000,
        temperature: float = 0.53,
    ) -> None:
        super().__init__()
        self.projector = projection_head(feature_channels, projection_dim, projection_depth)
        self.loss = Pix2RepLoss(num_samples=num_samples, temperature=temperature)


class Pix2RepBarlowObjective(_ProjectedPixelObjective):
    """Pix2Rep-v2: pixel Barlow Twins (Seince et al.) behind a projection head.

    Args:
        feature_channels: ``C`` of the backbone.
        projection_dim: output width ``D`` of the projection head.
        projection_depth: convolutions in the head (0 = none).
        lambda_offdiag: weight of the off-diagonal term.
        num_samples: pixels drawn per batch by :class:`~segassist.models.losses.PixelBarlowTwinsLoss`.
    """

    name = "pix2rep_barlow"

    def __init__(
        self,
        feature_channels: int,
        projection_dim: int = 256,
        projection_depth: int = 2,
        lambda_offdiag: float = 5e-3,
        num_samples: int | None = 8192,
    ) -> None:
        super().__init__()
        self.projector = projection_head(feature_channels, projection_dim, projection_depth)
        self.loss = PixelBarlowTwinsLoss(lambda_offdiag=lambda_offdiag, num_samples=num_samples)


class IICBoundaryObjective(Objective):
    """Regularised IIC + boundary cross-correlation (Peng et al.) on softmax cluster heads.

    ``num_heads`` independent 1×1 convolutions ``C→K``; the loss is averaged over them and the
    first is :attr:`cluster_head`.

    Args:
        feature_channels: ``C`` of the backbone.
        num_clusters: ``K``.
        num_heads: sub-heads whose losses are averaged.
        w_rmi, w_cc, alpha, lam, eps, gamma, window: see :class:`~segassist.models.losses.IICBoundaryLoss`.
    """

    name = "iic_boundary"

    def __init__(
        self,
        feature_channels: int,
        num_clusters: int = 20,
        num_heads: int = 1,
        w_rmi: float = 1.0,
        w_cc: float = 0.1,
        alpha: float = 0.5,
        lam: float = 1.5,
        eps: float = 1e-5,
        gamma: float = 0.75,
        window: int = 5,
    ) -> None:
        super().__init__()
        if num_clusters < 2:
            raise ValueError(f"num_clusters must be >= 2, got {num_clusters}.")
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}.")
        self.heads = nn.ModuleList(
            nn.Conv2d(feature_channels, num_clusters, 1) for _ in range(num_heads)
        )
        self.loss = IICBoundaryLoss(
            w_rmi=w_rmi, w_cc=w_cc, alpha=alpha, lam=lam, eps=eps, gamma=gamma, window=window
        )

    @property
    def cluster_head(self) -> nn.Conv2d:
        """The first sub-head, ``C→K``; its argmax is the cluster map."""
        return cast(nn.Conv2d, self.heads[0])

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        valid: torch.Tensor,
        image_warped: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        check_pair(z1, z2, valid)
        rmi_terms, cc_terms = [], []
        for head in self.heads:
            p = torch.softmax(head(z1).float(), dim=1)
            q = torch.softmax(head(z2).float(), dim=1)
            rmi, cc = self.loss.components(p, q, valid, image_warped)
            rmi_terms.append(rmi)
            cc_terms.append(cc)
        rmi = torch.stack(rmi_terms).mean()
        cc = torch.stack(cc_terms).mean()
        loss = self.loss.w_rmi * rmi + self.loss.w_cc * cc
        logs = {
            "loss": float(loss.detach()),
            "rmi": float(rmi.detach()),
            "cc": float(cc.detach()),
            "valid_fraction": float(valid.float().mean()),
        }
        return loss, logs


_CLASSES: dict[str, type[Objective]] = {
    "pix2rep": Pix2RepObjective,
    "pix2rep_barlow": Pix2RepBarlowObjective,
    "iic_boundary": IICBoundaryObjective,
}


def build_objective(
    name: str, feature_channels: int, modality: str = "MR", **overrides: Any
) -> Objective:
    """Build the objective ``name`` for a backbone with ``feature_channels`` channels.

    Args:
        name: one of :data:`OBJECTIVES`.
        feature_channels: ``C`` of the backbone.
        modality: sets the edge exponent of ``iic_boundary`` (``gamma`` 0.5 for ``"CT"``, 0.75
            otherwise) unless ``gamma`` is overridden.
        overrides: constructor arguments of the objective's class (e.g. ``temperature``,
            ``num_clusters``).

    Raises:
        ValueError: unknown ``name`` or unknown override.
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown objective {name!r}; valid names are {', '.join(OBJECTIVES)}.")
    cls = _CLASSES[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "feature_channels"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for objective {name!r}; accepted: {sorted(accepted)}."
        )
    kwargs = dict(overrides)
    if name == "iic_boundary":
        kwargs.setdefault("gamma", 0.5 if modality.upper() == "CT" else 0.75)
    return cls(feature_channels, **kwargs)
