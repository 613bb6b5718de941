from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segassist.models.fewshot import (
    FewShotConfig,
    _augmenter,
    _batch,
    fit_segmenter,
    network_pool,
)
from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.pretrain import Encoder, PretrainConfig, pretrain
from segassist.models.progress import Progress
from segassist.models.volumes import IGNORE_INDEX

ANNOTATED = [2, 9]


def _disc_volume(depth: int = 16, size: int = 38, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A bright disc whose radius grows then shrinks through the slices (axis 2), 2 classes.

    38 is not a multiple of the encoder's size divisor: slices are padded, labels ignored there.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    image = np.empty((size, size, depth), np.float32)
    labels = np.empty((size, size, depth), np.uint8)
    for z in range(depth):
        r = 5 + 10 * np.sin(np.pi * (z + 0.5) / depth)
        disc = (yy - size / 2) ** 2 + (xx - size / 2.2) ** 2 < r**2
        image[..., z] = 0.2 + 0.5 * disc + 0.05 * rng.standard_normal((size, size))
        labels[..., z] = disc
    return np.clip(image, 0, 1), labels


def _sparse(labels: np.ndarray, slices: list[int]) -> np.ndarray:
    sparse = np.full_like(labels, IGNORE_INDEX)
    sparse[..., slices] = labels[..., slices]
    return sparse


def _dice_on_unannotated(segmenter: SegmenterNet, image: np.ndarray, labels: np.ndarray) -> float:
    x = np.moveaxis(image, 2, 0)[:, None]
    x = np.pad(x, [(0, 0), (0, 0), (0, 2), (0, 2)])  # to 40, as the runtime pads to 4 or 8
    with torch.no_grad():
        pred = segmenter(torch.from_numpy(x))[0].argmax(1).numpy()[:, :38, :38]
    keep = np.setdiff1d(np.arange(labels.shape[2]), ANNOTATED)
    p, g = pred[keep] == 1, np.moveaxis(labels, 2, 0)[keep] == 1
    return float(2 * (p & g).sum() / (p.sum() + g.sum()))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Encoder:
    """A short Pix2Rep pretraining on the volume itself (the product's path)."""
    image, _ = _disc_volume()
    config = PretrainConfig(
        channels=(8, 16, 32),
        image_size=40,
        batch_size=4,
        steps=40,
        lr=3e-3,
        num_clusters=4,
        kmeans_slices=2,
        objective_overrides={"projection_dim": 32},
    )
    return pretrain([image], config, Path(tmp_path_factory.mktemp("pretrain")))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "config"),
    [
        ("linear", FewShotConfig()),
        ("finetune", FewShotConfig(steps=60)),
        ("mean_teacher", FewShotConfig(steps=80)),
    ],
)
def test_methods_segment_the_unannotated_slices(
    pretrained: Encoder, method: str, config: FewShotConfig
) -> None:
    image, labels = _disc_volume()
    reports: list[Progress] = []
    segmenter = fit_segmenter(
        pretrained,
        [image],
        [_sparse(labels, ANNOTATED)],
        num_classes=2,
        method=method,  # type: ignore[arg-type]
        config=config,
        progress=reports.append,
    )

    assert _dice_on_unannotated(segmenter, image, labels) > 0.8
    assert reports and reports[0].step == 1 and reports[0].phase == method
    assert reports[-1].total == (config.linear_steps if method == "linear" else config.steps)
    assert all(r.eta_seconds >= 0 for r in reports)
    # The cluster head is the encoder's, untouched by training.
    trained, original = segmenter.cluster_head.state_dict(), pretrained.cluster_head.state_dict()
    assert trained.keys() == original.keys()
    assert all(torch.equal(trained[k], original[k]) for k in original)


def _finetune_disc(encoder: Encoder, config: FewShotConfig) -> SegmenterNet:
    """``"finetune"`` on the disc volume's :data:`ANNOTATED` slices."""
    image, labels = _disc_volume()
    return fit_segmenter(
        encoder, [image], [_sparse(labels, ANNOTATED)], 2, method="finetune", config=config
    )


@pytest.mark.slow
def test_random_init_baseline_finetunes(pretrained: Encoder) -> None:
    image, labels = _disc_volume()
    scratch = Encoder.random(pretrained.config, pretrained.normalisation)
    before = [p.clone() for p in scratch.parameters()]
    segmenter = _finetune_disc(scratch, FewShotConfig.for_scratch(steps=60))
    assert _dice_on_unannotated(segmenter, image, labels) > 0.8
    # The encoder passed in is copied, not trained in place.
    assert all(torch.equal(a, b) for a, b in zip(before, scratch.parameters(), strict=True))


def test_label_values_out_of_range_are_rejected(pretrained: Encoder) -> None:
    image, labels = _disc_volume(depth=4)
    bad = _sparse(labels, [1])
    bad[3, 3, 1] = 2
    with pytest.raises(ValueError, match=r"label values \[2\] out of range for 2 classes"):
        fit_segmenter(pretrained, [image], [bad], num_classes=2)


def test_no_annotated_slice_is_rejected(pretrained: Encoder) -> None:
    image, labels = _disc_volume(depth=4)
    with pytest.raises(ValueError, match="no slice is annotated"):
        fit_segmenter(pretrained, [image], [_sparse(labels, [])], num_classes=2)
    with pytest.raises(ValueError, match="differs from image shape"):
        fit_segmenter(pretrained, [image], [labels[:, :, :3]], num_classes=2)


def test_augmentation_marks_pixels_from_outside_the_slice_as_ignored() -> None:
    config = FewShotConfig(aug_prob=1.0, rotate_degrees=45.0, scale_range=0.0)
    images = np.full((1, 16, 16), 0.5, np.float32)
    labels = np.ones((1, 16, 16), np.uint8)
    labels[0, :, :8] = 0
    x, y = _batch(images, labels, [0], _augmenter(config, 16, 16))

    assert x.shape == (1, 1, 16, 16) and y.shape == (1, 16, 16)
    values = set(torch.unique(y).tolist())
    # A 45° rotation brings outside pixels into the corners: ignored, never background.
    assert values == {0, 1, IGNORE_INDEX}
    assert (y[0, 0, 0] == IGNORE_INDEX).item()


def test_only_networks_from_scratch_on_large_slices_are_pooled(pretrained: Encoder) -> None:
    scratch = Encoder.random(pretrained.config, pretrained.normalisation)
    config = FewShotConfig(scratch_max_side=256)
    assert network_pool(scratch, "finetune", (512, 512), config) == 2
    assert network_pool(scratch, "mean_teacher", (300, 200), config) == 2
    assert network_pool(scratch, "finetune", (233, 197), config) == 1
    assert network_pool(scratch, "finetune", (513, 100), config) == 3
    assert network_pool(scratch, "finetune", (512, 512), FewShotConfig(scratch_max_side=0)) == 1
    assert network_pool(scratch, "linear", (512, 512), config) == 1  # a probe reads native maps
    assert network_pool(pretrained, "finetune", (512, 512), config) == 1  # its pixel scale


@pytest.mark.slow
def test_a_network_from_scratch_on_slices_over_the_side_trains_pooled(
    pretrained: Encoder,
) -> None:
    image, labels = _disc_volume()  # 38×38 slices, padded to 40 at 2× pooling (divisor 8)
    scratch = Encoder.random(pretrained.config, pretrained.normalisation)
    segmenter = _finetune_disc(scratch, FewShotConfig.for_scratch(steps=100, scratch_max_side=20))
    assert segmenter.pool == 2 and segmenter.size_divisor == 8
    # measured 0.90–0.92 over two seeds (native 40-pixel slices: 0.95)
    assert _dice_on_unannotated(segmenter, image, labels) > 0.8
