"""Temporary upload files left by an API killed mid-upload, and the staged siblings of atomic
writes left by any writer killed mid-write, are removed at the next start-up; a write still
under way is not."""

from __future__ import annotations

import os
import time
from pathlib import Path

from segassist.models.runtime._atomic import atomic_dir, atomic_path, is_staged
from segassist.server.storage import STALE_UPLOAD_SECONDS, Storage


def test_only_abandoned_upload_files_are_removed(data_dir: Path) -> None:
    storage = Storage(data_dir)
    with storage.upload_tmp() as abandoned, storage.upload_tmp() as streaming:
        abandoned.write_bytes(b"half an upload")
        streaming.write_bytes(b"still arriving")
        long_ago = time.time() - 2 * STALE_UPLOAD_SECONDS
        os.utime(abandoned, (long_ago, long_ago))

        assert storage.remove_stale_uploads() == 1

        assert not abandoned.exists()
        assert streaming.read_bytes() == b"still arriving"


def test_only_abandoned_staged_writes_are_removed(data_dir: Path) -> None:
    """What a writer killed mid-write staged (hidden siblings, :mod:`..._atomic`'s names) goes
    once nothing has written to it for an hour; published files, a write under way and other
    hidden names stay."""
    storage = Storage(data_dir)
    model = storage.model_dir("m1")
    prediction = storage.prediction_dir("m1", "i1")
    for folder in (model, prediction):
        folder.mkdir(parents=True)
    published = model / "model.onnx"
    published.write_bytes(b"onnx")
    left = [
        model / ".model.onnx.k2j_9x0a.onnx",  # atomic_path's file
        prediction.parent / ".tmp-i1-ab12cd34",  # atomic_dir's staging folder
        prediction.parent / ".old-i1-zz99yy88",  # atomic_dir's folder of the replaced one
    ]
    left[0].write_bytes(b"half a model")
    for folder in left[1:]:
        folder.mkdir()
        (folder / "labels.nii.gz").write_bytes(b"half")
    writing = prediction / ".labels.nii.gz.qwertyui.nii.gz"
    writing.write_bytes(b"being written")
    foreign = model / ".notes"
    foreign.write_bytes(b"an operator's file")
    long_ago = time.time() - 2 * STALE_UPLOAD_SECONDS
    for path in [published, foreign, *left, *(p for f in left[1:] for p in f.iterdir())]:
        os.utime(path, (long_ago, long_ago))
    busy = data_dir / "features" / "e1" / ".tmp-i2-mnbvcxzl"  # old folder, a file written now
    busy.mkdir(parents=True)
    os.utime(busy, (long_ago, long_ago))
    (busy / "map0.npy").write_bytes(b"still writing")

    assert storage.remove_stale_staging() == 3

    assert not any(path.exists() for path in left)
    assert published.read_bytes() == b"onnx" and foreign.exists()
    assert writing.exists() and (busy / "map0.npy").exists()


def test_the_sweep_knows_the_names_atomic_writes_stage_under(tmp_path: Path) -> None:
    with atomic_path(tmp_path / "labels.nii.gz") as staged_file:
        assert is_staged(staged_file.name)
    with atomic_dir(tmp_path / "image-1") as staged_folder:
        assert is_staged(staged_folder.name)
    for name in ("labels.nii.gz", ".notes", ".tmp-short", "image-1"):
        assert not is_staged(name)
