"""Networks: the dense U-Net backbone and the exported segmentation network."""

from __future__ import annotations

from models.networks.segmenter import SegmenterNet
from models.networks.unet import DenseUNet

__all__ = ["DenseUNet", "SegmenterNet"]
