"""Every client mistake gets a 4xx ``{"detail": str}`` naming it, and nothing is stored."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from server.settings import Settings
from tests.server.conftest import MAX_UPLOAD_BYTES, Api, nifti_bytes, sparse_label, volume


def _stored_files(data_dir: Path) -> list[str]:
    """Files a failed upload must not leave behind (images, labels, temporary uploads)."""
    return sorted(
        str(p.relative_to(data_dir))
        for sub in ("images", "labels", "uploads")
        for p in (data_dir / sub).rglob("*")
        if p.is_file()
    )


@pytest.mark.parametrize(
    ("content", "status", "needle"),
    [
        (b"this is not a medical volume" * 20, 422, ""),
        (nifti_bytes(volume())[:200], 422, ""),
        (gzip.compress(b"\0" * 400), 422, ""),
        (os.urandom(MAX_UPLOAD_BYTES + 1), 413, "limit"),
        (b"PK\x03\x04 broken zip", 422, ""),
    ],
    ids=["not-a-volume", "corrupt-gzip", "gzip-not-nifti", "oversized", "corrupt-zip"],
)
def test_bad_image_uploads_are_refused_and_leave_nothing(
    api: Api, settings: Settings, content: bytes, status: int, needle: str
) -> None:
    dataset = api.dataset()
    response = api.upload_image(dataset["id"], content)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    assert needle in detail
    assert _stored_files(settings.data_dir) == []
    assert api.client.get(f"/api/v1/datasets/{dataset['id']}").json()["image_count"] == 0


@pytest.mark.parametrize(
    ("label", "needle"),
    [
        (np.zeros((4, 4, 4), dtype=np.uint8), "shape"),
        (np.where(sparse_label() == 2, 7, sparse_label()).astype(np.uint8), "7"),
    ],
    ids=["wrong-shape", "value-outside-schema"],
)
def test_bad_labels_are_refused_and_leave_nothing(
    api: Api, settings: Settings, label: np.ndarray, needle: str
) -> None:
    image = api.image(api.dataset()["id"])
    before = _stored_files(settings.data_dir)
    response = api.upload_label(image["id"], nifti_bytes(label))
    assert response.status_code == 422, response.text
    assert needle in response.json()["detail"]
    assert _stored_files(settings.data_dir) == before
    assert api.client.get(f"/api/v1/images/{image['id']}/labels").json() == []


def test_unknown_ids_are_404_naming_the_id(api: Api) -> None:
    content = nifti_bytes(volume())
    answers = [
        api.upload_image("no-such-dataset", content),
        api.upload_label("no-such-image", nifti_bytes(sparse_label())),
        api.client.get("/api/v1/datasets/no-such-dataset"),
        api.client.get("/api/v1/images/no-such-image/file"),
        api.client.get("/api/v1/labels/no-such-label/file"),
        api.client.get("/api/v1/jobs/no-such-job"),
        api.client.post("/api/v1/jobs/no-such-job/cancel"),
        api.client.get("/api/v1/models/no-such-model"),
        api.client.post("/api/v1/models/no-such-model/predict", json={"image_id": "x"}),
        api.client.get("/api/v1/predictions/no-such-model/x/labels.nii.gz"),
    ]
    for response in answers:
        assert response.status_code == 404, response.request.url
        assert "no-such-" in response.json()["detail"]


def test_malformed_requests_are_422_with_a_message(api: Api) -> None:
    dataset = api.dataset()
    not_multipart = api.client.post(
        f"/api/v1/datasets/{dataset['id']}/images", content=b"raw", headers={"content-type": "x/y"}
    )
    no_file = api.client.post(f"/api/v1/datasets/{dataset['id']}/images", data={"name": "a"})
    bad_schema = api.client.post(
        "/api/v1/datasets", json={"name": "x", "modality": "CT", "labels": {"0": {"name": "bg"}}}
    )
    for response, needle in [
        (not_multipart, "multipart"),
        (no_file, "'file'"),
        (bad_schema, "1..254"),
    ]:
        assert response.status_code == 422, response.text
        assert needle in response.json()["detail"]
