"""PixelBarlowTwinsLoss against a loop-based reference, plus its properties."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segassist.models.losses import PixelBarlowTwinsLoss
from segassist.models.losses.pix2rep_barlow import standardise


def _naive_barlow(
    z1: torch.Tensor, z2: torch.Tensor, valid: torch.Tensor, lam: float, eps: float = 1e-5
) -> float:
    rows_1 = [
        z1[b, :, i, j] for b, i, j in zip(*torch.nonzero(valid[:, 0], as_tuple=True), strict=True)
    ]
    rows_2 = [
        z2[b, :, i, j] for b, i, j in zip(*torch.nonzero(valid[:, 0], as_tuple=True), strict=True)
    ]
    n, d = len(rows_1), z1.shape[1]

    def column_stats(rows: list[torch.Tensor], k: int) -> tuple[float, float]:
        mean = sum(float(r[k]) for r in rows) / n
        var = sum((float(r[k]) - mean) ** 2 for r in rows) / n
        return mean, (var + eps) ** 0.5

    stats_1 = [column_stats(rows_1, k) for k in range(d)]
    stats_2 = [column_stats(rows_2, k) for k in range(d)]
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = (
                sum(
                    (float(r1[i]) - stats_1[i][0])
                    / stats_1[i][1]
                    * (float(r2[j]) - stats_2[j][0])
                    / stats_2[j][1]
                    for r1, r2 in zip(rows_1, rows_2, strict=True)
                )
                / n
            )
            loss += (1 - c) ** 2 if i == j else lam * c**2
    return loss


def test_matches_loop_reference() -> None:
    z1 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    z2 = z1 + 0.5 * torch.randn_like(z1)
    valid = torch.rand(2, 1, 4, 4) > 0.25
    loss = PixelBarlowTwinsLoss(lambda_offdiag=0.1, num_samples=None)(z1, z2, valid)
    assert loss.item() == pytest.approx(_naive_barlow(z1, z2, valid, 0.1), rel=1e-6)


def test_standardise_is_batchnorm_without_affine() -> None:
    z = torch.randn(50, 6) * 3 + 2
    expected = F.batch_norm(z, None, None, training=True, eps=1e-5)
    torch.testing.assert_close(standardise(z), expected)


def test_identical_decorrelated_views_reach_the_minimum() -> None:
    z = torch.randn(4, 8, 32, 32)
    valid = torch.ones(4, 1, 32, 32, dtype=torch.bool)
    assert PixelBarlowTwinsLoss()(z, z, valid) < 1e-3


def test_redundant_features_and_mismatched_views_are_penalised() -> None:
    valid = torch.ones(2, 1, 32, 32, dtype=torch.bool)
    z = torch.randn(2, 8, 32, 32)
    redundant = z[:, :1].expand(-1, 8, -1, -1) + 0.01 * torch.randn_like(z)
    loss = PixelBarlowTwinsLoss()
    baseline = loss(z, z, valid)
    assert loss(redundant, redundant, valid) > baseline + 0.1
    assert loss(z, torch.randn_like(z), valid) > baseline + 1.0


def test_invalid_pixels_never_enter_the_loss() -> None:
    z = torch.randn(2, 4, 16, 16)
    valid = torch.rand(2, 1, 16, 16) > 0.5
    poisoned = z.masked_fill(~valid, float("inf"))
    torch.testing.assert_close(
        PixelBarlowTwinsLoss(num_samples=None)(poisoned, z, valid),
        PixelBarlowTwinsLoss(num_samples=None)(z, z, valid),
    )


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="lambda_offdiag"):
        PixelBarlowTwinsLoss(lambda_offdiag=-1.0)
    with pytest.raises(ValueError, match="valid mask"):
        PixelBarlowTwinsLoss()(
            torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4), torch.ones(1, 4, 4, dtype=torch.bool)
        )
