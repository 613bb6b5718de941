"""Few-shot benchmark: slice choice, scoring, the interpolation baseline, and a quick real run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from segassist.bench.baselines import fill_between_slices
from segassist.bench.protocol import (
    cross_volume_splits,
    dice_per_class,
    mean_dice,
    slice_propagation_dice,
    sparse_labels,
    spread_slices,
)
from segassist.bench.report import DEFAULT
from segassist.models.volumes import IGNORE_INDEX


def _cylinder(shape: tuple[int, int, int], axis: int, span: range, radius: float) -> np.ndarray:
    """Label volume with a cylinder of class 1 along ``axis`` over the slices in ``span``."""
    moved = (shape[axis], *(s for a, s in enumerate(shape) if a != axis))
    out = np.zeros(moved, dtype=np.uint8)
    yy, xx = np.mgrid[: moved[1], : moved[2]]
    disk = (yy - moved[1] / 2) ** 2 + (xx - moved[2] / 2) ** 2 < radius**2
    out[span.start : span.stop, disk] = 1
    return np.moveaxis(out, 0, axis)


def test_spread_slices_sit_inside_the_structure_at_quantile_midpoints() -> None:
    label = _cylinder((16, 40, 16), axis=1, span=range(10, 30), radius=4)
    assert spread_slices(label, 1, 1) == [20]
    three = spread_slices(label, 1, 3)
    assert three == [13, 20, 26]
    five = spread_slices(label, 1, 5)
    assert len(five) == 5 and all(10 <= s < 30 for s in five)
    assert min(np.diff(five)) >= 3  # spread, not clustered
    with pytest.raises(ValueError, match="21 slices"):
        spread_slices(label, 1, 21)


def test_spread_slices_cover_the_union_of_class_extents() -> None:
    label = _cylinder((12, 12, 30), axis=2, span=range(0, 10), radius=3)
    label[:2, :2, 20:30] = 2
    picked = spread_slices(label, 2, 2)
    assert picked[0] < 10 and picked[1] >= 20


def test_sparse_labels_keep_only_the_labelled_slices() -> None:
    label = _cylinder((10, 10, 8), axis=0, span=range(2, 8), radius=3)
    sparse = sparse_labels(label, 0, [3, 5])
    np.testing.assert_array_equal(sparse[[3, 5]], label[[3, 5]])
    assert (np.delete(sparse, [3, 5], axis=0) == IGNORE_INDEX).all()


def test_dice_counts_only_unlabelled_slices() -> None:
    truth = _cylinder((10, 10, 12), axis=2, span=range(2, 10), radius=3)
    prediction = truth.copy()
    prediction[..., 4] = 0  # a labelled slice, wrong: must not count
    scores = slice_propagation_dice(prediction, truth, 2, [4], [1])
    assert scores == {1: 1.0}
    prediction[..., 6] = 0  # an unlabelled slice, wrong: must count
    worse = slice_propagation_dice(prediction, truth, 2, [4], [1])
    assert worse[1] < 1.0


def test_dice_is_nan_for_absent_classes_and_zero_for_missed_ones() -> None:
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[1:3, 1:3, 1:3] = 1
    prediction = np.zeros_like(truth)
    scores = dice_per_class(prediction, truth, [1, 2])
    assert scores[1] == 0.0
    assert math.isnan(scores[2])
    assert mean_dice(scores) == 0.0
    with pytest.raises(ValueError, match="shape"):
        dice_per_class(prediction[:2], truth, [1])


def test_cross_volume_splits_partition_and_repeat_under_a_seed() -> None:
    labelled, held_out = cross_volume_splits(5, 2, seed=3)
    assert len(labelled) == 2
    assert sorted(labelled + held_out) == [0, 1, 2, 3, 4]
    assert cross_volume_splits(5, 2, seed=3) == (labelled, held_out)
    assert {tuple(cross_volume_splits(5, 2, seed=s)[0]) for s in range(10)} != {tuple(labelled)}
    with pytest.raises(ValueError, match="k < volumes"):
        cross_volume_splits(2, 2, seed=0)


def test_fill_between_slices_fills_a_cylinder_from_two_slices() -> None:
    truth = _cylinder((20, 20, 24), axis=2, span=range(4, 20), radius=5)
    sparse = sparse_labels(truth, 2, [6, 17])
    filled = fill_between_slices(sparse, 2)
    between = dice_per_class(filled[..., 7:17], truth[..., 7:17], [1])[1]
    assert between > 0.95
    assert not filled[..., :6].any() and not filled[..., 18:].any()  # never extrapolates
    np.testing.assert_array_equal(filled[..., [6, 17]], truth[..., [6, 17]])


def test_fill_between_slices_keeps_classes_apart_and_stops_at_empty_slices() -> None:
    truth = _cylinder((24, 20, 20), axis=0, span=range(2, 22), radius=4)
    truth[2:22, :3, :3] = 2
    sparse = sparse_labels(truth, 0, [4, 12, 19])
    sparse[12] = np.where(sparse[12] == 1, 0, sparse[12])  # class 1 annotated absent on slice 12
    filled = fill_between_slices(sparse, 0)
    assert (filled[5:19, :3, :3] == 2).all()
    assert (filled[12] == 1).sum() == 0
    assert (filled[8] == 1).sum() < (truth[8] == 1).sum()  # shrinks towards the empty slice


def _msd_folder(root: Path) -> Path:
    """Two small MR-like volumes with one class each: a cross-volume group."""
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    for i in range(2):
        label = _cylinder((24, 24, 10), axis=2, span=range(2, 9), radius=5 + i)
        image = 100.0 * label + rng.normal(50, 5, label.shape)
        for folder, array, stem in (("imagesTr", image, "_0000"), ("labelsTr", label, "")):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(
                nib.Nifti1Image(array.astype(np.float32), affine),
                root / folder / f"toy_{i}{stem}.nii.gz",
            )
    (root / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "MR"}, "labels": {"background": 0, "blob": 1}})
    )
    return root


@pytest.mark.slow
def test_quick_profile_runs_every_row_and_writes_the_report(tmp_path: Path) -> None:
    from segassist.bench.fewshot import main
    from segassist.models.objectives import OBJECTIVES

    out = tmp_path / "results"
    folder = _msd_folder(tmp_path / "toy")
    argv = ["--profile", "quick", "--sets", "tptbox-spine", "--dataset", str(folder)]
    assert main([*argv, "--out", str(out), "--encoder-cache", str(tmp_path / "enc")]) == 0

    report = json.loads((out / "fewshot.json").read_text())
    methods = {r["method"] for r in report["rows"]}
    best = report["selected"]["tptbox-spine"]
    expected = {
        "random-init · finetune",
        "random-init · linear",
        "fill-between-slices (ITK)",
        *(f"{o} · {m}" for o in OBJECTIVES for m in ("linear", "finetune")),
        f"{best} · mean teacher",
        f"{best} · linear, mlp head",
        f"{best} · linear, last block only",
        f"{best} · finetune, last block only",
        f"{best} (own volumes) · linear",
        f"{best} (own volumes) · finetune",
        "default (assist, then refinement)",
    }
    assert expected <= methods, expected - methods
    settings = {(r["set"], r["setting"]) for r in report["rows"]}
    assert ("tptbox-spine", "slice propagation") in settings
    assert ("msd:toy", "cross-volume") in settings
    assert all(
        0.0 <= r["mean_dice"] <= 1.0 for r in report["rows"] if not math.isnan(r["mean_dice"])
    )
    assert all(r["k"] >= 2 for r in report["rows"] if r["method"].startswith("fill-between"))
    encoders = report["encoders"]
    assert {e["objective"] for e in encoders} == set(OBJECTIVES)
    assert {"CT pool", "MR pool"} <= {e["name"].split(" · ")[1] for e in encoders}
    assert all(e["slices_per_second"] > 0 and e["peak_rss_mb"] > 0 for e in encoders)

    markdown = (out / "fewshot.md").read_text()
    assert "python -m segassist.bench.fewshot --profile quick" in markdown
    assert "tptbox-spine · tptbox-ct · slice propagation" in markdown
    assert "| random-init · finetune |" in markdown
    assert (out / "fewshot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the product's rows again, after a change to it: the baselines are kept as they were
    assert (
        main(["--default-only", "--out", str(out), "--encoder-cache", str(tmp_path / "enc")]) == 0
    )
    again = json.loads((out / "fewshot.json").read_text())

    def default_rows(rows: list[dict[str, Any]], registry: bool) -> list[dict[str, Any]]:
        return [
            r for r in rows if (r["method"] == DEFAULT) and (r["set"] == "tptbox-spine") == registry
        ]

    def others(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rows if r not in default_rows(rows, True)]

    assert others(again["rows"]) == others(report["rows"])
    redone, before = default_rows(again["rows"], True), default_rows(report["rows"], True)
    assert [(r["group"], r["k"], r["seed"]) for r in redone] == [
        (r["group"], r["k"], r["seed"]) for r in before
    ]
    assert all(0.0 <= r["mean_dice"] <= 1.0 for r in redone)
    assert default_rows(again["rows"], False) == default_rows(report["rows"], False) != []
    assert "segassist.bench.fewshot --default-only" in again["default_rerun"]["command"]
    assert "rows were recomputed on" in (out / "fewshot.md").read_text()


def test_encoder_cache_reuses_a_pretrained_encoder(tmp_path: Path) -> None:
    import torch

    from segassist.bench.fewshot import EncoderCache
    from segassist.models.pretrain import PretrainConfig

    volume = np.random.default_rng(1).random((16, 16, 4)).astype(np.float32)
    config = PretrainConfig(
        steps=1, batch_size=1, image_size=16, channels=(4, 8), num_clusters=2, kmeans_slices=1
    )
    first_run = EncoderCache(tmp_path)
    first = first_run.get("toy", "toy", [volume], config)
    later_run = EncoderCache(tmp_path)
    again = later_run.get("toy", "toy", [volume], config)
    assert [r.cached for r in (*first_run.records, *later_run.records)] == [False, True]
    assert later_run.records[0].seconds == first_run.records[0].seconds  # original time
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    later_run.get("toy", "toy", [volume * 0.5], config)
    assert later_run.records[-1].cached is False  # other data, other key
