"""Service benchmark: the embedded service measured through its REST API, plus inference speed.

``python -m bench.service [--quick] [--out DIR]`` (or ``segassist bench service …``) starts the
embedded service (:func:`worker.serve.run_embedded`: uvicorn + one Celery worker, SQLite and the
filesystem broker in a temporary data directory, 127.0.0.1 only) in a subprocess and measures:

1. upload throughput of a synthetic int16 CT volume (~200 MiB as ``.nii``, and as ``.nii.gz``),
   streamed with httpx; split into "body sent" and "server work after the body";
2. labels submitted → prediction downloaded with a pretrained encoder (pretrained once beforehand
   by a real ``pretrain`` job, not timed): label upload → ``finetune`` job (``linear``) → poll →
   ``POST /models/{id}/predict`` → ``GET …/labels.nii.gz``, broken down with the job row's
   timestamps, the job log and the polled progress phase;
3. ONNX Runtime vs PyTorch eager inference of the default :class:`SegmenterNet` on slices in
   batches of 8, their conv/matmul FLOP/s (``FlopCounterMode``) and the fraction of a numpy
   float32 GEMM measured in the same run (after the service is stopped);
4. p50/p99 latency of metadata calls under 50 concurrent ``httpx.AsyncClient`` clients;
5. peak RSS of the API process and of the worker processes (sampled with psutil) per phase.

Results: ``<out>/service.md`` (tables and the machine) and ``<out>/service.json`` (same rows).
Every process started here is stopped here; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import psutil

from bench.report import machine_info
from models.runtime.configs import IGNORE_INDEX

__all__ = ["PROFILES", "Profile", "Table", "main", "run"]

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
API = "/api/v1"
_CHUNK = 1 << 20
_POLL_SECONDS = 0.1
_SAMPLE_SECONDS = 0.1
_STOP_SECONDS = 90.0
_LAUNCHER = (
    "import logging, sys; from pathlib import Path; "
    "logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(message)s'); "
    "from worker.serve import run_embedded; "
    "run_embedded('127.0.0.1', int(sys.argv[1]), Path(sys.argv[2]))"
)


@dataclass(frozen=True)
class Profile:
    """Sizes of one benchmark run.

    Attributes:
        name: ``"default"`` or ``"quick"``.
        upload_shape: int16 volume uploaded for the throughput rows (512×512×400 = 200 MiB).
        upload_repeats: uploads per file format (the median is reported).
        volume_shape: volume of the labels → prediction runs (slices along the last axis).
        annotated_slices: labelled slices of the sparse label volume.
        e2e_repeats: labels → prediction runs (each uploads a new label version).
        pretrain_steps: steps of the (untimed) pretraining job.
        pretrain_config: :class:`models.pretrain.PretrainConfig` overrides of that job.
        finetune_config: :class:`models.fewshot.FewShotConfig` overrides of the timed jobs
            (empty: the service's defaults, which is what the default profile measures).
        inference_slices: slices of the ONNX vs PyTorch comparison.
        inference_size: their side (pixels).
        inference_repeats: timed passes over the slices per engine (the median is reported).
        batch_size: slices per forward call.
        gemm_size: n of the n×n float32 GEMM.
        gemm_repeats: timed GEMMs (the fastest gives the peak).
        clients: concurrent metadata clients.
        requests_per_client: sequential requests of each client, per endpoint.
        timeout: longest wait (seconds) for any one job, upload or service start.
    """

    name: str
    upload_shape: tuple[int, int, int]
    upload_repeats: int
    volume_shape: tuple[int, int, int]
    annotated_slices: int
    e2e_repeats: int
    pretrain_steps: int
    pretrain_config: dict[str, Any]
    finetune_config: dict[str, Any]
    inference_slices: int
    inference_size: int
    inference_repeats: int
    batch_size: int
    gemm_size: int
    gemm_repeats: int
    clients: int
    requests_per_client: int
    timeout: float


PROFILES = {
    "default": Profile(
        name="default",
        upload_shape=(512, 512, 400),
        upload_repeats=2,
        volume_shape=(256, 256, 100),
        annotated_slices=3,
        e2e_repeats=3,
        pretrain_steps=30,
        pretrain_config={},
        finetune_config={},
        inference_slices=100,
        inference_size=256,
        inference_repeats=3,
        batch_size=8,
        gemm_size=2048,
        gemm_repeats=5,
        clients=50,
        requests_per_client=10,
        timeout=3600.0,
    ),
    "quick": Profile(
        name="quick",
        upload_shape=(128, 128, 64),
        upload_repeats=1,
        volume_shape=(64, 64, 12),
        annotated_slices=3,
        e2e_repeats=1,
        pretrain_steps=2,
        pretrain_config={
            "channels": [8, 16],
            "image_size": 32,
            "batch_size": 2,
            "kmeans_slices": 4,
            "num_clusters": 4,
        },
        finetune_config={"linear_steps": 20},
        inference_slices=8,
        inference_size=64,
        inference_repeats=1,
        batch_size=8,
        gemm_size=512,
        gemm_repeats=2,
        clients=50,
        requests_per_client=2,
        timeout=300.0,
    ),
}


@dataclass
class Table:
    """One results table: rows of ``{"name": str, <column key>: number, …}``.

    Attributes:
        title: heading in the markdown.
        columns: ``(key, header, format spec)`` of the numeric columns, in order.
        rows: measured rows; every column key holds a number.
        note: sentence under the heading (what was measured, how).
    """

    title: str
    columns: list[tuple[str, str, str]]
    rows: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    def add(self, name: str, **values: float) -> None:
        """Append a row and log it."""
        self.rows.append({"name": name, **values})
        shown = ", ".join(f"{h}={values[k]:{f}}" for k, h, f in self.columns if k in values)
        logger.info("%s · %s: %s", self.title, name, shown)

    def markdown(self) -> str:
        """The table as GitHub markdown (heading, note, header, rows)."""
        head = "| | " + " | ".join(h for _, h, _ in self.columns) + " |"
        rule = "|---|" + "---:|" * len(self.columns)
        lines = [f"## {self.title}", "", *([self.note, ""] if self.note else []), head, rule]
        for row in self.rows:
            cells = " | ".join(format(row[k], f) for k, _, f in self.columns)
            lines.append(f"| {row['name']} | {cells} |")
        return "\n".join(lines)


# --------------------------------------------------------------------------- synthetic data


def _affine(spacing: tuple[float, float, float]) -> np.ndarray:
    return np.diag([*spacing, 1.0])


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like int16 volume (air, a noisy body, a bright ellipsoidal organ) and its label.

    Built slice by slice along the last axis, so a 200 MiB volume needs no large temporaries.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    x = np.linspace(-1.0, 1.0, nx)[:, None]
    y = np.linspace(-1.0, 1.0, ny)[None, :]
    body = (x / 0.85) ** 2 + (y / 0.7) ** 2 < 1.0
    image = np.empty(shape, dtype=np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    for k in range(nz):
        z = 2.0 * k / max(nz - 1, 1) - 1.0
        organ = ((x - 0.2) / 0.35) ** 2 + (y / 0.3) ** 2 + (z / 0.7) ** 2 < 1.0
        hu = np.where(body, 40.0, -1000.0) + np.where(organ, 120.0, 0.0)
        hu += rng.normal(0.0, 20.0, size=(nx, ny))
        image[:, :, k] = np.clip(hu, -1024, 3071).astype(np.int16)
        label[:, :, k] = organ
    return image, label


def sparse_label(label: np.ndarray, count: int) -> np.ndarray:
    """Keep ``count`` slices (along the last axis, spread over the organ); the rest is 255."""
    present = np.flatnonzero(label.any(axis=(0, 1)))
    if present.size < count:
        raise ValueError(f"the organ spans {present.size} slices, fewer than {count}")
    picks = present[np.linspace(0, present.size - 1, count + 2)[1:-1].round().astype(int)]
    sparse = np.full_like(label, IGNORE_INDEX)
    sparse[:, :, picks] = label[:, :, picks]
    return sparse


def _save(array: np.ndarray, path: Path) -> Path:
    nib.Nifti1Image(array, _affine((0.8, 0.8, 2.5))).to_filename(path)
    return path


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_environment() -> dict[str, str]:
    """This environment without ``SEGASSIST_*`` (the service must use its own SQLite/broker)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGASSIST_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class MemorySampler:
    """Samples the RSS of the API process and of its descendants (the worker) in a thread.

    Peaks are kept per phase (:meth:`phase`); ``worker_tree`` sums the worker's processes
    (pages shared after fork are counted once per process), ``worker_max`` is the largest one.
    """

    def __init__(self, api: psutil.Process) -> None:
        self.api = api
        self.peaks: dict[str, dict[str, float]] = {}
        self.seen: dict[int, psutil.Process] = {}
        self._phase = "start-up"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def start(self) -> None:
        """Begin sampling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (waits for the thread)."""
        self._stop.set()
        self._thread.join(timeout=5.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute the samples taken inside the block to ``name``."""
        self._phase = name
        try:
            yield
        finally:
            self._phase = "idle"

    def workers(self) -> list[psutil.Process]:
        """The API process's descendants alive now (the Celery worker and its pool)."""
        try:
            children = self.api.children(recursive=True)
        except psutil.Error:
            return []
        for child in children:
            self.seen.setdefault(child.pid, child)
        return children

    def _sample(self) -> None:
        mib = 2.0**20
        try:
            api = self.api.memory_info().rss / mib
        except psutil.Error:
            return
        sizes = []
        for proc in self.workers():
            try:
                sizes.append(proc.memory_info().rss / mib)
            except psutil.Error:
                continue
        peak = self.peaks.setdefault(
            self._phase, {"api_mib": 0.0, "worker_max_mib": 0.0, "worker_tree_mib": 0.0}
        )
        peak["api_mib"] = max(peak["api_mib"], api)
        peak["worker_max_mib"] = max(peak["worker_max_mib"], max(sizes, default=0.0))
        peak["worker_tree_mib"] = max(peak["worker_tree_mib"], sum(sizes))

    def _loop(self) -> None:
        while not self._stop.wait(_SAMPLE_SECONDS):
            self._sample()


class Service:
    """The embedded service (API + worker) in a subprocess on a free loopback port.

    Args:
        data_dir: its data directory (SQLite, broker, files).
        timeout: longest wait for it to become healthy.
    """

    def __init__(self, data_dir: Path, timeout: float) -> None:
        self.data_dir = data_dir
        self.timeout = timeout
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / "service.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._memory: MemorySampler | None = None

    @property
    def memory(self) -> MemorySampler:
        """The RSS sampler of the running service."""
        if self._memory is None:
            raise RuntimeError("the service has not been started")
        return self._memory

    def __enter__(self) -> Service:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-c", _LAUNCHER, str(self.port), str(self.data_dir)],
                cwd=REPO,
                env=_clean_environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        logger.info("started the embedded service (pid %d) at %s", self._process.pid, self.url)
        try:
            self._memory = MemorySampler(psutil.Process(self._process.pid))
            self._memory.start()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _alive(self) -> None:
        if self._process is not None and self._process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the service exited with {self._process.returncode}:\n{tail}")

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}{API}/health", timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    def _wait_ready(self) -> None:
        """Wait until the API answers ``/health`` and the worker process exists."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            self._alive()
            if self._healthy() and self.memory.workers():
                return
            time.sleep(0.2)
        raise TimeoutError(f"the service at {self.url} was not ready after {self.timeout} s")

    def stop(self) -> None:
        """Stop the service, then kill any worker process it left running.

        SIGINT, like Ctrl-C: uvicorn re-raises the signal it caught after shutting down, and
        only SIGINT (as ``KeyboardInterrupt``) lets ``run_embedded`` stop its worker in order.
        """
        seen: list[psutil.Process] = []
        if self._memory is not None:
            self._memory.workers()
            self._memory.stop()
            seen = list(self._memory.seen.values())
        process = self._process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                logger.warning("service pid %d still running after SIGINT; killing it", process.pid)
                process.kill()
                process.wait(timeout=10.0)
        for proc in seen:
            if proc.is_running():
                logger.warning("killing leftover worker process %d", proc.pid)
                proc.kill()
        logger.info("service stopped")


# --------------------------------------------------------------------------- HTTP helpers


def _checked(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise RuntimeError(
            f"{response.request.method} {response.request.url} -> {response.status_code}: "
            f"{response.text[:500]}"
        )
    return response.json()


def _multipart(path: Path, sent: list[float]) -> tuple[Iterator[bytes], dict[str, str]]:
    """A streamed multipart body with one ``file`` part; ``sent`` gets the time it was sent."""
    boundary = uuid.uuid4().hex
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def body() -> Iterator[bytes]:
        yield head
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                yield chunk
        yield tail
        sent.append(time.time())

    headers = {
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(head) + path.stat().st_size + len(tail)),
    }
    return body(), headers


def upload(client: httpx.Client, route: str, path: Path) -> tuple[dict[str, Any], float, float]:
    """POST ``path`` as the ``file`` part; returns (answer, seconds to send, seconds in total)."""
    sent: list[float] = []
    body, headers = _multipart(path, sent)
    began = time.time()
    answer = _checked(client.post(route, content=body, headers=headers))
    ended = time.time()
    return answer, (sent[0] if sent else ended) - began, ended - began


def _wait_job(
    client: httpx.Client,
    job_id: str,
    timeout: float,
    on_poll: Callable[[dict[str, Any]], None],
    interval: float = _POLL_SECONDS,
) -> dict[str, Any]:
    """Poll a job every ``interval`` s until it ends; raise unless it succeeded.

    ``on_poll`` sees every answer.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = _checked(client.get(f"{API}/jobs/{job_id}"))
        on_poll(job)
        if job["status"] == "succeeded":
            return job
        if job["status"] in ("failed", "cancelled"):
            log = client.get(f"{API}/jobs/{job_id}/logs").text[-3000:]
            raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}\n{log}")
        time.sleep(interval)
    raise TimeoutError(f"job {job_id} did not finish within {timeout} s")


def _epoch(stamp: str) -> float:
    """Seconds since the epoch of an API timestamp (naive ones are UTC, as the server writes)."""
    moment = datetime.fromisoformat(stamp)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (.*)$")


def log_time(log: str, pattern: str) -> float | None:
    """Epoch seconds of the first job-log line matching ``pattern`` (log times are local)."""
    wanted = re.compile(pattern)
    for line in log.splitlines():
        match = _LOG_LINE.match(line)
        if match and wanted.search(match.group(3)):
            stamp = time.mktime(time.strptime(match.group(1), "%Y-%m-%d %H:%M:%S"))
            return stamp + int(match.group(2)) / 1000.0
    return None


# --------------------------------------------------------------------------- 1. uploads


def bench_uploads(client: httpx.Client, dataset_id: str, folder: Path, profile: Profile) -> Table:
    """Upload throughput of the synthetic volume as ``.nii`` and ``.nii.gz``."""
    image, _ = synthetic_ct(profile.upload_shape, seed=1)
    voxel_mb = image.nbytes / 1e6
    files = [_save(image, folder / "upload.nii"), _save(image, folder / "upload.nii.gz")]
    del image
    table = Table(
        "Upload throughput",
        [
            ("file_mb", "file MB", ".1f"),
            ("seconds", "total s", ".2f"),
            ("file_mb_s", "file MB/s", ".1f"),
            ("volume_mb_s", "volume MB/s", ".1f"),
            ("send_s", "body sent s", ".2f"),
            ("server_s", "server after body s", ".2f"),
            ("repeats", "n", "d"),
        ],
        note=(
            f"Synthetic int16 CT {'×'.join(map(str, profile.upload_shape))} ({voxel_mb:.0f} MB of "
            "voxels) streamed with httpx to `POST /datasets/{id}/images` (median of n). "
            "'body sent' ends when the last byte is handed to the socket; the server then "
            "validates and stores the volume as .nii.gz (compressing a .nii). MB = 10^6 bytes."
        ),
    )
    route = f"{API}/datasets/{dataset_id}/images"
    for path in files:
        runs = [upload(client, route, path) for _ in range(profile.upload_repeats)]
        total = statistics.median(r[2] for r in runs)
        file_mb = path.stat().st_size / 1e6
        table.add(
            path.name.split(".", 1)[1],
            file_mb=file_mb,
            seconds=total,
            file_mb_s=file_mb / total,
            volume_mb_s=voxel_mb / total,
            send_s=statistics.median(r[1] for r in runs),
            server_s=statistics.median(r[2] - r[1] for r in runs),
            repeats=len(runs),
        )
        path.unlink()
    return table


# --------------------------------------------------------------------------- 2. labels → prediction


_STAGES = (
    ("label_upload", "label upload"),
    ("submit", "job submit"),
    ("queue", "queue wait"),
    ("load", "load"),
    ("fit", "fit"),
    ("export", "export"),
    ("register", "register"),
    ("notice", "poll notice"),
    ("predict", "predict"),
    ("download", "download"),
)


@dataclass
class _Timeline:
    """Epoch seconds of the boundaries of one labels → prediction run (client and server)."""

    submitted: float = math.nan
    label_stored: float = math.nan
    created: float = math.nan
    started: float = math.nan
    fit_start: float = math.nan
    fit_end: float = math.nan
    published: float = math.nan
    finished: float = math.nan
    noticed: float = math.nan
    predicted: float = math.nan
    downloaded: float = math.nan

    def stages(self) -> dict[str, float]:
        """Seconds per stage, summing to the total.

        Boundaries are made monotone; a missing one equals the previous, so its stage counts
        0 s and the next stage takes its time.
        """
        marks = list(asdict(self).values())
        for i in range(1, len(marks)):
            if math.isnan(marks[i]):
                marks[i] = marks[i - 1]
            marks[i] = max(marks[i], marks[i - 1])
        seconds = {key: marks[i + 1] - marks[i] for i, (key, _) in enumerate(_STAGES)}
        seconds["total"] = marks[-1] - marks[0]
        return seconds


def pretrain_encoder(
    client: httpx.Client, dataset_id: str, image_id: str, profile: Profile
) -> tuple[str, float]:
    """Run a (short) pretraining job; returns (encoder id, seconds)."""
    began = time.monotonic()
    params = {
        "objective": "pix2rep",
        "image_ids": [image_id],
        "steps": profile.pretrain_steps,
        "config": profile.pretrain_config,
    }
    job = _checked(
        client.post(
            f"{API}/jobs", json={"kind": "pretrain", "dataset_id": dataset_id, "params": params}
        )
    )
    # Untimed: poll slowly, so the API takes no CPU from the training worker.
    job = _wait_job(client, job["id"], profile.timeout, lambda _: None, interval=1.0)
    return str(job["result"]["encoder_id"]), time.monotonic() - began


@dataclass(frozen=True)
class _Subject:
    """What the timed runs work on: a dataset, its image, a sparse label file, an encoder."""

    dataset_id: str
    image_id: str
    label_path: Path
    encoder_id: str


def labels_to_prediction(
    client: httpx.Client, subject: _Subject, profile: Profile
) -> dict[str, float]:
    """One timed run: label upload → finetune (linear) → poll → predict → download."""
    t = _Timeline(submitted=time.time())
    label, _, _ = upload(client, f"{API}/images/{subject.image_id}/labels", subject.label_path)
    t.label_stored = time.time()
    params = {
        "encoder_id": subject.encoder_id,
        "method": "linear",
        "label_ids": [label["id"]],
        "config": profile.finetune_config,
    }
    job = _checked(
        client.post(
            f"{API}/jobs",
            json={"kind": "finetune", "dataset_id": subject.dataset_id, "params": params},
        )
    )

    def on_poll(answer: dict[str, Any]) -> None:
        past_fit = answer["status"] == "succeeded" or answer["progress"].get("phase") == "export"
        if past_fit and math.isnan(t.fit_end):
            t.fit_end = time.time()

    job = _wait_job(client, job["id"], profile.timeout, on_poll)
    t.noticed = time.time()
    model_id = job["result"]["segmenter_id"]
    prediction = _checked(
        client.post(f"{API}/models/{model_id}/predict", json={"image_id": subject.image_id})
    )
    t.predicted = time.time()
    with client.stream("GET", prediction["urls"]["labels"]) as response:
        size = sum(len(chunk) for chunk in response.iter_bytes())
        if response.status_code != 200 or size == 0:
            raise RuntimeError(f"prediction download answered {response.status_code}, {size} bytes")
    t.downloaded = time.time()
    log = client.get(f"{API}/jobs/{job['id']}/logs").text
    t.created, t.started, t.finished = (
        _epoch(job[k]) for k in ("created_at", "started_at", "finished_at")
    )
    t.fit_start = log_time(log, r"few-shot \w+ on \d+ labelled") or math.nan
    t.published = log_time(log, r"published model artifacts") or math.nan
    if not math.isnan(t.fit_end):
        t.fit_end = min(max(t.fit_end, t.fit_start), t.published)
    return t.stages()


def bench_labels_to_prediction(
    client: httpx.Client, folder: Path, profile: Profile, sampler: MemorySampler
) -> tuple[Table, str]:
    """Pretrain once (untimed), then time labels submitted → prediction downloaded.

    Returns the table and the id of the uploaded image (used by the metadata calls).
    """
    image, label = synthetic_ct(profile.volume_shape, seed=2)
    dataset = _checked(
        client.post(
            f"{API}/datasets",
            json={"name": "bench-e2e", "modality": "CT", "labels": {"1": {"name": "organ"}}},
        )
    )
    stored, _, _ = upload(
        client, f"{API}/datasets/{dataset['id']}/images", _save(image, folder / "e2e.nii.gz")
    )
    label_path = _save(sparse_label(label, profile.annotated_slices), folder / "e2e-labels.nii.gz")
    with sampler.phase("pretrain (untimed)"):
        encoder_id, pretrain_s = pretrain_encoder(client, dataset["id"], stored["id"], profile)
    logger.info("pretrained encoder %s in %.1f s", encoder_id, pretrain_s)
    subject = _Subject(dataset["id"], stored["id"], label_path, encoder_id)
    table = Table(
        "Labels submitted → prediction downloaded",
        [(key, f"{header} s", ".2f") for key, header in _STAGES] + [("total", "total s", ".2f")],
        note=(
            f"Synthetic CT {'×'.join(map(str, profile.volume_shape))}, {profile.annotated_slices} "
            "labelled slices, encoder pretrained beforehand (untimed, "
            f"{profile.pretrain_steps} steps, {pretrain_s:.0f} s). Stages: label upload; job "
            "submit (until the job row exists); queue wait (row created → worker started it; "
            "the filesystem broker is polled, by default once a second); "
            "load (volumes read and normalised); fit (linear probe, incl. encoder features; its "
            f"end is the first poll showing the export phase, ±{_POLL_SECONDS} s); export (ONNX + "
            "parity check); register; poll notice; predict (`POST /models/{id}/predict`, ONNX "
            "in the API); download of labels.nii.gz. Few-shot config overrides: "
            f"{profile.finetune_config or 'none'}. Target: total ≤ 10 s on 2 cores."
        ),
    )
    runs = []
    with sampler.phase("labels → prediction"):
        for i in range(profile.e2e_repeats):
            runs.append(labels_to_prediction(client, subject, profile))
            table.add(f"run {i + 1}", **runs[-1])
    if len(runs) > 1:
        table.add("median", **{k: statistics.median(r[k] for r in runs) for k in runs[0]})
    return table, stored["id"]


# --------------------------------------------------------------------------- 4. metadata latency


async def _client_loop(
    base: str, paths: list[str], latencies: list[float], errors: list[str]
) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=60.0) as client:
        for path in paths:
            began = time.perf_counter()
            response = await client.get(path)
            latencies.append(time.perf_counter() - began)
            if response.status_code != 200:
                errors.append(f"{path} -> {response.status_code}")


async def _load(base: str, path: str, clients: int, per_client: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    errors: list[str] = []
    began = time.perf_counter()
    await asyncio.gather(
        *(_client_loop(base, [path] * per_client, latencies, errors) for _ in range(clients))
    )
    wall = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"{len(errors)} metadata calls failed, e.g. {errors[0]}")
    return latencies, wall


def bench_metadata(base: str, image_id: str, profile: Profile) -> Table:
    """p50/p99 latency of metadata GETs under ``profile.clients`` concurrent clients."""
    table = Table(
        f"Metadata latency, {profile.clients} concurrent clients",
        [
            ("p50_ms", "p50 ms", ".1f"),
            ("p99_ms", "p99 ms", ".1f"),
            ("max_ms", "max ms", ".1f"),
            ("requests_s", "requests/s", ".0f"),
            ("requests", "requests", "d"),
        ],
        note=(
            f"{profile.clients} `httpx.AsyncClient`s (one connection each) on 127.0.0.1, each "
            f"sending {profile.requests_per_client} sequential GETs per endpoint; the client "
            "runs on the same cores as the service."
        ),
    )
    for name, path in (
        ("GET /datasets", f"{API}/datasets"),
        ("GET /jobs", f"{API}/jobs"),
        ("GET /images/{id}", f"{API}/images/{image_id}"),
    ):
        asyncio.run(_load(base, path, min(profile.clients, 4), 1))
        latencies, wall = asyncio.run(
            _load(base, path, profile.clients, profile.requests_per_client)
        )
        ms = np.asarray(latencies) * 1000.0
        table.add(
            name,
            p50_ms=float(np.percentile(ms, 50)),
            p99_ms=float(np.percentile(ms, 99)),
            max_ms=float(ms.max()),
            requests_s=len(ms) / wall,
            requests=len(ms),
        )
    return table


# --------------------------------------------------------------------------- 3. inference


def gemm_peak(n: int, repeats: int) -> float:
    """FLOP/s of the fastest of ``repeats`` numpy float32 n×n GEMMs (after a warm-up)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    a @ b
    best = math.inf
    for _ in range(repeats):
        began = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - began)
    return 2.0 * n**3 / best


def _timed(run: Callable[[], None], repeats: int) -> float:
    """Median seconds of ``run`` over ``repeats`` calls, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def bench_inference(profile: Profile, folder: Path) -> list[Table]:
    """ONNX Runtime vs PyTorch eager on the default segmenter, against a GEMM's FLOP/s."""
    import onnxruntime as ort
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models.export import export_segmenter
    from models.networks.segmenter import SegmenterNet
    from models.networks.unet import DenseUNet
    from models.pretrain import PretrainConfig
    from models.runtime.preprocess import default_normalisation

    config = PretrainConfig()
    torch.manual_seed(0)
    model = SegmenterNet(DenseUNet(channels=config.channels), 2, config.num_clusters).eval()
    export_segmenter(
        model,
        folder / "segmenter",
        labels={0: "background", 1: "organ"},
        axis=2,
        normalisation=default_normalisation("CT"),
    )
    session = ort.InferenceSession(
        str(folder / "segmenter" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    size, bs = profile.inference_size, profile.batch_size
    slices = np.random.default_rng(0).random((profile.inference_slices, 1, size, size), np.float32)
    batches = [slices[i : i + bs] for i in range(0, len(slices), bs)]
    input_name = session.get_inputs()[0].name
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.from_numpy(slices[:1]))
    flops = counter.get_total_flops() * len(slices)

    def run_torch() -> None:
        with torch.inference_mode():
            for batch in batches:
                model(torch.from_numpy(batch))

    def run_onnx() -> None:
        for batch in batches:
            session.run(None, {input_name: batch})

    peak = gemm_peak(profile.gemm_size, profile.gemm_repeats)
    gemm = Table(
        "GEMM reference",
        [("seconds", "seconds", ".4f"), ("gflop", "GFLOP", ".2f"), ("gflop_s", "GFLOP/s", ".1f")],
        note=f"numpy float32 {profile.gemm_size}² matmul, fastest of {profile.gemm_repeats}.",
    )
    gemm_flop = 2.0 * profile.gemm_size**3
    gemm.add(
        f"GEMM {profile.gemm_size}²",
        seconds=gemm_flop / peak,
        gflop=gemm_flop / 1e9,
        gflop_s=peak / 1e9,
    )
    table = Table(
        "Inference: ONNX Runtime vs PyTorch eager",
        [
            ("seconds", "seconds", ".3f"),
            ("slices_s", "slices/s", ".1f"),
            ("gflop", "GFLOP", ".2f"),
            ("gflop_s", "GFLOP/s", ".1f"),
            ("fraction_of_gemm", "fraction of GEMM peak", ".3f"),
        ],
        note=(
            f"Default SegmenterNet (channels {list(config.channels)}, 2 classes, "
            f"{config.num_clusters} clusters), {profile.inference_slices} slices of {size}×{size} "
            f"in batches of {bs}, median of {profile.inference_repeats} passes after a warm-up; "
            f"torch threads {torch.get_num_threads()}, ONNX Runtime default threads. FLOPs are "
            "conv/matmul FLOPs (2×MAC, torch `FlopCounterMode`), divided by the GEMM reference "
            "measured in the same run."
        ),
    )
    for name, runner in (("PyTorch eager", run_torch), ("ONNX Runtime", run_onnx)):
        seconds = _timed(runner, profile.inference_repeats)
        table.add(
            name,
            seconds=seconds,
            slices_s=len(slices) / seconds,
            gflop=flops / 1e9,
            gflop_s=flops / seconds / 1e9,
            fraction_of_gemm=flops / seconds / peak,
        )
    return [table, gemm]


# --------------------------------------------------------------------------- 5. memory, report


def memory_table(sampler: MemorySampler) -> Table:
    """Peak RSS per phase of the API process and of the worker processes."""
    table = Table(
        "Peak memory (RSS)",
        [
            ("api_mib", "API MiB", ".0f"),
            ("worker_max_mib", "worker (largest process) MiB", ".0f"),
            ("worker_tree_mib", "worker (all processes) MiB", ".0f"),
        ],
        note=(
            f"psutil RSS sampled every {_SAMPLE_SECONDS} s. API = the uvicorn process; worker = "
            "the Celery main process and its prefork pool (the sum counts pages shared after "
            "fork once per process)."
        ),
    )
    for phase, peak in sampler.peaks.items():
        if phase != "idle":
            table.add(phase, **peak)
    return table


def _load_average() -> float:
    """1-minute load average (how busy the machine was: these numbers are noisy above cores)."""
    return round(os.getloadavg()[0], 2)


def machine() -> dict[str, Any]:
    """The machine and library versions (:func:`bench.report.machine_info` + ONNX Runtime)."""
    import onnxruntime as ort

    return machine_info() | {"onnxruntime": ort.__version__, "load_average_1m": _load_average()}


def write_results(
    tables: Sequence[Table], info: dict[str, Any], profile: Profile, out: Path
) -> tuple[Path, Path]:
    """Write ``service.md`` and ``service.json`` under ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    described = ", ".join(f"{k}: {v}" for k, v in info.items())
    text = "\n\n".join(
        [
            "# Service benchmark",
            f"Profile `{profile.name}`; run `python -m bench.service` "
            f"{'--quick ' if profile.name == 'quick' else ''}(finished {info['finished']}).",
            f"Machine — {described}.",
            *(table.markdown() for table in tables),
        ]
    )
    md, js = out / "service.md", out / "service.json"
    md.write_text(text + "\n", encoding="utf-8")
    payload = {
        "profile": asdict(profile),
        "machine": info,
        "tables": [asdict(table) for table in tables],
    }
    js.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return md, js


def _service_tables(profile: Profile, work: Path) -> list[Table]:
    """Everything measured through the running service (rows 1, 2, 4, 5)."""
    data_dir = work / "data"
    with Service(data_dir, profile.timeout) as service:
        sampler = service.memory
        with httpx.Client(base_url=service.url, timeout=profile.timeout) as client:
            dataset = _checked(
                client.post(
                    f"{API}/datasets",
                    json={"name": "bench-upload", "modality": "CT", "labels": {"1": {"name": "x"}}},
                )
            )
            with sampler.phase("upload"):
                uploads = bench_uploads(client, dataset["id"], work, profile)
            e2e, image_id = bench_labels_to_prediction(client, work, profile, sampler)
        with sampler.phase("metadata"):
            metadata = bench_metadata(service.url, image_id, profile)
    return [uploads, e2e, metadata, memory_table(sampler)]


def run(profile: Profile, out: Path) -> tuple[Path, Path]:
    """Run every measurement of ``profile`` and write the results under ``out``."""
    started = machine()
    with tempfile.TemporaryDirectory(prefix="segassist-bench-") as tmp:
        work = Path(tmp)
        tables = _service_tables(profile, work)
        inference = bench_inference(profile, work)
    service, memory = tables[:3], tables[3]
    info = started | {
        "load_average_1m_end": _load_average(),
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return write_results([*service, *inference, memory], info, profile, out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.service", description=__doc__.split("\n\n", 1)[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, ~1 min)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; prints the markdown report and returns 0."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    profile = PROFILES["quick" if args.quick else "default"]
    md, js = run(profile, args.out)
    sys.stdout.write(md.read_text(encoding="utf-8"))
    logger.info("wrote %s and %s", md, js)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
