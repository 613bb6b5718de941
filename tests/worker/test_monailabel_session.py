"""3D Slicer's MONAI Label session against a real segassist, with MONAI Label 0.8.5's client.

The API on a real port (uvicorn) and a real Celery worker (embedded broker, SQLite); the client
is the one Slicer's module bundles. The session, with authentication off and on: info → upload
image → save a label painted the way Slicer saves it → train → poll → infer (multipart, parsed
by the client's ``cgi`` code on the raw socket; then ``output=image``) → next sample → stop a
running training. The returned NRRD is read with ITK (Slicer's reader) and every voxel's world
position is compared with the uploaded NIfTI, and with a DICOM series' own geometry.
"""

from __future__ import annotations

import gzip
import json
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import requests

from segassist.server.settings import Settings
from tests.server.dicom_factory import SeriesSpec, write_series, zip_files
from tests.server.monailabel_support import (
    AFFINE,
    SHAPE,
    LiveServer,
    client_module,
    save_nifti,
    slicer_label,
    synthetic_volume,
)
from tests.worker.conftest import JOB_DEADLINE_SECONDS, Worker

TOKEN = "session-token"
USER, PASSWORD = "annotator", "pw"


@pytest.fixture(params=["auth off", "auth on"])
def settings(request: pytest.FixtureRequest, data_dir: Path) -> Settings:
    """Embedded back-end; a short first pretraining and none in the background (test budget)."""
    token = TOKEN if request.param == "auth on" else ""
    return Settings(
        data_dir=data_dir,
        device="cpu",
        api_token=token,
        monailabel_username=USER,
        monailabel_password=PASSWORD,
        assist_pretrain_steps=3,
        background_pretrain_steps=0,
    )


@pytest.fixture
def live(settings: Settings, start_worker: Callable[[], Worker]) -> Iterator[LiveServer]:
    start_worker()
    with LiveServer(settings) as server:
        yield server


def _slicer_params(info: dict[str, Any], section: str, name: str) -> dict[str, Any]:
    """What Slicer's getParamsFromConfig sends: the first item of a list, other values as is."""
    config = info[section][name]["config"]
    return {k: v[0] if isinstance(v, list) else v for k, v in config.items()}


def _wait(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + JOB_DEADLINE_SECONDS
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {JOB_DEADLINE_SECONDS:.0f} s")
        time.sleep(1.0)


def _itk_grid(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(data X×Y×Z, 4×4 voxel → LPS matrix) of an image as ITK reads it."""
    import itk

    image = itk.imread(str(path))
    data = itk.array_from_image(image).transpose(2, 1, 0)
    matrix = np.eye(4)
    direction = itk.array_from_matrix(image.GetDirection())
    matrix[:3, :3] = direction @ np.diag(np.asarray(image.GetSpacing()))
    matrix[:3, 3] = np.asarray(image.GetOrigin())
    return data, matrix


def _voxels(shape: tuple[int, ...]) -> np.ndarray:
    """Homogeneous coordinates (4×N) of every voxel index of ``shape``."""
    grid = np.indices(shape).reshape(3, -1).astype(float)
    return np.vstack([grid, np.ones(grid.shape[1])])


def _auth_headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"} if settings.api_token else {}


def test_slicer_session(live: LiveServer, settings: Settings, tmp_path: Path) -> None:
    module = client_module()
    client = module.MONAILabelClient(live.url, str(tmp_path), client_id=USER)
    if settings.api_token:  # Slicer: GET /auth/, then the login dialog's user and password
        assert client.auth_enabled() is True
        assert "Status: 401" in str(_raises(module, client.info))
        client.update_auth(client.auth_token(USER, PASSWORD))
        assert client.auth_valid_token() is True
    else:
        assert client.auth_enabled() is False
    info = client.info()
    assert info["datastore"]["completed"] == 0

    # upload the volume Slicer saved to a temporary file, then the label painted on 2 slices
    folder = tmp_path / "slicer"
    folder.mkdir()
    image_file = save_nifti(synthetic_volume(), folder / "tmp0001.nii.gz")
    label_file = save_nifti(slicer_label(), folder / "tmp0002.nii.gz")
    image_id = client.upload_image(str(image_file), "CT box")["image"]
    others = [
        client.upload_image(
            str(save_nifti(synthetic_volume(seed), folder / f"o{seed}.nii.gz")), f"other {seed}"
        )["image"]
        for seed in (1, 2)
    ]
    saved = client.save_label(
        "CT box",
        str(label_file),
        params={"label_info": [{"name": "box", "idx": 1}], "model": "segmentation"},
    )
    assert saved["annotated_slices"] == [1, 4]
    info = client.info()
    assert info["labels"] == ["box"] and info["datastore"]["completed"] == 1  # Train enabled

    # train (the options table as Slicer sends it, "probabilities" ticked), poll like its timer
    trainer = _slicer_params(info, "trainers", "segmentation")
    assert trainer["method"] == "linear" and trainer["probabilities"] is False
    started = client.train_start("segmentation", {**trainer, "probabilities": True})
    assert started["status"] == "RUNNING"
    _wait(lambda: not client.train_status(check_if_running=True), "training")
    finished = client.train_status()
    assert finished["id"] == started["id"] and finished["status"] == "DONE", finished
    stats = client.info()["train_stats"]["segmentation"]
    assert stats["epoch"] == stats["total_epochs"] and stats["total_time"] > 0
    assert stats["best_metric"] > 0.5, stats  # Dice on the painted voxels it was fitted on
    segmenter = stats["segmenter_id"]

    # infer exactly as Slicer does: multipart request, cgi-parsed multipart answer
    selector = f"/infer/segmentation?image={urllib.parse.quote_plus('CT box')}"
    params = {"result_extension": ".nrrd", "result_dtype": "uint8", "client_id": USER}
    status, form, files, headers = module.MONAILabelUtils.http_multipart(
        "POST", live.url, selector, {"params": json.dumps(params)}, {}, _auth_headers(settings)
    )
    assert status == 200
    assert headers.get("Transfer-Encoding") is None and headers.get("Content-Encoding") is None
    assert int(headers["Content-Length"]) > 0
    ((filename, content),) = files.items()
    assert filename.endswith(".nrrd") and "/" not in filename
    assert content.startswith(b"NRRD000")  # saved under that name, read by SimpleITK
    answer = json.loads(form["params"])
    assert answer["label_names"] == {"background": 0, "box": 1}

    # the client's own infer, then the file's geometry through ITK against the uploaded NIfTI
    result_file, result_params = client.infer("segmentation", image_id, dict(params))
    assert result_params["segmenter_id"] == segmenter
    data, lps = _itk_grid(Path(result_file))
    assert data.shape == SHAPE and data.dtype == np.uint8
    voxels = _voxels(SHAPE)
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ AFFINE @ voxels
    np.testing.assert_allclose(lps @ voxels, expected, atol=1e-4)
    stored = requests.get(
        f"{live.url}/api/v1/predictions/{segmenter}/{image_id}/labels.nii.gz",
        headers=_auth_headers(settings),
        timeout=30,
    )
    prediction = nib.Nifti1Image.from_bytes(gzip.decompress(stored.content))
    np.testing.assert_array_equal(data, np.asarray(prediction.dataobj))
    box = np.zeros(SHAPE, dtype=bool)
    box[6:16, 5:14, :] = True
    dice = 2 * (box & (data == 1)).sum() / (box.sum() + (data == 1).sum())
    assert dice > 0.5, dice  # the unpainted slices were segmented too

    # OHIF's output=image: the NRRD alone, uncompressed when asked
    raw = requests.post(
        f"{live.url}/infer/clusters",
        params={"image": image_id, "output": "image"},
        files={"params": (None, json.dumps({**params, "result_compress": False}))},
        headers=_auth_headers(settings),
        timeout=60,
    )
    assert raw.status_code == 200 and raw.content.startswith(b"NRRD000")
    assert b"encoding: raw" in raw.content[:1024]
    (tmp_path / "clusters.nrrd").write_bytes(raw.content)
    clusters, cluster_lps = _itk_grid(tmp_path / "clusters.nrrd")
    np.testing.assert_allclose(cluster_lps, lps, atol=1e-6)
    assert clusters.min() >= 1  # viewers treat 0 as "no segment": clusters are 1…K

    # next sample: of the two unlabelled images, the one whose prediction is least certain
    # (mean normalised entropy of its stored uncertainty map)
    means = {}
    for other in others:
        stored = requests.get(
            f"{live.url}/api/v1/predictions/{segmenter}/{other}/uncertainty.nii.gz",
            headers=_auth_headers(settings),
            timeout=30,
        )
        assert stored.status_code == 200, stored.text
        uncertainty = nib.Nifti1Image.from_bytes(gzip.decompress(stored.content)).get_fdata()
        means[other] = float(np.mean(uncertainty))
    assert means[others[0]] != means[others[1]]
    sample = client.next_sample("uncertainty", _slicer_params(info, "strategies", "uncertainty"))
    assert sample["id"] == max(means, key=lambda k: means[k])
    assert sample["name"].endswith(".nii.gz")
    assert client.next_sample("first", {})["id"] == others[0]

    # stop a running training (a long fine-tune), as Slicer's Stop button does
    long_run = {"method": "finetune", "config": {"steps": 100000, "patience": 100000}}
    started = client.train_start("segmentation", long_run)
    _wait(
        lambda: client.train_status()["segassist"]["status"] == "running",
        "the fine-tune starting",
    )
    stopped = client.train_stop()
    assert stopped["id"] == started["id"] and stopped["details"][-1]
    _wait(lambda: not client.train_status(check_if_running=True), "the training stopping")
    assert client.train_status()["status"] == "STOPPED"
    assert client.info()["train_stats"]["segmentation"]["segmenter_id"] == segmenter


def _raises(module: Any, call: Callable[[], Any]) -> str:
    with pytest.raises(module.MONAILabelClientException) as caught:
        call()
    return str(caught.value.msg)


@pytest.mark.parametrize("settings", ["auth off"], indirect=True)
def test_infer_on_a_dicom_upload_lands_on_the_series_pixels(
    live: LiveServer, tmp_path: Path
) -> None:
    """A zipped DICOM series uploaded after training: infer runs a predict job and waits; the
    NRRD's voxels sit on the DICOM pixels (positions from the series' own tags)."""
    module = client_module()
    client = module.MONAILabelClient(live.url, str(tmp_path))
    folder = tmp_path / "slicer"
    folder.mkdir()
    client.upload_image(str(save_nifti(synthetic_volume(), folder / "a.nii.gz")), "ct")
    client.save_label(
        "ct",
        str(save_nifti(slicer_label(), folder / "b.nii.gz")),
        params={"label_info": [{"name": "box", "idx": 1}]},
    )
    client.train_start("segmentation", {})
    _wait(lambda: not client.train_status(check_if_running=True), "training")
    assert client.train_status()["status"] == "DONE"

    angle = np.deg2rad(25.0)
    row = np.array([np.cos(angle), np.sin(angle), 0.0])
    column = np.array([0.0, np.cos(0.3), -np.sin(0.3)])
    pixels = np.random.default_rng(5).integers(0, 2000, (6, 14, 12)).astype(np.uint16)
    spec = SeriesSpec(
        pixels=pixels,
        orientation=(*row, *column),
        origin=(-60.5, 20.25, 11.0),
        pixel_spacing=(0.7, 0.9),
        slice_step=2.5,
    )
    archive = zip_files(write_series(spec, tmp_path / "dicom"), tmp_path / "series.zip")
    image_id = client.upload_image(str(archive), "dicom series")["image"]
    result_file, params = client.infer(
        "segmentation", image_id, {"result_extension": ".nrrd", "result_dtype": "uint8"}
    )
    assert params["prediction_job_id"]  # no stored prediction: a worker made it
    data, lps = _itk_grid(Path(result_file))
    shape = data.shape
    assert sorted(shape) == sorted(pixels.shape)

    # each NRRD voxel's LPS position, as (column, row, slice) of the series
    normal = np.cross(row, column)
    to_world = np.column_stack(
        [row * spec.pixel_spacing[1], column * spec.pixel_spacing[0], normal * spec.slice_step]
    )
    world = (lps @ _voxels(shape))[:3]
    indices = np.linalg.solve(to_world, world - np.asarray(spec.origin)[:, None])
    rounded = np.round(indices)
    np.testing.assert_allclose(indices, rounded, atol=1e-3)
    c, r, k = rounded.astype(int)
    assert (c >= 0).all() and (c < 12).all() and (r >= 0).all() and (r < 14).all()
    assert (k >= 0).all() and (k < 6).all()
    assert len(set(zip(c, r, k, strict=True))) == pixels.size  # one voxel per pixel

    # and the stored image's voxel there holds that pixel (slope 1, intercept −1024)
    stored = requests.get(f"{live.url}/datastore/image", params={"image": image_id}, timeout=30)
    volume = nib.Nifti1Image.from_bytes(gzip.decompress(stored.content))
    values = np.asarray(volume.get_fdata()).reshape(-1)
    np.testing.assert_allclose(values, pixels[k, r, c] - 1024.0)

    # a session (a volume sent for one look, not through the datastore) infers like an image
    created = client.create_session(str(save_nifti(synthetic_volume(3), folder / "s.nii.gz")))
    session_file, session_params = client.infer(
        "segmentation", "", {}, session_id=created["session_id"]
    )
    assert session_params["image"] == created["session_info"]["image"]
    assert _itk_grid(Path(session_file))[0].shape == SHAPE
