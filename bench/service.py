"""Service benchmark: the assist loop measured through the REST API, plus inference speed.

``python -m segassist.bench.service [--quick] [--out DIR]`` (or ``segassist bench service …``) starts the
embedded service (:func:`segassist.worker.serve.run_embedded`: uvicorn plus a training-queue and a
prediction-queue Celery worker, SQLite and the filesystem broker in a temporary data directory,
127.0.0.1 only) in a subprocess and measures it through :class:`segassist.client.api.SegAssistClient` (raw
httpx only where the wire itself is timed: the uploads and the concurrent metadata clients):

1. upload throughput of a synthetic int16 CT volume (~200 MiB as ``.nii``, and as ``.nii.gz``),
   streamed with httpx; split into "body sent" and "server work after the body";
2. labels submitted → segmentation downloaded with an encoder already there (pretrained once
   beforehand by a real ``pretrain`` job, not timed): label upload → ``POST
   /datasets/{id}/assist`` → poll → ``GET …/labels.nii.gz``, (a) on an image whose decoder maps
   are not cached yet, (b) after uploading a corrected label of the same image (one more slice,
   the one the first run's ``next_slice`` pointed at: maps cached, the interactive case); broken
   down with the job row's timestamps and the job's ``result.timings``; the background
   refinement the last run queued is cancelled (each new assist cancels the earlier ones'):
   it would train on the two cores while the next phases are measured;
3. 4 concurrent ``POST /models/{id}/predict`` jobs on 4 images, and meanwhile
4. p50/p99 latency of metadata calls under 50 concurrent ``httpx.AsyncClient`` clients (also
   measured idle, before);
5. the first segmentation of a fresh dataset of another modality (no encoder of it yet): one
   assist that pretrains inline and queues a longer background pretraining (cancelled, not
   waited for);
6. ONNX Runtime vs PyTorch eager inference of the served segmenter's architecture on the slices
   of the same volume (after the service is stopped), their conv/matmul FLOP/s
   (``FlopCounterMode``) and the fraction of a numpy float32 GEMM measured in the same run; the
   assist runs are reported as multiples of that ONNX time;
7. peak RSS (sampled with psutil) per phase of the API process and of each worker process tree.

Results: ``<out>/service.md`` (tables, a line per target: measured vs target, met or missed, and
the machine) and ``<out>/service.json`` (the same). Every process started here is stopped here;
every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import psutil

from segassist.bench.report import machine_info
from segassist.client.api import JobFailedError, SegAssistAPIError, SegAssistClient
from segassist.models.runtime.configs import IGNORE_INDEX
from segassist.models.runtime.nifti import open_nifti
from segassist.server.queue import PREDICTION_QUEUE, REFINEMENT_QUEUE

__all__ = ["PROFILES", "Profile", "Table", "Target", "main", "run"]

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
API = "/api/v1"
_CHUNK = 1 << 20
_POLL_SECONDS = 0.1
_SLOW_POLL_SECONDS = 0.5
_SAMPLE_SECONDS = 0.1
_STOP_SECONDS = 90.0
_MIB = 2.0**20
_LAUNCHER = (
    "import logging, sys; from pathlib import Path; "
    "logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s %(message)s'); "
    "from segassist.worker.serve import run_embedded; "
    "run_embedded('127.0.0.1', int(sys.argv[1]), Path(sys.argv[2]))"
)
_TREES = ("training", "prediction", "refinement")
"""The embedded service's three Celery workers (each a main process and its prefork pool)."""
_QUEUE_TREES = {(PREDICTION_QUEUE,): "prediction", (REFINEMENT_QUEUE,): "refinement"}

# Targets of the issue "Assist loop on the server" (2 CPU cores).
CACHED_ASSIST_SECONDS = 5.0
FIRST_ASSIST_SECONDS = 300.0
API_RSS_MIB = 1024.0
METADATA_P99_MS = 200.0

# Phases of the RSS sampler (rows of the memory table).
PHASE_UPLOAD = "upload"
PHASE_PRETRAIN = "pretrain (untimed)"
PHASE_ASSIST = "assist, encoder there"
PHASE_IDLE = "metadata, idle"
PHASE_PREDICT = "4 predictions + 50 clients"
PHASE_FIRST = "assist, no encoder yet"


@dataclass(frozen=True)
class Profile:
    """Sizes of one benchmark run.

    Attributes:
        name: ``"default"`` or ``"quick"``.
        upload_shape: int16 volume uploaded for the throughput rows (512×512×400 = 200 MiB).
        upload_repeats: uploads per file format (the median is reported).
        volume_shape: volume of the assist runs, the predictions and the inference comparison
            (slices along the last axis).
        annotated_slices: labelled slices of the first sparse label volume.
        e2e_repeats: (a)/(b) pairs of assist runs, each on its own image (medians reported).
        predictions: concurrent prediction jobs (each on its own image).
        pretrain_steps: steps of the (untimed) pretraining job.
        pretrain_config: :class:`segassist.models.pretrain.PretrainConfig` overrides of that job (also the
            architecture of the inference comparison).
        fewshot_config: :class:`segassist.models.fewshot.FewShotConfig` overrides of the timed assist jobs
            (empty: the service's defaults, which is what the default profile measures).
        service_env: ``SEGASSIST_*`` settings of the service (empty: its defaults, e.g. 60 inline
            pretraining steps when no encoder exists).
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
    predictions: int
    pretrain_steps: int
    pretrain_config: dict[str, Any]
    fewshot_config: dict[str, Any]
    service_env: dict[str, str]
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
        predictions=4,
        pretrain_steps=30,
        pretrain_config={},
        fewshot_config={},
        service_env={},
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
        predictions=4,
        pretrain_steps=2,
        pretrain_config={
            "channels": [8, 16],
            "image_size": 32,
            "batch_size": 2,
            "kmeans_slices": 4,
            "num_clusters": 4,
        },
        fewshot_config={"linear_steps": 20},
        service_env={
            "SEGASSIST_ASSIST_PRETRAIN_STEPS": "3",
            "SEGASSIST_BACKGROUND_PRETRAIN_STEPS": "6",
        },
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

    def row(self, name: str) -> dict[str, Any]:
        """The row called ``name`` (``KeyError`` if there is none)."""
        for row in self.rows:
            if row["name"] == name:
                return row
        raise KeyError(f"{self.title}: no row {name!r}")

    def markdown(self) -> str:
        """The table as GitHub markdown (heading, note, header, rows)."""
        head = "| | " + " | ".join(h for _, h, _ in self.columns) + " |"
        rule = "|---|" + "---:|" * len(self.columns)
        lines = [f"## {self.title}", "", *([self.note, ""] if self.note else []), head, rule]
        for row in self.rows:
            cells = " | ".join(format(row[k], f) for k, _, f in self.columns)
            lines.append(f"| {row['name']} | {cells} |")
        return "\n".join(lines)


@dataclass(frozen=True)
class Target:
    """One target of the issue: a measured value against its upper limit.

    Attributes:
        name: what was measured.
        measured: the value (NaN when it could not be measured: counts as missed).
        limit: the largest value that meets the target.
        unit: unit of both.
    """

    name: str
    measured: float
    limit: float
    unit: str

    @property
    def met(self) -> bool:
        """Whether the measured value is at most the limit."""
        return math.isfinite(self.measured) and self.measured <= self.limit

    def line(self) -> str:
        """A markdown list item: measured vs target, met or missed."""
        verdict = "**met**" if self.met else "**missed**"
        return (
            f"- {self.name}: {self.measured:.2f} {self.unit} vs target ≤ {self.limit:g} "
            f"{self.unit}: {verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        """The target as JSON-ready values (with ``met``)."""
        return asdict(self) | {"met": self.met}


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


def corrected_label(sparse: np.ndarray, label: np.ndarray, hint: int | None) -> np.ndarray:
    """``sparse`` plus one more slice of ``label`` (along the last axis): ``hint`` (the server's
    ``next_slice``) when it is an unannotated slice, else the organ slice farthest from the
    annotated ones (the annotator's correction after looking at the first segmentation)."""
    annotated = np.flatnonzero((sparse != IGNORE_INDEX).any(axis=(0, 1)))
    free = [k for k in range(sparse.shape[2]) if k not in set(annotated.tolist())]
    if not free:
        raise ValueError("every slice is annotated already: nothing left to correct")
    if hint is None or hint not in free:
        organ = [k for k in free if label[:, :, k].any()] or free
        hint = max(organ, key=lambda k: int(np.abs(annotated - k).min(initial=sparse.shape[2])))
    corrected = sparse.copy()
    corrected[:, :, hint] = label[:, :, hint]
    return corrected


def _save(array: np.ndarray, path: Path) -> Path:
    nib.Nifti1Image(array, _affine((0.8, 0.8, 2.5))).to_filename(path)
    return path


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _clean_environment(settings: Mapping[str, str]) -> dict[str, str]:
    """This environment without ``SEGASSIST_*`` (the service must use its own SQLite/broker),
    plus ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGASSIST_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env | dict(settings)


def _tree_name(proc: psutil.Process) -> str | None:
    """``"prediction"``, ``"refinement"`` or ``"training"`` for a Celery worker main process,
    else ``None``."""
    try:
        command = proc.cmdline()
    except psutil.Error:
        return None
    if "celery" not in command or "-Q" not in command[:-1]:
        return None
    queues = command[command.index("-Q") + 1].split(",")
    return _QUEUE_TREES.get(tuple(queues), "training")


class MemorySampler:
    """Samples the RSS of the API process and of its three worker trees in a thread.

    The API process runs uvicorn; its children are the three Celery worker main processes
    (training, prediction and refinement queues), each with its prefork pool. Peaks are kept
    per phase (:meth:`phase`): ``<tree>_tree`` sums a worker's processes (pages shared after
    fork are counted once per process), ``<tree>_max`` is its largest process.
    """

    def __init__(self, api: psutil.Process) -> None:
        self.api = api
        self.peaks: dict[str, dict[str, float]] = {}
        self.seen: dict[int, psutil.Process] = {}
        self._names: dict[int, str] = {}
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

    def trees(self) -> dict[str, list[psutil.Process]]:
        """The processes alive now of each worker tree (main process first)."""
        trees: dict[str, list[psutil.Process]] = {name: [] for name in _TREES}
        try:
            mains = self.api.children()
        except psutil.Error:
            return trees
        for main in mains:
            # Not cached until known: between fork and exec a child still shows our command.
            name = self._names.get(main.pid) or _tree_name(main)
            if name is None:
                continue
            self._names[main.pid] = name
            try:
                family = [main, *main.children(recursive=True)]
            except psutil.Error:
                family = [main]
            for proc in family:
                self.seen.setdefault(proc.pid, proc)
            trees[name].extend(family)
        return trees

    def descendants(self) -> list[psutil.Process]:
        """Every descendant of the API process alive now (remembered for :meth:`Service.stop`)."""
        try:
            children = self.api.children(recursive=True)
        except psutil.Error:
            return []
        for child in children:
            self.seen.setdefault(child.pid, child)
        return children

    def _sample(self) -> None:
        try:
            values = {"api_mib": self.api.memory_info().rss / _MIB}
        except psutil.Error:
            return
        for name, procs in self.trees().items():
            sizes = []
            for proc in procs:
                try:
                    sizes.append(proc.memory_info().rss / _MIB)
                except psutil.Error:
                    continue
            values[f"{name}_max_mib"] = max(sizes, default=0.0)
            values[f"{name}_tree_mib"] = sum(sizes)
        peak = self.peaks.setdefault(self._phase, dict.fromkeys(values, 0.0))
        for key, value in values.items():
            peak[key] = max(peak.get(key, 0.0), value)

    def _loop(self) -> None:
        while not self._stop.wait(_SAMPLE_SECONDS):
            self._sample()


class Service:
    """The embedded service (API + two workers) in a subprocess on a free loopback port.

    Args:
        data_dir: its data directory (SQLite, broker, files).
        timeout: longest wait for it to become healthy.
        settings: ``SEGASSIST_*`` variables it runs with (nothing else of this environment's).
    """

    def __init__(
        self, data_dir: Path, timeout: float, settings: Mapping[str, str] | None = None
    ) -> None:
        self.data_dir = data_dir
        self.timeout = timeout
        self.settings = dict(settings or {})
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
                env=_clean_environment(self.settings),
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
        """Wait until the API answers ``/health`` and both worker processes exist."""
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            self._alive()
            if self._healthy() and all(self.memory.trees().values()):
                return
            time.sleep(0.2)
        raise TimeoutError(f"the service at {self.url} was not ready after {self.timeout} s")

    def stop(self) -> None:
        """Stop the service, then kill any worker process it left running.

        SIGINT, like Ctrl-C: uvicorn re-raises the signal it caught after shutting down, and
        only SIGINT (as ``KeyboardInterrupt``) lets ``run_embedded`` stop its workers in order.
        """
        seen: list[psutil.Process] = []
        if self._memory is not None:
            self._memory.descendants()
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


def wait_job(
    api: SegAssistClient, job_id: str, timeout: float, poll: float = _POLL_SECONDS
) -> dict[str, Any]:
    """:meth:`SegAssistClient.wait_for_job` with a deadline; a failed job raises with its log."""
    try:
        return api.wait_for_job(job_id, poll_interval=poll, timeout=timeout)
    except JobFailedError as failed:
        log = api.job_logs(job_id)[-3000:]
        raise RuntimeError(f"{failed}\n{log}") from failed


def _epoch(stamp: str | None) -> float:
    """Seconds since the epoch of an API timestamp (naive ones are UTC, as the server writes)."""
    if not stamp:
        return math.nan
    moment = datetime.fromisoformat(stamp)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# --------------------------------------------------------------------------- 1. uploads


def bench_uploads(client: httpx.Client, dataset_id: str, folder: Path, profile: Profile) -> Table:
    """Upload throughput of the synthetic volume as ``.nii`` and ``.nii.gz`` (raw httpx: the
    body is streamed by hand to time when its last byte was sent)."""
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


# --------------------------------------------------------------------------- 2. the assist loop


_PHASES = ("encoder", "features", "fit", "export", "predict")
"""The assist job's phases, in order (its ``result.timings`` keys)."""

_STAGES = (
    ("label_upload", "label upload"),
    ("submit", "assist submit"),
    ("queue", "queue wait"),
    *((phase, phase) for phase in _PHASES),
    ("other", "job other"),
    ("notice", "poll notice"),
    ("download", "download"),
)
_RATIO_COLUMN = ("onnx_x", "× ONNX", ".1f")


def _stage_columns() -> list[tuple[str, str, str]]:
    return [
        *((key, f"{header} s", ".2f") for key, header in _STAGES),
        ("total", "total s", ".2f"),
        _RATIO_COLUMN,
    ]


_STAGE_NOTE = (
    "Stages: label upload (`upload_label`); assist submit (`POST /datasets/{id}/assist` until "
    "its 202); queue wait (until the worker started the job); encoder, features, fit, export, "
    "predict (the job's `result.timings`); job other (the rest of the job: rows and labels "
    "read, result stored); poll notice (job finished → the client's poll saw it); download of "
    "`labels.nii.gz`. × ONNX: total / ONNX Runtime on the slices of the same volume (inference "
    "table below)."
)


@dataclass
class _Timeline:
    """Epoch seconds of the boundaries of one labels → segmentation run (client and server
    clocks of the same machine), and the job's seconds per phase (``result.timings``)."""

    submitted: float = math.nan
    label_stored: float = math.nan
    accepted: float = math.nan
    started: float = math.nan
    phases: dict[str, float] = field(default_factory=dict)
    finished: float = math.nan
    noticed: float = math.nan
    downloaded: float = math.nan

    def stages(self) -> dict[str, float]:
        """Seconds per stage (:data:`_STAGES`), summing to the total.

        The phases follow ``started`` back to back; what the job did between them is "job other",
        up to ``finished``. Boundaries are made monotone; a missing one equals the previous, so
        its stage counts 0 s and the next stage takes its time.
        """
        marks = [self.submitted, self.label_stored, self.accepted, self.started]
        at = self.started
        for phase in _PHASES:
            at += self.phases.get(phase, 0.0)
            marks.append(at)
        marks += [self.finished, self.noticed, self.downloaded]
        for i in range(1, len(marks)):
            if math.isnan(marks[i]):
                marks[i] = marks[i - 1]
            marks[i] = max(marks[i], marks[i - 1])
        seconds = {key: marks[i + 1] - marks[i] for i, (key, _) in enumerate(_STAGES)}
        seconds["total"] = marks[-1] - marks[0]
        return seconds


def pretrain_encoder(
    api: SegAssistClient, dataset_id: str, image_id: str, profile: Profile
) -> tuple[str, float]:
    """Run a (short) pretraining job; returns (encoder id, seconds)."""
    began = time.monotonic()
    params = {
        "objective": "pix2rep",
        "image_ids": [image_id],
        "steps": profile.pretrain_steps,
        "config": profile.pretrain_config,
    }
    job = api.create_job("pretrain", dataset_id, params)
    # Untimed: poll slowly, so the API takes no CPU from the training worker.
    job = wait_job(api, job["id"], profile.timeout, poll=1.0)
    return str(job["result"]["encoder_id"]), time.monotonic() - began


@dataclass(frozen=True)
class _Subject:
    """What a timed assist run works on: a dataset, one of its images, its encoder (``None``:
    the server chooses, or pretrains when there is none)."""

    dataset_id: str
    image_id: str
    encoder_id: str | None


def _check_segmentation(path: Path, shape: tuple[int, ...]) -> None:
    """Raise unless ``path`` is a label volume of ``shape`` (untimed sanity check)."""
    image = open_nifti(path)
    got = tuple(int(n) for n in image.shape)
    if got != tuple(shape):
        raise RuntimeError(f"downloaded segmentation {path.name} is {got}, expected {shape}")


def assist_run(
    api: SegAssistClient,
    subject: _Subject,
    label_path: Path,
    dest: Path,
    profile: Profile,
    poll: float = _POLL_SECONDS,
) -> tuple[dict[str, float], dict[str, Any]]:
    """One timed run: label upload → assist → poll → labels download.

    Returns the seconds per stage (:meth:`_Timeline.stages`) and the finished job.
    """
    t = _Timeline(submitted=time.time())
    label = api.upload_label(subject.image_id, label_path)
    t.label_stored = time.time()
    body: dict[str, Any] = {"image_ids": [subject.image_id], "label_ids": [label["id"]]}
    if subject.encoder_id is not None:
        body["encoder_id"] = subject.encoder_id
    if profile.fewshot_config:
        body["config"] = profile.fewshot_config
    job = api.assist(subject.dataset_id, body)
    t.accepted = time.time()
    job = wait_job(api, job["id"], profile.timeout, poll)
    t.noticed = time.time()
    api.download(job["result"]["predictions"][subject.image_id]["labels"], dest)
    t.downloaded = time.time()
    t.started, t.finished = _epoch(job["started_at"]), _epoch(job["finished_at"])
    t.phases = {k: float(v) for k, v in (job["result"].get("timings") or {}).items()}
    return t.stages(), job


def _cancel_refinement(api: SegAssistClient, job: Mapping[str, Any]) -> None:
    """Cancel (best effort) the background refinement the assist ``job`` queued: it would train
    on the two cores while the next phases are measured (each new assist of the dataset cancels
    the earlier ones' itself)."""
    refine_id = (job.get("result") or {}).get("refine_job_id")
    if refine_id is None:
        return
    try:
        api.cancel_job(refine_id)
        logger.info("refinement job %s cancelled by the benchmark", refine_id)
    except SegAssistAPIError as exc:
        logger.info("refinement job %s not cancelled (%s)", refine_id, exc.detail)


def _medians(runs: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per-column medians (they need not sum to the median total)."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


@dataclass(frozen=True)
class _Volume:
    """A stored image and the synthetic ground truth it was made with."""

    image_id: str
    truth: np.ndarray


def bench_assist(
    api: SegAssistClient,
    dataset_id: str,
    encoder_id: str,
    volumes: Sequence[_Volume],
    folder: Path,
    profile: Profile,
) -> tuple[Table, str, float]:
    """(a) then (b) on each volume: labels submitted → segmentation downloaded.

    Returns the table, the last segmenter (fitted by a (b) run) and the median total of (b).
    """
    table = Table("Labels submitted → segmentation downloaded, encoder there", _stage_columns())
    shape = profile.volume_shape
    runs: dict[str, list[dict[str, float]]] = {"(a)": [], "(b)": []}
    segmenter = ""
    for i, volume in enumerate(volumes, start=1):
        subject = _Subject(dataset_id, volume.image_id, encoder_id)
        sparse = sparse_label(volume.truth, profile.annotated_slices)
        first = _save(sparse, folder / f"labels-{i}a.nii.gz")
        stages, job = assist_run(api, subject, first, folder / f"seg-{i}a.nii.gz", profile)
        _check_segmentation(folder / f"seg-{i}a.nii.gz", shape)
        runs["(a)"].append(stages)
        table.add(f"(a) run {i}", **stages)
        hint = (job["result"].get("next_slice") or {}).get(volume.image_id)
        second = _save(corrected_label(sparse, volume.truth, hint), folder / f"labels-{i}b.nii.gz")
        stages, job = assist_run(api, subject, second, folder / f"seg-{i}b.nii.gz", profile)
        _check_segmentation(folder / f"seg-{i}b.nii.gz", shape)
        runs["(b)"].append(stages)
        table.add(f"(b) run {i}", **stages)
        segmenter = str(job["result"]["segmenter_id"])
    _cancel_refinement(api, job)
    summary = {key: _medians(values) for key, values in runs.items()}
    if len(volumes) > 1:
        for key, values in summary.items():
            table.add(f"{key} median", **values)
    return table, segmenter, summary["(b)"]["total"]


# --------------------------------------------------------------------------- 3, 4. predictions, load


_ENDPOINTS = ("GET /datasets", "GET /jobs", "GET /images/{id}")


def _endpoints(image_id: str) -> dict[str, str]:
    paths = (f"{API}/datasets", f"{API}/jobs", f"{API}/images/{image_id}")
    return dict(zip(_ENDPOINTS, paths, strict=True))


async def _client_loop(
    client: httpx.AsyncClient,
    plan: list[tuple[str, str]],
    latencies: dict[str, list[float]],
    errors: list[str],
) -> None:
    for name, path in plan:
        began = time.perf_counter()
        response = await client.get(path)
        latencies[name].append(time.perf_counter() - began)
        if response.status_code != 200:
            errors.append(f"{path} -> {response.status_code}")


async def _load(
    base: str, endpoints: Mapping[str, str], clients: int, per_client: int
) -> tuple[dict[str, list[float]], float, float]:
    """``clients`` concurrent clients, each sending ``per_client`` GETs per endpoint, endpoints
    interleaved (each client starts at another one); returns the latencies per endpoint and the
    epoch seconds of the start and the end.

    The clients are built before the clock starts and share one SSL context: each
    ``httpx.AsyncClient`` otherwise loads the CA bundle (~60 ms of this process's CPU on 2
    cores), 3 s for 50 of them, which landed inside the first requests' latencies. A client's
    first request still includes its TCP connection.
    """
    names = list(endpoints)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    errors: list[str] = []
    plans = [
        [
            (names[(c + j) % len(names)], endpoints[names[(c + j) % len(names)]])
            for j in range(len(names) * per_client)
        ]
        for c in range(clients)
    ]
    context = ssl.create_default_context()
    sessions = [httpx.AsyncClient(base_url=base, timeout=60.0, verify=context) for _ in plans]
    try:
        began = time.time()
        await asyncio.gather(
            *(
                _client_loop(session, plan, latencies, errors)
                for session, plan in zip(sessions, plans, strict=True)
            )
        )
        ended = time.time()
    finally:
        await asyncio.gather(*(session.aclose() for session in sessions))
    if errors:
        raise RuntimeError(f"{len(errors)} metadata calls failed, e.g. {errors[0]}")
    return latencies, began, ended


def metadata_table(profile: Profile) -> Table:
    """The (empty) metadata latency table: rows are added idle and under predictions."""
    return Table(
        f"Metadata latency, {profile.clients} concurrent clients",
        [
            ("p50_ms", "p50 ms", ".1f"),
            ("p99_ms", "p99 ms", ".1f"),
            ("max_ms", "max ms", ".1f"),
            ("requests_s", "requests/s", ".0f"),
            ("requests", "requests", "d"),
            ("in_flight_pct", "predictions in flight %", ".0f"),
        ],
        note=(
            f"{profile.clients} `httpx.AsyncClient`s (one connection each, built before the "
            f"clock starts) on 127.0.0.1, each sending {profile.requests_per_client} sequential "
            "GETs per endpoint, the endpoints interleaved; the clients run on the same cores as "
            "the service. 'idle': nothing else running; "
            f"'{profile.predictions} predictions': started once the {profile.predictions} "
            "prediction jobs below were submitted; 'in flight %': share of the load's wall time "
            "before the last of them finished (server's `finished_at`)."
        ),
    )


def run_load(
    base: str, image_id: str, profile: Profile
) -> tuple[dict[str, list[float]], float, float]:
    """The metadata load of ``profile`` (:func:`_load`)."""
    endpoints = _endpoints(image_id)
    return asyncio.run(_load(base, endpoints, profile.clients, profile.requests_per_client))


def add_metadata_rows(
    table: Table,
    latencies: Mapping[str, list[float]],
    wall: float,
    condition: str,
    in_flight_pct: float = 0.0,
) -> None:
    """A row per endpoint, named ``"<endpoint> · <condition>"``."""
    for name, values in latencies.items():
        ms = np.asarray(values) * 1000.0
        table.add(
            f"{name} · {condition}",
            p50_ms=float(np.percentile(ms, 50)),
            p99_ms=float(np.percentile(ms, 99)),
            max_ms=float(ms.max()),
            requests_s=len(ms) / wall,
            requests=len(ms),
            in_flight_pct=in_flight_pct,
        )


class _Call(threading.Thread):
    """Runs ``call`` in a daemon thread, keeping its answer or exception and its epoch times."""

    def __init__(self, call: Callable[[], dict[str, Any]], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self._call = call
        self.began = math.nan
        self.ended = math.nan
        self.answer: dict[str, Any] | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        self.began = time.time()
        try:
            self.answer = self._call()
        except BaseException as exc:  # re-raised by result()
            self.error = exc
        finally:
            self.ended = time.time()

    def result(self, deadline: float) -> dict[str, Any]:
        """The answer, waiting until ``deadline`` (``time.monotonic()``); re-raises its error."""
        self.join(max(0.0, deadline - time.monotonic()))
        if self.is_alive():
            raise TimeoutError(f"{self.name} did not finish in time")
        if self.error is not None:
            raise self.error
        if self.answer is None:
            raise RuntimeError(f"{self.name} returned nothing")
        return self.answer


def _predict_call(url: str, model_id: str, image_id: str, timeout: float) -> _Call:
    """``SegAssistClient.predict`` (POST, then wait for the job) with its own connection.

    The client's wait has no deadline: the thread is a daemon, and :meth:`_Call.result` has one
    (stopping the service then ends the thread's polling with a connection error).
    """

    def call() -> dict[str, Any]:
        with SegAssistClient(url, timeout=timeout) as api:
            return api.predict(model_id, image_id)

    return _Call(call, f"predict-{image_id[:8]}")


def _await_submitted(
    api: SegAssistClient, dataset_id: str, calls: Sequence[_Call], deadline: float
) -> None:
    """Return once the dataset has a ``predict`` job per call (all of them in flight)."""
    while time.monotonic() < deadline:
        failed = [c.error for c in calls if c.error is not None]
        if failed:
            raise RuntimeError(f"a prediction failed before the load: {failed[0]}") from failed[0]
        jobs = api.list_jobs(dataset_id=dataset_id)
        if sum(job["kind"] == "predict" for job in jobs) >= len(calls):
            return
        time.sleep(0.02)
    raise TimeoutError("the prediction jobs were not all submitted in time")


def bench_predictions(
    api: SegAssistClient,
    dataset_id: str,
    model_id: str,
    image_ids: Sequence[str],
    profile: Profile,
    metadata: Table,
    folder: Path,
) -> Table:
    """``profile.predictions`` concurrent ``POST /models/{id}/predict`` and, while they are in
    flight, the metadata load (rows added to ``metadata``)."""
    n = len(image_ids)
    table = Table(
        f"{n} predictions in flight",
        [
            ("queue_s", "queue wait s", ".2f"),
            ("run_s", "run s", ".2f"),
            ("other_s", "submit + poll notice s", ".2f"),
            ("total_s", "total s", ".2f"),
        ],
        note=(
            f"{n} `POST /models/{{id}}/predict` sent at once (`SegAssistClient.predict` in {n} "
            "threads, each with its own connection, polling every 0.5 s) with the last segmenter "
            f"fitted above, each on its own {'×'.join(map(str, profile.volume_shape))} image; the "
            "prediction worker runs `prediction_concurrency` (default 1) jobs at a time, so the "
            "queue wait grows with the position (rows in the order the jobs started). Queue wait: job row created → started; run: "
            "started → finished; total: the call's wall time. The metadata load ran meanwhile "
            "(API peak RSS: the memory table's row of this phase)."
        ),
    )
    deadline = time.monotonic() + profile.timeout
    calls = [_predict_call(api.base_url, model_id, i, profile.timeout) for i in image_ids]
    for call in calls:
        call.start()
    _await_submitted(api, dataset_id, calls, deadline)
    latencies, began, ended = run_load(api.base_url, image_ids[0], profile)
    jobs = [call.result(deadline) for call in calls]
    last = max(_epoch(job["finished_at"]) for job in jobs)
    in_flight = 100.0 * min(max(last - began, 0.0), ended - began) / (ended - began)
    add_metadata_rows(metadata, latencies, ended - began, f"{n} predictions", in_flight)
    done = sorted(zip(calls, jobs, strict=True), key=lambda pair: _epoch(pair[1]["started_at"]))
    for i, (call, job) in enumerate(done, start=1):
        created, started, finished = (
            _epoch(job[k]) for k in ("created_at", "started_at", "finished_at")
        )
        total = call.ended - call.began
        queue, run_s = max(started - created, 0.0), max(finished - started, 0.0)
        table.add(
            f"prediction {i}",
            queue_s=queue,
            run_s=run_s,
            other_s=max(total - queue - run_s, 0.0),
            total_s=total,
        )
    for job, image_id in zip(jobs, image_ids, strict=True):  # untimed: the outputs exist
        dest = folder / f"prediction-{job['id']}.nii.gz"
        api.download(job["result"]["predictions"][image_id]["labels"], dest)
        _check_segmentation(dest, profile.volume_shape)
    return table


# --------------------------------------------------------------------------- 5. no encoder yet


def _background_state(api: SegAssistClient, job_id: str | None) -> str:
    """Describe the background pretraining job ``job_id``, then cancel it (best effort): the
    benchmark does not wait for it."""
    if job_id is None:
        return "The run queued no background pretraining."
    job = api.get_job(job_id)
    progress = job.get("progress") or {}
    state = f"{job['status']}, step {progress.get('step')}/{progress.get('total')}"
    try:
        api.cancel_job(job_id)
        action = "cancelled by the benchmark then"
    except SegAssistAPIError as exc:
        action = f"not cancelled ({exc.detail})"
    logger.info("background pretraining job %s: %s; %s", job_id, state, action)
    return f"It queued the background pretraining job `{job_id}`: {state} at the end, {action}."


def bench_first_assist(
    api: SegAssistClient,
    image: np.ndarray,
    truth: np.ndarray,
    folder: Path,
    profile: Profile,
    sampler: MemorySampler,
) -> Table:
    """The first segmentation of a fresh MR dataset (no MR encoder exists): one timed assist."""
    dataset = api.create_dataset("bench-first", "MR", {})
    stored = api.upload_image(dataset["id"], _save(image, folder / "first.nii.gz"))
    labels = _save(sparse_label(truth, profile.annotated_slices), folder / "first-labels.nii.gz")
    subject = _Subject(dataset["id"], stored["id"], None)
    dest = folder / "first-seg.nii.gz"
    with sampler.phase(PHASE_FIRST):
        stages, job = assist_run(api, subject, labels, dest, profile, poll=_SLOW_POLL_SECONDS)
    _check_segmentation(dest, profile.volume_shape)
    _cancel_refinement(api, job)
    background = _background_state(api, job["result"].get("background_job_id"))
    steps = profile.service_env.get("SEGASSIST_ASSIST_PRETRAIN_STEPS", "60 (the default)")
    table = Table(
        "First segmentation, no encoder yet",
        _stage_columns(),
        note=(
            "A fresh dataset of modality MR (no label schema given: it comes from the label "
            "volume) while only a CT encoder exists, so nothing is reused: the same-size volume, "
            f"{profile.annotated_slices} labelled slices, one assist run with the server's "
            f"choices (its encoder phase pretrains {steps} steps inline). Polled every "
            f"{_SLOW_POLL_SECONDS} s (the shipped client's default). {background} {_STAGE_NOTE}"
        ),
    )
    table.add("run 1", **stages)
    return table


# --------------------------------------------------------------------------- 6. inference


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


def bench_inference(profile: Profile, folder: Path) -> tuple[Table, Table, float]:
    """ONNX Runtime vs PyTorch eager on the slices of ``profile.volume_shape`` with the served
    segmenter's architecture (``profile.pretrain_config``), against a GEMM's FLOP/s.

    Returns the inference table, the GEMM table and the ONNX Runtime seconds.
    """
    import onnxruntime as ort
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from segassist.models.export import export_segmenter
    from segassist.models.networks.segmenter import SegmenterNet
    from segassist.models.networks.unet import DenseUNet
    from segassist.models.pretrain import PretrainConfig
    from segassist.models.runtime.preprocess import default_normalisation

    config = PretrainConfig.from_dict(profile.pretrain_config)
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
    nx, ny, nz = profile.volume_shape
    bs = profile.batch_size
    slices = np.random.default_rng(0).random((nz, 1, nx, ny), np.float32)
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
            f"SegmenterNet of the served encoder's architecture (channels "
            f"{list(config.channels)}, 2 classes, {config.num_clusters} clusters), the "
            f"{nz} slices of {nx}×{ny} of the assist volume (random values) in batches of {bs}, "
            f"median of {profile.inference_repeats} passes after a warm-up, in the benchmark "
            f"process after the service stopped; torch threads {torch.get_num_threads()}, ONNX "
            "Runtime default threads. FLOPs are conv/matmul FLOPs (2×MAC, torch "
            "`FlopCounterMode`), divided by the GEMM reference measured in the same run."
        ),
    )
    seconds = {}
    for name, runner in (("PyTorch eager", run_torch), ("ONNX Runtime", run_onnx)):
        seconds[name] = _timed(runner, profile.inference_repeats)
        table.add(
            name,
            seconds=seconds[name],
            slices_s=len(slices) / seconds[name],
            gflop=flops / 1e9,
            gflop_s=flops / seconds[name] / 1e9,
            fraction_of_gemm=flops / seconds[name] / peak,
        )
    return table, gemm, seconds["ONNX Runtime"]


# --------------------------------------------------------------------------- 7. memory, report


def memory_table(sampler: MemorySampler) -> Table:
    """Peak RSS per phase of the API process and of each worker tree."""
    table = Table(
        "Peak memory (RSS)",
        [
            ("api_mib", "API MiB", ".0f"),
            ("training_max_mib", "training worker largest MiB", ".0f"),
            ("training_tree_mib", "training worker all MiB", ".0f"),
            ("prediction_max_mib", "prediction worker largest MiB", ".0f"),
            ("prediction_tree_mib", "prediction worker all MiB", ".0f"),
            ("refinement_max_mib", "refinement worker largest MiB", ".0f"),
            ("refinement_tree_mib", "refinement worker all MiB", ".0f"),
        ],
        note=(
            f"psutil RSS sampled every {_SAMPLE_SECONDS} s. API = the uvicorn process; each "
            "worker = its Celery main process and prefork pool (training queue: pretraining, "
            "fine-tuning; prediction queue: predictions, probe assists, feature prefetch; "
            "refinement queue: assists' background refinements); "
            "'largest' is its largest process, 'all' the sum (pages shared after fork counted "
            "once per process)."
        ),
    )
    for phase, peak in sampler.peaks.items():
        if phase != "idle":
            table.add(phase, **{k: peak.get(k, 0.0) for k, _, _ in table.columns})
    return table


def _load_average() -> float:
    """1-minute load average (how busy the machine was: these numbers are noisy above cores)."""
    return round(os.getloadavg()[0], 2)


def machine() -> dict[str, Any]:
    """The machine and library versions (:func:`segassist.bench.report.machine_info` + ONNX Runtime)."""
    import onnxruntime as ort

    return machine_info() | {"onnxruntime": ort.__version__, "load_average_1m": _load_average()}


def write_results(
    tables: Sequence[Table],
    targets: Sequence[Target],
    info: dict[str, Any],
    profile: Profile,
    out: Path,
) -> tuple[Path, Path]:
    """Write ``service.md`` and ``service.json`` under ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    described = ", ".join(f"{k}: {v}" for k, v in info.items())
    text = "\n\n".join(
        [
            "# Service benchmark",
            f"Profile `{profile.name}`; run `python -m segassist.bench.service` "
            f"{'--quick ' if profile.name == 'quick' else ''}(finished {info['finished']}).",
            f"Machine — {described}.",
            "## Targets\n\n" + "\n".join(target.line() for target in targets),
            *(table.markdown() for table in tables),
        ]
    )
    md, js = out / "service.md", out / "service.json"
    md.write_text(text + "\n", encoding="utf-8")
    payload = {
        "profile": asdict(profile),
        "machine": info,
        "targets": [target.to_dict() for target in targets],
        "tables": [asdict(table) for table in tables],
    }
    js.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return md, js


@dataclass
class _Measured:
    """What the running service gave: its tables and the values the targets read."""

    tables: list[Table]
    cached_assist_s: float
    api_peak_mib: float
    metadata_p99_ms: float
    first_assist_s: float


def _upload_volumes(
    api: SegAssistClient, dataset_id: str, folder: Path, count: int, profile: Profile
) -> list[_Volume]:
    """``count`` synthetic volumes (seeds 2, 3, …) stored in the dataset (untimed)."""
    volumes = []
    for i in range(count):
        image, truth = synthetic_ct(profile.volume_shape, seed=2 + i)
        path = _save(image, folder / f"volume-{i}.nii.gz")
        volumes.append(_Volume(str(api.upload_image(dataset_id, path)["id"]), truth))
        path.unlink()
    return volumes


def _measure_service(profile: Profile, work: Path) -> _Measured:
    """Everything measured through the running service (sections 1–5 and 7)."""
    data_dir = work / "data"
    with (
        Service(data_dir, profile.timeout, profile.service_env) as service,
        SegAssistClient(service.url, timeout=profile.timeout) as api,
        httpx.Client(base_url=service.url, timeout=profile.timeout) as wire,
    ):
        sampler = service.memory
        dataset = api.create_dataset("bench-upload", "CT", {1: "x"})
        with sampler.phase(PHASE_UPLOAD):
            uploads = bench_uploads(wire, dataset["id"], work, profile)
        # Stored before any CT encoder exists: no features job prefetches their decoder maps.
        dataset = api.create_dataset("bench-assist", "CT", {1: "organ"})
        volumes = _upload_volumes(
            api, dataset["id"], work, profile.e2e_repeats + profile.predictions, profile
        )
        assisted, predicted = volumes[: profile.e2e_repeats], volumes[profile.e2e_repeats :]
        with sampler.phase(PHASE_PRETRAIN):
            encoder_id, pretrain_s = pretrain_encoder(
                api, dataset["id"], assisted[0].image_id, profile
            )
        logger.info("pretrained encoder %s in %.1f s", encoder_id, pretrain_s)
        with sampler.phase(PHASE_ASSIST):
            assist, segmenter, cached_s = bench_assist(
                api, dataset["id"], encoder_id, assisted, work, profile
            )
        assist.note = (
            f"Synthetic CT {'×'.join(map(str, profile.volume_shape))}, encoder pretrained "
            f"beforehand (untimed: {profile.pretrain_steps} steps, {pretrain_s:.0f} s). "
            f"(a): the first assist on an image ({profile.annotated_slices} labelled slices) whose "
            "decoder maps are not cached (uploaded before the encoder existed, so no features job "
            "prefetched them); (b): the same image after uploading a corrected label (one more "
            "slice: the one (a)'s `next_slice` named), maps cached: the interactive case. "
            f"{profile.e2e_repeats} image(s), one (a) and one (b) each; medians are per column. "
            f"Polled every {_POLL_SECONDS} s (the shipped CLI polls every 0.5 s). Few-shot "
            f"overrides: {profile.fewshot_config or 'none'}. Feature cache on disk after these "
            f"runs: {_folder_mb(data_dir / 'features'):.0f} MB. {_STAGE_NOTE}"
        )
        metadata = metadata_table(profile)
        with sampler.phase(PHASE_IDLE):
            asyncio.run(_load(service.url, _endpoints(predicted[0].image_id), 4, 1))  # warm-up
            latencies, began, ended = run_load(service.url, predicted[0].image_id, profile)
            add_metadata_rows(metadata, latencies, ended - began, "idle")
        with sampler.phase(PHASE_PREDICT):
            predictions = bench_predictions(
                api,
                dataset["id"],
                segmenter,
                [v.image_id for v in predicted],
                profile,
                metadata,
                work,
            )
        image, truth = synthetic_ct(profile.volume_shape, seed=2)
        first = bench_first_assist(api, image, truth, work, profile, sampler)
    memory = memory_table(sampler)
    under_load = [r["p99_ms"] for r in metadata.rows if not r["name"].endswith(" · idle")]
    return _Measured(
        tables=[uploads, assist, first, predictions, metadata, memory],
        cached_assist_s=cached_s,
        api_peak_mib=memory.row(PHASE_PREDICT)["api_mib"],
        metadata_p99_ms=max(under_load),
        first_assist_s=first.row("run 1")["total"],
    )


def _add_onnx_ratio(table: Table, onnx_seconds: float) -> None:
    for row in table.rows:
        row[_RATIO_COLUMN[0]] = row["total"] / onnx_seconds


def targets(measured: _Measured, profile: Profile) -> list[Target]:
    """The issue's targets against what was measured."""
    shape = "×".join(map(str, profile.volume_shape))
    runs = "median" if profile.e2e_repeats > 1 else "one run"
    return [
        Target(
            f"labels submitted → segmentation downloaded, features cached ((b), {shape}, {runs})",
            measured.cached_assist_s,
            CACHED_ASSIST_SECONDS,
            "s",
        ),
        Target(
            f"first segmentation with no encoder yet ({shape})",
            measured.first_assist_s,
            FIRST_ASSIST_SECONDS,
            "s",
        ),
        Target(
            f"API peak RSS with {profile.predictions} predictions in flight",
            measured.api_peak_mib,
            API_RSS_MIB,
            "MiB",
        ),
        Target(
            f"metadata p99 under {profile.clients} clients while predictions run (worst endpoint)",
            measured.metadata_p99_ms,
            METADATA_P99_MS,
            "ms",
        ),
    ]


def run(profile: Profile, out: Path) -> tuple[Path, Path]:
    """Run every measurement of ``profile`` and write the results under ``out``."""
    started = machine()
    with tempfile.TemporaryDirectory(prefix="segassist-bench-") as tmp:
        work = Path(tmp)
        measured = _measure_service(profile, work)
        inference, gemm, onnx_seconds = bench_inference(profile, work)
    uploads, assist, first, predictions, metadata, memory = measured.tables
    for table in (assist, first):
        _add_onnx_ratio(table, onnx_seconds)
    info = started | {
        "load_average_1m_end": _load_average(),
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    tables = [uploads, assist, first, predictions, metadata, inference, gemm, memory]
    return write_results(tables, targets(measured, profile), info, profile, out)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m segassist.bench.service", description=__doc__.split("\n\n", 1)[0]
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test, ~2 min)")
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
