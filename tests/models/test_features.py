"""The decoder-map cache: what a head reads from it equals what the exported network computes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from segassist.models.export import export_feature_extractor
from segassist.models.features import (
    FeatureCache,
    apply_head,
    compute_feature_maps,
    onnx_runner,
)
from segassist.models.fewshot import FewShotConfig, fit_probe, fit_segmenter
from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.pretrain import Encoder, PretrainConfig
from segassist.models.runtime.preprocess import crop_to, pad_to_multiple

SHAPE = (24, 20, 6)  # slices along axis 2 are 24×20: padded to the size divisor


def _encoder() -> Encoder:
    return Encoder.random(PretrainConfig(channels=(4, 8, 16), num_clusters=3, seed=1))


def _volume(seed: int = 0) -> np.ndarray:
    volume = np.random.default_rng(seed).random(SHAPE, dtype=np.float32) * 0.2
    volume[6:16, 5:14] += 0.6
    return volume


def _network_logits(segmenter: SegmenterNet, volume: np.ndarray, axis: int) -> np.ndarray:
    slices = np.ascontiguousarray(np.moveaxis(volume, axis, 0)[:, None])
    padded, size = pad_to_multiple(slices, segmenter.encoder.size_divisor)
    with torch.no_grad():
        return crop_to(segmenter(torch.from_numpy(padded))[0].numpy(), size)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_head_on_cached_maps_equals_the_whole_network(tmp_path: Path, head: str) -> None:
    encoder = _encoder()
    volume = _volume()
    features = compute_feature_maps(encoder, volume, 2, tmp_path / "entry")
    assert features.maps[0].dtype == np.float16
    assert [m.shape[2] for m in features.maps] == [24, 12]  # coarse maps at their own size
    segmenter = SegmenterNet(encoder.network, 2, 3, head=head, multiscale=True).eval()
    cached = apply_head(segmenter, features, 0, SHAPE[2])
    np.testing.assert_allclose(cached, _network_logits(segmenter, volume, 2), atol=2e-3)


def test_onnx_extractor_gives_the_torch_maps(tmp_path: Path) -> None:
    encoder = _encoder()
    volume = _volume()
    path = tmp_path / "extractor.onnx"
    names = export_feature_extractor(
        encoder.network, encoder.cluster_head, path, size_divisor=encoder.size_divisor
    )
    assert names == ("map0", "map1", "cluster_scores")
    by_torch = compute_feature_maps(encoder, volume, 1, tmp_path / "torch")
    by_onnx = compute_feature_maps(encoder, volume, 1, tmp_path / "onnx", runner=onnx_runner(path))
    for a, b in zip(by_torch.maps, by_onnx.maps, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=2e-3)
    assert (np.asarray(by_torch.clusters) == np.asarray(by_onnx.clusters)).mean() > 0.99


def test_probe_on_cached_maps_equals_the_linear_probe(tmp_path: Path) -> None:
    encoder = _encoder()
    volume = _volume()
    labels = np.full(SHAPE, 255, dtype=np.uint8)
    for z in (1, 4):
        labels[..., z] = 0
        labels[6:16, 5:14, z] = 1
    config = FewShotConfig(axis=2, linear_steps=20)
    features = compute_feature_maps(encoder, volume, 2, tmp_path / "entry")
    probe = fit_probe(encoder, [features], [labels], 2, config)
    linear = fit_segmenter(encoder, [volume], [labels], 2, "linear", config)
    np.testing.assert_allclose(
        apply_head(probe, features, 0, SHAPE[2]), _network_logits(linear, volume, 2), atol=2e-3
    )
    with pytest.raises(ValueError, match="255"):
        fit_probe(encoder, [features], [np.full(SHAPE, 255, np.uint8)], 2, config)


def test_cache_reuses_entries_and_evicts_the_least_recently_used(tmp_path: Path) -> None:
    encoder = _encoder()
    calls: list[int] = []

    def volume() -> np.ndarray:
        calls.append(1)
        return _volume()

    probe = FeatureCache(tmp_path, max_bytes=1 << 40)
    first = probe.get_or_compute("e", "a", encoder, volume, 2)
    size = sum(f.stat().st_size for f in first.folder.iterdir())
    assert probe.get_or_compute("e", "a", encoder, volume, 2).folder == first.folder
    assert len(calls) == 1  # the second call read the cache
    probe.get_or_compute("e", "a", encoder, volume, 0)  # another axis: recomputed
    assert len(calls) == 2

    cache = FeatureCache(tmp_path / "bounded", max_bytes=int(2.5 * size))
    cache.get_or_compute("e", "a", encoder, volume, 2)
    cache.get_or_compute("e", "b", encoder, volume, 2)
    old = time.time() - 100
    os.utime(cache.folder("e", "a") / "meta.json", (old, old))  # "a" used longest ago
    cache.get_or_compute("e", "c", encoder, volume, 2)
    assert cache.get("e", "a") is None
    assert cache.get("e", "b") is not None and cache.get("e", "c") is not None
