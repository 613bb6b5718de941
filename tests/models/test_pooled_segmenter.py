"""Networks pooled into one (:class:`segassist.models.networks.pooled.PooledSegmenter`) and the
refinement's networks (:func:`segassist.models.refinement.fit_networks`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segassist.models.export import export_segmenter
from segassist.models.fewshot import FewShotConfig
from segassist.models.networks.pooled import PooledSegmenter
from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.networks.unet import DenseUNet
from segassist.models.pretrain import Encoder, PretrainConfig
from segassist.models.refinement import fit_networks, network_probabilities
from segassist.models.runtime import OnnxPredictor
from segassist.models.runtime.configs import IGNORE_INDEX
from segassist.models.runtime.preprocess import Normalisation, normalise

LABELS = {0: "background", 1: "liver", 2: "spleen"}
NORM = Normalisation(kind="ct_window", low=-1000.0, high=1000.0)


def _member(seed: int, num_classes: int = 3) -> SegmenterNet:
    torch.manual_seed(seed)
    return SegmenterNet(DenseUNet(channels=(4, 8, 16)), num_classes, num_clusters=4).eval()


def test_pooled_logits_are_the_log_of_the_members_mean_probability() -> None:
    members = [_member(0), _member(1), _member(2)]
    pooled = PooledSegmenter(members).eval()
    x = torch.randn(2, 1, 16, 12)
    with torch.inference_mode():
        logits, clusters = pooled(x)
        mean = torch.stack([torch.softmax(m(x)[0], dim=1) for m in members]).mean(dim=0)
        first_clusters = members[0](x)[1]
    torch.testing.assert_close(torch.softmax(logits, dim=1), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.exp(), mean, rtol=1e-5, atol=1e-6)  # log of the mean
    torch.testing.assert_close(clusters, first_clusters)
    assert pooled.num_classes == 3 and pooled.size_divisor == members[0].encoder.size_divisor
    # one member: its own probabilities
    with torch.inference_mode():
        alone, _ = PooledSegmenter([members[1]])(x)
        torch.testing.assert_close(alone.softmax(dim=1), members[1](x)[0].softmax(dim=1))


def test_members_must_agree() -> None:
    with pytest.raises(ValueError, match="at least one member"):
        PooledSegmenter([])
    with pytest.raises(ValueError, match="members differ"):
        PooledSegmenter([_member(0), _member(1, num_classes=4)])


def test_the_exported_pool_predicts_the_mean_probability_through_onnx_runtime(
    tmp_path: Path,
) -> None:
    """Exported as one graph, ONNX Runtime's probabilities are the members' mean."""
    members = [_member(3), _member(4)]
    pooled = PooledSegmenter(members).eval()
    manifest = export_segmenter(pooled, tmp_path, labels=LABELS, axis=2, normalisation=NORM)
    assert manifest.parity_max_abs_diff is not None and manifest.parity_max_abs_diff <= 1e-4
    volume = np.random.default_rng(0).normal(0.0, 400.0, size=(16, 12, 5)).astype(np.float32)
    predicted = OnnxPredictor.from_folder(tmp_path, device="cpu").predict(
        volume, with_probabilities=True
    )
    assert predicted.probabilities is not None
    normalised = normalise(volume, NORM)
    expected = np.mean([network_probabilities(m, normalised, 2) for m in members], axis=0)
    np.testing.assert_allclose(predicted.probabilities, expected, atol=1e-4)
    np.testing.assert_allclose(network_probabilities(pooled, normalised, 2), expected, atol=1e-5)


def _moving_disc() -> tuple[np.ndarray, np.ndarray]:
    """A bright disc drifting across 8 slices; labels on slices 1, 4 and 6."""
    shape = (16, 16, 8)
    grid = np.mgrid[: shape[0], : shape[1]]
    image = np.zeros(shape, dtype=np.float32)
    sparse = np.full(shape, IGNORE_INDEX, dtype=np.uint8)
    for z in range(shape[2]):
        disc = (grid[0] - 5 - z) ** 2 + (grid[1] - 8) ** 2 < 12
        image[..., z] = np.where(disc, 0.8, 0.2)
        if z in (1, 4, 6):
            sparse[..., z] = disc
    return image, sparse


def test_fit_networks_pools_members_of_their_own_seeds() -> None:
    """Member m of a run seeded s is seeded 2s + m: a rerun gives the same networks, runs of
    other seeds share none."""
    scratch = Encoder.random(PretrainConfig(channels=(4, 8), num_clusters=3, seed=0))
    image, sparse = _moving_disc()
    settings = FewShotConfig.for_scratch(axis=2, steps=3, eval_every=1, batch_size=2)

    def weights(seed: int) -> list[torch.Tensor]:
        pooled = fit_networks(
            scratch, [image], [sparse], 2, settings.model_copy(update={"seed": seed})
        )
        assert len(pooled.members) == 2
        return [next(m.parameters()).detach().clone() for m in pooled.members]

    first, again, other = weights(0), weights(0), weights(1)
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b)
    assert not torch.equal(first[0], first[1])  # two seeds, two networks
    for a in first:
        assert all(not torch.equal(a, b) for b in other)
    # each member is what the scratch recipe fits from that seed alone
    one = fit_networks(
        scratch, [image], [sparse], 2, settings.model_copy(update={"seed": 1}), networks=1
    )
    torch.testing.assert_close(next(one.members[0].parameters()), first[1])
