"""Twenty uploads streaming at once on PostgreSQL, through a real HTTP server (uvicorn).

The database pool holds 15 connections (5 + 10 overflow). An upload route that kept its
connection while the body streams would let only 15 uploads reach the streaming stage; the other
five would wait for a connection until the pool times out. Every body here is held back until
all twenty uploads are streaming (their temporary files exist), so the test passes only if no
upload holds a connection while it receives bytes.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from segassist.server.main import create_app
from segassist.server.settings import Settings
from tests.server.conftest import LABEL_SCHEMA, nifti_bytes, volume

UPLOADS = 20
HANG_GUARD_SECONDS = 60.0
"""Bounds a hung test on a shared machine; not a performance claim."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def base_url(data_dir: Path, postgres_url: str) -> Iterator[str]:
    """The API on PostgreSQL served by uvicorn in a thread; its base URL."""
    settings = Settings(
        data_dir=data_dir,
        database_url=postgres_url,
        broker_url="filesystem://",
        device="cpu",
        api_token="",
    )
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(int(HANG_GUARD_SECONDS * 10)):
            if server.started:
                break
            threading.Event().wait(0.1)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


async def _streaming_bodies(
    uploads_dir: Path, contents: list[bytes]
) -> tuple[str, list[AsyncIterator[bytes]]]:
    """Multipart bodies that send their first half, then wait until every upload is streaming.

    One watcher sets a shared latch when all temporary files exist at once: the first body to
    finish removes its file, so bodies polling the folder each on their own would miss it.
    """
    boundary = uuid.uuid4().hex
    latch = asyncio.Event()

    async def watch() -> None:
        for _ in range(int(HANG_GUARD_SECONDS * 20)):
            if len(list(uploads_dir.glob("*"))) >= UPLOADS:
                latch.set()
                return
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())

    async def all_streaming() -> None:
        await watcher
        if not latch.is_set():
            raise AssertionError(
                f"only {len(list(uploads_dir.glob('*')))} of {UPLOADS} uploads reached streaming"
            )

    async def body(index: int, content: bytes) -> AsyncIterator[bytes]:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file";'
            f' filename="ct{index}.nii.gz"\r\nContent-Type: application/gzip\r\n\r\n'
        ).encode()
        half = len(content) // 2
        yield head + content[:half]
        await all_streaming()
        yield content[half:] + f"\r\n--{boundary}--\r\n".encode()

    return boundary, [body(i, c) for i, c in enumerate(contents)]


def test_twenty_concurrent_uploads_on_postgresql_all_succeed(base_url: str, data_dir: Path) -> None:
    contents = [nifti_bytes(volume(seed)) for seed in range(UPLOADS)]

    async def run() -> tuple[str, list[httpx.Response]]:
        async with httpx.AsyncClient(base_url=base_url, timeout=HANG_GUARD_SECONDS) as client:
            created = await client.post(
                "/api/v1/datasets", json={"name": "c", "modality": "CT", "labels": LABEL_SCHEMA}
            )
            assert created.status_code == 201, created.text
            dataset_id = created.json()["id"]
            boundary, bodies = await _streaming_bodies(data_dir / "uploads", contents)
            headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
            responses = await asyncio.gather(
                *(
                    client.post(
                        f"/api/v1/datasets/{dataset_id}/images", content=body, headers=headers
                    )
                    for body in bodies
                )
            )
            return dataset_id, list(responses)

    dataset_id, responses = asyncio.run(run())

    assert [r.status_code for r in responses] == [201] * UPLOADS, [r.text for r in responses]
    stored = {r.json()["sha256"] for r in responses}
    assert len(stored) == UPLOADS  # twenty different volumes, none mixed up
    listed = httpx.get(f"{base_url}/api/v1/datasets/{dataset_id}/images").json()
    assert len(listed) == UPLOADS
    for image in listed:
        on_disk = data_dir / "images" / image["id"] / "image.nii.gz"
        assert hashlib.sha256(on_disk.read_bytes()).hexdigest() == image["sha256"]
    assert list((data_dir / "uploads").glob("*")) == []
