"""Segmenters trained apart, answering as one: the mean of their class probabilities."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from segassist.models.networks.segmenter import SegmenterNet

__all__ = ["PooledSegmenter"]


class PooledSegmenter(nn.Module):
    r"""``M`` segmenters of the same classes as one exportable model.

    With member logits ``z_m``, the pooled logits are the log of the mean of the members'
    class probabilities, computed stably as
    ``log((1/M) Σ_m softmax(z_m)) = logsumexp_m(log_softmax(z_m)) − log M``, so that their
    softmax is that mean and their argmax its vote. The cluster scores are the first member's.

    Args:
        members: the segmenters (same classes and size divisor); ``M ≥ 1``.

    Shapes:
        ``forward``: ``B×1×H×W`` -> (logits ``B×L×H×W``, cluster scores ``B×K×H×W``).
    """

    def __init__(self, members: Sequence[SegmenterNet]) -> None:
        super().__init__()
        if not members:
            raise ValueError("a pooled segmenter needs at least one member")
        classes = {member.num_classes for member in members}
        divisors = {member.encoder.size_divisor for member in members}
        if len(classes) > 1 or len(divisors) > 1:
            raise ValueError(
                f"members differ: classes {sorted(classes)}, size divisors {sorted(divisors)}"
            )
        self.members = nn.ModuleList(members)
        self.num_classes = members[0].num_classes
        self.size_divisor = members[0].encoder.size_divisor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled logits ``B×L×H×W`` and the first member's cluster scores ``B×K×H×W``."""
        outputs = [member(x) for member in self.members]
        log_probabilities = torch.stack([F.log_softmax(logits, dim=1) for logits, _ in outputs])
        pooled = torch.logsumexp(log_probabilities, dim=0) - math.log(len(outputs))
        return pooled, outputs[0][1]
