"""Stored images and labels get the configured permissions (group-readable by default), so an
API and workers running as different users of one group can read each other's files."""

from __future__ import annotations

import io
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from segassist.models.runtime._atomic import file_modes, set_file_modes
from segassist.server.main import create_app
from segassist.server.settings import Settings
from tests.server.conftest import LABEL_SCHEMA, nifti_bytes, sparse_label, volume


@pytest.fixture
def restore_modes() -> Iterator[None]:
    before = file_modes()
    yield
    set_file_modes(before.file, before.directory)


def _stored_modes(data_dir: Path) -> set[int]:
    return {
        stat.S_IMODE(p.stat().st_mode)
        for sub in ("images", "labels")
        for p in (data_dir / sub).rglob("*")
        if p.is_file()
    }


@pytest.mark.parametrize(("configured", "expected"), [(None, 0o640), ("0660", 0o660)])
def test_stored_files_get_the_configured_mode(
    data_dir: Path, tmp_path: Path, restore_modes: None, configured: str | None, expected: int
) -> None:
    extra = {} if configured is None else {"file_mode": configured}
    settings = Settings(
        data_dir=data_dir,
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        broker_url="filesystem://",
        api_token="",
        **extra,
    )
    with TestClient(create_app(settings)) as client:
        body = {"name": "d", "modality": "CT", "labels": LABEL_SCHEMA}
        dataset = client.post("/api/v1/datasets", json=body).json()
        files = {"file": ("ct.nii.gz", io.BytesIO(nifti_bytes(volume())), "x")}
        image = client.post(f"/api/v1/datasets/{dataset['id']}/images", files=files).json()
        label = {"file": ("l.nii.gz", io.BytesIO(nifti_bytes(sparse_label())), "x")}
        assert client.post(f"/api/v1/images/{image['id']}/labels", files=label).status_code == 201
    assert _stored_modes(data_dir) == {expected}
