"""Progress reporting shared by the training loops (pretraining, few-shot fitting)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Progress", "ProgressCallback"]


@dataclass(frozen=True)
class Progress:
    """One progress report of a training loop.

    Attributes:
        step: optimisation steps done so far (1-based after the first step).
        total: optimisation steps planned.
        loss: loss of the last step (or a running mean, as the loop documents).
        eta_seconds: estimated seconds left, from the mean step time so far.
        phase: what the loop is doing, e.g. ``"pretrain"``, ``"linear"``, ``"finetune"``.
    """

    step: int
    total: int
    loss: float
    eta_seconds: float
    phase: str


ProgressCallback = Callable[[Progress], None]
"""Called after each reported step. It may raise (e.g. to cancel a job): loops checkpoint first
when they checkpoint at all, then let the exception propagate."""
