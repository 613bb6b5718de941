"""The probe head: trained on standardised features, exported reading the raw ones; ``auto``
keeps the head that validates best on held-out tiles."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from torch import nn

from segassist.models.fewshot import (
    FewShotConfig,
    _first_conv,
    _fold_standardisation,
    _pointwise,
    _select_head,
    _train_head,
)
from segassist.models.pretrain import Encoder, PretrainConfig
from segassist.models.segloss import MaskedDiceCELoss
from segassist.models.threads import torch_threads

STEPS = 60  # the few-shot benchmark's default probe budget


def _head(kind: Literal["linear", "mlp"], channels: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Conv2d(channels, 2, 1)
    return nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(), nn.Conv2d(channels, 2, 1))


def _offset_features(seed: int, n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """``N×8`` features like a ReLU decoder block's: a large positive offset (3), small noise
    (σ 0.05), and the class (20 % of pixels) a +0.2 shift of channel 0."""
    generator = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=generator) < 0.2).long()
    x = 3.0 + 0.05 * torch.randn(n, 8, generator=generator)
    x[:, 0] += 0.2 * y
    return x, y


def _dice(head: nn.Module, seed: int) -> float:
    x, y = _offset_features(seed + 100)  # fresh pixels of the same distribution
    with torch.no_grad():
        predicted = _pointwise(head, x.T.contiguous()).argmax(dim=0)
    return float(2 * (predicted * y).sum() / (predicted.sum() + y.sum()))


def _naive_fit(head: nn.Module, x: torch.Tensor, y: torch.Tensor, config: FewShotConfig) -> None:
    """The probe as it was: full-batch Adam on the raw features."""
    optimiser = torch.optim.Adam(head.parameters(), lr=config.linear_lr)
    columns, loss_fn = x.T.contiguous(), MaskedDiceCELoss()
    with torch_threads(1):  # as the probe: tiny products are slower on two threads
        _naive_steps(head, columns, y, optimiser, loss_fn, config.linear_steps)


def _naive_steps(
    head: nn.Module,
    columns: torch.Tensor,
    y: torch.Tensor,
    optimiser: torch.optim.Optimizer,
    loss_fn: MaskedDiceCELoss,
    steps: int,
) -> None:
    for _ in range(steps):
        loss = loss_fn(_pointwise(head, columns)[None, :, :, None], y[None, :, None])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_standardised_probe_learns_a_small_shift_on_a_large_offset(
    kind: Literal["linear", "mlp"],
) -> None:
    config = FewShotConfig(linear_steps=STEPS)
    for seed in range(2):
        x, y = _offset_features(seed)
        naive = _head(kind, 8, seed)
        _naive_fit(naive, x, y, config)
        head = _head(kind, 8, seed)
        _train_head(head, x, y, config, torch.device("cpu"), None, "fit")
        # raw features: the offset dominates every pre-activation and the budget is spent
        # before the head separates the classes; standardised, it separates them
        assert _dice(naive, seed) < 0.5
        assert _dice(head, seed) > 0.75
        assert _dice(head, seed) > _dice(naive, seed) + 0.3


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_folded_head_reads_raw_features_exactly(kind: Literal["linear", "mlp"]) -> None:
    x = 2.0 + 3.0 * torch.randn(6, 500, dtype=torch.float64)
    x[5] = 1.5  # a constant channel keeps scale 1
    head = _head(kind, 6, 0).double()
    mean, std = x.mean(dim=1), x.std(dim=1)
    scale = torch.where(std > 1e-6, std, torch.ones_like(std))
    with torch.no_grad():
        expected = _pointwise(head, (x - mean[:, None]) / scale[:, None])
        _fold_standardisation(_first_conv(head), mean, scale)
        folded = _pointwise(head, x)
    torch.testing.assert_close(folded, expected)


def test_auto_head_picks_the_head_that_generalises() -> None:
    """Class 1 where channels 0 and 1 share their sign (XOR): no linear head separates it, a
    4-unit MLP does; the held-out tiles' Dice must say so."""
    encoder = Encoder.random(PretrainConfig(channels=(4, 8), num_clusters=2))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 4, generator=generator)
    y = ((x[:, 0] > 0) == (x[:, 1] > 0)).long()
    held = torch.rand(3000, generator=generator) < 0.2
    config = FewShotConfig(linear_steps=300, linear_lr=3e-2)
    choice = _select_head(encoder, x, y, held, 2, config)
    linear, mlp = choice.validation["linear"], choice.validation["mlp"]
    assert linear is not None and mlp is not None
    assert choice.head == "mlp"
    assert mlp > linear + 0.2


def test_auto_head_without_held_out_pixels_is_linear() -> None:
    encoder = Encoder.random(PretrainConfig(channels=(4, 8), num_clusters=2))
    x, y = torch.randn(10, 4), torch.tensor([0, 1] * 5)
    choice = _select_head(encoder, x, y, torch.zeros(10, dtype=torch.bool), 2, FewShotConfig())
    assert choice.head == "linear"
