"""DICOMweb datasets against a real Orthanc, and DICOM-SEG of DICOM-sourced label volumes.

The series is TotalSegmentator's real CT test series (20 slices of 512×512, JPEG 2000), stored in
a throw-away Orthanc; TotalSegmentator's own segmentation of it (made on dcm2niix's grid) is the
reference for geometry and for the labels.
"""

from __future__ import annotations

import gzip
import io
import logging
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from segassist.server.db.session import session_factory
from segassist.server.db.tables import Dataset, Image
from segassist.server.dicom_headers import headers_path, read_headers
from segassist.server.dicom_seg import SegmentClass, build_segmentation, labels_from_segmentation
from segassist.server.dicomweb import DicomwebError
from segassist.server.dicomweb_images import fetch_image
from segassist.server.settings import Settings
from segassist.server.storage import Storage
from tests.conftest import TOTALSEG_DICOM, TOTALSEG_LIVER, TOTALSEG_SEG
from tests.dicom_checks import assert_same_world_labels
from tests.orthanc import USER, Orthanc, archive_ready, orthanc_fixture  # noqa: F401
from tests.server.conftest import Api
from tests.server.dicom_factory import zip_files

SCHEMA = {"1": {"name": "liver", "color": "#e6194b"}, "2": {"name": "spleen", "color": "#3cb44b"}}
TOTALSEG_SPLEEN = 1


@pytest.fixture
def settings(data_dir: Path, database_url: str) -> Settings:
    """The server tests' settings with room for a real CT series upload."""
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        broker_url="filesystem://",
        max_upload_bytes=64 * 1024**2,
        device="cpu",
        api_token="",
    )


@pytest.fixture
def stored_series(orthanc: Orthanc, totalseg: Path) -> str:
    """The CT series stored in Orthanc; its SeriesInstanceUID."""
    datasets = archive_ready([totalseg / member for member in TOTALSEG_DICOM])
    orthanc.store(datasets)
    return str(datasets[0].SeriesInstanceUID)


def _dicomweb_dataset(api: Api, orthanc: Orthanc, password: str = USER[1]) -> dict:
    body = {
        "name": "pacs",
        "modality": "CT",
        "labels": SCHEMA,
        "dicomweb": {"url": orthanc.dicomweb, "username": USER[0], "password": password},
    }
    return dict(api.client.post("/api/v1/datasets", json=body).json())


def _reference_labels(totalseg: Path) -> np.ndarray:
    """TotalSegmentator's liver and spleen as classes 1 and 2 (on the dcm2niix grid)."""
    reference = np.asarray(nib.load(totalseg / TOTALSEG_SEG).dataobj)
    labels = np.zeros(reference.shape, dtype=np.uint8)
    labels[reference == TOTALSEG_LIVER] = 1
    labels[reference == TOTALSEG_SPLEEN] = 2
    return labels


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_series_are_listed_and_fetched_once_on_the_dicom_grid(
    client: TestClient,
    api: Api,
    orthanc: Orthanc,
    stored_series: str,
    totalseg: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    dataset = _dicomweb_dataset(api, orthanc)
    assert dataset["dicomweb"] == {"url": orthanc.dicomweb, "username": USER[0]}

    series = client.get(f"/api/v1/datasets/{dataset['id']}/series")
    assert series.status_code == 200, series.text
    (listed,) = series.json()
    assert listed["series_uid"] == stored_series
    assert listed["modality"] == "CT" and listed["instances"] == 20
    assert listed["image_id"] is None

    fetched = client.post(f"/api/v1/datasets/{dataset['id']}/series/{stored_series}")
    assert fetched.status_code == 201, fetched.text
    image = fetched.json()
    assert image["source"] == "dicomweb" and image["series_uid"] == stored_series
    # Same rules as a DICOM upload: TotalSegmentator's dcm2niix grid, voxel for voxel.
    reference = nib.load(totalseg / TOTALSEG_SEG)
    assert tuple(image["shape"]) == reference.shape == (512, 512, 20)
    np.testing.assert_allclose(image["affine"], reference.affine, atol=1e-4)
    stored = client.get(f"/api/v1/images/{image['id']}/file")
    volume = np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(stored.content)).dataobj)
    liver = volume[np.asanyarray(reference.dataobj) == TOTALSEG_LIVER]
    assert 50 < liver.mean() < 150 and liver.std() < 40  # enhanced parenchyma: order is right

    again = client.post(f"/api/v1/datasets/{dataset['id']}/series/{stored_series}")
    assert again.status_code == 200 and again.json()["id"] == image["id"]
    assert (
        client.get(f"/api/v1/datasets/{dataset['id']}/series").json()[0]["image_id"]
        == (image["id"])
    )
    listing = (
        client.get("/api/v1/datasets").text + client.get(f"/api/v1/datasets/{dataset['id']}").text
    )
    assert USER[1] not in listing
    assert USER[1] not in caplog.text and caplog.text  # logged, never the password


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_orthanc_stopped_mid_fetch_stores_nothing(
    client: TestClient,
    api: Api,
    settings: Settings,
    orthanc: Orthanc,
    stored_series: str,
) -> None:
    dataset_id = _dicomweb_dataset(api, orthanc)["id"]
    seen: list[int] = []

    def stop_after_five(done: int, total: int) -> None:
        seen.append(done)
        if done == 5:
            orthanc.stop()

    with session_factory(settings)() as session:
        dataset = session.get(Dataset, dataset_id)
        assert dataset is not None
        with pytest.raises(DicomwebError) as failure:
            fetch_image(
                session, Storage(settings.data_dir), dataset, stored_series, stop_after_five
            )
        assert session.scalar(select(func.count(Image.id))) == 0
    assert seen == [1, 2, 3, 4, 5]
    assert failure.value.status_code == 503
    assert orthanc.dicomweb in failure.value.detail and "nothing was stored" in failure.value.detail
    images = settings.data_dir / "images"
    assert not images.exists() or not any(images.iterdir())

    # Through the API with the server down: the same error, no stack trace, nothing listed.
    answer = client.post(f"/api/v1/datasets/{dataset_id}/series/{stored_series}")
    assert answer.status_code == 503
    assert orthanc.dicomweb in answer.json()["detail"]
    assert client.get(f"/api/v1/datasets/{dataset_id}/images").json() == []


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_wrong_credentials_are_a_4xx_naming_the_server(
    client: TestClient, api: Api, settings: Settings, orthanc: Orthanc
) -> None:
    refused = client.post(
        "/api/v1/datasets",
        json={
            "name": "pacs",
            "modality": "CT",
            "dicomweb": {"url": orthanc.dicomweb, "username": USER[0], "password": "wrong"},
        },
    )
    assert refused.status_code == 424, refused.text
    detail = refused.json()["detail"]
    assert orthanc.dicomweb in detail and "credentials" in detail and "wrong" not in detail
    assert client.get("/api/v1/datasets").json() == []  # nothing created

    # Credentials in the URL are moved out of it, and never shown.
    netloc = orthanc.url.removeprefix("http://")
    inline = f"http://{USER[0]}:{USER[1]}@{netloc}/dicom-web/"
    made = client.post(
        "/api/v1/datasets", json={"name": "pacs", "modality": "CT", "dicomweb": {"url": inline}}
    )
    assert made.status_code == 201, made.text
    assert made.json()["dicomweb"] == {"url": orthanc.dicomweb, "username": USER[0]}

    # The server's password changes later: listing names the server, 4xx, no trace.
    with session_factory(settings)() as session:
        dataset = session.get(Dataset, made.json()["id"])
        assert dataset is not None
        dataset.dicomweb = {**(dataset.dicomweb or {}), "password": "rotated"}
        session.commit()
    listing = client.get(f"/api/v1/datasets/{made.json()['id']}/series")
    assert listing.status_code == 424
    assert orthanc.dicomweb in listing.json()["detail"] and "Traceback" not in listing.text


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_dicom_seg_needs_a_dicom_source(client: TestClient, api: Api) -> None:
    dataset = api.dataset()
    image = api.image(dataset["id"])
    assert image["source"] == "nifti" and image["series_uid"] is None
    answer = client.get(f"/api/v1/predictions/{'0' * 32}/{image['id']}/segmentation.dcm")
    assert answer.status_code == 409
    assert "uploaded as NIfTI, not from DICOM" in answer.json()["detail"]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_dicom_upload_round_trips_through_dicom_seg(
    client: TestClient, api: Api, settings: Settings, totalseg: Path, tmp_path: Path
) -> None:
    """A zipped series keeps its headers; a label volume on it → DICOM-SEG → the same labels."""
    datasets = archive_ready([totalseg / member for member in TOTALSEG_DICOM])
    folder = tmp_path / "series"
    folder.mkdir()
    for k, dataset in enumerate(datasets):
        dataset.save_as(folder / f"IM{k:02d}.dcm", enforce_file_format=True)
    archive = zip_files(sorted(folder.iterdir()), tmp_path / "ct.zip")
    target = api.dataset(labels=SCHEMA)
    uploaded = api.upload_image(target["id"], archive.read_bytes(), "ct.zip")
    assert uploaded.status_code == 201, uploaded.text
    image = uploaded.json()
    assert image["source"] == "dicom"
    assert image["series_uid"] == str(datasets[0].SeriesInstanceUID)

    with session_factory(settings)() as session:
        row = session.get(Image, image["id"])
        assert row is not None
        instances = read_headers(headers_path(Path(row.path)))
    # Stacking order: along the slice normal, as the series' own positions define it.
    normal = np.cross(
        np.asarray(datasets[0].ImageOrientationPatient[:3], dtype=float),
        np.asarray(datasets[0].ImageOrientationPatient[3:], dtype=float),
    )
    by_position = sorted(datasets, key=lambda d: float(np.dot(d.ImagePositionPatient, normal)))
    assert [d.SOPInstanceUID for d in instances] == [d.SOPInstanceUID for d in by_position]

    labels = _reference_labels(totalseg)
    labels[..., 7] = 255  # an unannotated slice of a sparse label: background in the SEG
    classes = [SegmentClass(1, "liver", "#e6194b"), SegmentClass(2, "spleen", "#3cb44b")]
    classes.append(SegmentClass(3, "left adrenal thing", "#4363d8"))  # empty, not in SNOMED
    segmentation = build_segmentation(
        labels, instances, classes, automatic=True, description="test"
    )
    buffer = io.BytesIO()
    segmentation.save_as(buffer)
    read = hd.seg.segread(io.BytesIO(buffer.getvalue()))
    assert read.ReferencedSeriesSequence[0].SeriesInstanceUID == image["series_uid"]
    segments = {int(s.SegmentNumber): s for s in read.SegmentSequence}
    assert [segments[n].SegmentLabel for n in (1, 2, 3)] == [
        "liver",
        "spleen",
        "left adrenal thing",
    ]
    assert segments[1].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SCT liver
    assert segments[3].SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == (
        "99SEGASSIST"
    )
    expected = np.where(labels == 255, 0, labels)
    np.testing.assert_array_equal(labels_from_segmentation(read, instances), expected)

    # Independently of our layout code: highdicom's own volume, placed by its LPS affine.
    volume = read.get_volume(combine_segments=True)
    assert_same_world_labels(expected, np.asarray(image["affine"]), volume.array, volume.affine)
