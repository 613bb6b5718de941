"""The hospital data path end to end: Orthanc (DICOMweb) → assist workflow → DICOM-SEG → Orthanc.

A real CT series (TotalSegmentator's test series) sits in a throw-away Orthanc; a DICOMweb dataset
lists and fetches it, an annotator's sparse liver label is saved (and stored back in Orthanc as a
MANUAL DICOM-SEG), the assist workflow segments every slice on a real worker, the prediction is
downloaded as DICOM-SEG and stored in Orthanc with STOW-RS, and OHIF's mask contract is checked:
``/infer`` by SeriesInstanceUID with ``output=image`` answers exactly the series' voxels in the
order the series' own instances define.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import httpx
import nibabel as nib
import numpy as np
import pytest

from tests.conftest import TOTALSEG_DICOM, TOTALSEG_LIVER, TOTALSEG_SEG
from tests.dicom_checks import assert_same_world_labels, series_frames_from_nifti
from tests.orthanc import USER, Orthanc, archive_ready, orthanc_fixture  # noqa: F401
from tests.worker.conftest import TINY_FEWSHOT, TINY_PRETRAIN, Service, Worker

ANNOTATED = (3, 10, 16)
"""Axial slices the annotator labels (of 20)."""


def _nifti(content: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(content))


def _sparse_liver(totalseg: Path) -> np.ndarray:
    """TotalSegmentator's liver on :data:`ANNOTATED` slices, 255 elsewhere (its own grid, which
    is the fetched image's)."""
    liver = np.asarray(nib.load(totalseg / TOTALSEG_SEG).dataobj) == TOTALSEG_LIVER
    label = np.full(liver.shape, 255, dtype=np.uint8)
    for z in ANNOTATED:
        label[..., z] = liver[..., z]
    return label


def _nrrd_payload(content: bytes) -> tuple[dict[str, str], bytes]:
    """Header fields and raw data of an attached-header NRRD."""
    head, _, data = content.partition(b"\n\n")
    fields = {}
    for line in head.decode().splitlines()[1:]:
        if ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            fields[key.strip()] = value.lstrip("=").strip()
    return fields, data


@pytest.mark.parametrize(
    "settings", [("embedded", {"background_pretrain_steps": 0})], indirect=True
)
def test_orthanc_series_to_dicom_seg_and_ohif_mask(
    service: Service,
    start_worker: Callable[[], Worker],
    orthanc: Orthanc,
    totalseg: Path,
) -> None:
    start_worker()
    series = archive_ready([totalseg / member for member in TOTALSEG_DICOM])
    orthanc.store(series)
    series_uid = str(series[0].SeriesInstanceUID)

    dataset = service.post(
        "/datasets",
        json={
            "name": "pacs",
            "modality": "CT",
            "labels": {"1": {"name": "liver", "color": "#e6194b"}},
            "dicomweb": {"url": orthanc.dicomweb, "username": USER[0], "password": USER[1]},
        },
    )
    (listed,) = service.get(f"/datasets/{dataset['id']}/series")
    assert listed["series_uid"] == series_uid
    image = service.post(f"/datasets/{dataset['id']}/series/{series_uid}")
    image_id = image["id"]
    affine = np.asarray(image["affine"])

    # OHIF saves its painted segmentation as the series' raw frames (label.bin) by series UID;
    # the label is stored on the image's grid and goes back to Orthanc as a MANUAL DICOM-SEG.
    sparse = _sparse_liver(totalseg)
    painted = series_frames_from_nifti(np.where(sparse == 255, 0, sparse), affine, series)
    saved = service.client.put(
        f"/monailabel/{dataset['id']}/datastore/label",
        params={"image": series_uid},
        files={
            "params": (None, json.dumps({"label_info": [{"name": "liver", "idx": 1}]})),
            "label": ("label.bin", painted.astype(np.uint8).tobytes(), "application/octet-stream"),
        },
    )
    assert saved.status_code == 200, saved.text
    assert saved.json()["annotated_slices"] == list(ANNOTATED)
    (label,) = service.get(f"/images/{image_id}/labels")
    stored_label = _nifti(service.client.get(f"/api/v1/labels/{label['id']}/file").content)
    np.testing.assert_array_equal(np.asarray(stored_label.dataobj), sparse)
    (manual,) = orthanc.series("SEG")

    # The assist workflow on a tiny encoder, on the real worker.
    pretrain = service.post(
        "/jobs",
        json={
            "kind": "pretrain",
            "dataset_id": dataset["id"],
            "params": {"objective": "pix2rep", "steps": 3, "config": TINY_PRETRAIN},
        },
    )
    assert service.finished(pretrain["id"])["status"] == "succeeded"
    job = service.post(f"/datasets/{dataset['id']}/assist", json={"config": TINY_FEWSHOT})
    done = service.finished(job["id"])
    assert done["status"] == "succeeded", done
    segmenter = done["result"]["segmenter_id"]
    prediction = np.asarray(
        _nifti(
            service.client.get(done["result"]["predictions"][image_id]["labels"]).content
        ).dataobj
    )
    assert prediction.shape == (512, 512, 20) and prediction.any()

    # DICOM-SEG of the prediction: references the series, names the class, same mask.
    download = service.client.get(f"/api/v1/predictions/{segmenter}/{image_id}/segmentation.dcm")
    assert download.status_code == 200, download.text
    assert download.headers["content-type"] == "application/dicom"
    seg = hd.seg.segread(io.BytesIO(download.content))
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid
    (segment,) = seg.SegmentSequence
    assert segment.SegmentLabel == "liver" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SCT liver
    volume = seg.get_volume(combine_segments=True)
    assert volume.array.any()
    assert_same_world_labels(prediction, affine, volume.array, volume.affine)

    # STOW-RS on request: Orthanc then holds the prediction next to the annotator's label.
    stow = service.post(f"/predictions/{segmenter}/{image_id}/stow")
    assert stow["server"] == orthanc.dicomweb
    assert stow["sop_instance_uid"] == str(seg.SOPInstanceUID)
    stored = {s["MainDicomTags"]["SeriesInstanceUID"]: s for s in orthanc.series("SEG")}
    assert set(stored) == {manual["MainDicomTags"]["SeriesInstanceUID"], stow["series_uid"]}
    with httpx.Client(auth=orthanc.auth, timeout=60) as client:
        (instance,) = stored[stow["series_uid"]]["Instances"]
        file = client.get(f"{orthanc.url}/instances/{instance}/file").content
        (manual_instance,) = manual["Instances"]
        manual_file = client.get(f"{orthanc.url}/instances/{manual_instance}/file").content
    in_orthanc = hd.seg.segread(io.BytesIO(file))
    assert in_orthanc.SOPInstanceUID == seg.SOPInstanceUID
    manual_seg = hd.seg.segread(io.BytesIO(manual_file))
    assert manual_seg.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"
    assert manual_seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series_uid

    # OHIF's mask contract: image = SeriesInstanceUID, output=image → raw uint8 NRRD whose
    # voxels are the series' pixels, instance after instance in the series' own stacking order.
    answer = service.client.post(
        f"/monailabel/{dataset['id']}/infer/segmentation",
        params={"image": series_uid, "output": "image"},
        files={
            "params": (
                None,
                json.dumps(
                    {
                        "result_extension": ".nrrd",
                        "result_dtype": "uint8",
                        "result_compress": False,
                    }
                ),
            )
        },
    )
    assert answer.status_code == 200, answer.text
    fields, raw = _nrrd_payload(answer.content)
    assert fields["type"] in ("uint8", "unsigned char") and fields["encoding"] == "raw"
    assert fields["sizes"].split() == ["512", "512", "20"]
    assert len(raw) == 512 * 512 * 20
    # ... with the geometry of those instances (what Slicer and OHIF place it by).
    normal = np.cross(
        np.asarray(series[0].ImageOrientationPatient[:3], dtype=float),
        np.asarray(series[0].ImageOrientationPatient[3:], dtype=float),
    )
    first = min(series, key=lambda d: float(np.dot(d.ImagePositionPatient, normal)))
    origin = np.asarray(fields["space origin"].strip("()").split(","), dtype=float)
    np.testing.assert_allclose(
        origin, np.asarray(first.ImagePositionPatient, dtype=float), atol=1e-3
    )
    expected = series_frames_from_nifti(prediction, affine, series)
    np.testing.assert_array_equal(
        np.frombuffer(raw, dtype=np.uint8).reshape(20, 512, 512), expected
    )
