"""Pixel-level Barlow Twins loss (Pix2Rep-v2)."""

from __future__ import annotations

import torch
from torch import nn

from segassist.models.losses.pix2rep import sample_valid_pixels

__all__ = ["PixelBarlowTwinsLoss", "barlow_twins", "standardise"]


def standardise(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    r"""Standardise each column of ``z`` (``N×D``): :math:`(z - \mu) / \sqrt{\sigma^2 + \epsilon}`.

    The biased variance is used, as in ``BatchNorm1d(D, affine=False)`` in training mode.
    """
    mean = z.mean(dim=0, keepdim=True)
    var = z.var(dim=0, unbiased=False, keepdim=True)
    return (z - mean) / torch.sqrt(var + eps)


def barlow_twins(
    z1: torch.Tensor, z2: torch.Tensor, lambda_offdiag: float, eps: float = 1e-5
) -> torch.Tensor:
    r"""Barlow Twins redundancy-reduction loss of two aligned ``N×D`` sets.

    .. math::
        C = \tilde z_1^\top \tilde z_2 / N, \qquad
        L = \sum_i (1 - C_{ii})^2 + \lambda \sum_{i \neq j} C_{ij}^2,

    with :math:`\tilde z` the column-standardised features (:func:`standardise`).
    """
    n = z1.shape[0]
    c = standardise(z1, eps).T @ standardise(z2, eps) / n
    diag = torch.diagonal(c)
    on_diag = (1 - diag).pow(2).sum()
    off_diag = c.pow(2).sum() - diag.pow(2).sum()
    return on_diag + lambda_offdiag * off_diag


class PixelBarlowTwinsLoss(nn.Module):
    r"""Pixel-level Barlow Twins, the non-contrastive objective of Pix2Rep-v2 (Seince et al.,
    "Dense Self-Supervised Learning for Medical Image Segmentation", 2024; Zbontar et al., 2021).

    Pixels of both views are flattened over (batch, H, W) and the valid ones kept; each feature is
    standardised over them (``BatchNorm1d`` without affine) and

    .. math::
        C = \tilde z_1^\top \tilde z_2 / N \;(D \times D), \qquad
        L = \sum_i (1 - C_{ii})^2 + \lambda \sum_{i \neq j} C_{ij}^2.

    To bound memory, ``num_samples`` pixels (the same in both views) are drawn from the whole
    batch; the default of 8192 (our choice, the papers are silent) keeps the ``N×D`` matrices small
    while leaving ``N ≫ D`` for a well-estimated ``D×D`` correlation.

    Args:
        lambda_offdiag: :math:`\lambda`, weight of the redundancy-reduction term.
        num_samples: pixels drawn per batch; ``None`` keeps every valid pixel.
        eps: added to the variance when standardising.

    Shapes:
        ``z1``, ``z2``: ``B×D×H×W`` projected features, pixel-aligned. ``valid``: ``B×1×H×W`` bool.
        Output: scalar.
    """

    def __init__(
        self, lambda_offdiag: float = 5e-3, num_samples: int | None = 8192, eps: float = 1e-5
    ) -> None:
        super().__init__()
        if lambda_offdiag < 0:
            raise ValueError(f"lambda_offdiag must be non-negative, got {lambda_offdiag}.")
        if num_samples is not None and num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 or None, got {num_samples}.")
        self.lambda_offdiag = lambda_offdiag
        self.num_samples = num_samples
        self.eps = eps

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        valid: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        v1, v2 = sample_valid_pixels(z1, z2, valid, self.num_samples, generator)
        return barlow_twins(v1, v2, self.lambda_offdiag, self.eps)
