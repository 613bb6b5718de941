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
        pool: in-plane factor ``p`` (2D only): ``forward`` averages the input over ``p×p``
            blocks, runs the network at that resolution and brings logits and cluster scores
            back to the input's (bilinear, as the multiscale head upsamples), so the network's
            cost falls about ``p²``-fold and an exported model still takes native slices
            (:func:`segassist.models.fewshot.network_pool` says when).

    Shapes:
        ``forward``: ``B×1×H×W`` -> (logits ``B×L×H×W``, cluster scores ``B×K×H×W``), ``H`` and
        ``W`` multiples of :attr:`size_divisor`.
    """

    def __init__(
        self,
        encoder: DenseUNet,
        num_classes: int,
        num_clusters: int,
        head: Literal["linear", "mlp"] = "linear",
        multiscale: bool = False,
        pool: int = 1,
    ) -> None:
        super().__init__()
        if pool < 1 or (pool > 1 and encoder.spatial_dims != 2):
            raise ValueError(f"pool must be >= 1, and above 1 only for a 2D encoder; got {pool}.")
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
        self.pool = pool
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
    def size_divisor(self) -> int:
        """Input sizes must be multiples of this: the encoder's, times :attr:`pool`."""
        return self.encoder.size_divisor * self.pool

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

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.pool == 1 else F.avg_pool2d(x, self.pool)

    def _unpooled(self, scores: torch.Tensor) -> torch.Tensor:
        if self.pool == 1:
            return scores
        return F.interpolate(
            scores, scale_factor=float(self.pool), mode="bilinear", align_corners=False
        )

    def head_features(self, x: torch.Tensor) -> torch.Tensor:
        """What the segmentation head reads, ``B×C_head×(H/p)×(W/p)`` (cacheable for a linear
        probe; probes are never pooled, ``p = 1``)."""
        return self._head_input(self.encoder.forward_features(self._pooled(x)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Segmentation logits ``B×L×H×W`` and cluster scores ``B×K×H×W`` for ``x`` ``B×1×H×W``."""
        features = self.encoder.forward_features(self._pooled(x))
        logits = self.seg_head(self._head_input(features))
        return self._unpooled(logits), self._unpooled(self.cluster_head(features[0]))
