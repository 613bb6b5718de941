"""Streaming multipart receiver: one file part goes straight to disk within a byte limit.

Starlette's ``request.form()`` spools the whole body before the route runs and cannot stop an
oversized upload early; this parser writes the ``file`` part chunk by chunk to a temporary file in
the datastore, hashing as it goes, and stops with 413 as soon as the limit is passed.

Parsing, hashing and writing run in a worker thread (the event loop only receives the body and
hands over about :data:`_HANDOFF_BYTES` at a time), so one upload never stalls the other
requests. Every bound is explicit: at most :data:`MAX_PARTS` parts, :data:`MAX_PART_HEADERS`
header lines of at most :data:`MAX_HEADER_LINE_BYTES` per part (python-multipart enforces both),
:data:`_MAX_FIELD_BYTES` per text field and one file part.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from anyio import to_thread
from fastapi import HTTPException, Request, status
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy.orm import Session

from segassist.server.storage import UploadTooLargeError

__all__ = [
    "MAX_HEADER_LINE_BYTES",
    "MAX_PARTS",
    "MAX_PART_HEADERS",
    "ReceivedUpload",
    "multipart_openapi",
    "receive_upload",
    "release_connection",
]

MAX_PARTS = 16
"""Most parts (the file and text fields) one upload body may hold."""
MAX_PART_HEADERS = 8
"""Most header lines of one part."""
MAX_HEADER_LINE_BYTES = 4096
"""Longest header line of a part."""
_MAX_FIELD_BYTES = 64 * 1024
_MULTIPART_OVERHEAD = 64 * 1024
_HANDOFF_BYTES = 1 << 20
"""Body bytes gathered on the event loop before the worker thread parses and writes them."""


@dataclass
class ReceivedUpload:
    """What :func:`receive_upload` wrote and read.

    Attributes:
        path: temporary file holding the ``file`` part.
        filename: the client's file name (may be empty).
        size: bytes written.
        sha256: hex digest of the bytes written.
        fields: the text form fields.
    """

    path: Path
    filename: str = ""
    size: int = 0
    sha256: str = ""
    fields: dict[str, str] = field(default_factory=dict)


class _Receiver:
    """python-multipart callbacks writing the file part to ``out``."""

    def __init__(self, out: BinaryIO, file_field: str, max_bytes: int) -> None:
        self.out = out
        self.file_field = file_field
        self.max_bytes = max_bytes
        self.digest = hashlib.sha256()
        self.size = 0
        self.filename: str | None = None
        self.fields: dict[str, str] = {}
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._is_file = False
        self._buffer = bytearray()
        self._parts = 0

    def on_part_begin(self) -> None:
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"multipart body has more than {MAX_PARTS} parts",
            )
        self._disposition = b""
        self._buffer.clear()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        self._is_file = self._name == self.file_field
        if self._is_file:
            if self.filename is not None:
                raise HTTPException(
                    status.HTTP_422_UNPROCESSABLE_CONTENT,
                    f"send exactly one '{self.file_field}' part",
                )
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._is_file:
            self.size += len(chunk)
            if self.size > self.max_bytes:
                raise UploadTooLargeError(self.max_bytes)
            self.digest.update(chunk)
            self.out.write(chunk)
            return
        if len(self._buffer) + len(chunk) > _MAX_FIELD_BYTES:
            raise HTTPException(
                status.HTTP_413_CONTENT_TOO_LARGE,
                f"form field {self._name!r} exceeds {_MAX_FIELD_BYTES} bytes",
            )
        self._buffer.extend(chunk)

    def on_part_end(self) -> None:
        if not self._is_file and self._name:
            self.fields[self._name] = self._buffer.decode("utf-8", "replace")


async def receive_upload(
    request: Request, dst: Path, max_bytes: int, file_field: str = "file"
) -> ReceivedUpload:
    """Stream the multipart body of ``request``; the ``file_field`` part goes to ``dst``.

    The body is parsed, hashed and written in a worker thread; callers hold no database
    connection while it streams.

    Raises:
        UploadTooLargeError: (413) the file part, or the declared body, exceeds ``max_bytes``.
        HTTPException: 422 when the body is not multipart, is malformed, or has no file part.
    """
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"send the volume as multipart/form-data with a '{file_field}' part",
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes + _MULTIPART_OVERHEAD:
        raise UploadTooLargeError(max_bytes)
    with await to_thread.run_sync(dst.open, "wb") as out:
        receiver = _Receiver(out, file_field, max_bytes)
        parser = MultipartParser(
            params[b"boundary"],
            {
                "on_part_begin": receiver.on_part_begin,
                "on_header_field": receiver.on_header_field,
                "on_header_value": receiver.on_header_value,
                "on_header_end": receiver.on_header_end,
                "on_headers_finished": receiver.on_headers_finished,
                "on_part_data": receiver.on_part_data,
                "on_part_end": receiver.on_part_end,
            },
            max_header_count=MAX_PART_HEADERS,
            max_header_size=MAX_HEADER_LINE_BYTES,
        )
        pending = bytearray()
        try:
            async for chunk in request.stream():
                pending += chunk
                if len(pending) >= _HANDOFF_BYTES:
                    await to_thread.run_sync(parser.write, bytes(pending))
                    pending.clear()
            await to_thread.run_sync(_finish, parser, bytes(pending), out)
        except FormParserError as exc:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT, f"malformed multipart body: {exc}"
            ) from exc
    if receiver.filename is None:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"multipart body has no '{file_field}' part"
        )
    return ReceivedUpload(
        path=dst,
        filename=receiver.filename,
        size=receiver.size,
        sha256=receiver.digest.hexdigest(),
        fields=receiver.fields,
    )


async def release_connection(session: Session) -> None:
    """End ``session``'s transaction so its pooled connection is free while a body streams.

    An upload route looks its target up (a quick 404), releases the connection here, receives
    the body, then stores it in a new transaction: twenty slow uploads do not hold twenty
    connections (the pool holds fifteen). Objects loaded so far reload on their next access.
    """
    await to_thread.run_sync(session.rollback)


def _finish(parser: MultipartParser, rest: bytes, out: BinaryIO) -> None:
    """Parse the last bytes and check that the body ended properly."""
    parser.write(rest)
    parser.finalize()
    out.flush()


UPLOAD_MEDIA_TYPES = "application/gzip, application/zip, application/octet-stream"
"""What a volume part may be: ``.nii.gz``, a ``.zip`` of a DICOM series, ``.nii`` (or NRRD)."""


def multipart_openapi(file_field: str = "file", **fields: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` of an upload route: a required binary ``file_field`` (a volume,
    :data:`UPLOAD_MEDIA_TYPES`) plus ``fields``.

    The routes parse the body themselves (streamed, size-limited), so FastAPI cannot infer it.
    """
    properties = {file_field: {"type": "string", "format": "binary"}, **fields}
    schema = {"type": "object", "required": [file_field], "properties": properties}
    form = {"schema": schema, "encoding": {file_field: {"contentType": UPLOAD_MEDIA_TYPES}}}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": form}}}
