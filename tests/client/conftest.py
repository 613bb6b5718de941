"""A real embedded segassist service (``segassist serve`` in a subprocess) and small volumes.

The service runs the API and one Celery worker with the filesystem broker and SQLite under a
temporary data directory, on a free port, started through :func:`segassist.client.local.start_service`
(the code path ``segassist segment`` uses when no service answers). ``SEGASSIST_TEST_SERVER=URL``
runs the tests against an already running service instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segassist.client.local import ServiceStartError, start_service, wait_until_healthy

TINY_PRETRAIN = {
    "batch_size": 2,
    "image_size": 32,
    "channels": [16, 32],
    "num_clusters": 3,
    "kmeans_slices": 4,
    "checkpoint_every": 1,
}
"""Pretraining config small enough for a test (a few seconds on 2 cores)."""

TINY_FIT = {"linear_steps": 100, "steps": 5, "eval_every": 5}
"""Few-shot config small enough for a test."""

OBLIQUE_AFFINE = np.array(
    [
        [-0.9, 0.2, 0.0, 40.0],
        [0.1, 1.1, 0.3, -20.0],
        [0.0, -0.25, 2.5, 7.5],
        [0.0, 0.0, 0.0, 1.0],
    ]
)


@dataclass(frozen=True)
class Service:
    """A running embedded service."""

    url: str
    data_dir: Path
    log: Path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    """End the service we started: its own process group (API + worker), TERM then KILL."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def running_service(data_dir: Path, pretrain_steps: int) -> Iterator[Service]:
    """``segassist serve`` on a free port over ``data_dir`` (log: ``serve.log``) with
    ``pretrain_steps`` of first pretraining and none in the background; stopped after the yield."""
    log = data_dir / "serve.log"
    port = _free_port()
    budget = {
        "SEGASSIST_ASSIST_PRETRAIN_STEPS": str(pretrain_steps),
        "SEGASSIST_BACKGROUND_PRETRAIN_STEPS": "0",
    }
    saved = {k: os.environ.get(k) for k in budget}
    os.environ.update(budget)
    try:
        process = start_service("127.0.0.1", port, data_dir, log)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, process, timeout=180, log_path=log)
    except ServiceStartError as exc:
        _stop(process)
        pytest.fail(f"{exc}\n--- serve.log ---\n{log.read_text()[-4000:]}")
    yield Service(url, data_dir, log)
    _stop(process)


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    data_dir = tmp_path_factory.mktemp("segassist-data")
    log = data_dir / "serve.log"
    existing = os.environ.get("SEGASSIST_TEST_SERVER")
    if existing:  # run the client tests against a service started elsewhere
        wait_until_healthy(existing, timeout=30)
        yield Service(existing.rstrip("/"), data_dir, log)
        return
    # A short first pretraining and none in the background: the tests' budget, not the product's.
    yield from running_service(data_dir, pretrain_steps=3)


def make_volume(shape: tuple[int, int, int] = (32, 32, 12)) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume (HU) with a bright ellipsoid (class 1) and a dark one (class 2)."""
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.arange(s, dtype=np.float32) for s in shape), indexing="ij")
    c = [s / 2 for s in shape]
    bright = ((x - c[0]) / 7) ** 2 + ((y - c[1] + 5) / 6) ** 2 + ((z - c[2]) / 5) ** 2 <= 1
    dark = ((x - c[0]) / 5) ** 2 + ((y - c[1] - 9) / 4) ** 2 + ((z - c[2]) / 5) ** 2 <= 1
    image = rng.normal(0.0, 20.0, shape).astype(np.float32)
    image[bright] += 600.0
    image[dark] -= 500.0
    label = np.zeros(shape, dtype=np.uint8)
    label[bright] = 1
    label[dark] = 2
    return image, label


def save_nifti(array: np.ndarray, path: Path, affine: np.ndarray = OBLIQUE_AFFINE) -> Path:
    img = nib.Nifti1Image(array, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


@dataclass(frozen=True)
class Volume:
    """A synthetic image, its full reference labels and a sparse annotation of 3 slices."""

    image: Path
    reference: np.ndarray
    sparse: Path
    labelled: tuple[int, ...]
    axis: int = 2


@pytest.fixture(scope="session")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    folder = tmp_path_factory.mktemp("volume")
    image, label = make_volume()
    labelled = (3, 6, 8)
    sparse = np.full(label.shape, 255, dtype=np.uint8)
    sparse[:, :, list(labelled)] = label[:, :, list(labelled)]
    return Volume(
        image=save_nifti(image, folder / "ct.nii.gz"),
        reference=label,
        sparse=save_nifti(sparse, folder / "sparse.nii.gz"),
        labelled=labelled,
    )


def load_nifti(path: Path) -> nib.Nifti1Image:
    """Load a NIfTI written by the service or the CLI."""
    image = nib.load(str(path))
    assert isinstance(image, nib.Nifti1Image), f"{path}: {type(image).__name__}, not NIfTI-1"
    return image
