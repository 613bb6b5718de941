from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans

from segassist.models.clusters import fit_kmeans_head


def _blobs(n_per: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=5.0, size=(4, 6))
    return np.concatenate([c + rng.normal(size=(n_per, 6)) for c in centres]).astype(np.float32)


def test_head_argmax_is_the_nearest_centroid() -> None:
    features = _blobs()
    head = fit_kmeans_head(features, num_clusters=4, seed=3)

    centroids = head.weight.detach().numpy()[:, :, 0, 0] / 2.0
    reference = KMeans(n_clusters=4, init=centroids, n_init=1, max_iter=1).fit(features)
    reference.cluster_centers_ = centroids.astype(np.float64)
    expected = reference.predict(features.astype(np.float64))

    # Lay the N×C features out as a 1×C×N×1 map, as the segmenter sees them.
    fmap = torch.from_numpy(features).T[None, :, :, None]
    got = head(fmap)[0, :, :, 0].argmax(dim=0).numpy()
    np.testing.assert_array_equal(got, expected)
    # Four well separated blobs: each is one cluster.
    assert len(set(got.tolist())) == 4
    assert all(len(set(got[i * 200 : (i + 1) * 200].tolist())) == 1 for i in range(4))


def test_head_accepts_tensors_and_is_deterministic() -> None:
    features = torch.from_numpy(_blobs(seed=1))
    a = fit_kmeans_head(features, num_clusters=3, seed=7, max_samples=300)
    b = fit_kmeans_head(features, num_clusters=3, seed=7, max_samples=300)
    assert torch.equal(a.weight, b.weight)
    assert not a.weight.requires_grad


def test_head_rejects_bad_features() -> None:
    with pytest.raises(ValueError, match="N×C"):
        fit_kmeans_head(np.zeros((2, 3, 4)), num_clusters=2)
    with pytest.raises(ValueError, match="too few"):
        fit_kmeans_head(np.zeros((2, 3)), num_clusters=5)
    bad = _blobs()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_kmeans_head(bad, num_clusters=2)
