"""Manifest validation and the torch-free ONNX predictor against the PyTorch model."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from segassist.models.export import export_segmenter
from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.networks.unet import DenseUNet
from segassist.models.runtime import Manifest, OnnxPredictor
from segassist.models.runtime.preprocess import Normalisation, crop_to, normalise, pad_to_multiple

ROOT = Path(__file__).resolve().parents[2]
LABELS = {0: "background", 1: "a", 2: "b"}
NORM = Normalisation(kind="percentile", low=0.5, high=99.5)


def _manifest(**changes: object) -> Manifest:
    base = Manifest(
        kind="segmenter",
        labels=LABELS,
        num_classes=3,
        num_clusters=4,
        axis=1,
        normalisation=NORM,
        size_divisor=4,
        onnx_file="model.onnx",
        onnx_sha256="0" * 64,
        opset=18,
        lineage={"dataset_id": "d", "image_ids": ["i1", "i2"]},
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


# --- manifest ---------------------------------------------------------------------------------


def test_manifest_round_trip(tmp_path: Path) -> None:
    manifest = _manifest(metrics={"dice": [0.5, 0.7]}, parity_max_abs_diff=2e-6)
    path = manifest.save(tmp_path)
    assert path == tmp_path / "manifest.json"
    assert Manifest.load(path) == manifest
    assert Manifest.load(tmp_path).normalisation == NORM


def _edited(tmp_path: Path, edit: dict[str, object], drop: str | None = None) -> Path:
    data = _manifest().to_dict()
    data.update(edit)
    if drop:
        del data[drop]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("edit", "drop", "message"),
    [
        ({"format_version": 2}, None, "unsupported manifest format_version 2"),
        ({}, "axis", r"lacks required field\(s\): axis"),
        ({"colour": "red"}, None, r"unknown field\(s\): colour"),
        ({"kind": "classifier"}, None, "kind must be one of"),
        ({"labels": {"0": "bg", "2": "x"}}, None, "label indices"),
        ({"axis": "1"}, None, "axis must be an integer"),
        ({"normalisation": {"kind": "ct_window"}}, None, "invalid manifest"),
        ({"onnx_sha256": None}, None, "lacks onnx_sha256"),
    ],
)
def test_manifest_load_rejects(
    tmp_path: Path, edit: dict[str, object], drop: str | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        Manifest.load(_edited(tmp_path, edit, drop))


def test_manifest_load_rejects_bad_json(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Manifest.load(tmp_path)


def test_encoder_manifest_needs_no_onnx(tmp_path: Path) -> None:
    encoder = Manifest(
        kind="encoder",
        labels={},
        num_classes=0,
        num_clusters=8,
        axis=2,
        normalisation=NORM,
        size_divisor=16,
        objective="iic_boundary",
    )
    assert Manifest.load(encoder.save(tmp_path)) == encoder


# --- predictor --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_and_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[SegmenterNet, Path]:
    torch.manual_seed(1)
    model = SegmenterNet(DenseUNet(channels=(4, 8, 16)), num_classes=3, num_clusters=4).eval()
    folder = tmp_path_factory.mktemp("model")
    export_segmenter(model, folder, labels=LABELS, axis=2, normalisation=NORM)
    return model, folder


def _with_axis(src: Path, dest: Path, axis: int) -> Path:
    dest.mkdir()
    shutil.copy(src / "model.onnx", dest / "model.onnx")
    dataclasses.replace(Manifest.load(src), axis=axis).save(dest)
    return dest


def _volume(shape: tuple[int, int, int]) -> np.ndarray:
    """A phantom: a bright ellipsoid and a dark cube in noise, raw MR-like intensities."""
    rng = np.random.default_rng(7)
    grid = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    volume = 100 + 20 * rng.standard_normal(shape)
    volume[grid[0] ** 2 + (grid[1] / 0.7) ** 2 + grid[2] ** 2 < 0.4] += 300
    volume[(np.abs(grid[0] - 0.5) < 0.3) & (np.abs(grid[1] + 0.4) < 0.3)] -= 80
    return volume.astype(np.float32)


def _torch_reference(model: SegmenterNet, volume: np.ndarray, axis: int) -> list[np.ndarray]:
    """Logits and cluster scores L×X×Y×Z / K×X×Y×Z computed slice-wise with PyTorch."""
    slices = np.moveaxis(normalise(volume, NORM), axis, 0)[:, None]
    batch, size = pad_to_multiple(np.ascontiguousarray(slices), 4)
    with torch.inference_mode():
        outputs = model(torch.from_numpy(batch))
    return [np.moveaxis(crop_to(o.numpy(), size), 0, axis + 1) for o in outputs]


def _assert_argmax_matches(scores: np.ndarray, predicted: np.ndarray) -> None:
    """``predicted`` equals the argmax of ``scores`` wherever the top two are not a near tie."""
    top2 = np.sort(scores, axis=0)[-2:]
    decided = top2[1] - top2[0] > 1e-4
    assert np.array_equal(predicted[decided], scores.argmax(axis=0)[decided])
    assert decided.mean() > 0.99


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_predict_matches_torch_along_each_axis(
    model_and_folder: tuple[SegmenterNet, Path], tmp_path: Path, axis: int
) -> None:
    model, folder = model_and_folder
    predictor = OnnxPredictor.from_folder(_with_axis(folder, tmp_path / "m", axis), device="cpu")
    volume = _volume((9, 11, 7))

    prediction = predictor.predict(volume, batch_size=4)

    logits, scores = _torch_reference(model, volume, axis)
    assert prediction.labels.shape == prediction.clusters.shape == (9, 11, 7)
    assert prediction.labels.dtype == prediction.clusters.dtype == np.uint8
    assert prediction.probabilities is None and prediction.uncertainty is None
    _assert_argmax_matches(logits, prediction.labels)
    _assert_argmax_matches(scores, prediction.clusters)
    assert len(np.unique(logits.argmax(axis=0))) > 1


def test_probabilities_and_uncertainty(model_and_folder: tuple[SegmenterNet, Path]) -> None:
    model, folder = model_and_folder
    predictor = OnnxPredictor.from_folder(folder, device="cpu", threads=1)
    volume = _volume((6, 10, 5))

    prediction = predictor.predict(volume, with_probabilities=True, batch_size=2)

    probs, uncertainty = prediction.probabilities, prediction.uncertainty
    assert probs is not None and uncertainty is not None
    assert probs.shape == (3, 6, 10, 5) and probs.dtype == np.float32
    logits = _torch_reference(model, volume, axis=2)[0]
    expected = np.exp(logits) / np.exp(logits).sum(axis=0)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    entropy = -(expected * np.log(expected)).sum(axis=0) / np.log(3)
    np.testing.assert_allclose(uncertainty, entropy, atol=1e-4)
    assert uncertainty.dtype == np.float32
    assert uncertainty.min() >= 0.0 and uncertainty.max() <= 1.0


def test_batch_size_does_not_change_the_result(model_and_folder: tuple[SegmenterNet, Path]) -> None:
    predictor = OnnxPredictor.from_folder(model_and_folder[1], device="cpu")
    volume = _volume((5, 8, 7))
    one = predictor.predict(volume, batch_size=1, with_uncertainty=True)
    many = predictor.predict(volume, batch_size=16, with_uncertainty=True)
    assert np.array_equal(one.labels, many.labels)
    assert np.array_equal(one.clusters, many.clusters)
    assert one.uncertainty is not None and many.uncertainty is not None
    np.testing.assert_allclose(one.uncertainty, many.uncertainty, atol=1e-5)
    assert many.probabilities is None


def test_predict_rejects_bad_volumes(model_and_folder: tuple[SegmenterNet, Path]) -> None:
    predictor = OnnxPredictor.from_folder(model_and_folder[1], device="cpu")
    with pytest.raises(ValueError, match="X×Y×Z"):
        predictor.predict(np.zeros((4, 4)))
    volume = _volume((4, 4, 4))
    volume[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        predictor.predict(volume)


def test_checksum_mismatch_is_refused(
    model_and_folder: tuple[SegmenterNet, Path], tmp_path: Path
) -> None:
    folder = _with_axis(model_and_folder[1], tmp_path / "m", axis=2)
    with open(folder / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ValueError, match="SHA-256"):
        OnnxPredictor.from_folder(folder)


def test_cuda_request_falls_back_to_cpu(
    model_and_folder: tuple[SegmenterNet, Path], caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    with caplog.at_level(logging.WARNING, logger="segassist.models.runtime.predictor"):
        predictor = OnnxPredictor.from_folder(model_and_folder[1], device="cuda")
    assert predictor.device == "cpu"
    assert "CUDA requested" in caplog.text
    assert OnnxPredictor.from_folder(model_and_folder[1], device="auto").device == "cpu"


def test_runtime_predicts_without_importing_torch(
    model_and_folder: tuple[SegmenterNet, Path], tmp_path: Path
) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        from segassist.models.runtime import OnnxPredictor, render_cluster_montage
        predictor = OnnxPredictor.from_folder({str(model_and_folder[1])!r}, device="cpu")
        volume = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
        prediction = predictor.predict(volume, with_probabilities=True)
        render_cluster_montage(volume, prediction.clusters, 2, {str(tmp_path / "c.png")!r})
        assert prediction.labels.shape == (5, 6, 7)
        print("torch" in sys.modules)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert (tmp_path / "c.png").stat().st_size > 0
