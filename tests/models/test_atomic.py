"""The one atomic-write helper: whole files or nothing, with the configured permissions."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from segassist.models.runtime._atomic import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_chunks,
    file_modes,
    set_file_modes,
)


@pytest.fixture
def modes() -> Iterator[None]:
    """Restore the process-wide permissions after a test changes them."""
    before = file_modes()
    yield
    set_file_modes(before.file, before.directory)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_are_group_readable_by_default(tmp_path: Path) -> None:
    path = atomic_write_bytes(b"volume", tmp_path / "a" / "image.nii.gz")
    assert path.read_bytes() == b"volume"
    assert _mode(path) == 0o640
    assert [p.name for p in path.parent.iterdir()] == ["image.nii.gz"]  # no temporary left


def test_configured_modes_apply_to_files_and_staged_folders(tmp_path: Path, modes: None) -> None:
    set_file_modes(0o660, 0o2770)
    with atomic_dir(tmp_path / "models" / "m1") as staging:
        (staging / "model.onnx").write_bytes(b"onnx")
        (staging / "sub").mkdir()
    folder = tmp_path / "models" / "m1"
    assert _mode(folder) == 0o2770 and _mode(folder / "sub") == 0o2770
    assert _mode(folder / "model.onnx") == 0o660
    assert _mode(atomic_write_bytes(b"x", tmp_path / "f.json")) == 0o660


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    dest = atomic_write_bytes(b"old", tmp_path / "label.nii.gz")

    def broken() -> Iterator[bytes]:
        yield b"new, partial"
        raise OSError("client went away")

    with pytest.raises(OSError, match="went away"):
        atomic_write_chunks(broken(), dest)
    assert dest.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["label.nii.gz"]


def test_a_staged_folder_replaces_the_previous_one_whole(tmp_path: Path) -> None:
    final = tmp_path / "features" / "entry"
    with atomic_dir(final) as staging:
        (staging / "map0.npy").write_bytes(b"first")
        (staging / "stale.npy").write_bytes(b"first")
    with atomic_dir(final) as staging:
        (staging / "map0.npy").write_bytes(b"second")
    assert sorted(p.name for p in final.iterdir()) == ["map0.npy"]
    assert (final / "map0.npy").read_bytes() == b"second"
    assert [p.name for p in final.parent.iterdir()] == ["entry"]
