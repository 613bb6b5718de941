"""Kombu's filesystem transport with atomic publishing and binding: the embedded service's broker.

Kombu's ``filesystem`` channel creates a message file under its final name, then writes it. A
worker polling the folder (every 0.1 s here) can move and read the file in between, get an empty
payload and drop the message: with a consumer polling beside a publisher, 5 of 3000 messages were
lost that way. The job row stays ``queued`` until the recovery sweep sends it again
(``queued_resend_seconds``, 5 min), so a user's prediction could wait five minutes on a busy
machine.

:class:`AtomicFilesystemTransport` writes each message under a staging folder on the same
filesystem, flushes it to disk, then renames it into the message folder: a consumer finds either
no file or the whole message. Consuming is kombu's own.

Binding a queue to an exchange has the same flaw: kombu opens a missing exchange table with
``"wb"`` (truncating) before locking it, so processes binding at once (the service's workers all
start together, and the API binds the queue it publishes to) can read an empty table, lose a
binding, or leave the table corrupt for good: 3 processes binding one exchange at the same
moment, 200 times, left 22 corrupt tables and lost 45 bindings. Here a binding is added under an
exclusive lock on a side file and the table replaced by rename, so readers (kombu's own) see a
whole table, old or new.
"""

from __future__ import annotations

import fcntl
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

    def _queue_bind(self, exchange: str, routing_key: str, pattern: str, queue: str) -> None:
        """Add the binding ``(routing_key, pattern, queue)`` to ``exchange``'s table, if missing.

        Under an exclusive lock on ``<table>.lock``: read the table, write the new one beside it
        in the control folder, fsync, rename it over the old.
        """
        table_file = Path(self._exchange_file(exchange))
        binding = filesystem.exchange_queue_t(routing_key or "", pattern or "", queue or "")
        try:
            table_file.parent.mkdir(parents=True, exist_ok=True)
            with open(f"{table_file}.lock", "ab") as guard:
                fcntl.flock(guard, fcntl.LOCK_EX)
                try:
                    table = self.get_table(exchange)
                except ValueError:  # left corrupt by kombu's own binding: each consumer rebinds
                    table = []
                if binding in table:
                    return
                staged = table_file.with_name(f".{table_file.name}.{uuid.uuid4()}")
                with staged.open("wb") as handle:
                    handle.write(dumps([binding, *table]).encode())
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(staged, table_file)
        except OSError as exc:
            raise ChannelError(f"Cannot bind {queue!r} to {table_file}") from exc


class AtomicFilesystemTransport(filesystem.Transport):
    """Kombu's filesystem transport publishing through :class:`AtomicFilesystemChannel`."""

    Channel = AtomicFilesystemChannel
