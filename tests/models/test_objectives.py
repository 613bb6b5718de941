"""Objectives: a few optimisation steps on real views decrease each loss; the factory's contract."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from segassist.models.networks import DenseUNet
from segassist.models.objectives import OBJECTIVES, IICBoundaryObjective, build_objective
from segassist.models.views import TwoViews, TwoViewSampler

SMALL: dict[str, dict[str, Any]] = {
    "pix2rep": {"num_samples": 256, "projection_dim": 32},
    "pix2rep_barlow": {"num_samples": 512, "projection_dim": 16},
    "iic_boundary": {"num_clusters": 4},
}


def _views() -> TwoViews:
    x = torch.zeros(4, 1, 32, 32)
    x[:, :, 8:24, 10:22] = 0.8
    x[:, :, 12:18, 4:12] = 0.4
    x = x + 0.05 * torch.rand_like(x)
    return TwoViewSampler().sample(x, torch.Generator().manual_seed(0))


def _evaluate(
    net: nn.Module, objective: nn.Module, views: TwoViews
) -> tuple[torch.Tensor, dict[str, float]]:
    torch.manual_seed(123)  # the same pixel draw before and after training
    z1 = TwoViewSampler.warp(net(views.view1), views.theta)
    z2 = net(views.view2)
    return objective(z1, z2, views.valid, views.image_warped)


@pytest.mark.parametrize("name", OBJECTIVES)
def test_a_few_steps_decrease_the_loss_with_finite_gradients(name: str) -> None:
    net = DenseUNet(channels=(8, 16, 32))
    objective = build_objective(name, net.feature_channels, **SMALL[name])
    optimiser = torch.optim.Adam([*net.parameters(), *objective.parameters()], lr=3e-3)
    views = _views()
    before, logs = _evaluate(net, objective, views)
    assert set(logs) >= {"loss", "valid_fraction"}
    assert all(isinstance(v, float) for v in logs.values())
    for _ in range(8):
        loss, _ = _evaluate(net, objective, views)
        optimiser.zero_grad()
        loss.backward()
        grads = [p.grad for p in [*net.parameters(), *objective.parameters()] if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
        optimiser.step()
    after, _ = _evaluate(net, objective, views)
    assert after.item() < before.item()


def test_cluster_head_only_for_iic() -> None:
    iic = build_objective("iic_boundary", 8)
    assert isinstance(iic.cluster_head, nn.Conv2d)
    assert (iic.cluster_head.in_channels, iic.cluster_head.out_channels) == (8, 20)
    assert build_objective("pix2rep", 8).cluster_head is None
    assert build_objective("pix2rep_barlow", 8).cluster_head is None


def _iic(**kwargs: Any) -> IICBoundaryObjective:
    objective = build_objective("iic_boundary", 8, **kwargs)
    assert isinstance(objective, IICBoundaryObjective)
    return objective


def test_edge_exponent_follows_the_modality_unless_overridden() -> None:
    assert _iic(modality="CT").loss.cc.gamma == 0.5
    assert _iic(modality="MR").loss.cc.gamma == 0.75
    assert _iic(modality="CT", gamma=0.9).loss.cc.gamma == 0.9


def test_unknown_names_and_options_are_rejected_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="pix2rep, pix2rep_barlow, iic_boundary"):
        build_objective("simclr", 8)
    with pytest.raises(ValueError, match="num_clusters"):
        build_objective("pix2rep", 8, num_clusters=3)


def test_sub_head_losses_are_averaged() -> None:
    z1, z2 = torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16)
    valid = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    image = torch.rand(2, 1, 16, 16)
    one = _iic(num_clusters=5)
    two = _iic(num_clusters=5, num_heads=2)
    for head in two.heads:
        head.load_state_dict(one.cluster_head.state_dict())
    torch.testing.assert_close(one(z1, z2, valid, image)[0], two(z1, z2, valid, image)[0])


def test_projection_depth_zero_reads_the_backbone_features() -> None:
    objective = build_objective("pix2rep", 8, projection_depth=0, num_samples=64)
    assert not list(objective.parameters())
    z = torch.randn(2, 8, 16, 16)
    loss, _ = objective(z, z, torch.ones(2, 1, 16, 16, dtype=torch.bool), torch.rand(2, 1, 16, 16))
    assert torch.isfinite(loss)


def test_invalid_pixels_do_not_reach_the_projection_statistics() -> None:
    # BatchNorm in the head must see valid pixels only: garbage elsewhere changes nothing.
    objective = build_objective("pix2rep_barlow", 8, projection_dim=16, num_samples=None)
    z1, z2 = torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16)
    valid = torch.rand(2, 1, 16, 16) > 0.3
    image = torch.rand(2, 1, 16, 16)
    clean, _ = objective(z1, z2, valid, image)
    noisy, _ = objective(z1.masked_fill(~valid, 1e3), z2, valid, image)
    torch.testing.assert_close(clean, noisy)
