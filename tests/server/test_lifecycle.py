"""Dataset → image → label lifecycle through the REST API (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from tests.server.conftest import (
    OBLIQUE_AFFINE,
    SHAPE,
    Api,
    load_nifti,
    nifti_bytes,
    sparse_label,
    volume,
)
from tests.server.dicom_factory import SeriesSpec, write_series, zip_files


def test_uploaded_image_keeps_its_affine_and_voxels_exactly(api: Api) -> None:
    dataset = api.dataset()
    uploaded = nifti_bytes(volume())
    response = api.upload_image(dataset["id"], uploaded)
    assert response.status_code == 201, response.text
    image = response.json()
    # The header holds the affine in float32: "exactly" means bit for bit what the file says.
    expected = load_nifti(uploaded).affine
    assert np.allclose(expected, OBLIQUE_AFFINE, atol=1e-5)

    assert image["shape"] == list(SHAPE)
    assert np.array_equal(np.array(image["affine"]), expected)
    assert image["label_status"] == "unlabelled"
    assert api.client.get(f"/api/v1/datasets/{dataset['id']}").json()["image_count"] == 1
    listed = api.client.get(f"/api/v1/datasets/{dataset['id']}/images").json()
    assert [i["id"] for i in listed] == [image["id"]]

    download = api.client.get(f"/api/v1/images/{image['id']}/file")
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == image["sha256"]
    stored = load_nifti(download.content)
    assert np.array_equal(stored.affine, expected)
    assert np.array_equal(np.asanyarray(stored.dataobj), volume())


def test_uncompressed_nifti_is_accepted(api: Api) -> None:
    dataset = api.dataset()
    response = api.upload_image(dataset["id"], nifti_bytes(volume(), compress=False), "a.nii")
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "a"


def test_every_label_version_is_kept_and_one_is_final(api: Api) -> None:
    image = api.image(api.dataset()["id"])
    first = api.upload_label(image["id"], nifti_bytes(sparse_label((1,))))
    assert first.status_code == 201, first.text
    assert first.json()["version"] == 1
    assert first.json()["classes_present"] == [0, 1]
    assert first.json()["annotated_slices"]["2"] == [1, 4]

    second = api.upload_label(image["id"], nifti_bytes(sparse_label((1, 2))))
    draft = api.upload_label(image["id"], nifti_bytes(sparse_label((2,))), tag="draft")
    assert (second.status_code, draft.status_code) == (201, 201)

    versions = api.client.get(f"/api/v1/images/{image['id']}/labels").json()
    assert [(v["version"], v["tag"]) for v in versions] == [
        (3, "draft"),
        (2, "final"),
        (1, "previous"),
    ]
    described = api.client.get(f"/api/v1/images/{image['id']}").json()
    assert described["label_status"] == "labelled"
    assert described["final_label_id"] == second.json()["id"]
    assert described["label_versions"] == 3

    old = api.client.get(f"/api/v1/labels/{first.json()['id']}/file")
    assert old.status_code == 200
    stored = load_nifti(old.content)
    assert np.array_equal(np.asanyarray(stored.dataobj), sparse_label((1,)))
    image_file = load_nifti(api.client.get(f"/api/v1/images/{image['id']}/file").content)
    assert np.array_equal(stored.affine, image_file.affine)


def test_zipped_dicom_series_is_stored_as_nifti(api: Api, tmp_path: Path) -> None:
    spec = SeriesSpec(
        pixels=np.arange(4 * 6 * 5, dtype=np.uint16).reshape(4, 6, 5),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        origin=(-10.0, 20.0, 30.0),
        pixel_spacing=(0.7, 0.9),
        slice_step=2.0,
    )
    archive = zip_files(write_series(spec, tmp_path / "dcm"), tmp_path / "series.zip")
    dataset = api.dataset()
    response = api.upload_image(dataset["id"], archive.read_bytes(), "series.zip")
    assert response.status_code == 201, response.text
    image = response.json()
    assert sorted(image["shape"]) == [4, 5, 6]
    stored = load_nifti(api.client.get(f"/api/v1/images/{image['id']}/file").content)
    # The affine reported is the one stored in the file's header, exactly.
    assert np.array_equal(stored.affine, np.array(image["affine"]))
