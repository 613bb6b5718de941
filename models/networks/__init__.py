"""Networks: the dense U-Net backbone and the exported segmentation network."""

from __future__ import annotations

from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.networks.unet import DenseUNet

__all__ = ["DenseUNet", "SegmenterNet"]
