"""Networks: the dense U-Net backbone, the exported segmentation network and a pool of them."""

from __future__ import annotations

from segassist.models.networks.pooled import PooledSegmenter
from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.networks.unet import DenseUNet

__all__ = ["DenseUNet", "PooledSegmenter", "SegmenterNet"]
