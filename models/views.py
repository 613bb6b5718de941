"""Two augmented views of a batch of slices with a known pixel correspondence."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandBiasField,
    RandGaussianNoise,
    RandGaussianSmooth,
    Randomizable,
)
from monai.utils import convert_to_tensor

__all__ = ["TwoViewSampler", "TwoViews", "ViewConfig", "valid_mask", "warp"]


@dataclass(frozen=True)
class ViewConfig:
    """Parameters of the geometric and intensity draws (defaults: Pix2Rep, Seince et al.).

    Attributes:
        rotation_degrees: rotation angle drawn from U(-r, r) degrees.
        scale_range: zoom-crop scale ``s`` drawn from U(lo, hi); the view shows a fraction ``s``
            of the image side, shifted by U(-(1-s), 1-s) per axis (normalised coordinates).
        flip_prob: probability of a flip, drawn independently for x and y.
        noise_std: Gaussian noise standard deviation (drawn from U(0, noise_std) by MONAI).
        noise_prob: probability of Gaussian noise.
        blur_sigma: Gaussian blur sigma range, drawn per axis.
        blur_prob: probability of blurring.
        log_gamma: gamma drawn from U(exp(-g), exp(g)) — within 0.1% of log-uniform at g = 0.05.
        gamma_prob: probability of the gamma change.
        bias_coeff: bias-field polynomial coefficients drawn from U(-c, c) (degree 3).
        bias_prob: probability of a bias field.
        invert_prob: probability of inverting the intensities (``1 - x``, inputs in [0, 1]).
    """

    rotation_degrees: float = 90.0
    scale_range: tuple[float, float] = (0.33, 0.95)
    flip_prob: float = 0.5
    noise_std: float = 0.5
    noise_prob: float = 0.3
    blur_sigma: tuple[float, float] = (0.1, 1.3)
    blur_prob: float = 0.5
    log_gamma: float = 0.05
    gamma_prob: float = 0.9
    bias_coeff: float = 0.9
    bias_prob: float = 0.75
    invert_prob: float = 0.35

    def __post_init__(self) -> None:
        lo, hi = self.scale_range
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi <= 1, got {self.scale_range}.")
        for name in (
            "flip_prob",
            "noise_prob",
            "blur_prob",
            "gamma_prob",
            "bias_prob",
            "invert_prob",
        ):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}.")
        if self.blur_sigma[0] <= 0 or self.blur_sigma[1] < self.blur_sigma[0]:
            raise ValueError(
                f"blur_sigma must be a positive (lo, hi) range, got {self.blur_sigma}."
            )


@dataclass
class TwoViews:
    """Two views of a batch ``x`` (``B×1×H×W``) and their correspondence.

    Attributes:
        view1: ``a1(x)``, ``B×1×H×W``.
        view2: ``W_A(a2(x))``, ``B×1×H×W``.
        image_warped: ``W_A(x)``, ``B×1×H×W`` (the un-augmented image aligned with view 2).
        valid: ``B×1×H×W`` bool, pixels that ``W_A`` maps from inside the image
            (see :func:`valid_mask`).
        theta: ``B×2×3`` affine of ``W_A`` in ``affine_grid`` convention (output → input,
            normalised coordinates).
    """

    view1: torch.Tensor
    view2: torch.Tensor
    image_warped: torch.Tensor
    valid: torch.Tensor
    theta: torch.Tensor


def _sampling_grid(theta: torch.Tensor, size: tuple[int, int, int, int]) -> torch.Tensor:
    return F.affine_grid(theta, list(size), align_corners=False)


def warp(features: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Apply ``W_A``: ``grid_sample(features, affine_grid(theta))``, bilinear, zeros outside.

    Args:
        features: ``B×C×H×W``.
        theta: ``B×2×3``.

    Returns:
        ``B×C×H×W``; pixel ``i`` holds ``features`` at the point ``theta`` maps ``i`` to.
    """
    if features.ndim != 4:
        raise ValueError(f"features must be B×C×H×W, got shape {tuple(features.shape)}.")
    if tuple(theta.shape) != (features.shape[0], 2, 3):
        raise ValueError(f"theta must be {features.shape[0]}×2×3, got {tuple(theta.shape)}.")
    grid = _sampling_grid(theta.to(features.dtype), tuple(features.shape))  # type: ignore[arg-type]
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def valid_mask(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``B×1×H×W`` bool: pixels whose ``W_A`` source point lies inside the image.

    "Inside" means within the outermost pixel centres (``|u| <= 1 - 1/W`` for x, ``1 - 1/H`` for
    y, ``align_corners=False``), so bilinear sampling at a valid pixel reads image pixels only,
    never the zero padding; in particular every pixel whose grid leaves [-1, 1] is invalid.
    """
    grid = _sampling_grid(theta, (theta.shape[0], 1, height, width))
    limit = torch.tensor([1.0 - 1.0 / width, 1.0 - 1.0 / height], dtype=grid.dtype)
    return (grid.abs() <= limit.to(grid.device) + 1e-6).all(dim=-1).unsqueeze(1)


class TwoViewSampler:
    r"""Draws the two views of Pix2Rep (Seince et al.) and Peng et al.

    For each image, an affine ``A`` (rotation, zoom-crop, translation, flips) and two independent
    intensity augmentations ``a1``, ``a2`` are drawn; the sampler returns ``a1(x)``,
    ``W_A(a2(x))`` and ``W_A(x)``. The objectives then compare ``W_A(f(a1(x)))`` with
    ``f(W_A(a2(x)))``, pixel by pixel.

    ``A`` maps output normalised coordinates ``u`` to input ones:
    :math:`A u = s\, D^{-1} R(\phi) D\, F u + t` with :math:`D = \mathrm{diag}(W, H)` (so rotations
    are rigid on non-square slices), :math:`F` the flips, :math:`s` the zoom-crop scale and
    :math:`t` the translation.

    Intensity augmentations are MONAI transforms applied per image in this order (our choice):
    inversion ``1 - x`` (on [0, 1] inputs), bias field (``RandBiasField``), gamma
    (``RandAdjustContrast``), blur (``RandGaussianSmooth``), noise (``RandGaussianNoise``).

    Every draw comes from the ``generator`` passed to :meth:`sample`: the same seed gives the same
    views.

    Args:
        config: draw parameters; defaults to :class:`ViewConfig`.
    """

    def __init__(self, config: ViewConfig | None = None) -> None:
        self.config = config or ViewConfig()
        c = self.config
        self._intensity = Compose(
            [
                RandBiasField(
                    degree=3, coeff_range=(-c.bias_coeff, c.bias_coeff), prob=c.bias_prob
                ),
                RandAdjustContrast(
                    prob=c.gamma_prob, gamma=(math.exp(-c.log_gamma), math.exp(c.log_gamma))
                ),
                RandGaussianSmooth(sigma_x=c.blur_sigma, sigma_y=c.blur_sigma, prob=c.blur_prob),
                RandGaussianNoise(prob=c.noise_prob, std=c.noise_std),
            ]
        )

    @staticmethod
    def warp(features: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Apply ``W_A`` to a ``B×C×H×W`` map; see :func:`warp`."""
        return warp(features, theta)

    def draw_affine(
        self, batch: int, height: int, width: int, generator: torch.Generator
    ) -> torch.Tensor:
        """Draw ``B×2×3`` affines (float32, CPU) as described in the class docstring."""
        c = self.config
        angle = (torch.rand(batch, generator=generator) * 2 - 1) * math.radians(c.rotation_degrees)
        lo, hi = c.scale_range
        scale = lo + (hi - lo) * torch.rand(batch, generator=generator)
        shift = (torch.rand(batch, 2, generator=generator) * 2 - 1) * (1 - scale)[:, None]
        flips = torch.where(torch.rand(batch, 2, generator=generator) < c.flip_prob, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # D^{-1} R D with D = diag(W, H): the x-row is scaled by 1/W, the y-row by 1/H.
        linear = torch.stack(
            [
                torch.stack([cos, -sin * height / width], dim=-1),
                torch.stack([sin * width / height, cos], dim=-1),
            ],
            dim=1,
        )
        linear = scale[:, None, None] * linear * flips[:, None, :]
        return torch.cat([linear, shift[:, :, None]], dim=2)

    def _augment(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        invert = bool(torch.rand(1, generator=generator) < self.config.invert_prob)
        state = np.random.RandomState(seed)
        for transform in self._intensity.transforms:
            if isinstance(transform, Randomizable):
                transform.set_random_state(state=state)
        out = 1.0 - image if invert else image
        return convert_to_tensor(self._intensity(out), track_meta=False, dtype=torch.float32)

    def sample(self, x: torch.Tensor, generator: torch.Generator | None = None) -> TwoViews:
        """Draw two views of ``x`` (``B×1×H×W``, intensities in [0, 1]).

        Args:
            x: batch of slices.
            generator: CPU random generator; a fresh unseeded one when ``None``.

        Returns:
            :class:`TwoViews` on the device of ``x``.
        """
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"expected a B×1×H×W batch, got shape {tuple(x.shape)}.")
        if generator is None:
            generator = torch.Generator()
            generator.seed()
        batch, _, height, width = x.shape
        with torch.no_grad():
            theta = self.draw_affine(batch, height, width, generator)
            cpu = x.detach().to("cpu", torch.float32)
            view1 = torch.stack([self._augment(img, generator) for img in cpu])
            view2 = torch.stack([self._augment(img, generator) for img in cpu])
            image_warped = warp(cpu, theta)
            view2 = warp(view2, theta)
            valid = valid_mask(theta, height, width)
        device = x.device
        return TwoViews(
            view1=view1.to(device),
            view2=view2.to(device),
            image_warped=image_warped.to(device),
            valid=valid.to(device),
            theta=theta.to(device),
        )
