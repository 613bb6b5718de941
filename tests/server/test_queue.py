"""The embedded broker (Celery filesystem transport) keeps every file under the data directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kombu import Exchange, Queue
from kombu.message import Message
from kombu.transport import filesystem
from kombu.transport.virtual import BrokerState

from segassist.server.queue import QUEUE_NAME, make_celery, task_name
from segassist.server.settings import Settings


def test_embedded_broker_writes_nothing_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kombu's default control folder is ``./control``: a ``segassist serve`` started from a
    project folder used to leave it there, and an API and a worker started from two folders did
    not share their exchange bindings."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    # The transport remembers bindings process-wide and skips writing known ones: start afresh,
    # as a new API or worker process does.
    monkeypatch.setattr(filesystem.Transport, "global_state", BrokerState())
    settings = Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'unused.db'}",
        broker_url="filesystem://",
        device="cpu",
        api_token="",
    )
    celery = make_celery(settings)
    task_id = "5" * 32
    celery.send_task(task_name("pretrain"), args=[task_id], task_id=task_id, queue=QUEUE_NAME)

    received: list[dict[str, Any]] = []

    def on_message(_body: Any, message: Message) -> None:
        received.append(dict(message.headers))
        message.ack()

    queue = Queue(QUEUE_NAME, Exchange(QUEUE_NAME), routing_key=QUEUE_NAME)
    with (
        celery.connection_for_read() as connection,
        connection.Consumer(queue, callbacks=[on_message], accept=["json"]),
    ):
        connection.drain_events(timeout=10)

    assert [(h["task"], h["id"]) for h in received] == [("segassist.pretrain", task_id)]
    assert sorted(p.name for p in cwd.rglob("*")) == []
    control = settings.broker_dir / "control"
    assert (control / f"{QUEUE_NAME}.exchange").is_file()
