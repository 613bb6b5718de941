"""ONNX export: parity with PyTorch, dynamic batch/H/W, manifest written next to the graph."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort
import pytest
import torch

from segassist.models.export import export_segmenter
from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.networks.unet import DenseUNet
from segassist.models.runtime._atomic import sha256_file
from segassist.models.runtime.manifest import Manifest
from segassist.models.runtime.preprocess import Normalisation

LABELS = {0: "background", 1: "liver", 2: "spleen"}
NORM = Normalisation(kind="ct_window", low=-1000.0, high=1000.0)


def _segmenter(multiscale: bool = False) -> SegmenterNet:
    torch.manual_seed(0)
    head: Literal["linear", "mlp"] = "mlp" if multiscale else "linear"
    encoder = DenseUNet(channels=(4, 8, 16))
    return SegmenterNet(encoder, num_classes=3, num_clusters=5, head=head, multiscale=multiscale)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[SegmenterNet, Path, Manifest]:
    model = _segmenter()
    folder = tmp_path_factory.mktemp("segmenter")
    manifest = export_segmenter(
        model,
        folder,
        labels=LABELS,
        axis=2,
        normalisation=NORM,
        objective="pix2rep",
        method="linear",
        lineage={"dataset_id": "d1", "encoder_id": "e1", "label_ids": ["l1"]},
        metrics={"dice": {"1": 0.8}},
    )
    return model, folder, manifest


def test_parity_within_tolerance_and_recorded(
    exported: tuple[SegmenterNet, Path, Manifest],
) -> None:
    _, _, manifest = exported
    assert manifest.parity_max_abs_diff is not None
    assert 0.0 <= manifest.parity_max_abs_diff <= 1e-4


@pytest.mark.parametrize("shape", [(1, 1, 12, 20), (3, 1, 24, 8)])
def test_graph_runs_at_other_batch_and_sizes(
    exported: tuple[SegmenterNet, Path, Manifest], shape: tuple[int, int, int, int]
) -> None:
    model, folder, _ = exported
    x = np.random.default_rng(3).random(shape, dtype=np.float32)
    session = ort.InferenceSession(folder / "model.onnx", providers=["CPUExecutionProvider"])
    logits, scores = session.run(["logits", "cluster_scores"], {"image": x})
    with torch.inference_mode():
        ref_logits, ref_scores = model(torch.from_numpy(x))
    assert logits.shape == (shape[0], 3, *shape[2:])
    assert scores.shape == (shape[0], 5, *shape[2:])
    assert np.max(np.abs(logits - ref_logits.numpy())) <= 1e-4
    assert np.max(np.abs(scores - ref_scores.numpy())) <= 1e-4


def test_manifest_round_trips_and_matches_file(
    exported: tuple[SegmenterNet, Path, Manifest],
) -> None:
    _, folder, manifest = exported
    loaded = Manifest.load(folder)
    assert loaded == manifest
    assert loaded.onnx_sha256 == sha256_file(folder / "model.onnx")
    assert (loaded.num_classes, loaded.num_clusters, loaded.size_divisor) == (3, 5, 4)
    assert loaded.labels == LABELS
    assert loaded.lineage["label_ids"] == ["l1"]
    assert json.loads((folder / "manifest.json").read_text())["labels"]["1"] == "liver"
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx"]


def test_training_mode_restored_and_multiscale_head_exports(tmp_path: Path) -> None:
    model = _segmenter(multiscale=True).train()
    manifest = export_segmenter(model, tmp_path, labels=LABELS, axis=0, normalisation=NORM)
    assert model.training
    assert manifest.parity_max_abs_diff is not None
    assert manifest.parity_max_abs_diff <= 1e-4


def test_a_pooled_segmenter_exports_and_takes_native_slices(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SegmenterNet(DenseUNet(channels=(4, 8, 16)), 3, 5, multiscale=True, pool=2).eval()
    manifest = export_segmenter(model, tmp_path, labels=LABELS, axis=2, normalisation=NORM)
    assert manifest.size_divisor == 8  # the runtime pads slices to what the pooling needs
    assert manifest.parity_max_abs_diff is not None and manifest.parity_max_abs_diff <= 1e-4
    x = np.random.default_rng(4).random((3, 1, 24, 40), dtype=np.float32)
    session = ort.InferenceSession(tmp_path / "model.onnx", providers=["CPUExecutionProvider"])
    logits, scores = session.run(["logits", "cluster_scores"], {"image": x})
    with torch.inference_mode():
        ref_logits, ref_scores = model(torch.from_numpy(x))
    assert logits.shape == (3, 3, 24, 40) and scores.shape == (3, 5, 24, 40)
    assert np.max(np.abs(logits - ref_logits.numpy())) <= 1e-4
    assert np.max(np.abs(scores - ref_scores.numpy())) <= 1e-4


def test_label_mismatch_raises_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 logit channels"):
        export_segmenter(
            _segmenter(), tmp_path, labels={0: "bg", 1: "x"}, axis=0, normalisation=NORM
        )
    assert list(tmp_path.iterdir()) == []


def test_invalid_manifest_field_leaves_no_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="axis"):
        export_segmenter(_segmenter(), tmp_path, labels=LABELS, axis=3, normalisation=NORM)
    assert list(tmp_path.iterdir()) == []
