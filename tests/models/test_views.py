"""TwoViewSampler: determinism, geometry of W_A, the valid mask, and the intensity draws."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from segassist.models.views import TwoViewSampler, ViewConfig, valid_mask, warp

NO_INTENSITY = ViewConfig(
    noise_prob=0.0, blur_prob=0.0, gamma_prob=0.0, bias_prob=0.0, invert_prob=0.0
)


def _image(batch: int = 3, height: int = 32, width: int = 48) -> torch.Tensor:
    x = torch.zeros(batch, 1, height, width)
    x[:, :, height // 4 : height // 2, width // 3 : width - 4] = 0.8
    return x + 0.1 * torch.rand_like(x)


def _pixel_linear_part(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    d = torch.diag(torch.tensor([float(width), float(height)]))
    return d @ theta[:, :, :2] @ torch.linalg.inv(d)


def test_same_seed_gives_identical_views_and_another_seed_does_not() -> None:
    sampler = TwoViewSampler()
    x = _image()
    a = sampler.sample(x, torch.Generator().manual_seed(3))
    b = sampler.sample(x, torch.Generator().manual_seed(3))
    c = sampler.sample(x, torch.Generator().manual_seed(4))
    for name in ("view1", "view2", "image_warped", "valid", "theta"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.theta, c.theta)
    assert not torch.equal(a.view1, c.view1)


def test_views_have_the_input_shape() -> None:
    views = TwoViewSampler().sample(_image(2, 16, 64), torch.Generator().manual_seed(0))
    for t in (views.view1, views.view2, views.image_warped, views.valid):
        assert t.shape == (2, 1, 16, 64)
    assert views.valid.dtype == torch.bool
    assert views.theta.shape == (2, 2, 3)


def test_without_intensity_draws_views_are_the_image_and_its_warp() -> None:
    sampler = TwoViewSampler(NO_INTENSITY)
    x = _image()
    views = sampler.sample(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(views.view1, x)
    torch.testing.assert_close(views.view2, views.image_warped)
    torch.testing.assert_close(warp(x, views.theta), views.image_warped)


def test_inversion_flips_intensities() -> None:
    sampler = TwoViewSampler(replace(NO_INTENSITY, invert_prob=1.0))
    x = _image()
    torch.testing.assert_close(sampler.sample(x, torch.Generator()).view1, 1.0 - x)


def test_default_intensity_draws_change_the_image() -> None:
    x = _image(8)
    views = TwoViewSampler().sample(x, torch.Generator().manual_seed(0))
    changed = (views.view1 - x).abs().flatten(1).amax(dim=1) > 1e-3
    assert changed.float().mean() >= 0.5


def test_warp_commutes_with_a_pixelwise_network_on_valid_pixels() -> None:
    # W_A(f(a(x))) and f(W_A(a(x))) agree pixel by pixel: the correspondence the objectives use.
    sampler = TwoViewSampler(NO_INTENSITY)
    x = _image(4)
    views = sampler.sample(x, torch.Generator().manual_seed(2))
    weight = torch.tensor([[[[2.0]]], [[[-1.0]]], [[[0.5]]]])
    bias = torch.tensor([1.0, 0.3, -2.0])

    def f(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, weight, bias)

    z1 = sampler.warp(f(views.view1), views.theta)
    z2 = f(views.view2)
    mask = views.valid.expand_as(z1)
    torch.testing.assert_close(z1[mask], z2[mask], rtol=1e-5, atol=1e-5)
    assert mask.float().mean() > 0.5


def test_valid_mask_is_false_where_the_grid_leaves_the_image() -> None:
    sampler = TwoViewSampler()
    theta = sampler.draw_affine(16, 24, 40, torch.Generator().manual_seed(5))
    valid = valid_mask(theta, 24, 40)
    grid = F.affine_grid(theta, [16, 1, 24, 40], align_corners=False)
    outside = (grid.abs() > 1).any(dim=-1).unsqueeze(1)
    assert outside.any(), "rotations up to 90° must leave the image somewhere"
    assert not (valid & outside).any()
    # The centre always maps inside the image (scale <= 0.95, |shift| <= 1 - scale).
    assert valid[:, 0, 12, 20].all()


def test_affines_are_rigid_zoom_crops_on_non_square_slices() -> None:
    height, width = 24, 40
    cfg = ViewConfig()
    theta = TwoViewSampler(cfg).draw_affine(64, height, width, torch.Generator().manual_seed(7))
    linear = _pixel_linear_part(theta, height, width)
    scale = torch.linalg.det(linear).abs().sqrt()
    # In pixel units the linear part is s·R·F: orthogonal up to the zoom factor.
    gram = linear @ linear.transpose(1, 2)
    torch.testing.assert_close(gram, scale[:, None, None] ** 2 * torch.eye(2).expand(64, 2, 2))
    assert ((scale >= cfg.scale_range[0] - 1e-5) & (scale <= cfg.scale_range[1] + 1e-5)).all()
    assert (theta[:, :, 2].abs() <= (1 - scale)[:, None] + 1e-5).all()
    flipped = torch.linalg.det(linear) < 0
    assert 0 < flipped.sum() < 64  # x or y flip (not both) changes orientation about half the time


def test_warp_by_a_quarter_turn_is_rot90() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    angle = math.pi / 2
    theta = torch.tensor(
        [[[math.cos(angle), -math.sin(angle), 0.0], [math.sin(angle), math.cos(angle), 0.0]]]
    )
    torch.testing.assert_close(warp(x, theta), torch.rot90(x, k=1, dims=(2, 3)), atol=1e-5, rtol=0)
    assert valid_mask(theta, 4, 4).all()


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="B×1×H×W"):
        TwoViewSampler().sample(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="theta"):
        warp(torch.rand(2, 1, 8, 8), torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="scale_range"):
        ViewConfig(scale_range=(0.9, 0.3))
    with pytest.raises(ValueError, match="invert_prob"):
        ViewConfig(invert_prob=1.5)
