"""Atomic file replacement: write to a temporary sibling, fsync, then ``os.replace``.

Readers of the destination see either the old file or the complete new one, never a partial
write, because ``os.replace`` within one directory is atomic on POSIX and Windows.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "link_atomic", "sha256_file"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory; on success move it onto ``path``.

    The temporary name keeps ``path``'s suffixes (``.nii.gz``, ``.png``…) so writers that pick a
    format from the extension behave as for the final name. On error the temporary file is removed
    and the destination is left untouched.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        dir=dest.parent, prefix=f".{dest.name}.", suffix="".join(dest.suffixes) or ".tmp"
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        # mkstemp creates 0600; artifacts are read by other processes (API, worker containers).
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def link_atomic(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Make ``dst`` the same file as ``src`` atomically: a hard link (no bytes copied), or a copy
    where the two are on different file systems. Returns ``dst``."""
    dest = Path(dst)
    with atomic_path(dest) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
    return dest


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
