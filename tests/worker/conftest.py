"""Worker fixtures: a real Celery worker subprocess, the API in-process, tiny synthetic data.

Two back-ends, as deployed: ``embedded`` (filesystem broker under the data directory + SQLite)
and ``deployed`` (Redis on its own logical database + a fresh PostgreSQL schema).
"""

from __future__ import annotations

import gzip
import io
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from segassist.server.main import create_app
from segassist.server.settings import Settings
from segassist.worker.serve import worker_command

SHAPE = (24, 20, 6)
AFFINE = np.array(
    [
        [0.0, -0.9, 0.1, 80.25],
        [1.1, 0.0, 0.0, -12.5],
        [0.0, 0.05, 3.0, 7.125],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
LABEL_SCHEMA = {"1": {"name": "blob", "color": "#e6194b"}}
ANNOTATED = (1, 4)

TINY_PRETRAIN = {
    "batch_size": 2,
    "image_size": 16,
    "channels": [4, 8],
    "num_clusters": 3,
    "kmeans_slices": 2,
    "checkpoint_every": 1,
}
"""Pretraining config of the tests: a 2-level U-Net with 4 feature channels, 16×16 crops."""

TINY_FEWSHOT = {"linear_steps": 5}

JOB_DEADLINE_SECONDS = 600.0
"""Generous: the machine is shared; this bounds a hung test, it is not a performance claim."""


def synthetic_volume(seed: int = 0) -> np.ndarray:
    """A bright box in noise (CT-like values): something a segmenter can learn."""
    rng = np.random.default_rng(seed)
    data = rng.normal(-100.0, 30.0, SHAPE).astype(np.float32)
    data[6:16, 5:14, :] += 400.0
    return data


def sparse_label() -> np.ndarray:
    """The box on :data:`ANNOTATED` slices (axis 2), 255 elsewhere."""
    label = np.full(SHAPE, 255, dtype=np.uint8)
    for z in ANNOTATED:
        label[..., z] = 0
        label[6:16, 5:14, z] = 1
    return label


def nifti_bytes(data: np.ndarray) -> bytes:
    image = nib.Nifti1Image(data, AFFINE)
    image.set_qform(AFFINE, code=1)
    image.set_sform(AFFINE, code=1)
    return gzip.compress(image.to_bytes())


class Service:
    """The API (in-process TestClient) plus helpers to wait on jobs run by the real worker."""

    def __init__(self, client: TestClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings

    def post(self, path: str, **kwargs: Any) -> Any:
        response = self.client.post(f"/api/v1{path}", **kwargs)
        assert response.status_code in (200, 201, 202), response.text
        return response.json()

    def get(self, path: str) -> Any:
        response = self.client.get(f"/api/v1{path}")
        assert response.status_code == 200, response.text
        return response.json()

    def dataset_with_labels(self, modality: str = "CT") -> tuple[str, str]:
        """A dataset with one image and a sparse final label; returns (dataset id, image id)."""
        dataset = self.post(
            "/datasets", json={"name": "box", "modality": modality, "labels": LABEL_SCHEMA}
        )
        files = {"file": ("ct.nii.gz", io.BytesIO(nifti_bytes(synthetic_volume())), "x")}
        image = self.post(f"/datasets/{dataset['id']}/images", files=files)
        label = {"file": ("label.nii.gz", io.BytesIO(nifti_bytes(sparse_label())), "x")}
        self.post(f"/images/{image['id']}/labels", files=label)
        return str(dataset["id"]), str(image["id"])

    def job(self, kind: str, dataset_id: str, **params: Any) -> str:
        body = {"kind": kind, "dataset_id": dataset_id, "params": params}
        return str(self.post("/jobs", json=body)["id"])

    def wait(
        self,
        job_id: str,
        until: Callable[[dict[str, Any]], bool],
        deadline: float = JOB_DEADLINE_SECONDS,
    ) -> dict[str, Any]:
        """Poll the job until ``until(job)``; fail with the job and its log after ``deadline``."""
        end = time.monotonic() + deadline
        while True:
            job = dict(self.get(f"/jobs/{job_id}"))
            if until(job):
                return job
            if time.monotonic() > end:
                log = self.client.get(f"/api/v1/jobs/{job_id}/logs").text
                pytest.fail(f"job never reached the expected state: {job}\nlog:\n{log}")
            time.sleep(0.5)

    def finished(self, job_id: str) -> dict[str, Any]:
        return self.wait(job_id, lambda job: job["status"] in ("succeeded", "failed", "cancelled"))


class Worker:
    """A Celery worker subprocess in its own process group, logging to a file."""

    def __init__(self, settings: Settings, log_path: Path) -> None:
        env = dict(os.environ)
        env |= {
            "SEGASSIST_DATA_DIR": str(settings.data_dir),
            "SEGASSIST_DATABASE_URL": settings.database_url,
            "SEGASSIST_BROKER_URL": settings.broker_url,
            "SEGASSIST_TASK_SOFT_TIME_LIMIT": str(settings.task_soft_time_limit),
            "SEGASSIST_TASK_HARD_TIME_LIMIT": str(settings.task_hard_time_limit),
            "SEGASSIST_DEVICE": "cpu",
            "SEGASSIST_ASSIST_PRETRAIN_STEPS": str(settings.assist_pretrain_steps),
            "SEGASSIST_BACKGROUND_PRETRAIN_STEPS": str(settings.background_pretrain_steps),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.process = subprocess.Popen(
            worker_command(),
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """``kill -9`` the worker and its pool processes (a crash, an OOM kill, a power cut)."""
        if self.alive():
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=60)

    def stop(self) -> None:
        """End the worker after a test without waiting for the job it runs (a background
        refinement the test did not wait for: a warm shutdown would let it finish)."""
        self.kill()
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture(params=["embedded", "deployed"])
def settings(request: pytest.FixtureRequest, data_dir: Path) -> Settings:
    """``embedded``: filesystem broker + SQLite; ``deployed``: Redis + PostgreSQL.

    A test may narrow the back-ends and set time limits by indirect parametrisation with
    ``("embedded" | "deployed", {"task_soft_time_limit": …, …})``.
    """
    backend, extra = (request.param, {}) if isinstance(request.param, str) else request.param
    if backend == "embedded":
        database_url, broker_url = f"sqlite:///{data_dir / 'segassist.db'}", "filesystem://"
    else:
        database_url = str(request.getfixturevalue("postgres_url"))
        broker_url = str(request.getfixturevalue("redis_url"))
    return Settings(
        data_dir=data_dir,
        database_url=database_url,
        broker_url=broker_url,
        device="cpu",
        api_token="",
        **extra,
    )


@pytest.fixture
def service(settings: Settings) -> Iterator[Service]:
    """The API app on ``settings`` (migrates on start-up)."""
    with TestClient(create_app(settings)) as client:
        yield Service(client, settings)


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path) -> Iterator[Callable[[], Worker]]:
    """Start real worker processes on ``settings``; all are stopped after the test."""
    workers: list[Worker] = []

    def start() -> Worker:
        worker = Worker(settings, tmp_path / f"worker-{len(workers)}.log")
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()
