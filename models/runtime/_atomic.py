"""Atomic file replacement, the one helper every writer uses: write to a temporary sibling,
fsync, give it the datastore's permissions, then ``os.replace``.

Readers of the destination see either the old file or the complete new one, never a partial
write, because ``os.replace`` within one directory is atomic on POSIX and Windows.

Permissions: ``mkstemp``/``mkdtemp`` create ``0600``/``0700``, which locks out an API and workers
running as different users of one group on shared storage. Every file published here gets
:func:`file_modes` ``.file`` (default ``0o640``, group-readable) and every staged folder
``.directory`` (default ``0o750``). A process sets them once at start-up from its settings
(:func:`set_file_modes`; ``SEGASSIST_FILE_MODE`` / ``SEGASSIST_DIR_MODE``).

Variants are thin wrappers of :func:`atomic_path`: :func:`atomic_write_bytes`,
:func:`atomic_write_chunks` (streamed, hashed), :func:`commit_file` (a finished temporary file),
:func:`link_atomic`, and :func:`atomic_dir` (a folder staged then renamed into place).

A writer that dies mid-write (killed, power cut) leaves its staged sibling behind, hidden and
never read; :func:`is_staged` recognises those names so a start-up sweep can delete them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FileModes",
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_chunks",
    "commit_file",
    "file_modes",
    "is_staged",
    "link_atomic",
    "set_file_modes",
    "sha256_file",
]


@dataclass(frozen=True)
class FileModes:
    """Permission bits of published files and folders (e.g. ``0o640`` and ``0o750``)."""

    file: int = 0o640
    directory: int = 0o750


_modes = FileModes()


def set_file_modes(file: int, directory: int) -> None:
    """Set the permissions of everything this process publishes from now on (process start)."""
    global _modes
    _modes = FileModes(file=file, directory=directory)


def file_modes() -> FileModes:
    """The permissions in force."""
    return _modes


_STAGED = re.compile(r"^\.(?:(?:tmp|old)-.+-[a-z0-9_]{8}|.+\.[a-z0-9_]{8}\..+)$")
"""Names staged here: ``.{name}.XXXXXXXX{suffixes}`` files (:func:`atomic_path`),
``.tmp-{name}-XXXXXXXX`` and ``.old-{name}-XXXXXXXX`` folders (:func:`atomic_dir`); ``X`` are
:mod:`tempfile`'s random characters."""


def is_staged(name: str) -> bool:
    """Whether a file or folder name is one this module stages a write under (module
    docstring): a leftover once its writer is gone."""
    return _STAGED.match(name) is not None


def commit_file(tmp: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Publish the finished temporary file ``tmp`` as ``dest`` (same folder): fsync, set the
    file mode, ``os.replace``. Returns ``dest``."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.chmod(tmp, _modes.file)
    os.replace(tmp, dest)
    return Path(dest)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory; on success publish it as ``path``.

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
        commit_file(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(data: bytes, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` to ``path`` atomically. Returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_chunks(chunks: Iterable[bytes], path: str | os.PathLike[str]) -> tuple[str, int]:
    """Stream ``chunks`` to ``path`` atomically, never holding them whole; returns
    ``(sha256 hex, size in bytes)``. If the iterable raises, ``path`` is left as it was."""
    digest = hashlib.sha256()
    size = 0
    with atomic_path(path) as tmp, tmp.open("wb") as out:
        for chunk in chunks:
            size += len(chunk)
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest(), size


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


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``path``; on success it replaces ``path`` as a whole.

    An existing ``path`` (an earlier attempt's) is moved aside, then removed, so readers see the
    old folder or the new one. Files inside should be written with the helpers above or get
    their mode here: every regular file gets the file mode, the folder the directory mode.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        yield staging
        for child in staging.rglob("*"):
            os.chmod(child, _modes.directory if child.is_dir() else _modes.file)
        os.chmod(staging, _modes.directory)
        if final.exists():
            stale = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
            os.replace(final, stale / final.name)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
