"""A corpus of malformed uploads: each is a 4xx whose message names the problem, and the datastore
is byte for byte what it was (every file under ``data_dir`` hashed before and after).

One app (SQLite, filesystem broker) serves the whole module: a dataset with one stored image and
one stored label version, so refusals are checked against a datastore that holds something.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from segassist.server.db.session import make_engine
from segassist.server.main import create_app
from segassist.server.settings import Settings
from segassist.server.uploads import MAX_HEADER_LINE_BYTES, MAX_PART_HEADERS, MAX_PARTS
from tests.server.conftest import OBLIQUE_AFFINE, SHAPE, nifti_bytes, sparse_label, volume
from tests.server.dicom_factory import SeriesSpec, write_series, zip_files

UPLOAD_LIMIT = 1024**2


@dataclass(frozen=True)
class Upload:
    """One request: a multipart ``file`` (and form fields), or a raw body with its headers."""

    content: bytes = b""
    fields: dict[str, str] = field(default_factory=dict)
    raw_body: bytes | None = None
    content_type: str = ""


@dataclass(frozen=True)
class Case:
    """A malformed input, where it is sent, and what the answer must say."""

    target: str  # "image" or "label"
    build: Callable[[Path], Upload]
    status: int
    needle: str


# -- builders ------------------------------------------------------------------------------------
def _nifti(data: np.ndarray, affine: np.ndarray = OBLIQUE_AFFINE) -> Upload:
    return Upload(nifti_bytes(data, affine))


def _header_claiming(shape: tuple[int, ...], dtype: type = np.uint16) -> Upload:
    """A valid NIfTI header whose dims claim ``shape``, followed by 1 kB of voxels."""
    header = nib.Nifti1Image(np.zeros((2, 2, 2), dtype), OBLIQUE_AFFINE).header.copy()
    header.set_data_shape(shape)
    return Upload(gzip.compress(header.binaryblock + b"\0" * 4 + b"\0" * 1024))


def _with_voxel(value: float, dtype: type = np.float32) -> Upload:
    data = volume().astype(dtype)
    data[3, 3, 3] = value
    return _nifti(data)


def _analyze_pair() -> Upload:
    image = nib.Nifti1Image(volume(), OBLIQUE_AFFINE)
    block = bytearray(image.header.binaryblock)
    block[344:348] = b"ni1\0"  # the magic of a header with a separate .img file
    return Upload(gzip.compress(bytes(block) + b"\0" * 4 + volume().tobytes()))


def _degenerate_affine() -> Upload:
    """An sform (code 2, preferred over the qform) whose rotation-zoom part is all zeros."""
    raw = nib.Nifti1Image(volume(), OBLIQUE_AFFINE).to_bytes()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw))
    header["sform_code"] = 2
    for row in ("srow_x", "srow_y", "srow_z"):
        header[row] = [0.0, 0.0, 0.0, 1.0]
    return Upload(gzip.compress(header.binaryblock + raw[len(header.binaryblock) :]))


def _corrupt_gzip() -> Upload:
    data = bytearray(nifti_bytes(volume()))
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)
    return Upload(bytes(data))


def _series(folder: Path, slices: int = 3, uid: str | None = None) -> list[Path]:
    pixels = np.random.default_rng(0).integers(0, 2000, (slices, 8, 8)).astype(np.uint16)
    spec = SeriesSpec(
        pixels=pixels,
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        origin=(-20.0, 10.0, 5.0),
        pixel_spacing=(0.7, 0.9),
        slice_step=2.5,
    )
    return write_series(spec, folder / uuid.uuid4().hex, series_uid=uid)


def _zip(tmp: Path, files: list[Path], extra: dict[str, bytes] | None = None) -> Upload:
    return Upload(zip_files(files, tmp / f"{uuid.uuid4().hex}.zip", extra).read_bytes())


def _zip_bomb(tmp: Path) -> Upload:
    """A DICOM series plus one member of 64 MiB of zeros deflated to ~64 kB."""
    bomb = tmp / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in _series(tmp):
            archive.write(path, f"series/{path.name}")
        with archive.open("series/IM9999.dcm", "w") as member:
            for _ in range(64):
                member.write(bytes(1024**2))
    return Upload(bomb.read_bytes())


def _zip_with_symlink(tmp: Path) -> Upload:
    path = tmp / "symlink.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for dcm in _series(tmp):
            archive.write(dcm, f"series/{dcm.name}")
        link = zipfile.ZipInfo("series/IM0100.dcm")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "/etc/passwd")
    return Upload(path.read_bytes())


def _multipart(parts: list[tuple[str, bytes]], extra_headers: str = "") -> Upload:
    """A hand-made multipart body of ``(name, payload)`` parts (``file`` parts get a filename)."""
    boundary = uuid.uuid4().hex
    body = b""
    for name, payload in parts:
        filename = '; filename="ct.nii.gz"' if name == "file" else ""
        body += (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n'
                f"{extra_headers}\r\n"
            ).encode()
            + payload
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    return Upload(raw_body=body, content_type=f"multipart/form-data; boundary={boundary}")


def _label(data: np.ndarray, affine: np.ndarray = OBLIQUE_AFFINE) -> Upload:
    return Upload(nifti_bytes(data, affine))


_SHIFTED = OBLIQUE_AFFINE.copy()
_SHIFTED[:3, 3] += (5.0, 0.0, 0.0)
_FRACTIONAL = sparse_label().astype(np.float32)
_FRACTIONAL[2, 2, 1] = 1.5
_NAN_LABEL = sparse_label().astype(np.float32)
_NAN_LABEL[2, 2, 1] = np.nan

CORPUS: dict[str, Case] = {
    "text-not-a-volume": Case(
        "image", lambda _: Upload(b"this is not a medical volume" * 20), 422, "NIfTI-1"
    ),
    "truncated-gzip": Case(
        "image", lambda _: Upload(nifti_bytes(volume())[:200]), 422, "truncated"
    ),
    "corrupt-gzip": Case("image", lambda _: _corrupt_gzip(), 422, "gzip stream"),
    "gzip-of-zeros": Case("image", lambda _: Upload(gzip.compress(bytes(400))), 422, "NIfTI-1"),
    "header-claims-2GB": Case(
        "image", lambda _: _header_claiming((1024, 1024, 1024)), 422, "claims 2147483648 bytes"
    ),
    "4d-volume": Case(
        "image", lambda _: _nifti(np.zeros((*SHAPE, 3), np.float32)), 422, "3 volumes"
    ),
    "zero-sized-volume": Case("image", lambda _: _header_claiming((12, 0, 6)), 422, "must be 3D"),
    "nan-voxels": Case("image", lambda _: _with_voxel(np.nan), 422, "NaN"),
    "inf-voxels": Case("image", lambda _: _with_voxel(np.inf), 422, "infinite"),
    "analyze-header-pair": Case("image", lambda _: _analyze_pair(), 422, "single-file"),
    "complex-voxels": Case(
        "image", lambda _: _nifti(volume().astype(np.complex64)), 422, "voxel type"
    ),
    "degenerate-affine": Case("image", lambda _: _degenerate_affine(), 422, "degenerate"),
    "over-the-size-limit": Case(
        "image", lambda _: Upload(os.urandom(UPLOAD_LIMIT + 1)), 413, "limit"
    ),
    "broken-zip": Case("image", lambda _: Upload(b"PK\x03\x04 broken zip"), 422, "zip"),
    "zip-bomb": Case("image", _zip_bomb, 422, "zip bomb"),
    "dicom-zip-path-traversal": Case(
        "image",
        lambda tmp: _zip(tmp, _series(tmp), {"../../etc/cron.d/x": b"* * * * * root true"}),
        422,
        "unsafe path",
    ),
    "dicom-zip-symlink": Case("image", _zip_with_symlink, 422, "symbolic link"),
    "dicom-zip-two-series": Case(
        "image",
        lambda tmp: _zip(tmp, _series(tmp), {f"b/{p.name}": p.read_bytes() for p in _series(tmp)}),
        422,
        "2 series",
    ),
    "zip-without-dicom": Case(
        "image",
        lambda tmp: _zip(tmp, [], {"readme.txt": b"scan notes", "scan.jpg": b"\xff\xd8\xff"}),
        422,
        "no DICOM images",
    ),
    "dicom-single-slice": Case(
        "image", lambda tmp: _zip(tmp, _series(tmp, slices=1)), 422, "at least 2 slices"
    ),
    "multipart-too-many-parts": Case(
        "image",
        lambda _: _multipart([(f"f{i}", b"x") for i in range(MAX_PARTS + 1)]),
        422,
        f"more than {MAX_PARTS} parts",
    ),
    "multipart-huge-header-line": Case(
        "image",
        lambda _: _multipart(
            [("file", nifti_bytes(volume()))], f"X-Padding: {'a' * MAX_HEADER_LINE_BYTES}\r\n"
        ),
        422,
        "Maximum header size exceeded",
    ),
    "multipart-too-many-headers": Case(
        "image",
        lambda _: _multipart(
            [("file", nifti_bytes(volume()))],
            "".join(f"X-H{i}: v\r\n" for i in range(MAX_PART_HEADERS)),
        ),
        422,
        "Maximum header count exceeded",
    ),
    "multipart-two-files": Case(
        "image",
        lambda _: _multipart([("file", nifti_bytes(volume())), ("file", nifti_bytes(volume()))]),
        422,
        "exactly one 'file'",
    ),
    "multipart-no-file": Case("image", lambda _: _multipart([("name", b"a")]), 422, "'file'"),
    "label-value-outside-schema": Case(
        "label",
        lambda _: _label(np.where(sparse_label() == 2, 7, sparse_label()).astype(np.uint8)),
        422,
        "{7}",
    ),
    "label-on-another-grid": Case(
        "label", lambda _: _label(sparse_label(), _SHIFTED), 422, "affine differs"
    ),
    "label-wrong-shape": Case(
        "label", lambda _: _label(np.zeros((4, 4, 4), np.uint8)), 422, "differs from image shape"
    ),
    "label-nan": Case("label", lambda _: _label(_NAN_LABEL), 422, "NaN"),
    "label-fractional": Case("label", lambda _: _label(_FRACTIONAL), 422, "1.5"),
    "label-4d": Case("label", lambda _: _label(np.zeros((*SHAPE, 2), np.uint8)), 422, "2 volumes"),
    "label-bad-tag": Case(
        "label",
        lambda _: Upload(nifti_bytes(sparse_label()), fields={"tag": "../final"}),
        422,
        "tag '../final'",
    ),
}


# -- the app -------------------------------------------------------------------------------------
@dataclass
class Stored:
    client: TestClient
    data_dir: Path
    dataset_id: str
    image_id: str


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    """The app with one dataset, one image and one label version already stored."""
    root = tmp_path_factory.mktemp("corpus")
    settings = Settings(
        data_dir=root / "data",
        database_url=f"sqlite:///{root / 'segassist.db'}",
        broker_url="filesystem://",
        max_upload_bytes=UPLOAD_LIMIT,
        device="cpu",
        api_token="",
    )
    with TestClient(create_app(settings)) as client:
        labels = {"1": {"name": "liver"}, "2": {"name": "spleen"}}
        dataset = client.post(
            "/api/v1/datasets", json={"name": "d", "modality": "CT", "labels": labels}
        ).json()
        files = {"file": ("ct.nii.gz", io.BytesIO(nifti_bytes(volume())), "x")}
        image = client.post(f"/api/v1/datasets/{dataset['id']}/images", files=files).json()
        label = {"file": ("l.nii.gz", io.BytesIO(nifti_bytes(sparse_label())), "x")}
        answer = client.post(f"/api/v1/images/{image['id']}/labels", files=label)
        assert answer.status_code == 201, answer.text
        yield Stored(client, settings.data_dir, dataset["id"], image["id"])
    make_engine(settings.database_url).dispose()


def _checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _send(stored: Stored, target: str, upload: Upload) -> Any:
    url = (
        f"/api/v1/datasets/{stored.dataset_id}/images"
        if target == "image"
        else f"/api/v1/images/{stored.image_id}/labels"
    )
    if upload.raw_body is not None:
        headers = {"content-type": upload.content_type}
        return stored.client.post(url, content=upload.raw_body, headers=headers)
    files = {"file": ("upload.bin", io.BytesIO(upload.content), "application/octet-stream")}
    return stored.client.post(url, files=files, data=upload.fields)


def _counts(stored: Stored) -> tuple[int, int]:
    images = stored.client.get(f"/api/v1/datasets/{stored.dataset_id}/images").json()
    labels = stored.client.get(f"/api/v1/images/{stored.image_id}/labels").json()
    return len(images), len(labels)


def test_the_corpus_has_at_least_twenty_inputs() -> None:
    assert len(CORPUS) >= 20


@pytest.mark.parametrize("name", list(CORPUS))
def test_malformed_input_is_refused_naming_the_problem_and_nothing_changes(
    stored: Stored, tmp_path: Path, name: str
) -> None:
    case = CORPUS[name]
    upload = case.build(tmp_path)
    before, counts = _checksums(stored.data_dir), _counts(stored)

    response = _send(stored, case.target, upload)

    assert response.status_code == case.status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and case.needle in detail, detail
    assert _checksums(stored.data_dir) == before
    assert _counts(stored) == counts == (1, 1)
