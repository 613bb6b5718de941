"""Robustness benchmark: faults injected into real processes, and a load test on PostgreSQL.

``python -m segassist.bench.robustness [--out DIR] [--clients 50] [--load-seconds 60]`` (or ``segassist
bench robustness …``) runs, each against real components it starts itself on free loopback
ports (a private ``redis-server`` without persistence and a private PostgreSQL cluster, so the
machine's shared servers are never restarted):

1. **SIGKILL of the API mid-upload** (embedded service, SQLite + filesystem broker): a large
   upload is streaming when the service's process gets ``kill -9``. Its worker processes must
   exit with it (``PR_SET_PDEATHSIG``); after a restart on the same data directory no partial
   image is visible and the files stored before are unchanged.
2. **SIGKILL of a worker mid-fit** (API + Celery worker on PostgreSQL + Redis): a pretraining is
   killed at step ≥ 5 with its whole process group; a new worker takes it over (the job row's
   heartbeat and attempt, :mod:`segassist.worker.recovery`).
3. **Restart of Redis mid-job**: a pretraining runs and a second job waits in the queue when
   Redis restarts empty (the queued message is lost); both must finish.
4. **Restart of PostgreSQL mid-job** (``pg_ctl restart -m fast``) while a pretraining runs.
5. **Load**: ``--clients`` concurrent clients for ``--load-seconds`` on PostgreSQL (metadata
   GETs), errors counted, p50/p99 reported.

For 2–4 every job must end ``succeeded`` or ``failed`` with a reason, and the stored images and
labels must hash the same before and after. Results: ``<out>/robustness.md`` and
``<out>/robustness.json``. Every process started here is stopped here; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
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

from segassist.bench.service import Service, _free_port, machine
from segassist.models.runtime._atomic import atomic_write_bytes
from segassist.worker.serve import worker_command

__all__ = ["main", "run"]

logger = logging.getLogger("segassist.bench.robustness")

REPO = Path(__file__).resolve().parent.parent
API = "/api/v1"
SHAPE = (48, 40, 8)
TINY_PRETRAIN = {
    "batch_size": 2,
    "image_size": 16,
    "channels": [4, 8],
    "num_clusters": 3,
    "kmeans_slices": 2,
    "checkpoint_every": 1,
}
"""A 2-level U-Net with 4 feature channels on 16×16 crops: steps of a fraction of a second."""
JOB_DEADLINE = 1200.0
START_DEADLINE = 180.0
_FINISHED = ("succeeded", "failed", "cancelled")
_API_LAUNCHER = (
    "import sys, uvicorn; from segassist.server.main import create_app; "
    "uvicorn.run(create_app(), host='127.0.0.1', port=int(sys.argv[1]), log_level='warning')"
)


# --------------------------------------------------------------------------- data


def _volume(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.normal(-100.0, 30.0, SHAPE).astype(np.float32)
    data[10:30, 8:28, :] += 400.0
    return data


def _sparse_label() -> np.ndarray:
    label = np.full(SHAPE, 255, dtype=np.uint8)
    for z in (1, 5):
        label[..., z] = 0
        label[10:30, 8:28, z] = 1
    return label


def _nifti(data: np.ndarray) -> bytes:
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return gzip.compress(image.to_bytes())


def checksums(data_dir: Path) -> dict[str, str]:
    """sha256 of every stored image and label under ``data_dir``."""
    return {
        str(path.relative_to(data_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for sub in ("images", "labels")
        for path in sorted((data_dir / sub).rglob("*"))
        if path.is_file()
    }


# --------------------------------------------------------------------------- private servers


def _as_postgres(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the ``postgres`` user then."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def _wait_for(check: Callable[[], bool], what: str, deadline: float = START_DEADLINE) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {deadline} s")


class PrivateRedis:
    """A ``redis-server`` without persistence on a free port (a restart empties it)."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed")
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        self._process = subprocess.Popen(
            [*command, "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_for(self._ping, "private redis-server")

    def _ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=1).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=30)

    def restart(self) -> None:
        self.stop()
        self.start()


class PrivatePostgres:
    """A throw-away PostgreSQL cluster in ``workdir`` on a free port, database ``bench``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.data = workdir / "pgdata"
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/bench"

    def _ctl(self, *args: str) -> None:
        pg_ctl = shutil.which("pg_ctl")
        if pg_ctl is None:
            raise RuntimeError("pg_ctl is not installed")
        options = f"-p {self.port} -k {self.workdir} -h 127.0.0.1"
        server_log = str(self.workdir / "postgres.log")
        # Output to a file: the server inherits pg_ctl's descriptors, and a pipe it holds open
        # would never reach end-of-file.
        command = [pg_ctl, "-D", str(self.data), "-o", options, "-l", server_log, "-w", *args]
        with (self.workdir / "pg_ctl.log").open("ab") as log:
            subprocess.run(
                _as_postgres(command),
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def start(self) -> None:
        initdb = shutil.which("initdb")
        if initdb is None:
            raise RuntimeError("initdb is not installed")
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
            os.chmod(self.workdir.parent, 0o755)  # the postgres user must reach its folder
        subprocess.run(
            _as_postgres([initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust"]),
            check=True,
            capture_output=True,
        )
        self._ctl("start")
        import psycopg

        admin = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute("CREATE DATABASE bench")

    def restart(self) -> None:
        self._ctl("-m", "fast", "restart")

    def stop(self) -> None:
        if self.data.exists():
            self._ctl("-m", "fast", "stop")


# --------------------------------------------------------------------------- deployed processes


class Deployed:
    """The API (uvicorn) and Celery workers as subprocesses on PostgreSQL + Redis."""

    def __init__(self, data_dir: Path, database_url: str, broker_url: str, logs: Path) -> None:
        self.data_dir = data_dir
        self.logs = logs
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SEGASSIST_")}
        self.env |= {
            "SEGASSIST_DATA_DIR": str(data_dir),
            "SEGASSIST_DATABASE_URL": database_url,
            "SEGASSIST_BROKER_URL": broker_url,
            "SEGASSIST_DEVICE": "cpu",
            "SEGASSIST_API_TOKEN": "",
            "SEGASSIST_RECOVERY_SWEEP_SECONDS": "5",
            "SEGASSIST_QUEUED_RESEND_SECONDS": "30",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
        }
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []

    def _spawn(self, command: list[str], name: str) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as log:
            return subprocess.Popen(
                command,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start_api(self) -> None:
        self.api = self._spawn([sys.executable, "-c", _API_LAUNCHER, str(self.port)], "api")
        _wait_for(self._healthy, "API")

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}{API}/health", timeout=5.0).status_code == 200
        except httpx.TransportError:
            return False

    def start_worker(self) -> subprocess.Popen[bytes]:
        worker = self._spawn(worker_command(), f"worker-{len(self.workers)}")
        self.workers.append(worker)
        return worker

    @staticmethod
    def kill_group(process: subprocess.Popen[bytes]) -> None:
        """``kill -9`` a process and its children (its own session)."""
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)

    def stop(self) -> None:
        for process in [*self.workers, *([self.api] if self.api else [])]:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    self.kill_group(process)


# --------------------------------------------------------------------------- HTTP helpers


class Client:
    """Retrying JSON calls against one API (a restart of its database answers 5xx for a while)."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=f"{url}{API}", timeout=120.0)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        deadline = time.monotonic() + 120.0
        while True:
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError:
                response = None
            if response is not None and response.status_code < 500:
                if response.status_code >= 400:
                    raise RuntimeError(
                        f"{method} {path} -> {response.status_code}: {response.text}"
                    )
                return response.json()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{method} {path} kept failing")
            time.sleep(1.0)

    def dataset_with_label(self) -> tuple[str, str]:
        labels = {"1": {"name": "box", "color": "#e6194b"}}
        dataset = self.call(
            "POST", "/datasets", json={"name": "b", "modality": "CT", "labels": labels}
        )
        files = {"file": ("ct.nii.gz", _nifti(_volume()), "application/gzip")}
        image = self.call("POST", f"/datasets/{dataset['id']}/images", files=files)
        label = {"file": ("l.nii.gz", _nifti(_sparse_label()), "application/gzip")}
        self.call("POST", f"/images/{image['id']}/labels", files=label)
        return dataset["id"], image["id"]

    def pretrain(self, dataset_id: str, steps: int) -> str:
        params = {"objective": "pix2rep", "steps": steps, "config": TINY_PRETRAIN}
        body = {"kind": "pretrain", "dataset_id": dataset_id, "params": params}
        return str(self.call("POST", "/jobs", json=body)["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.call("GET", f"/jobs/{job_id}"))

    def wait(self, job_id: str, until: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        end = time.monotonic() + JOB_DEADLINE
        while time.monotonic() < end:
            job = self.job(job_id)
            if until(job):
                return job
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not reach the expected state: {self.job(job_id)}")

    def finished(self, job_id: str) -> dict[str, Any]:
        return self.wait(job_id, lambda job: job["status"] in _FINISHED)

    def running_at(self, job_id: str, step: int) -> dict[str, Any]:
        def reached(job: dict[str, Any]) -> bool:
            if job["status"] in _FINISHED:
                raise RuntimeError(f"job {job_id} finished before the fault: raise its steps")
            return job["status"] == "running" and (job["progress"].get("step") or 0) >= step

        return self.wait(job_id, reached)


# --------------------------------------------------------------------------- scenarios


@dataclass
class Outcome:
    """What one fault scenario ended with."""

    scenario: str
    jobs: list[dict[str, Any]] = field(default_factory=list)
    checksums_unchanged: bool = False
    seconds_to_finish: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.checksums_unchanged and all(
            job["status"] == "succeeded" or (job["status"] == "failed" and job["error"])
            for job in self.jobs
        )


def _job_summary(job: dict[str, Any]) -> dict[str, Any]:
    return {k: job[k] for k in ("id", "status", "attempts", "error")}


def _resent(logs: Path, job_id: str) -> int:
    """How many times the workers' recovery re-enqueued ``job_id`` (from their logs)."""
    return sum(
        line.count(f"re-enqueued pretrain job {job_id}")
        for path in logs.glob("worker-*.log")
        for line in path.read_text(errors="replace").splitlines()
    )


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kill_api_mid_upload(work: Path) -> Outcome:
    """Scenario 1 on the embedded service."""
    outcome = Outcome("SIGKILL of the embedded service mid-upload")
    data_dir = work / "embedded" / "data"
    data_dir.mkdir(parents=True)
    with Service(data_dir, START_DEADLINE) as service:
        client = Client(service.url)
        dataset_id, _ = client.dataset_with_label()
        before = checksums(data_dir)
        process = psutil.Process(service._process.pid)  # type: ignore[union-attr]
        workers = service.memory.descendants()
        body_started = threading.Event()

        def body() -> Iterator[bytes]:
            boundary = "robustness"
            yield (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file";'
                ' filename="big.nii"\r\n\r\n'
            ).encode()
            for _ in range(4096):
                body_started.set()
                yield bytes(1 << 16)
                time.sleep(0.01)

        def upload() -> None:
            headers = {"content-type": "multipart/form-data; boundary=robustness"}
            with contextlib.suppress(httpx.TransportError):  # the server is killed mid-body
                httpx.post(
                    f"{service.url}{API}/datasets/{dataset_id}/images",
                    content=body(),
                    headers=headers,
                    timeout=600.0,
                )

        sender = threading.Thread(target=upload, daemon=True)
        sender.start()
        body_started.wait(60)
        _wait_for(
            lambda: any(p.stat().st_size > (1 << 20) for p in (data_dir / "uploads").glob("*")),
            "upload streaming",
        )
        process.kill()
        process.wait(30)
        began = time.monotonic()
        survivors = [p for p in workers if _alive(p)]
        for _ in range(100):
            survivors = [p for p in survivors if _alive(p)]
            if not survivors:
                break
            time.sleep(0.1)
        outcome.notes.append(
            f"{len(workers)} worker processes of the killed service; {len(survivors)} still "
            f"running {time.monotonic() - began:.1f} s after the kill"
        )
        sender.join(60)
    leftovers = [p.name for p in (data_dir / "uploads").glob("*")]
    with Service(data_dir, START_DEADLINE) as restarted:
        images = Client(restarted.url).call("GET", f"/datasets/{dataset_id}/images")
    outcome.notes.append(
        f"after restart: {len(images)} image(s) listed (1 stored before the kill); "
        f"{len(leftovers)} temporary upload file(s) left in uploads/"
    )
    outcome.checksums_unchanged = checksums(data_dir) == before and len(images) == 1
    if survivors:
        outcome.checksums_unchanged = False
        outcome.notes.append("FAILED: worker processes outlived their service")
    return outcome


@contextmanager
def deployed_stack(work: Path) -> Iterator[tuple[Deployed, PrivateRedis, PrivatePostgres]]:
    """Private Redis + PostgreSQL, the API and one worker."""
    redis_server = PrivateRedis()
    pg_dir = work / "pg"
    pg_dir.mkdir()
    postgres = PrivatePostgres(pg_dir)
    data_dir = work / "deployed" / "data"
    data_dir.mkdir(parents=True)
    redis_server.start()
    try:
        postgres.start()
        stack = Deployed(data_dir, postgres.url, redis_server.url, work)
        try:
            stack.start_api()
            stack.start_worker()
            yield stack, redis_server, postgres
        finally:
            stack.stop()
    finally:
        postgres.stop()
        redis_server.stop()


def kill_worker_mid_fit(stack: Deployed, client: Client, dataset_id: str) -> Outcome:
    """Scenario 2."""
    outcome = Outcome("SIGKILL of a worker mid-fit (PostgreSQL + Redis)")
    before = checksums(stack.data_dir)
    job_id = client.pretrain(dataset_id, steps=200)
    interrupted = client.running_at(job_id, 5)
    Deployed.kill_group(stack.workers[-1])
    killed = time.monotonic()
    stack.start_worker()
    done = client.finished(job_id)
    outcome.seconds_to_finish = time.monotonic() - killed
    outcome.jobs.append(_job_summary(done))
    outcome.notes.append(
        f"killed at step {interrupted['progress']['step']}/200; re-queued by the recovery "
        f"{_resent(stack.logs, job_id)} time(s); finished at step "
        f"{done['progress'].get('step')} on attempt {done['attempts']}"
    )
    outcome.checksums_unchanged = checksums(stack.data_dir) == before
    return outcome


def restart_redis_mid_job(
    stack: Deployed, client: Client, redis_server: PrivateRedis, dataset_id: str
) -> Outcome:
    """Scenario 3: the queued job's message is lost with the restart."""
    outcome = Outcome("restart of Redis mid-job (queued message lost)")
    before = checksums(stack.data_dir)
    running = client.pretrain(dataset_id, steps=120)
    queued = client.pretrain(dataset_id, steps=3)
    client.running_at(running, 3)
    redis_server.restart()
    restarted = time.monotonic()
    jobs = [client.finished(running), client.finished(queued)]
    outcome.seconds_to_finish = time.monotonic() - restarted
    outcome.jobs.extend(_job_summary(job) for job in jobs)
    outcome.notes.append(
        "the second job was queued behind the first when Redis restarted empty; the recovery "
        f"re-sent it {_resent(stack.logs, queued)} time(s), the running one "
        f"{_resent(stack.logs, running)} time(s)"
    )
    outcome.checksums_unchanged = checksums(stack.data_dir) == before
    return outcome


def restart_postgres_mid_job(
    stack: Deployed, client: Client, postgres: PrivatePostgres, dataset_id: str
) -> Outcome:
    """Scenario 4."""
    outcome = Outcome("restart of PostgreSQL mid-job")
    before = checksums(stack.data_dir)
    job_id = client.pretrain(dataset_id, steps=120)
    client.running_at(job_id, 3)
    began = time.monotonic()
    postgres.restart()
    outcome.notes.append(f"pg_ctl restart -m fast took {time.monotonic() - began:.1f} s")
    done = client.finished(job_id)
    outcome.seconds_to_finish = time.monotonic() - began
    outcome.jobs.append(_job_summary(done))
    outcome.checksums_unchanged = checksums(stack.data_dir) == before
    return outcome


@dataclass
class Load:
    """Latencies of the load test."""

    clients: int
    seconds: float
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    error_examples: list[str]


async def _load(url: str, image_id: str, clients: int, seconds: float) -> Load:
    paths = [f"{API}/datasets", f"{API}/jobs", f"{API}/images/{image_id}"]
    latencies: list[float] = []
    errors: list[str] = []
    end = time.monotonic() + seconds

    async def one(index: int, client: httpx.AsyncClient) -> None:
        turn = index
        while time.monotonic() < end:
            path = paths[turn % len(paths)]
            turn += 1
            began = time.perf_counter()
            try:
                response = await client.get(path)
                if response.status_code != 200:
                    errors.append(f"{path} -> {response.status_code}")
            except httpx.HTTPError as exc:
                errors.append(f"{path} -> {type(exc).__name__}")
            latencies.append(time.perf_counter() - began)

    sessions = [httpx.AsyncClient(base_url=url, timeout=60.0) for _ in range(clients)]
    try:
        await asyncio.gather(*(one(i, s) for i, s in enumerate(sessions)))
    finally:
        await asyncio.gather(*(s.aclose() for s in sessions))
    ms = np.asarray(latencies) * 1000.0
    return Load(
        clients=clients,
        seconds=seconds,
        requests=len(latencies),
        errors=len(errors),
        p50_ms=float(np.percentile(ms, 50)),
        p99_ms=float(np.percentile(ms, 99)),
        max_ms=float(ms.max()),
        error_examples=sorted(set(errors))[:5],
    )


# --------------------------------------------------------------------------- report


def write_results(out: Path, outcomes: Sequence[Outcome], load: Load, wall: float) -> Path:
    """``robustness.md`` and ``robustness.json`` in ``out``."""
    info = machine()
    lines = [
        "# Robustness benchmark",
        "",
        f"Run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC by `bench/robustness.py` in {wall:.0f} s; "
        f"machine: {json.dumps(info)}.",
        "",
        "## Faults",
        "",
        "| scenario | jobs (status, attempts) | stored files unchanged | s to finish | passed |",
        "|---|---|---|---|---|",
    ]
    for o in outcomes:
        jobs = ", ".join(f"{j['status']} ({j['attempts']})" for j in o.jobs) or "–"
        lines.append(
            f"| {o.scenario} | {jobs} | {'yes' if o.checksums_unchanged else 'NO'} | "
            f"{o.seconds_to_finish:.0f} | {'yes' if o.passed else 'NO'} |"
        )
    lines += ["", "Notes:", ""]
    lines += [f"- {o.scenario}: {note}" for o in outcomes for note in o.notes]
    lines += [
        "",
        f"## Load: {load.clients} concurrent clients for {load.seconds:.0f} s on PostgreSQL",
        "",
        "| requests | errors | requests/s | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|",
        f"| {load.requests} | {load.errors} | {load.requests / load.seconds:.0f} | "
        f"{load.p50_ms:.1f} | {load.p99_ms:.1f} | {load.max_ms:.1f} |",
        "",
        "Metadata GETs (`/datasets`, `/jobs`, `/images/{id}`) interleaved, one connection per "
        "client, clients on the same cores as the API (uvicorn, one process) and an idle worker.",
    ]
    if load.error_examples:
        lines.append(f"Errors seen: {', '.join(load.error_examples)}")
    out.mkdir(parents=True, exist_ok=True)
    md = atomic_write_bytes(("\n".join(lines) + "\n").encode(), out / "robustness.md")
    payload = {
        "outcomes": [asdict(o) | {"passed": o.passed} for o in outcomes],
        "load": asdict(load),
        "wall_seconds": wall,
        "machine": info,
    }
    atomic_write_bytes(json.dumps(payload, indent=2).encode(), out / "robustness.json")
    return md


def run(out: Path, clients: int, load_seconds: float) -> Path:
    """Every scenario, then the report; returns the Markdown path."""
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="segassist-robustness-") as tmp:
        work = Path(tmp)
        outcomes = [kill_api_mid_upload(work)]
        logger.info("%s", outcomes[-1])
        with deployed_stack(work) as (stack, redis_server, postgres):
            client = Client(stack.url)
            dataset_id, image_id = client.dataset_with_label()
            for scenario in (
                lambda: kill_worker_mid_fit(stack, client, dataset_id),
                lambda: restart_redis_mid_job(stack, client, redis_server, dataset_id),
                lambda: restart_postgres_mid_job(stack, client, postgres, dataset_id),
            ):
                outcomes.append(scenario())
                logger.info("%s", outcomes[-1])
            load = asyncio.run(_load(stack.url, image_id, clients, load_seconds))
            logger.info("%s", load)
    return write_results(out, outcomes, load, time.monotonic() - began)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segassist.bench.robustness", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--load-seconds", type=float, default=60.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    path = run(args.out, args.clients, args.load_seconds)
    print(path.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
