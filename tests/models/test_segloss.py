from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segassist.models.segloss import MaskedDiceCELoss
from segassist.models.volumes import IGNORE_INDEX


def test_matches_hand_computation_on_annotated_voxels() -> None:
    # One image, two classes, three voxels: two annotated (class 0, class 1), one ignored.
    logits = torch.tensor([[[[2.0, 0.0, 5.0]], [[0.0, 1.0, -5.0]]]])  # 1×2×1×3
    target = torch.tensor([[[0, 1, IGNORE_INDEX]]])
    p0 = [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))]  # P(class 0) at voxels 0, 1
    ce = -(math.log(p0[0]) + math.log(1 - p0[1])) / 2
    eps = 1e-5
    dice0 = 1 - (2 * p0[0] + eps) / (p0[0] + p0[1] + 1 + eps)
    dice1 = 1 - (2 * (1 - p0[1]) + eps) / ((1 - p0[0]) + (1 - p0[1]) + 1 + eps)
    expected = ce + (dice0 + dice1) / 2

    got = MaskedDiceCELoss()(logits, target)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_ignored_voxels_change_neither_loss_nor_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8), generator=gen)
    target[:, :, 4:] = IGNORE_INDEX
    base = torch.randn(2, 3, 8, 8, generator=gen)
    other = base.clone()
    other[:, :, :, 4:] = 50 * torch.randn(2, 3, 8, 4, generator=gen)

    loss_fn = MaskedDiceCELoss()
    results = []
    for logits in (base, other):
        leaf = logits.clone().requires_grad_(True)
        loss = loss_fn(leaf, target)
        loss.backward()
        assert leaf.grad is not None
        results.append((loss.detach(), leaf.grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1][..., :4], results[1][1][..., :4])
    assert results[0][1][..., 4:].abs().max() == 0
    assert results[1][1][..., 4:].abs().max() == 0


def test_absent_class_is_left_out_of_dice_but_penalised_by_ce() -> None:
    target = torch.zeros(1, 4, 4, dtype=torch.long)  # only class 0 annotated
    confident = torch.zeros(1, 3, 4, 4)
    confident[:, 0] = 10.0
    loss_fn = MaskedDiceCELoss()
    # Perfect prediction of the only present class: the loss is ~0, not inflated by classes 1, 2.
    assert loss_fn(confident, target).item() < 1e-3
    wrong = confident.clone()
    wrong[:, 2] = 12.0
    assert loss_fn(wrong, target).item() > 1.0
    # Plain CE, for reference, agrees on the ordering.
    assert F.cross_entropy(wrong, target) > F.cross_entropy(confident, target)


def test_all_ignored_gives_zero_loss_with_graph() -> None:
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    loss = MaskedDiceCELoss()(logits, torch.full((1, 4, 4), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad is not None and logits.grad.abs().max() == 0


def test_rejects_bad_targets() -> None:
    with pytest.raises(ValueError, match="target values must be in"):
        MaskedDiceCELoss()(torch.randn(1, 2, 4, 4), torch.full((1, 4, 4), 2))
    with pytest.raises(ValueError, match="B×H×W"):
        MaskedDiceCELoss()(torch.randn(1, 2, 4, 4), torch.zeros(1, 4, 5, dtype=torch.long))
