"""Segmentation network: a dense backbone with a segmentation head and a cluster head."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Act, Conv
from torch import nn

from segassist.models.networks.unet import DenseUNet

__all__ = ["SegmenterNet"]


class SegmenterNet(nn.Module):
    r"""Dense backbone plus a segmentation head and a cluster head; the model exported to ONNX.

    The segmentation head reads the last decoder block of the encoder (``C`` channels) or, with
    ``multiscale=True``, the last block concatenated with every coarser decoder map upsampled
    (bilinear / trilinear) to input resolution, ``C_head = sum(encoder.channels[:-1])`` channels,
    fine map first. ``head="linear"`` is a 1×1 convolution ``C_head→L`` (the linear probe of
    Pix2Rep: Seince et al.); ``head="mlp"`` is a 1×1 convolution ``C_head→C_head``, ReLU, 1×1
    convolution ``C_head→L``. The cluster head is a 1×1 convolution ``C→K`` on the last decoder
    block whose argmax is the cluster map (IIC head of Peng et al., or the k-means head).

    Args:
        encoder: the dense backbone.
        num_classes: ``L``, label classes including background.
        num_clusters: ``K``, clusters of the cluster head.
        head: ``"linear"`` or ``"mlp"``.
        multiscale: whether the segmentation head also reads the coarser decoder maps.

    Shapes:
        ``forward``: ``B×1×H×W`` -> (logits ``B×L×H×W``, cluster scores ``B×K×H×W``).
    """

    def __init__(
        self,
        encoder: DenseUNet,
        num_classes: int,
        num_clusters: int,
        head: Literal["linear", "mlp"] = "linear",
        multiscale: bool = False,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(
                f"num_classes must count background and >= 1 class, got {num_classes}."
            )
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {num_clusters}.")
        if head not in ("linear", "mlp"):
            raise ValueError(f"head must be 'linear' or 'mlp', got {head!r}.")
        self.encoder = encoder
        self.num_classes = num_classes
        self.num_clusters = num_clusters
        self.head = head
        self.multiscale = multiscale
        dims = encoder.spatial_dims
        conv = Conv[Conv.CONV, dims]
        c_head = self.head_channels
        self.seg_head: nn.Module
        if head == "linear":
            self.seg_head = conv(c_head, num_classes, kernel_size=1)
        else:
            self.seg_head = nn.Sequential(
                conv(c_head, c_head, kernel_size=1),
                Act[Act.RELU](),
                conv(c_head, num_classes, kernel_size=1),
            )
        self.cluster_head: nn.Module = conv(encoder.feature_channels, num_clusters, kernel_size=1)

    @property
    def head_channels(self) -> int:
        """Channels ``C_head`` that the segmentation head reads."""
        if self.multiscale:
            return sum(self.encoder.channels[:-1])
        return self.encoder.feature_channels

    def _head_input(self, features: list[torch.Tensor]) -> torch.Tensor:
        if not self.multiscale:
            return features[0]
        mode = "bilinear" if self.encoder.spatial_dims == 2 else "trilinear"
        upsampled = [
            F.interpolate(f, scale_factor=float(2**i), mode=mode, align_corners=False)
            for i, f in enumerate(features[1:], start=1)
        ]
        return torch.cat([features[0], *upsampled], dim=1)

    def head_features(self, x: torch.Tensor) -> torch.Tensor:
        """What the segmentation head reads, ``B×C_head×H×W`` (cacheable for a linear probe)."""
        return self._head_input(self.encoder.forward_features(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segmentation logits ``B×L×H×W`` and cluster scores ``B×K×H×W`` for ``x`` ``B×1×H×W``."""
        features = self.encoder.forward_features(x)
        logits = self.seg_head(self._head_input(features))
        return logits, self.cluster_head(features[0])
