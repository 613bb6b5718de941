"""Find or start the local embedded segassist service (``segassist serve``) for the CLI."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from segassist.client.api import SegAssistClient

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "ServiceStartError",
    "default_data_dir",
    "ensure_local_service",
    "start_service",
    "wait_until_healthy",
]

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


class ServiceStartError(RuntimeError):
    """The background service exited or never became healthy."""


def default_data_dir() -> Path:
    """``SEGASSIST_DATA_DIR`` if set, else ``./segassist-data``."""
    return Path(os.environ.get("SEGASSIST_DATA_DIR", "segassist-data"))


def start_service(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    data_dir: str | os.PathLike[str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``segassist serve`` in the background, detached from this terminal.

    Its output goes to ``log_path`` (default ``<data_dir>/serve.log``) and its process id to
    ``<data_dir>/serve.pid``. The process outlives the caller: it is the user's service, left
    running for the next command.
    """
    data = Path(data_dir) if data_dir is not None else default_data_dir()
    data.mkdir(parents=True, exist_ok=True)
    log = Path(log_path) if log_path is not None else data / "serve.log"
    cmd = [
        sys.executable,
        "-m",
        "segassist.client.cli",
        "serve",
        "--host",
        host,
        "--port",
        str(port),
        "--data-dir",
        str(data),
    ]
    logger.info("starting %s (log: %s)", " ".join(cmd), log)
    with log.open("ab") as out:
        process = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    (data / "serve.pid").write_text(f"{process.pid}\n")
    return process


def wait_until_healthy(
    url: str,
    process: subprocess.Popen[bytes] | None = None,
    timeout: float = 180.0,
    log_path: str | os.PathLike[str] | None = None,
) -> None:
    """Poll ``url``'s ``/api/v1/health`` until it answers ok.

    Raises:
        ServiceStartError: ``process`` exited first, or ``timeout`` seconds passed.
    """
    deadline = time.monotonic() + timeout
    with SegAssistClient(url, timeout=5.0) as api:
        while not api.is_healthy():
            if process is not None and process.poll() is not None:
                hint = f"; see {log_path}" if log_path else ""
                raise ServiceStartError(
                    f"segassist serve exited with code {process.returncode} before it was "
                    f"healthy{hint}"
                )
            if time.monotonic() > deadline:
                raise ServiceStartError(f"{url} not healthy after {timeout:.0f} s")
            time.sleep(0.5)


def ensure_local_service(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    data_dir: str | os.PathLike[str] | None = None,
    timeout: float = 180.0,
) -> tuple[str, bool]:
    """Use the embedded service at ``host:port`` if it answers, else start one and wait.

    Returns:
        ``(url, started)``: the server root and whether this call started it.
    """
    url = f"http://{host}:{port}"
    with SegAssistClient(url, timeout=5.0) as api:
        if api.is_healthy():
            return url, False
    data = Path(data_dir) if data_dir is not None else default_data_dir()
    log = data / "serve.log"
    process = start_service(host, port, data, log)
    wait_until_healthy(url, process, timeout=timeout, log_path=log)
    return url, True
