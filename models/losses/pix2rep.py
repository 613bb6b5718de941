"""Pixel-level InfoNCE loss of Pix2Rep."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Pix2RepLoss", "check_pair", "info_nce", "sample_valid_pixels"]


def check_pair(z1: torch.Tensor, z2: torch.Tensor, valid: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``z1``, ``z2`` are ``B×D×H×W`` alike and ``valid`` ``B×1×H×W`` bool."""
    if z1.ndim != 4:
        raise ValueError(f"features must be B×D×H×W, got shape {tuple(z1.shape)}.")
    if z1.shape != z2.shape:
        raise ValueError(
            f"view 2 has shape {tuple(z2.shape)}, differing from view 1 {tuple(z1.shape)}."
        )
    expected = (z1.shape[0], 1, *z1.shape[2:])
    if tuple(valid.shape) != expected:
        raise ValueError(f"valid mask must have shape {expected}, got {tuple(valid.shape)}.")
    if valid.dtype != torch.bool:
        raise ValueError(f"valid mask must be bool, got {valid.dtype}.")


def sample_valid_pixels(
    z1: torch.Tensor,
    z2: torch.Tensor,
    valid: torch.Tensor,
    num_samples: int | None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten both views over (batch, H, W), keep valid pixels, draw the same pixels in both.

    Args:
        z1: view 1, ``B×D×H×W``.
        z2: view 2, ``B×D×H×W``, pixel-aligned with ``z1``.
        valid: ``B×1×H×W`` bool, pixels with a correspondence.
        num_samples: pixels to draw without replacement; ``None`` or more than the valid count
            keeps every valid pixel.
        generator: random generator of the draw (on CPU).

    Returns:
        Two ``N×D`` tensors whose row ``n`` is the same pixel in both views.
    """
    check_pair(z1, z2, valid)
    mask = valid[:, 0]
    v1 = z1.permute(0, 2, 3, 1)[mask]
    v2 = z2.permute(0, 2, 3, 1)[mask]
    count = v1.shape[0]
    if count < 2:
        raise ValueError(f"need at least 2 valid pixels, the mask has {count}.")
    if num_samples is not None and num_samples < count:
        index = torch.randperm(count, generator=generator)[:num_samples].to(v1.device)
        v1, v2 = v1[index], v2[index]
    return v1, v2


def info_nce(u1: torch.Tensor, u2: torch.Tensor, temperature: float) -> torch.Tensor:
    r"""InfoNCE over the ``2N`` vectors of two aligned sets (NT-Xent).

    With :math:`u = [u_1; u_2]` L2-normalised and :math:`p(k) = (k + N) \bmod 2N` the partner,

    .. math::
        \ell_k = -\log \frac{\exp(u_k \cdot u_{p(k)} / \tau)}{\sum_{m \neq k} \exp(u_k \cdot u_m / \tau)},
        \qquad L = \frac{1}{2N} \sum_k \ell_k.

    Args:
        u1: ``N×D`` (normalised here).
        u2: ``N×D``, row ``n`` the positive of row ``n`` of ``u1``.
        temperature: :math:`\tau > 0`.

    Returns:
        Scalar loss.
    """
    n = u1.shape[0]
    u = F.normalize(torch.cat([u1, u2]), dim=1)
    logits = u @ u.T / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=u.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    partner = (torch.arange(2 * n, device=u.device) + n) % (2 * n)
    return F.cross_entropy(logits, partner)


class Pix2RepLoss(nn.Module):
    r"""Pixel-level contrastive loss of Pix2Rep (Seince et al., "Dense Self-Supervised Learning
    for Medical Image Segmentation", 2024).

    Both views are flattened over (batch, H, W); valid pixels are kept and the same ``N`` are drawn
    in both, then L2-normalised. Each pixel's positive is its partner in the other view; every other
    sampled pixel (both views, all images of the batch) is a negative:

    .. math::
        \ell_k = -\log \frac{\exp(u_k \cdot u_{p(k)} / \tau)}{\sum_{m \neq k} \exp(u_k \cdot u_m / \tau)},
        \qquad L = \frac{1}{2N} \sum_{k=1}^{2N} \ell_k.

    Args:
        num_samples: ``N`` pixels drawn per batch (fewer when fewer are valid).
        temperature: :math:`\tau`.

    Shapes:
        ``z1``, ``z2``: ``B×D×H×W`` projected features of the two views, pixel-aligned.
        ``valid``: ``B×1×H×W`` bool. Output: scalar.
    """

    def __init__(self, num_samples: int = 1000, temperature: float = 0.53) -> None:
        super().__init__()
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2, got {num_samples}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.num_samples = num_samples
        self.temperature = temperature

    def forward(
        self,
        z1: torch.Tensor,
        z2: torch.Tensor,
        valid: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        u1, u2 = sample_valid_pixels(z1, z2, valid, self.num_samples, generator)
        return info_nce(u1, u2, self.temperature)
