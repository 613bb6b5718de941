"""Dice + cross-entropy for sparse labels: voxels equal to the ignore value contribute nothing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import MaskedDiceLoss
from torch import nn

from segassist.models.volumes import IGNORE_INDEX

__all__ = ["MaskedDiceCELoss"]


class MaskedDiceCELoss(nn.Module):
    r"""Soft Dice + cross-entropy over annotated voxels only.

    .. math::
        L = w_{ce}\,\mathrm{CE} + w_{dice}\,\frac{1}{|P|}\sum_{l \in P}
            \Bigl(1 - \frac{2\sum_{n} p_{nl} y_{nl} + \epsilon}{\sum_n p_{nl} + \sum_n y_{nl}
            + \epsilon}\Bigr)

    with ``n`` ranging over the annotated voxels of the whole batch (Dice is computed over the
    batch, not per image: few-shot batches hold slices where a class may be absent), ``p``
    the softmax of the logits, ``y`` the one-hot target, ε = 1e-5 (MONAI's smoothing).

    Classes absent from the batch's annotated voxels (``l ∉ P``) are left out of the Dice mean: a
    Dice term for an absent class is either ≈1 (a constant) or ≈0 with a vanishing gradient, so
    it only adds noise; false positives of absent classes are still penalised by the
    cross-entropy. Cross-entropy is the mean over annotated voxels. With no annotated voxel the
    loss is 0 (with a graph, so ``backward`` still works) and no gradient flows.

    Args:
        ce_weight: weight of the cross-entropy term.
        dice_weight: weight of the Dice term.
        ignore_index: target value of unannotated voxels.
    """

    def __init__(
        self, ce_weight: float = 1.0, dice_weight: float = 1.0, ignore_index: int = IGNORE_INDEX
    ) -> None:
        super().__init__()
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.ignore_index = ignore_index
        self.dice = MaskedDiceLoss(softmax=True, batch=True, reduction="none")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            logits: ``B×L×H×W`` unnormalised class scores.
            target: ``B×H×W`` integer class ids in ``0…L−1`` or ``ignore_index``.

        Returns:
            Scalar loss.

        Raises:
            ValueError: on mismatched shapes or target values out of range.
        """
        if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(
                f"expected logits B×L×H×W and target B×H×W, got {tuple(logits.shape)} "
                f"and {tuple(target.shape)}"
            )
        num_classes = logits.shape[1]
        target = target.long()
        valid = target != self.ignore_index
        safe = torch.where(valid, target, torch.zeros_like(target))
        if bool((safe < 0).any()) or bool((safe >= num_classes).any()):
            raise ValueError(
                f"target values must be in 0…{num_classes - 1} or {self.ignore_index}, got "
                f"{sorted(int(v) for v in torch.unique(target[valid]))}"
            )
        if not bool(valid.any()):
            return logits.sum() * 0.0
        ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        onehot = F.one_hot(safe, num_classes).permute(0, 3, 1, 2).to(logits.dtype)
        mask = valid.unsqueeze(1).to(logits.dtype)
        per_class = self.dice(logits, onehot, mask=mask).reshape(num_classes)
        present = (onehot * mask).sum(dim=(0, 2, 3)) > 0
        dice = per_class[present].mean()
        return self.ce_weight * ce + self.dice_weight * dice
