"""Shared fixtures: real PostgreSQL and Redis (started locally if needed), data directories.

``postgres_url`` and ``redis_url`` use the services at 127.0.0.1 (override with
``SEGASSIST_TEST_POSTGRES_URL`` / ``SEGASSIST_TEST_REDIS_URL``). When a service is not reachable,
the fixture starts a throw-away local server if the binary is installed, else skips with the
reason; under ``CI=true`` that skip is a failure instead.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379"
_START_ATTEMPTS = 100
_exit_status: list[int] = []


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """Leave without interpreter teardown once ITK has been loaded.

    ITK's SWIG wrappers (loaded by the fill-between-slices baseline) sometimes segfault while
    the interpreter finalises, after every test has passed and the summary is printed: seen once
    in five CI runs, turning a green run into exit 139. Everything is reported and flushed by
    now, so the real exit status is kept and the teardown skipped.
    """
    if "itk" in sys.modules and _exit_status:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_status[-1])


def unavailable(reason: str) -> None:
    """Skip with ``reason``, or fail when running under CI (``CI=true``)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: required services must be present)")
    pytest.skip(reason)


TOTALSEG_DICOM = [
    f"tests/reference_files/example_ct_dicom/CT.1.3.12.2.1107.5.1.4.60064.300000221208081134280000{n}"
    for n in range(16573, 16593)
]
"""TotalSegmentator 2.18.0's 20-slice DICOM CT test series (members of its sdist)."""
TOTALSEG_SEG = "tests/reference_files/example_seg_dicom.nii.gz"
"""Its reference segmentation, on the series' grid as dcm2niix lays it out."""
TOTALSEG_LIVER = 5


@pytest.fixture(scope="session")
def totalseg() -> Path:
    """TotalSegmentator 2.18.0's DICOM CT test series and its segmentation, from the sdist
    (fetched once with pip into the cache; folder holding :data:`TOTALSEG_DICOM`)."""
    from segassist.models.datasets import fetch_registry_file

    try:
        return fetch_registry_file(
            "totalsegmentator", "2.18.0", [*TOTALSEG_DICOM, TOTALSEG_SEG], sdist=True
        )
    except RuntimeError as exc:
        unavailable(f"package index unreachable: {exc}")
        raise


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _postgres_reachable(url: str) -> str | None:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        return str(exc).strip()
    return None


def _wait(check: Callable[[], bool], what: str) -> None:
    for _ in range(_START_ATTEMPTS):
        if check():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not come up")


def _start_local_postgres(workdir: Path) -> tuple[str, subprocess.Popen[bytes]] | str:
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if not initdb or not postgres:
        return "initdb/postgres not installed"
    if os.geteuid() == 0:
        return "cannot start a throw-away PostgreSQL as root"
    data = workdir / "pgdata"
    subprocess.run(
        [initdb, "-D", str(data), "-U", "postgres", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    port = _free_port()
    proc = subprocess.Popen(
        [postgres, "-D", str(data), "-p", str(port), "-k", str(workdir), "-h", "127.0.0.1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    _wait(lambda: _postgres_reachable(admin) is None, "local PostgreSQL")
    import psycopg

    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("CREATE DATABASE test")
    return f"postgresql://postgres@127.0.0.1:{port}/test", proc


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """URL of a reachable PostgreSQL database (the configured one, or a local throw-away)."""
    url = os.environ.get("SEGASSIST_TEST_POSTGRES_URL", DEFAULT_POSTGRES)
    error = _postgres_reachable(url)
    if error is None:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="segassist-pg-") as workdir:
        started = _start_local_postgres(Path(workdir))
        if isinstance(started, str):
            unavailable(f"PostgreSQL not reachable at {url} ({error}) and {started}")
            return
        local_url, proc = started
        try:
            yield local_url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A PostgreSQL URL whose ``search_path`` is a fresh schema, dropped after the test.

    Every connection made from this URL (in this process or a worker subprocess) sees only
    that schema, so concurrent test runs on one server do not meet.
    """
    import psycopg

    schema = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    separator = "&" if "?" in postgres_server else "?"
    yield f"{postgres_server}{separator}options={quote(f'-csearch_path={schema}')}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


def _redis_reachable(url: str) -> str | None:
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """Base URL (no db number) of a reachable Redis (the configured one or a local throw-away)."""
    url = os.environ.get("SEGASSIST_TEST_REDIS_URL", DEFAULT_REDIS).rstrip("/")
    error = _redis_reachable(url)
    if error is None:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        unavailable(f"Redis not reachable at {url} ({error}) and redis-server not installed")
        return
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    local = f"redis://127.0.0.1:{port}"
    try:
        _wait(lambda: _redis_reachable(local) is None, "local redis-server")
        yield local
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """A Redis URL on an empty logical database (1–15), flushed after the test."""
    import redis

    for _ in range(50):
        db = 1 + uuid.uuid4().int % 15
        client = redis.Redis.from_url(f"{redis_server}/{db}")
        # Claim the database with a marker key so a concurrent run picks another one.
        if client.dbsize() == 0 and client.set("segassist-test-claim", "1", nx=True, ex=3600):
            break
    else:
        unavailable(f"no empty Redis database (1-15) free on {redis_server}")
        return
    try:
        yield f"{redis_server}/{db}"
    finally:
        client.flushdb()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An empty data directory for one test (``SEGASSIST_DATA_DIR``)."""
    path = tmp_path / "segassist-data"
    path.mkdir()
    return path
