"""MONAI Label sessions: an uploaded volume a client refers to by session id for a while.

``PUT /session/`` stores the volume as an image of the app's dataset (so it can be predicted like
any other) and records ``<data_dir>/monailabel/sessions/<session id>.json``; ``infer`` with
``session_id`` works on that image. A session expires ``expiry`` seconds after its last use
(default one hour); ``DELETE /session/{id}`` ends it. Ending a session keeps the image.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from segassist.server.db.tables import ID_PATTERN, new_id
from segassist.server.monailabel.apps import monailabel_dir
from segassist.server.storage import Storage, atomic_write_bytes

__all__ = ["DEFAULT_EXPIRY_SECONDS", "SessionRecord", "create", "get", "remove"]

DEFAULT_EXPIRY_SECONDS = 3600


@dataclass
class SessionRecord:
    """One session: which image of which dataset, and its times (Unix seconds)."""

    session_id: str
    dataset_id: str
    image_id: str
    name: str
    create_ts: int
    last_access_ts: int
    expiry: int

    def public(self, image_path: str) -> dict[str, Any]:
        """``{session_id, session_info}`` as MONAI Label answers."""
        return {
            "session_id": self.session_id,
            "session_info": {
                "name": self.name,
                "path": image_path,
                "image": self.image_id,
                "meta": {"dataset_id": self.dataset_id},
                "create_ts": self.create_ts,
                "last_access_ts": self.last_access_ts,
                "expiry": self.expiry,
            },
        }


def _path(storage: Storage, session_id: str) -> Path:
    return monailabel_dir(storage) / "sessions" / f"{session_id}.json"


def _write(storage: Storage, record: SessionRecord) -> None:
    path = _path(storage, record.session_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(json.dumps(asdict(record)).encode(), path)


def create(
    storage: Storage, dataset_id: str, image_id: str, name: str, expiry: int
) -> SessionRecord:
    """Record a new session on a stored image."""
    now = int(time.time())
    record = SessionRecord(new_id(), dataset_id, image_id, name, now, now, expiry)
    _write(storage, record)
    return record


def get(storage: Storage, session_id: str, touch: bool = False) -> SessionRecord | None:
    """The live session ``session_id`` (an expired one is removed), optionally marked used."""
    if not re.fullmatch(ID_PATTERN, session_id):
        return None
    path = _path(storage, session_id)
    try:
        record = SessionRecord(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    now = int(time.time())
    if record.expiry > 0 and now > record.last_access_ts + record.expiry:
        path.unlink(missing_ok=True)
        return None
    if touch:
        record.last_access_ts = now
        _write(storage, record)
    return record


def remove(storage: Storage, session_id: str) -> SessionRecord | None:
    """End a session; returns it, or ``None`` if there was none."""
    record = get(storage, session_id)
    if record is not None:
        _path(storage, session_id).unlink(missing_ok=True)
    return record
