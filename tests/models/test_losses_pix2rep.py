"""Pix2RepLoss against a loop-based InfoNCE, plus its properties."""

from __future__ import annotations

import math

import pytest
import torch

from segassist.models.losses import Pix2RepLoss


def _naive_info_nce(z1: torch.Tensor, z2: torch.Tensor, valid: torch.Tensor, tau: float) -> float:
    vectors_1, vectors_2 = [], []
    for b in range(z1.shape[0]):
        for i in range(z1.shape[2]):
            for j in range(z1.shape[3]):
                if valid[b, 0, i, j]:
                    vectors_1.append(z1[b, :, i, j] / z1[b, :, i, j].norm())
                    vectors_2.append(z2[b, :, i, j] / z2[b, :, i, j].norm())
    u = vectors_1 + vectors_2
    n = len(vectors_1)
    total = 0.0
    for k in range(2 * n):
        partner = (k + n) % (2 * n)
        denominator = sum(math.exp(float(u[k] @ u[m]) / tau) for m in range(2 * n) if m != k)
        total += -math.log(math.exp(float(u[k] @ u[partner]) / tau) / denominator)
    return total / (2 * n)


def _valid(batch: int, height: int, width: int) -> torch.Tensor:
    valid = torch.rand(batch, 1, height, width) > 0.3
    valid[0, 0, 0, 0] = True
    return valid


def test_matches_loop_reference_when_all_valid_pixels_are_kept() -> None:
    z1, z2 = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    valid = _valid(2, 4, 5)
    loss = Pix2RepLoss(num_samples=1000, temperature=0.53)(z1, z2, valid)
    assert loss.item() == pytest.approx(_naive_info_nce(z1, z2, valid, 0.53), rel=1e-5)


def test_invalid_pixels_never_enter_the_loss() -> None:
    z1, z2 = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    valid = _valid(2, 8, 8)
    z1 = z1.masked_fill(~valid, float("nan"))
    loss = Pix2RepLoss(num_samples=20)(z1, z2, valid)
    assert torch.isfinite(loss)


def test_aligned_views_score_lower_than_shuffled_ones() -> None:
    # Well-separated pixel embeddings: the loss must reward the correct correspondence.
    z = torch.randn(2, 16, 8, 8) * 3
    valid = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    shuffled = z.flatten(2)[:, :, torch.randperm(64)].reshape(2, 16, 8, 8)
    loss = Pix2RepLoss(num_samples=128, temperature=0.1)
    generator = torch.Generator().manual_seed(0)
    aligned = loss(z, z + 0.01 * torch.randn_like(z), valid, generator)
    generator = torch.Generator().manual_seed(0)
    assert aligned < loss(z, shuffled, valid, generator)


def test_same_generator_same_pixels_and_views_are_symmetric() -> None:
    z1, z2 = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16)
    valid = _valid(2, 16, 16)
    loss = Pix2RepLoss(num_samples=50)
    a = loss(z1, z2, valid, torch.Generator().manual_seed(1))
    b = loss(z1, z2, valid, torch.Generator().manual_seed(1))
    swapped = loss(z2, z1, valid, torch.Generator().manual_seed(1))
    assert a == b
    torch.testing.assert_close(a, swapped)


def test_input_checks_name_the_problem() -> None:
    loss = Pix2RepLoss()
    z = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="differing"):
        loss(z, torch.randn(1, 4, 8, 4), torch.ones(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        loss(z, z, torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="valid pixels"):
        loss(z, z, torch.zeros(1, 1, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        Pix2RepLoss(temperature=0.0)
