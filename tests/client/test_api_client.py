"""SegAssistClient against a real embedded service (API + Celery worker in a subprocess)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from segassist.client.api import JobFailedError, SegAssistAPIError, SegAssistClient, job_status
from segassist.client.local import ensure_local_service
from tests.client.conftest import (
    OBLIQUE_AFFINE,
    TINY_FIT,
    TINY_PRETRAIN,
    Service,
    Volume,
    load_nifti,
)


@pytest.fixture
def api(service: Service) -> Any:
    with SegAssistClient(service.url, timeout=120) as client:
        yield client


@pytest.fixture
def dataset(api: SegAssistClient) -> dict[str, Any]:
    return api.create_dataset("client test", "CT", {1: "bright", 2: "dark"})


def test_health_is_ok_and_a_running_service_is_reused(service: Service) -> None:
    with SegAssistClient(service.url) as api:
        assert api.health()["status"] == "ok"
    host, port = service.url.removeprefix("http://").split(":")
    url, started = ensure_local_service(host, int(port), service.data_dir)
    assert (url, started) == (service.url, False)


def test_uploaded_volume_comes_back_identical(
    api: SegAssistClient, dataset: dict[str, Any], volume: Volume, tmp_path: Path
) -> None:
    image = api.upload_image(dataset["id"], volume.image, name="synthetic")
    assert image["shape"] == list(volume.reference.shape)
    np.testing.assert_allclose(image["affine"], OBLIQUE_AFFINE, atol=1e-6)
    assert [i["id"] for i in api.list_images(dataset["id"])] == [image["id"]]
    assert api.get_dataset(dataset["id"])["image_count"] == 1

    umask = os.umask(0o027)  # a download gets the mode open() gives, not mkstemp's 0o600
    try:
        copy = api.download_image(image["id"], tmp_path / "copy.nii.gz")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(copy.stat().st_mode) == 0o640
    assert hashlib.sha256(copy.read_bytes()).hexdigest() == image["sha256"]
    back = load_nifti(copy)
    np.testing.assert_allclose(back.affine, OBLIQUE_AFFINE, atol=1e-6)
    original = np.asanyarray(load_nifti(volume.image).dataobj)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), original)


def test_label_versions_are_kept_newest_first(
    api: SegAssistClient, dataset: dict[str, Any], volume: Volume, tmp_path: Path
) -> None:
    image = api.upload_image(dataset["id"], volume.image)
    first = api.upload_label(image["id"], volume.sparse)
    second = api.upload_label(image["id"], volume.sparse, tag="final")
    assert first["annotated_slices"]["2"] == list(volume.labelled)
    assert {1, 2} <= set(first["classes_present"]) and 255 not in first["classes_present"]
    versions = [label["version"] for label in api.list_labels(image["id"])]
    assert versions == sorted(versions, reverse=True) and len(versions) == 2
    assert second["version"] > first["version"]
    saved = api.download_label(second["id"], tmp_path / "label.nii.gz")
    expected = np.asanyarray(load_nifti(volume.sparse).dataobj)
    np.testing.assert_array_equal(np.asanyarray(load_nifti(saved).dataobj), expected)


def test_client_mistakes_raise_with_the_servers_message(
    api: SegAssistClient, dataset: dict[str, Any], tmp_path: Path
) -> None:
    with pytest.raises(SegAssistAPIError) as missing:
        api.get_image("0" * 32)
    assert missing.value.status_code == 404
    assert missing.value.detail

    not_a_volume = tmp_path / "notes.nii.gz"
    not_a_volume.write_text("this is not a NIfTI file")
    with pytest.raises(SegAssistAPIError) as bad:
        api.upload_image(dataset["id"], not_a_volume)
    assert 400 <= bad.value.status_code < 500
    assert bad.value.detail and "Internal Server Error" not in bad.value.detail
    assert api.list_images(dataset["id"]) == []  # nothing stored half-way

    with pytest.raises(SegAssistAPIError) as bad_schema:
        api.create_job("pretrain", dataset["id"], {"objective": "no-such-objective"})
    assert bad_schema.value.status_code == 422
    assert "objective" in bad_schema.value.detail


def test_pretrain_finetune_predict_and_download(
    api: SegAssistClient, dataset: dict[str, Any], volume: Volume, tmp_path: Path
) -> None:
    image = api.upload_image(dataset["id"], volume.image)
    label = api.upload_label(image["id"], volume.sparse)

    updates: list[dict[str, Any]] = []
    job = api.create_job(
        "pretrain", dataset["id"], {"objective": "pix2rep", "steps": 3, "config": TINY_PRETRAIN}
    )
    done = api.wait_for_job(job["id"], updates.append, poll_interval=0.1, timeout=600)
    assert job_status(done) == "succeeded"
    assert job_status(updates[-1]) == "succeeded"
    steps = [u["progress"]["step"] for u in updates if u["progress"].get("step") is not None]
    assert steps == sorted(steps), "progress went backwards"
    encoder_id = done["result"]["encoder_id"]
    assert encoder_id in [m["id"] for m in api.list_models(kind="encoder")]
    assert api.get_model(encoder_id)["objective"] == "pix2rep"
    assert api.job_logs(job["id"]).strip(), "the finished job has an empty log"
    assert job["id"] in [j["id"] for j in api.list_jobs(dataset_id=dataset["id"])]

    fit = api.create_job(
        "finetune",
        dataset["id"],
        {
            "encoder_id": encoder_id,
            "method": "linear",
            "label_ids": [label["id"]],
            "config": TINY_FIT,
        },
    )
    segmenter_id = api.wait_for_job(fit["id"], timeout=600)["result"]["segmenter_id"]

    answer = api.predict(segmenter_id, image["id"])
    assert answer["kind"] == "predict"
    assert set(answer["result"]["predictions"]) == {image["id"]}
    out = api.download_prediction(segmenter_id, image["id"], "labels.nii.gz", tmp_path / "l.nii.gz")
    labels = load_nifti(out)
    np.testing.assert_allclose(labels.affine, OBLIQUE_AFFINE, atol=1e-6)
    assert labels.shape == volume.reference.shape
    assert set(np.unique(np.asanyarray(labels.dataobj))) <= {0, 1, 2}
    png = api.download_prediction(segmenter_id, image["id"], "clusters.png", tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.part")), "a temporary download file was left behind"


def test_cancelled_job_stops_and_wait_reports_it(
    api: SegAssistClient, dataset: dict[str, Any], volume: Volume
) -> None:
    api.upload_image(dataset["id"], volume.image)
    job = api.create_job(
        "pretrain",
        dataset["id"],
        {"objective": "pix2rep", "steps": 100_000, "config": TINY_PRETRAIN},
    )
    cancelled = api.cancel_job(job["id"])
    assert cancelled["id"] == job["id"]
    with pytest.raises(JobFailedError) as failed:
        api.wait_for_job(job["id"], poll_interval=0.2, timeout=300)
    assert job_status(failed.value.job) == "cancelled"
    assert job["id"] in [j["id"] for j in api.list_jobs(status="cancelled")]
