"""Regularised IIC and boundary cross-correlation losses against loop references, plus properties."""

from __future__ import annotations

import math

import pytest
import torch

from segassist.models.losses import (
    BoundaryCrossCorrelationLoss,
    IICBoundaryLoss,
    RegularisedIICLoss,
)
from segassist.models.losses.iic_boundary import edge_map, regularised_mi


def _probs(batch: int, k: int, height: int, width: int, sharpness: float = 1.0) -> torch.Tensor:
    return torch.softmax(sharpness * torch.randn(batch, k, height, width, dtype=torch.float64), 1)


def _naive_rmi(
    p: torch.Tensor, q: torch.Tensor, valid: torch.Tensor, alpha: float, lam: float, eps: float
) -> float:
    k = p.shape[1]
    pixels = [tuple(ix) for ix in torch.nonzero(valid[:, 0]).tolist()]
    joint = [[0.0] * k for _ in range(k)]
    for b, y, x in pixels:
        for i in range(k):
            for j in range(k):
                joint[i][j] += float(p[b, i, y, x] * q[b, j, y, x]) / len(pixels)
    sym = [[(joint[i][j] + joint[j][i]) / 2 for j in range(k)] for i in range(k)]
    rows = [sum(sym[i]) for i in range(k)]
    cols = [sum(sym[i][j] for i in range(k)) for j in range(k)]
    loss = 0.0
    for i in range(k):
        for j in range(k):
            target = alpha * (i == j) / k + (1 - alpha) * sym[i][j]
            loss -= target * math.log(sym[i][j] + eps)
            loss += lam * sym[i][j] * (math.log(rows[i] + eps) + math.log(cols[j] + eps))
    return loss


def test_rmi_matches_loop_reference() -> None:
    p, q = _probs(2, 3, 4, 4), _probs(2, 3, 4, 4)
    valid = torch.rand(2, 1, 4, 4) > 0.3
    loss = RegularisedIICLoss(alpha=0.5, lam=1.5, eps=1e-5)(p, q, valid)
    assert loss.item() == pytest.approx(_naive_rmi(p, q, valid, 0.5, 1.5, 1e-5), rel=1e-5)


def test_alpha_zero_lambda_one_is_negative_mutual_information() -> None:
    joint = torch.rand(5, 5, dtype=torch.float64) + 0.1
    joint = (joint + joint.T) / 2
    joint = joint / joint.sum()
    marginal = joint.sum(dim=1)
    mi = (joint * torch.log(joint / (marginal[:, None] * marginal[None, :]))).sum()
    loss = regularised_mi(joint, alpha=0.0, lam=1.0, eps=1e-12)
    assert loss.item() == pytest.approx(-mi.item(), abs=1e-9)


def test_balanced_diagonal_joint_beats_unbalanced_and_off_diagonal_ones() -> None:
    k = 4
    balanced = torch.eye(k, dtype=torch.float64) / k
    unbalanced = torch.diag(torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64))
    uniform = torch.full((k, k), 1.0 / k**2, dtype=torch.float64)
    off_diagonal = (torch.ones(k, k, dtype=torch.float64) - torch.eye(k, dtype=torch.float64)) / (
        k * (k - 1)
    )
    best = regularised_mi(balanced, alpha=0.5, lam=1.5, eps=1e-5)
    for other in (unbalanced, uniform, off_diagonal):
        assert best < regularised_mi(other, alpha=0.5, lam=1.5, eps=1e-5)


def test_rmi_is_symmetric_and_ignores_invalid_pixels() -> None:
    p, q = _probs(2, 4, 8, 8), _probs(2, 4, 8, 8)
    valid = torch.rand(2, 1, 8, 8) > 0.5
    loss = RegularisedIICLoss()
    torch.testing.assert_close(loss(p, q, valid), loss(q, p, valid))
    poisoned = p.masked_fill(~valid, float("nan"))
    torch.testing.assert_close(loss(poisoned, q, valid), loss(p, q, valid))


def _naive_cc(
    q: torch.Tensor, image: torch.Tensor, valid: torch.Tensor, gamma: float, window: int, eps: float
) -> float:
    batch, _, height, width = q.shape
    r = window // 2

    def minmax(v: list[list[float]], b: int) -> list[list[float]]:
        values = [v[y][x] for y in range(height) for x in range(width) if valid[b, 0, y, x]]
        lo, hi = min(values), max(values)
        return [
            [(v[y][x] - lo) / (hi - lo + 1e-8) if valid[b, 0, y, x] else 0.0 for x in range(width)]
            for y in range(height)
        ]

    total, count = 0.0, 0
    for b in range(batch):
        grad = [[0.0] * width for _ in range(height)]
        entropy = [[0.0] * width for _ in range(height)]
        for y in range(height):
            for x in range(width):
                dy = (
                    float(image[b, 0, y + 1, x] - image[b, 0, y, x])
                    if y + 1 < height and valid[b, 0, y, x] and valid[b, 0, y + 1, x]
                    else 0.0
                )
                dx = (
                    float(image[b, 0, y, x + 1] - image[b, 0, y, x])
                    if x + 1 < width and valid[b, 0, y, x] and valid[b, 0, y, x + 1]
                    else 0.0
                )
                grad[y][x] = math.sqrt(dy * dy + dx * dx)
                entropy[y][x] = -sum(
                    float(v) * math.log(max(float(v), 1e-12)) for v in q[b, :, y, x]
                )
        e = [[v**gamma for v in row] for row in minmax(grad, b)]
        s = minmax(entropy, b)
        for y in range(height):
            for x in range(width):
                if not valid[b, 0, y, x]:
                    continue
                window_pixels = [
                    (yy, xx)
                    for yy in range(y - r, y + r + 1)
                    for xx in range(x - r, x + r + 1)
                    if 0 <= yy < height and 0 <= xx < width and valid[b, 0, yy, xx]
                ]
                n = len(window_pixels)
                ms = sum(s[a][c] for a, c in window_pixels) / n
                me = sum(e[a][c] for a, c in window_pixels) / n
                cov = sum((s[a][c] - ms) * (e[a][c] - me) for a, c in window_pixels) / n
                vs = sum((s[a][c] - ms) ** 2 for a, c in window_pixels) / n
                ve = sum((e[a][c] - me) ** 2 for a, c in window_pixels) / n
                total += cov**2 / (max(vs, eps) * max(ve, eps))
                count += 1
    return -total / count


def test_boundary_cc_matches_loop_reference() -> None:
    q = _probs(2, 3, 7, 6)
    image = torch.rand(2, 1, 7, 6, dtype=torch.float64)
    valid = torch.ones(2, 1, 7, 6, dtype=torch.bool)
    valid[1, 0, :2] = False
    loss = BoundaryCrossCorrelationLoss(gamma=0.75, window=5, eps=1e-5)(q, image, valid)
    assert loss.item() == pytest.approx(_naive_cc(q, image, valid, 0.75, 5, 1e-5), rel=1e-4)


def test_uncertainty_on_image_edges_scores_lower_than_random_uncertainty() -> None:
    image = torch.zeros(1, 1, 32, 32)
    image[:, :, 8:24, 10:26] = 1.0
    valid = torch.ones(1, 1, 32, 32, dtype=torch.bool)
    edges = edge_map(image, valid, gamma=0.75) > 0.5
    logits = torch.zeros(1, 4, 32, 32)
    logits[:, 0] = 8.0  # confident everywhere ...
    logits[:, 0] = logits[:, 0].masked_fill(edges[:, 0], 0.0)  # ... but on the edges
    on_edges = torch.softmax(logits, dim=1)
    random = torch.softmax(3 * torch.randn(1, 4, 32, 32), dim=1)
    loss = BoundaryCrossCorrelationLoss()
    assert loss(on_edges, image, valid) < loss(random, image, valid) - 0.1
    assert -1.0 - 1e-4 <= loss(on_edges, image, valid) <= 0.0


def test_the_border_of_a_warped_image_is_not_an_edge() -> None:
    image = torch.zeros(1, 1, 16, 16)
    valid = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    image[:, :, 4:12, 4:12] = 0.7  # flat inside the valid region, zero padding outside
    valid[:, :, 4:12, 4:12] = True
    assert edge_map(image, valid, gamma=0.75).abs().max() == 0


def test_combined_loss_weights_both_terms_and_averages_cc_over_views() -> None:
    p, q = _probs(2, 5, 16, 16).float(), _probs(2, 5, 16, 16).float()
    image = torch.rand(2, 1, 16, 16)
    valid = torch.rand(2, 1, 16, 16) > 0.2
    combined = IICBoundaryLoss(w_rmi=1.0, w_cc=0.1, gamma=0.5)
    cc = BoundaryCrossCorrelationLoss(gamma=0.5)
    expected = (
        RegularisedIICLoss()(p, q, valid) + 0.1 * (cc(p, image, valid) + cc(q, image, valid)) / 2
    )
    torch.testing.assert_close(combined(p, q, valid, image), expected)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="window"):
        BoundaryCrossCorrelationLoss(window=4)
    with pytest.raises(ValueError, match="alpha"):
        RegularisedIICLoss(alpha=1.5)
    p = _probs(1, 3, 8, 8)
    with pytest.raises(ValueError, match="image must have shape"):
        BoundaryCrossCorrelationLoss()(
            p, torch.rand(1, 1, 4, 4), torch.ones(1, 1, 8, 8, dtype=torch.bool)
        )
    with pytest.raises(ValueError, match="no pixel"):
        RegularisedIICLoss()(p, p, torch.zeros(1, 1, 8, 8, dtype=torch.bool))
