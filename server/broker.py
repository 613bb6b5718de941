"""Kombu's filesystem transport with atomic publishing: the embedded service's broker.

Kombu's ``filesystem`` channel creates a message file under its final name, then writes it. A
worker polling the folder (every 0.1 s here) can move and read the file in between, get an empty
payload and drop the message: with a consumer polling beside a publisher, 5 of 3000 messages were
lost that way. The job row stays ``queued`` until the recovery sweep sends it again
(``queued_resend_seconds``, 5 min), so a user's prediction could wait five minutes on a busy
machine.

:class:`AtomicFilesystemTransport` writes each message under a staging folder on the same
filesystem, flushes it to disk, then renames it into the message folder: a consumer finds either
no file or the whole message. Consuming is kombu's own.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.json import dumps
from kombu.utils.objects import cached_property

__all__ = ["TRANSPORT", "AtomicFilesystemChannel", "AtomicFilesystemTransport"]

TRANSPORT = f"{__name__}:AtomicFilesystemTransport"
"""Celery's ``broker_transport`` setting naming :class:`AtomicFilesystemTransport`."""


class AtomicFilesystemChannel(filesystem.Channel):
    """A filesystem channel whose messages appear in the message folder only once complete.

    Transport option ``staging_folder``: where a message is written before its rename; it must be
    on the filesystem of ``data_folder_out`` (default: ``<data_folder_out>/../staging``).
    """

    @cached_property
    def staging_folder(self) -> Path:
        """Folder of messages being written (created if missing)."""
        default = Path(self.data_folder_out).parent / "staging"
        folder = Path(self.transport_options.get("staging_folder", default))
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    # kombu's filesystem channel names the argument ``payload``, its base channel ``message``.
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        """Write ``payload`` to ``staging/<name>``, fsync it, rename it to ``<data_folder_out>/<name>``.

        ``<name>`` is kombu's own (``<ms>_<uuid>.<queue>.msg``): consumers order by it and pick
        their queue's messages by its suffix.
        """
        name = f"{round(time.monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        staged = self.staging_folder / name
        try:
            with staged.open("wb") as handle:
                handle.write(dumps(payload).encode())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staged, Path(self.data_folder_out) / name)
        except OSError as exc:
            staged.unlink(missing_ok=True)
            raise ChannelError(f"Cannot add message {name!r} to {self.data_folder_out}") from exc


class AtomicFilesystemTransport(filesystem.Transport):
    """Kombu's filesystem transport publishing through :class:`AtomicFilesystemChannel`."""

    Channel = AtomicFilesystemChannel
