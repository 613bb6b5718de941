"""The memory benchmark's two ways of making the refinement's candidates
(:mod:`segassist.bench.refine_memory`) give the same scores and labels, on a synthetic volume
whose labelled slices show a disc moving through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segassist.bench.fewshot import _Volume
from segassist.bench.refine_memory import _phases
from segassist.models.datasets import Case
from segassist.models.features import compute_feature_maps
from segassist.models.fewshot import fit_segmenter
from segassist.models.pretrain import Encoder
from segassist.models.runtime.configs import FewShotConfig, PretrainConfig
from segassist.models.volumes import IGNORE_INDEX


def test_at_once_and_one_at_a_time_agree(tmp_path: Path) -> None:
    x, y = np.mgrid[:24, :24]
    label = np.stack(
        [((x - 8 - z) ** 2 + (y - 12) ** 2 <= 25).astype(np.uint8) for z in range(9)], axis=2
    )
    image = np.where(label > 0, 0.8, 0.2).astype(np.float32)
    image += np.random.default_rng(0).normal(0, 0.05, image.shape).astype(np.float32)
    sparse = np.full(label.shape, IGNORE_INDEX, dtype=np.uint8)
    sparse[..., [1, 4, 7]] = label[..., [1, 4, 7]]
    case = Case("disc", Path("i.nii.gz"), Path("l.nii.gz"), "CT", {1: "disc"}, 2)
    encoder = Encoder.random(PretrainConfig(channels=(4, 8), num_clusters=3, seed=0))
    maps = compute_feature_maps(encoder, image, 2, tmp_path / "maps")
    config = FewShotConfig(axis=2)
    network = fit_segmenter(
        encoder, [image], [sparse], 2, "finetune", FewShotConfig.for_scratch(steps=1, axis=2)
    )
    volume = _Volume(case, image, label)
    before, before_scores, before_labels = _phases(maps, network, volume, sparse, config, False)
    after, after_scores, after_labels = _phases(maps, network, volume, sparse, config, True)
    assert before_scores == after_scores and set(after_scores) == {"propagation", "blend"}
    np.testing.assert_array_equal(before_labels, after_labels)
    assert set(before) == set(after) == {"validate", "predict"}
    assert all(peak > 0 for peak in (*before.values(), *after.values()))
