"""Self-supervised losses: pixel InfoNCE, pixel Barlow Twins, regularised IIC + boundary term."""

from __future__ import annotations

from segassist.models.losses.iic_boundary import (
    BoundaryCrossCorrelationLoss,
    IICBoundaryLoss,
    RegularisedIICLoss,
)
from segassist.models.losses.pix2rep import Pix2RepLoss
from segassist.models.losses.pix2rep_barlow import PixelBarlowTwinsLoss

__all__ = [
    "BoundaryCrossCorrelationLoss",
    "IICBoundaryLoss",
    "Pix2RepLoss",
    "PixelBarlowTwinsLoss",
    "RegularisedIICLoss",
]
