"""Cluster maps for encoders without a cluster head: k-means on dense features as a 1×1 conv."""

from __future__ import annotations

import logging

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import nn

__all__ = ["fit_kmeans_head"]

logger = logging.getLogger(__name__)


def fit_kmeans_head(
    features: np.ndarray | torch.Tensor,
    num_clusters: int,
    seed: int = 0,
    max_samples: int = 20_000,
) -> nn.Conv2d:
    r"""Fit k-means on pixel features and return it as a 1×1 convolution.

    The conv computes :math:`s_k(x) = 2 c_k \cdot x - \lVert c_k \rVert^2`, and since
    :math:`\lVert x - c_k \rVert^2 = \lVert x \rVert^2 - s_k(x)`, ``argmax_k s_k(x)`` is the
    nearest centroid: the conv is a drop-in cluster head (``B×C×H×W → B×K×H×W``) that exports to
    ONNX with the segmenter.

    Args:
        features: ``N×C`` pixel features (one row per pixel).
        num_clusters: K.
        seed: seed of the subsampling and of k-means' initialisation.
        max_samples: at most this many rows (drawn uniformly without replacement) are clustered.

    Returns:
        ``nn.Conv2d(C, K, 1)`` in eval mode, float32, parameters not requiring gradients.

    Raises:
        ValueError: if ``features`` is not 2D, holds non-finite values, or has fewer rows than
            ``num_clusters``.
    """
    data = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features
    if data.ndim != 2:
        raise ValueError(f"features must be N×C, got shape {data.shape}")
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be ≥ 1, got {num_clusters}")
    if data.shape[0] < num_clusters:
        raise ValueError(f"{data.shape[0]} feature rows are too few for {num_clusters} clusters")
    if not np.isfinite(data).all():
        raise ValueError("features contain NaN or infinite values")
    rng = np.random.default_rng(seed)
    if data.shape[0] > max_samples:
        data = data[rng.choice(data.shape[0], size=max_samples, replace=False)]
    data = data.astype(np.float64, copy=False)  # after the draw: 8.4 M rows of 512² slices
    kmeans = KMeans(n_clusters=num_clusters, n_init=3, random_state=seed).fit(data)
    centroids = kmeans.cluster_centers_
    logger.debug("k-means on %d×%d features: inertia %.4g", *data.shape, kmeans.inertia_)
    head = nn.Conv2d(data.shape[1], num_clusters, kernel_size=1)
    weight = torch.from_numpy(2.0 * centroids).float()[:, :, None, None]
    bias = torch.from_numpy(-(centroids**2).sum(axis=1)).float()
    head.weight = nn.Parameter(weight, requires_grad=False)
    head.bias = nn.Parameter(bias, requires_grad=False)
    return head.eval()
