"""``method="auto"``: every candidate scored on the same held-out pixels of the labelled slices,
the best kept, network candidates skipped when the budget cannot hold them."""

from __future__ import annotations

import numpy as np
import torch

from segassist.models.fewshot import FewShotConfig, fit_segmenter
from segassist.models.method_selection import CANDIDATES, held_out_pixels, select_method
from segassist.models.pretrain import Encoder, PretrainConfig

SIZE, SLICES = 32, 6
LABELLED = (1, 4)


def _encoder(seed: int) -> Encoder:
    config = PretrainConfig(channels=(4, 8), num_clusters=2, axis=2, seed=seed)
    return Encoder.random(config)


def _halves() -> tuple[np.ndarray, np.ndarray]:
    """A uniform square (0.8) on a dark background (0.1): class 1 its left half, class 2 its
    right half. Inside a half, every pixel's neighbourhood looks alike: only the position
    (relative to the square's edges) tells the classes apart."""
    image = np.full((SIZE, SIZE, SLICES), 0.1, dtype=np.float32)
    label = np.full(image.shape, 255, dtype=np.uint8)
    image[4:28, 4:28] = 0.8
    for s in LABELLED:
        label[..., s] = 0
        label[4:28, 4:16, s] = 1
        label[4:28, 16:28, s] = 2
    return image, label


def _intensities() -> tuple[np.ndarray, np.ndarray]:
    """Two bright discs of different intensity: each class is its own intensity."""
    x, y = np.mgrid[:SIZE, :SIZE]
    left = (x - 16) ** 2 + (y - 9) ** 2 < 30
    right = (x - 16) ** 2 + (y - 23) ** 2 < 30
    image = np.full((SIZE, SIZE, SLICES), 0.1, dtype=np.float32)
    label = np.full(image.shape, 255, dtype=np.uint8)
    image[left] = 0.5
    image[right] = 0.9
    for s in LABELLED:
        label[..., s] = 0
        label[left, s] = 1
        label[right, s] = 2
    return image, label


NETWORK_FIT = {"steps": 80, "eval_every": 10, "patience": 8, "linear_steps": 60}


def test_position_defined_classes_go_to_a_network_and_every_candidate_is_scored() -> None:
    image, label = _halves()
    config = FewShotConfig(**NETWORK_FIT, auto_budget_seconds=1e6)
    choice = select_method(_encoder(0), _encoder(1), [image], [label], 3, config)
    record = choice.validation
    assert list(record) == list(CANDIDATES)
    assert all(entry["dice"] is not None for entry in record.values()), record
    assert choice.method in ("finetune", "scratch"), record
    best_probe = max(record["probe-linear"]["dice"], record["probe-mlp"]["dice"])
    assert record[choice.method]["dice"] > best_probe
    held = held_out_pixels([label], 2, config, (SIZE, SIZE))
    assert {entry["held_out"] for entry in record.values()} == {int(held.sum())}
    logits, _ = choice.segmenter(torch.from_numpy(image[None, None, :, :, 0]))
    assert logits.shape == (1, 3, SIZE, SIZE)


def test_with_two_labelled_slices_a_whole_one_is_held_out() -> None:
    _, label = _halves()  # slices 1 and 4 labelled everywhere
    held = held_out_pixels([label], 2, FewShotConfig(), (SIZE, SIZE))
    assert held.shape == (2, SIZE, SIZE)
    assert not held[0].any() and held[1].all()  # the second: the middle of two


def test_a_tiny_budget_keeps_a_probe_and_says_why_the_networks_were_skipped() -> None:
    image, label = _intensities()
    config = FewShotConfig(linear_steps=60, auto_budget_seconds=0.0)
    choice = select_method(_encoder(0), _encoder(1), [image], [label], 3, config)
    record = choice.validation
    assert choice.method == "probe-linear", record
    assert record["probe-linear"]["dice"] is not None
    for candidate in ("probe-mlp", "finetune", "scratch"):
        assert "left" in record[candidate]["skipped"], record


def test_nothing_held_out_falls_back_to_the_cheapest_candidate() -> None:
    image, _ = _intensities()
    label = np.full(image.shape, 255, dtype=np.uint8)
    label[14:18, 7:11, 1] = 1  # k = 1, one 4×4 patch: every tile of it lands on one side
    label[14:18, 1:3, 1] = 0
    config = FewShotConfig(linear_steps=20, auto_budget_seconds=1e6)
    assert not held_out_pixels([label], 2, config, (SIZE, SIZE)).any()
    choice = select_method(_encoder(0), _encoder(1), [image], [label], 2, config)
    assert choice.method == "probe-linear"
    assert choice.validation["probe-linear"]["dice"] is None
    assert "held out" in choice.validation["scratch"]["skipped"]


def test_fit_segmenter_auto_on_a_random_encoder_has_only_scratch() -> None:
    image, label = _intensities()
    config = FewShotConfig(steps=5, eval_every=5, auto_budget_seconds=0.0)
    segmenter = fit_segmenter(_encoder(0), [image], [label], 3, "auto", config)
    logits, _ = segmenter(torch.from_numpy(image[None, None, :, :, 0]))
    assert logits.shape == (1, 3, SIZE, SIZE)


def test_the_scratch_candidate_is_pooled_on_slices_over_the_side() -> None:
    image, label = _halves()
    config = FewShotConfig(**NETWORK_FIT, auto_budget_seconds=1e6, scratch_max_side=16)
    choice = select_method(None, _encoder(1), [image], [label], 3, config)
    assert choice.method == "scratch", choice.validation
    assert choice.validation["scratch"]["dice"] is not None
    assert choice.segmenter.pool == 2  # 32-pixel slices over a 16-pixel side
    logits, _ = choice.segmenter(torch.from_numpy(image[None, None, :, :, 0]))
    assert logits.shape == (1, 3, SIZE, SIZE)
