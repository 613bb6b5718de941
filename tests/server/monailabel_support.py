"""Support of the MONAI Label tests: a live server on a real port, MONAI Label's own client.

MONAI Label's client (``monailabel==0.8.5``, installed ``--no-deps`` by ``make install``) is the
code 3D Slicer's module bundles: it talks ``http.client`` to a URL and parses multipart answers
with ``cgi.FieldStorage`` on the raw socket, so the tests need a server on a port, not an
in-process transport. :class:`LiveServer` runs the real app with uvicorn in a thread.
"""

from __future__ import annotations

import gzip
import socket
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import nibabel as nib
import numpy as np
import uvicorn

from segassist.server.main import create_app
from segassist.server.settings import Settings
from tests.conftest import unavailable

__all__ = [
    "AFFINE",
    "SHAPE",
    "LiveServer",
    "client_module",
    "save_nifti",
    "slicer_label",
    "synthetic_volume",
]

SHAPE = (24, 20, 6)
AFFINE = np.array(
    [
        [0.0, -0.9, 0.1, 80.25],
        [1.1, 0.0, 0.0, -12.5],
        [0.0, 0.05, 3.0, 7.125],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
"""Oblique and sheared; axis 2 has the largest spacing (3 mm): the annotation axis."""
PAINTED = (1, 4)


def client_module() -> Any:
    """``monailabel.client.client``: the client, its exception and ``MONAILabelUtils`` (skip,
    or fail under CI, when it is not installed)."""
    try:
        from monailabel.client import client
    except ImportError:
        unavailable(
            "monailabel 0.8.5 is not installed: `make install` runs "
            "`pip install --no-deps monailabel==0.8.5`"
        )
    return client


def synthetic_volume(seed: int = 0) -> np.ndarray:
    """A bright box in noise (CT-like values)."""
    rng = np.random.default_rng(seed)
    data = rng.normal(-100.0, 30.0, SHAPE).astype(np.float32)
    data[6:16, 5:14, :] += 400.0
    return data


def slicer_label() -> np.ndarray:
    """What Slicer saves after painting the box on :data:`PAINTED` slices: 0 everywhere else."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    for z in PAINTED:
        label[6:16, 5:14, z] = 1
    return label


def save_nifti(data: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path.write_bytes(gzip.compress(image.to_bytes()))
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """The segassist API on ``settings``, served by uvicorn on a free port in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = _free_port()
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the live server did not start")
            time.sleep(0.05)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
