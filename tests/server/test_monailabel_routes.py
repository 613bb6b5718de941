"""The MONAI Label routes driven by MONAI Label 0.8.5's own client (what 3D Slicer bundles).

A live server (uvicorn on a port, SQLite, the embedded broker) without a worker: everything but
model training and prediction. Training jobs are queued and never run here, which is what the
stop-training path needs; the full session with a worker is ``tests/worker/test_monailabel_session.py``.
"""

from __future__ import annotations

import gzip
import urllib.parse
from collections.abc import Iterator
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
    PAINTED,
    SHAPE,
    LiveServer,
    client_module,
    save_nifti,
    slicer_label,
    synthetic_volume,
)

TOKEN = "s3cret-token"
LABEL_INFO = {"label_info": [{"name": "blob", "idx": 1}], "model": "segmentation"}


def _settings(data_dir: Path, **extra: Any) -> Settings:
    return Settings(**{"data_dir": data_dir, "device": "cpu", "api_token": "", **extra})


@pytest.fixture
def server(data_dir: Path) -> Iterator[LiveServer]:
    with LiveServer(_settings(data_dir)) as live:
        yield live


@pytest.fixture
def volume_files(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "slicer-tmp"  # Slicer sends absolute temporary paths as file names
    folder.mkdir()
    return {
        "image": save_nifti(synthetic_volume(), folder / "tmpa1b2c3.nii.gz"),
        "label": save_nifti(slicer_label(), folder / "tmpd4e5f6.nii.gz"),
    }


def _error(call: Any, *args: Any, **kwargs: Any) -> str:
    """The message of the MONAILabelClientException ``call`` raises."""
    exception = client_module().MONAILabelClientException
    with pytest.raises(exception) as caught:
        call(*args, **kwargs)
    return str(caught.value.msg)


def _status(message: str) -> int:
    return int(message.split(";")[0].removeprefix("Status: "))


def test_info_is_what_slicer_and_ohif_read(server: LiveServer) -> None:
    client = client_module().MONAILabelClient(server.url, client_id="user-xyz")
    assert client.auth_enabled() is False  # GET /auth/ is a 404 with authentication off
    info = client.info()
    assert "config" not in info  # a top-level config makes Slicer ask for a server upgrade
    assert info["labels"] == []  # a list: OHIF appends to it
    assert set(info["models"]) == {"segmentation", "clusters"}
    for model in info["models"].values():
        assert model["type"] == "segmentation" and model["description"]
        assert model["dimension"] == 3 and isinstance(model["labels"], list)
    assert info["models"]["clusters"]["labels"][0] == "cluster 1"
    trainer = info["trainers"]["segmentation"]["config"]
    assert trainer["method"][0] == "linear"  # a list is a drop-down, its first item the default
    assert not any(isinstance(v, dict) for v in trainer.values())  # flat
    assert set(info["strategies"]) == {"random", "first", "uncertainty"}
    assert info["datastore"] == {"total": 0, "completed": 0, "label_tags": {}}
    stats = info["train_stats"]["segmentation"]
    assert isinstance(stats["best_metric"], float) and stats["total_epochs"] > 0
    # nothing was created by reading
    assert requests.get(f"{server.url}/api/v1/datasets", timeout=10).json() == []


def test_upload_then_label_painted_in_a_viewer_becomes_sparse(
    server: LiveServer, volume_files: dict[str, Path]
) -> None:
    client = client_module().MONAILabelClient(server.url, client_id="user-xyz")
    uploaded = client.upload_image(str(volume_files["image"]), "CT chest")
    # Slicer then refers to the image by its own name ("CT chest"), never by our id
    saved = client.save_label("CT chest", str(volume_files["label"]), params=LABEL_INFO)
    assert saved["image"] == uploaded["image"] and saved["axis"] == 2
    assert saved["annotated_slices"] == list(PAINTED)
    assert saved["label_names"] == {"blob": 1}

    stored = nib.load(client.download_label("CT chest", "final"))
    assert isinstance(stored, nib.Nifti1Image)
    label = np.asarray(stored.dataobj)
    unpainted = [z for z in range(SHAPE[2]) if z not in PAINTED]
    assert (label[..., unpainted] == 255).all()  # unpainted slices: unannotated
    np.testing.assert_array_equal(label[..., list(PAINTED)], slicer_label()[..., list(PAINTED)])
    np.testing.assert_allclose(stored.affine, AFFINE, atol=1e-5)

    info = client.info()
    assert info["labels"] == ["blob"]
    assert info["models"]["segmentation"]["labels"] == ["blob"]
    assert info["datastore"]["completed"] == 1 and info["datastore"]["total"] == 1
    objects = client.datastore()["objects"]
    assert objects[uploaded["image"]]["labels"]["final"]["info"]["params"]["label_names"] == {
        "blob": 1
    }
    # the same bytes under the same name are the same image
    assert client.upload_image(str(volume_files["image"]), "CT chest") == uploaded
    # everything is labelled: no next sample
    assert client.next_sample("first", {}) == {}


def test_next_sample_hands_out_unlabelled_images_by_id(
    server: LiveServer, volume_files: dict[str, Path], tmp_path: Path
) -> None:
    client = client_module().MONAILabelClient(server.url, client_id="user-xyz")
    first = client.upload_image(str(volume_files["image"]), "first")["image"]
    other = save_nifti(synthetic_volume(seed=1), tmp_path / "other.nii.gz")
    second = client.upload_image(str(other), "second")["image"]
    client.save_label(first, str(volume_files["label"]), params=LABEL_INFO)

    for strategy in ("first", "random", "uncertainty"):
        sample = client.next_sample(strategy, {})
        assert sample["id"] == second, strategy
        # Slicer's loader takes the file type from the name, and caches by it: unique names
        assert sample["name"] == f"second_{second[:8]}.nii.gz"
        assert sample["checksum"].startswith("SHA256:")
    # Slicer's sample-data loader downloads by id, without a header
    download = requests.get(
        f"{server.url}/datastore/image?image={urllib.parse.quote_plus(second)}", timeout=30
    )
    assert download.status_code == 200
    image = nib.Nifti1Image.from_bytes(gzip.decompress(download.content))
    np.testing.assert_allclose(np.asarray(image.dataobj), synthetic_volume(seed=1), rtol=1e-6)


def test_bad_inputs_answer_4xx_with_a_message(
    server: LiveServer, volume_files: dict[str, Path], tmp_path: Path
) -> None:
    client = client_module().MONAILabelClient(server.url, client_id="user-xyz")
    # nothing to train on yet
    message = _error(client.train_start, "segmentation", {})
    assert _status(message) == 409 and "upload a volume" in message
    image = client.upload_image(str(volume_files["image"]), "ct")["image"]

    message = _error(client.infer, "segmentation", image, {})
    assert _status(message) == 409 and "train first" in message
    message = _error(client.infer, "deepedit", image, {})
    assert _status(message) == 404 and "unknown model 'deepedit'" in message
    message = _error(client.infer, "segmentation", "no-such-image", {})
    assert _status(message) == 404 and "'no-such-image' not found" in message
    message = _error(client.next_sample, "entropy", {})
    assert _status(message) == 404 and "unknown strategy 'entropy'" in message
    message = _error(client.train_start, "deepgrow", {})
    assert _status(message) == 404 and "unknown trainer 'deepgrow'" in message
    message = _error(client.train_start, "segmentation", {})
    assert _status(message) == 409 and "no labels yet" in message

    shifted = AFFINE.copy()
    shifted[:3, 3] += 5.0
    moved = save_nifti(slicer_label(), tmp_path / "moved.nii.gz", shifted)
    message = _error(client.save_label, image, str(moved), params=LABEL_INFO)
    assert "Status: 422" in message and "label affine differs" in message
    small = save_nifti(np.zeros((8, 8, 6), np.uint8), tmp_path / "small.nii.gz")
    message = _error(client.save_label, image, str(small), params=LABEL_INFO)
    assert "Status: 422" in message and "not on the grid" in message
    message = _error(client.save_label, "nobody", str(volume_files["label"]), params=LABEL_INFO)
    assert "Status: 404" in message
    bad_info = {"label_info": [{"name": "blob", "idx": 300}]}
    message = _error(client.save_label, image, str(volume_files["label"]), params=bad_info)
    assert "Status: 422" in message and "idx" in message

    # idle training: check-if-running is False (a 404), status 404, stop answers null
    assert client.train_status(check_if_running=True) is False
    message = _error(client.train_status)
    assert _status(message) == 404
    assert client.train_stop() is None


def test_stop_training_cancels_it_and_reports_details(
    server: LiveServer, volume_files: dict[str, Path]
) -> None:
    client = client_module().MONAILabelClient(server.url, client_id="user-xyz")
    client.upload_image(str(volume_files["image"]), "ct")
    client.save_label("ct", str(volume_files["label"]), params=LABEL_INFO)
    started = client.train_start("segmentation", {"method": "linear", "client_id": "user-xyz"})
    # no worker here: the job waits in the queue, which both plugins must see as running
    assert started["status"] == "RUNNING" and started["start_ts"]
    assert client.train_status(check_if_running=True) is True
    message = _error(client.train_start, "segmentation", {})
    assert _status(message) == 409 and "already" in message

    stopped = client.train_stop()
    assert stopped["id"] == started["id"] and stopped["status"] == "STOPPED"
    assert stopped["end_ts"] and stopped["details"][-1]  # Slicer reads details[-1]
    assert client.train_status(check_if_running=True) is False
    assert client.train_status()["status"] == "STOPPED"


def test_every_dataset_is_an_app_at_its_own_url(
    server: LiveServer, volume_files: dict[str, Path]
) -> None:
    module = client_module()
    created = requests.post(
        f"{server.url}/api/v1/datasets",
        json={"name": "liver", "modality": "CT", "labels": {"1": {"name": "liver"}}},
        timeout=10,
    ).json()
    # the client joins its selectors onto the URL's path: the prefix must survive
    client = module.MONAILabelClient(f"{server.url}/monailabel/{created['id']}/")
    assert client.info()["labels"] == ["liver"]
    image = client.upload_image(str(volume_files["image"]), "ct")["image"]
    listed = requests.get(f"{server.url}/api/v1/datasets/{created['id']}/images", timeout=10)
    assert [i["id"] for i in listed.json()] == [image]
    assert client.datastore()["objects"].keys() == {image}
    root = module.MONAILabelClient(server.url)
    assert root.datastore()["objects"] == {}  # the root app is another dataset

    missing = module.MONAILabelClient(f"{server.url}/monailabel/{'0' * 32}")
    assert _status(_error(missing.info)) == 404


def test_a_dicom_upload_gives_the_default_dataset_its_modality(
    data_dir: Path, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    spec = SeriesSpec(
        pixels=rng.integers(0, 2000, (5, 12, 10)).astype(np.uint16),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        origin=(-20.0, 10.0, 5.0),
        pixel_spacing=(0.9, 0.8),
        slice_step=2.5,
    )
    archive = zip_files(write_series(spec, tmp_path / "dicom"), tmp_path / "series.zip")
    with LiveServer(_settings(data_dir, monailabel_modality="MR")) as live:
        client = client_module().MONAILabelClient(live.url)
        client.upload_image(str(archive), "series")
        datasets = requests.get(f"{live.url}/api/v1/datasets", timeout=10).json()
    assert [(d["name"], d["modality"]) for d in datasets] == [("monailabel", "CT")]


def test_sessions_live_until_removed(server: LiveServer, volume_files: dict[str, Path]) -> None:
    client = client_module().MONAILabelClient(server.url, client_id="user-xyz")
    created = client.create_session(str(volume_files["image"]))
    session_id = created["session_id"]
    assert created["session_info"]["image"]
    assert client.get_session(session_id)["session_id"] == session_id
    assert client.remove_session(session_id)["session_id"] == session_id
    assert _status(_error(client.get_session, session_id)) == 404


def test_with_a_token_every_route_but_the_login_needs_it(
    data_dir: Path, volume_files: dict[str, Path]
) -> None:
    module = client_module()
    settings = _settings(
        data_dir, api_token=TOKEN, monailabel_username="annotator", monailabel_password="pw"
    )
    with LiveServer(settings) as live:
        client = module.MONAILabelClient(live.url, client_id="annotator")
        assert client.auth_enabled() is True
        assert _status(_error(client.info)) == 401
        assert _status(_error(client.auth_token, "annotator", "wrong")) == 401
        token = client.auth_token("annotator", "pw")
        assert token["access_token"] == TOKEN
        client.update_auth(token)
        assert client.auth_valid_token() is True
        image = client.upload_image(str(volume_files["image"]), "ct")["image"]
        assert client.info()["datastore"]["total"] == 1
        # the API token itself also logs in (any user name)
        assert module.MONAILabelClient(live.url).auth_token("someone", TOKEN)["access_token"]

        # Slicer's loader sends no header: an image id is enough, a name is not
        by_id = requests.get(f"{live.url}/datastore/image", params={"image": image}, timeout=30)
        assert by_id.status_code == 200
        by_name = requests.get(f"{live.url}/datastore/image", params={"image": "ct"}, timeout=30)
        assert by_name.status_code == 401
        listing = requests.get(f"{live.url}/datastore/?output=all", timeout=30)
        assert listing.status_code == 401
        headers = {"Authorization": f"Bearer {TOKEN}"}
        assert requests.get(f"{live.url}/api/v1/datasets", headers=headers, timeout=10).ok


def test_cors_allows_the_configured_viewer_origin(data_dir: Path) -> None:
    origin = "https://viewer.example.org"
    with LiveServer(_settings(data_dir, cors_origins=f"{origin}, http://other")) as live:
        preflight = requests.options(
            f"{live.url}/info/",
            headers={"Origin": origin, "Access-Control-Request-Method": "GET"},
            timeout=10,
        )
        assert preflight.headers.get("access-control-allow-origin") == origin
        foreign = requests.get(
            f"{live.url}/info/", headers={"Origin": "https://evil.example"}, timeout=10
        )
        assert "access-control-allow-origin" not in foreign.headers


def test_without_cors_origins_no_cors_headers(server: LiveServer) -> None:
    answer = requests.get(
        f"{server.url}/info/", headers={"Origin": "https://viewer.example.org"}, timeout=10
    )
    assert answer.ok and "access-control-allow-origin" not in answer.headers


def test_label_params_mark_an_all_background_slice(
    server: LiveServer, volume_files: dict[str, Path]
) -> None:
    client = client_module().MONAILabelClient(server.url)
    client.upload_image(str(volume_files["image"]), "ct")
    params = {**LABEL_INFO, "annotated_slices": [0, *PAINTED]}
    saved = client.save_label("ct", str(volume_files["label"]), params=params)
    assert saved["annotated_slices"] == [0, *PAINTED]
    label = np.asarray(nib.load(client.download_label("ct", "final")).dataobj)
    assert (label[..., 0] == 0).all() and (label[..., 2] == 255).all()


def test_nrrd_volumes_from_slicer_are_stored_on_their_world_grid(
    server: LiveServer, tmp_path: Path
) -> None:
    """Slicer's ``.nrrd`` file-extension setting: image and label arrive as NRRD (written by
    ITK here, as Slicer does) and are stored as NIfTI on the same world grid."""
    import itk

    angle = np.deg2rad(20.0)
    direction = np.array(
        [[np.cos(angle), 0.0, np.sin(angle)], [0.0, 1.0, 0.0], [-np.sin(angle), 0.0, np.cos(angle)]]
    )
    spacing, origin = [0.9, 1.1, 3.0], [12.0, -30.5, 44.0]

    def write(data: np.ndarray, name: str) -> Path:
        image = itk.image_from_array(np.ascontiguousarray(data.transpose(2, 1, 0)))
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(itk.matrix_from_array(direction))
        path = tmp_path / name
        itk.imwrite(image, str(path))
        return path

    client = client_module().MONAILabelClient(server.url)
    volume = synthetic_volume().astype(np.int16)
    image_id = client.upload_image(str(write(volume, "tmp1.nrrd")), "nrrd volume")["image"]
    saved = client.save_label(image_id, str(write(slicer_label(), "tmp2.nrrd")), params=LABEL_INFO)
    assert saved["annotated_slices"] == list(PAINTED)

    stored = requests.get(f"{server.url}/datastore/image", params={"image": image_id}, timeout=30)
    nifti = nib.Nifti1Image.from_bytes(gzip.decompress(stored.content))
    np.testing.assert_array_equal(np.asarray(nifti.dataobj), volume)
    lps_of_corner = origin + direction @ (np.asarray(spacing) * np.array([23, 19, 5]))
    ras = nifti.affine @ np.array([23, 19, 5, 1.0])
    np.testing.assert_allclose([-ras[0], -ras[1], ras[2]], lps_of_corner, atol=1e-4)
