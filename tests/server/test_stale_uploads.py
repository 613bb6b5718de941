"""Temporary upload files left by an API killed mid-upload are removed at the next start-up;
an upload still being written is not."""

from __future__ import annotations

import os
import time
from pathlib import Path

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
