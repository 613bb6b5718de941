"""API fixtures: the app on SQLite and on PostgreSQL, synthetic NIfTI volumes."""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from segassist.server.db.session import make_engine
from segassist.server.main import create_app
from segassist.server.settings import Settings

SHAPE = (12, 10, 6)
# Oblique, LPS-like affine with non-trivial values: any rounding or reorientation shows.
OBLIQUE_AFFINE = np.array(
    [
        [-0.8660254037844387, 0.5, 0.0, 101.123456789],
        [-0.5, -0.8660254037844387, 0.0, -37.000000001],
        [0.0, 0.0, 2.5, 12.75],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
LABEL_SCHEMA = {"1": {"name": "liver", "color": "#e6194b"}, "2": {"name": "spleen"}}
MAX_UPLOAD_BYTES = 256 * 1024


def nifti_bytes(
    data: np.ndarray, affine: np.ndarray = OBLIQUE_AFFINE, compress: bool = True
) -> bytes:
    """A NIfTI-1 file (gzipped unless ``compress=False``) holding ``data`` on ``affine``."""
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    raw = image.to_bytes()
    return gzip.compress(raw) if compress else raw


def volume(seed: int = 0) -> np.ndarray:
    """A small float32 volume of shape :data:`SHAPE`."""
    return np.random.default_rng(seed).normal(100, 20, SHAPE).astype(np.float32)


def sparse_label(values: tuple[int, ...] = (1, 2), slices: tuple[int, ...] = (1, 4)) -> np.ndarray:
    """uint8 label of shape :data:`SHAPE`: 255 everywhere but ``slices`` along axis 2."""
    label = np.full(SHAPE, 255, dtype=np.uint8)
    for z in slices:
        label[..., z] = 0
        for i, v in enumerate(values):
            label[2 + 3 * i : 4 + 3 * i, 2:6, z] = v
    return label


def load_nifti(content: bytes) -> nib.Nifti1Image:
    """Parse downloaded NIfTI bytes."""
    raw = gzip.decompress(content) if content[:2] == b"\x1f\x8b" else content
    return nib.Nifti1Image.from_bytes(raw)


class Api:
    """Thin helpers over the TestClient for the lifecycle steps most tests need."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    def dataset(self, **overrides: Any) -> dict[str, Any]:
        body = {"name": "abdomen", "modality": "CT", "labels": LABEL_SCHEMA} | overrides
        response = self.client.post("/api/v1/datasets", json=body)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def upload_image(self, dataset_id: str, content: bytes, filename: str = "ct.nii.gz") -> Any:
        return self.client.post(
            f"/api/v1/datasets/{dataset_id}/images",
            files={"file": (filename, io.BytesIO(content), "application/octet-stream")},
        )

    def image(self, dataset_id: str, seed: int = 0) -> dict[str, Any]:
        response = self.upload_image(dataset_id, nifti_bytes(volume(seed)))
        assert response.status_code == 201, response.text
        return dict(response.json())

    def upload_label(self, image_id: str, content: bytes, tag: str | None = None) -> Any:
        data = {"tag": tag} if tag is not None else {}
        return self.client.post(
            f"/api/v1/images/{image_id}/labels",
            files={"file": ("label.nii.gz", io.BytesIO(content), "application/octet-stream")},
            data=data,
        )


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The metadata database of one test: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'segassist.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def settings(data_dir: Path, database_url: str) -> Settings:
    """Settings of a test app: embedded filesystem broker, small upload limit."""
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        broker_url="filesystem://",
        max_upload_bytes=MAX_UPLOAD_BYTES,
        device="cpu",
        api_token="",
    )


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """A TestClient on a started app (schema migrated at startup)."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client
    make_engine(settings.database_url).dispose()


@pytest.fixture
def api(client: TestClient) -> Api:
    """Lifecycle helpers bound to :func:`client`."""
    return Api(client)
