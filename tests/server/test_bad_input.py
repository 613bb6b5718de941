"""Every client mistake gets a 4xx ``{"detail": str}`` naming it, and nothing is stored."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from segassist.server.settings import Settings
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
    unknown = "0123456789abcdef" * 2  # well-formed, never handed out
    content = nifti_bytes(volume())
    answers = [
        api.upload_image(unknown, content),
        api.upload_label(unknown, nifti_bytes(sparse_label())),
        api.client.get(f"/api/v1/datasets/{unknown}"),
        api.client.get(f"/api/v1/images/{unknown}/file"),
        api.client.get(f"/api/v1/labels/{unknown}/file"),
        api.client.get(f"/api/v1/jobs/{unknown}"),
        api.client.post(f"/api/v1/jobs/{unknown}/cancel"),
        api.client.get(f"/api/v1/models/{unknown}"),
        api.client.post(f"/api/v1/models/{unknown}/predict", json={"image_id": unknown}),
        api.client.get(f"/api/v1/predictions/{unknown}/{unknown}/labels.nii.gz"),
    ]
    for response in answers:
        assert response.status_code == 404, response.request.url
        assert unknown in response.json()["detail"]


_BAD_IDS = ["%2E%2E", "no-such-dataset", "0123456789ABCDEF" * 2, "0" * 33, "0" * 31 + "g"]
"""Not 32 lowercase hex digits: ``..`` (percent-encoded, so the client sends it as is), a name,
upper case, too long, not hex."""


@pytest.mark.parametrize("bad", _BAD_IDS)
def test_malformed_ids_in_paths_and_queries_are_422_naming_the_parameter(
    api: Api, bad: str
) -> None:
    good = api.dataset()["id"]
    label = nifti_bytes(sparse_label())
    answers = {
        "dataset_id": [
            api.client.get(f"/api/v1/datasets/{bad}"),
            api.client.get(f"/api/v1/datasets/{bad}/images"),
            api.upload_image(bad, nifti_bytes(volume())),
            api.client.get("/api/v1/jobs", params={"dataset_id": bad}),
            api.client.get("/api/v1/models", params={"dataset_id": bad}),
            api.client.get(f"/api/v1/datasets/{bad}/assist"),
            api.client.post(f"/api/v1/datasets/{bad}/assist", json={}),
        ],
        "image_id": [
            api.client.get(f"/api/v1/images/{bad}"),
            api.client.get(f"/api/v1/images/{bad}/file"),
            api.client.get(f"/api/v1/images/{bad}/labels"),
            api.upload_label(bad, label),
            api.client.get(f"/api/v1/predictions/{good}/{bad}/labels.nii.gz"),
        ],
        "label_id": [api.client.get(f"/api/v1/labels/{bad}/file")],
        "job_id": [
            api.client.get(f"/api/v1/jobs/{bad}"),
            api.client.post(f"/api/v1/jobs/{bad}/cancel"),
            api.client.get(f"/api/v1/jobs/{bad}/logs"),
        ],
        "model_id": [
            api.client.get(f"/api/v1/models/{bad}"),
            api.client.post(f"/api/v1/models/{bad}/predict", json={"image_id": good}),
            api.client.get(f"/api/v1/predictions/{bad}/{good}/labels.nii.gz"),
        ],
    }
    for name, responses in answers.items():
        for response in responses:
            assert response.status_code == 422, (response.request.url, response.text)
            assert f".{name}: String should match pattern" in response.json()["detail"]


def test_malformed_ids_in_bodies_are_422_naming_the_field(api: Api) -> None:
    dataset = api.dataset()
    image = api.image(dataset["id"])
    answers = {
        "body.dataset_id": api.client.post(
            "/api/v1/jobs",
            json={"kind": "pretrain", "dataset_id": "..", "params": {"objective": "pix2rep"}},
        ),
        "params.image_ids.1": api.client.post(
            "/api/v1/jobs",
            json={
                "kind": "pretrain",
                "dataset_id": dataset["id"],
                "params": {"objective": "pix2rep", "image_ids": [image["id"], "../x"]},
            },
        ),
        "body.image_id": api.client.post(
            f"/api/v1/models/{dataset['id']}/predict", json={"image_id": "../../etc"}
        ),
    }
    for location, response in answers.items():
        assert response.status_code == 422, response.text
        assert f"{location}: String should match pattern" in response.json()["detail"]


def test_prediction_paths_cannot_climb_out_of_the_data_directory(
    api: Api, settings: Settings
) -> None:
    """``predictions/../../labels.nii.gz`` would be the data directory's parent folder."""
    outside = settings.data_dir.parent / "labels.nii.gz"
    outside.write_bytes(b"not for download")
    answer = api.client.get("/api/v1/predictions/%2E%2E/%2E%2E/labels.nii.gz")
    assert answer.status_code == 422, answer.text
    assert b"not for download" not in answer.content
    for url in ("/api/v1/predictions/x/../y/labels.nii.gz", "/api/v1/images/..%2F.."):
        assert api.client.get(url).status_code in (404, 422)


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
