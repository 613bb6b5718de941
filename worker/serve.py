"""Run the service: the embedded default (API + one worker) or a worker alone.

``run_embedded`` is what ``segassist serve`` calls: it settles the settings (SQLite and the
filesystem broker under the data directory unless ``SEGASSIST_DATABASE_URL`` /
``SEGASSIST_BROKER_URL`` say otherwise), migrates the database, starts three Celery worker
subprocesses, restarted if they die: one on the training queue (concurrency 1, logging to
``<data_dir>/worker.log``), one on the prediction queue (``prediction_concurrency``,
``<data_dir>/worker-prediction.log``), so a prediction never waits behind a pretraining, and one
on the refinement queue (concurrency 1, ``<data_dir>/worker-refinement.log``), so an assist's
background refinement does not either. The refinement worker runs at niceness
``refinement_niceness`` (10), the training worker at ``training_niceness`` (19): on shared
cores the scheduler then
gives the annotator's interactive jobs nearly all the CPU time, and the background work takes
what they leave (``bench/results/background_priority.md``: beside a background pretraining on
both cores in a session of its own, a 20-step inline pretraining took 80.1 s at niceness 0 and
4.8 s at 19, 5.0 s alone; decoder maps and propagation of a volume 3.3 s and 0.6 s, 0.5 s
alone). Writes
``<data_dir>/server.json`` (``{"url", "pid", "host", "port"}``) and serves the API with uvicorn in
the foreground. SIGINT/SIGTERM stop uvicorn, then the workers (warm shutdown, then cold); a
second signal meanwhile kills them.

The service is ready when ``GET <url>/api/v1/health`` answers 200; jobs enqueued before the
worker has started wait in the broker.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

from segassist.server.db import migrate
from segassist.server.queue import PREDICTION_QUEUE, QUEUE_NAME, REFINEMENT_QUEUE
from segassist.server.settings import Settings, get_settings
from segassist.server.storage import atomic_write_bytes

__all__ = [
    "SERVER_FILE",
    "WORKER_QUEUES",
    "WorkerProcess",
    "lower_priority",
    "run_embedded",
    "run_together",
    "run_worker",
    "worker_command",
]

logger = logging.getLogger(__name__)

SERVER_FILE = "server.json"
"""Written in the data directory while an embedded service runs: its URL and process id."""

_STOP_GRACE_SECONDS = 20.0
_RESTART_DELAY_SECONDS = (1.0, 60.0)


WORKER_QUEUES = {
    "all": (QUEUE_NAME, PREDICTION_QUEUE, REFINEMENT_QUEUE),
    "training": (QUEUE_NAME,),
    "prediction": (PREDICTION_QUEUE,),
    "refinement": (REFINEMENT_QUEUE,),
}
"""``segassist worker --queue NAME`` → the Celery queues that worker consumes: training
(pretraining, fine-tuning; minutes), prediction (predictions and the assists that fit a head;
seconds), refinement (assists' background refinements; tens of seconds), or all in one
process, where they take turns."""


def worker_command(
    concurrency: int = 1,
    loglevel: str = "INFO",
    queues: tuple[str, ...] = WORKER_QUEUES["all"],
) -> list[str]:
    """The command line of one Celery worker consuming ``queues`` (default: all)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "segassist.worker.app",
        "worker",
        "--concurrency",
        str(concurrency),
        "--pool",
        "prefork",
        "-Q",
        ",".join(queues),
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]


def _environment(settings: Settings) -> dict[str, str]:
    """The parent's environment with the resolved locations, so the worker sees the same ones."""
    env = dict(os.environ)
    env |= {
        "SEGASSIST_DATA_DIR": str(settings.data_dir),
        "SEGASSIST_DATABASE_URL": settings.database_url,
        "SEGASSIST_BROKER_URL": settings.broker_url,
        "PYTHONUNBUFFERED": "1",
    }
    return env


class WorkerProcess:
    """One Celery worker subprocess, restarted when it exits unexpectedly.

    Args:
        settings: settings the worker inherits through ``SEGASSIST_*`` variables.
        log_path: file receiving the worker's output (appended).
        command: the worker's command line (default :func:`worker_command`).
        niceness: added to the worker's niceness (its pool processes inherit it).
    """

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        command: list[str] | None = None,
        niceness: int = 0,
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.command = command or worker_command()
        self.niceness = niceness
        self.restarts = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._monitor = threading.Thread(target=self._watch, name="worker-monitor", daemon=True)

    @property
    def pid(self) -> int | None:
        """Process id of the current worker, if one runs."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def start(self) -> None:
        """Start the worker and the thread that restarts it when it dies."""
        self._spawn()
        self._monitor.start()

    def _spawn(self) -> None:
        with self._lock:
            if self._stopping.is_set():
                return
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            if self._log is None:
                self._log = self.log_path.open("ab")
            # Its own session: a terminal's Ctrl-C reaches the API, which then stops the worker
            # in order, instead of both at once. Bound to this process's life (see
            # _die_with_parent) so a killed service leaves no worker behind.
            parent, niceness = os.getpid(), self.niceness
            self._process = subprocess.Popen(
                self.command,
                env=_environment(self.settings),
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=(lambda: _in_child(parent, niceness)) if _POSIX else None,
            )
            logger.info("started worker pid %d (log %s)", self._process.pid, self.log_path)

    def _watch(self) -> None:
        delay = _RESTART_DELAY_SECONDS[0]
        started = time.monotonic()
        while not self._stopping.wait(1.0):
            process = self._process
            if process is None or process.poll() is None:
                continue
            if time.monotonic() - started > _RESTART_DELAY_SECONDS[1]:
                delay = _RESTART_DELAY_SECONDS[0]
            logger.warning(
                "worker pid %d exited with %s; restarting in %.0f s",
                process.pid,
                process.returncode,
                delay,
            )
            if self._stopping.wait(delay):
                return
            self._spawn()
            self.restarts += 1
            started = time.monotonic()
            delay = min(delay * 2, _RESTART_DELAY_SECONDS[1])

    def stop(self) -> None:
        """Stop the worker: warm shutdown (SIGTERM), then cold (SIGQUIT), then SIGKILL.

        SIGTERM goes to Celery's main process alone, which stops its pool processes itself
        after their running task; SIGQUIT and SIGKILL go to the group. Sent to the group,
        SIGTERM killed a pool process mid-task, and the main process then hung in billiard's
        pool join: with a pretraining running, the cold shutdown hung too and only SIGKILL
        ended the worker (the service stopped in 46.5 s; now 31.6 s, the cold shutdown ending
        it in 3 s), and an orphaned worker in that state (its service killed meanwhile) was
        still there 13 min later.
        A job interrupted by the cold shutdown is taken up again at the next start (its message
        is restored, or re-enqueued by :mod:`segassist.worker.recovery`; pretraining resumes from its
        checkpoint).
        """
        with self._lock:
            self._stopping.set()
            process = self._process
        if self._monitor.is_alive():
            self._monitor.join()
        if process is not None and process.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGKILL):
                try:
                    if sig == signal.SIGTERM:
                        os.kill(process.pid, sig)
                    else:
                        os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=_STOP_GRACE_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    logger.warning("worker pid %d still running after %s", process.pid, sig.name)
            logger.info("worker stopped (exit code %s)", process.returncode)
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        """SIGKILL the worker's process group now; safe in a signal handler (no lock taken).
        The monitor does not restart it once :meth:`stop` has begun."""
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


_LINUX = sys.platform.startswith("linux")
_POSIX = os.name == "posix"
_PR_SET_PDEATHSIG = 1


def _in_child(parent: int, niceness: int) -> None:
    """In the forked worker, in its new session, before exec: :func:`lower_priority`; on
    Linux, bind its life to the service's (:func:`_die_with_parent`)."""
    lower_priority(niceness)
    if _LINUX:
        _die_with_parent(parent)


def lower_priority(niceness: int) -> None:
    """Add ``niceness`` to this process's niceness and, on Linux, to its session's autogroup's.

    With autogroups on (``/proc/sys/kernel/sched_autogroup_enabled``, the default of most
    distributions), the scheduler first shares the CPU fairly between sessions and only then by
    niceness inside each: a worker in its own session, as the service starts it, is niced only
    through its autogroup. Measured with the embedded service (a new modality's first assist,
    60 inline pretraining steps, while the other modality's background pretraining ran): 207.5 s
    with the worker process niced alone, 11.3 s with its autogroup niced too.
    """
    if not niceness:
        return
    os.nice(niceness)
    autogroup = Path("/proc/self/autogroup")
    if _LINUX and autogroup.exists():
        with contextlib.suppress(OSError, ValueError, IndexError):
            current = int(autogroup.read_text().split("nice")[1])
            autogroup.write_text(str(min(19, current + niceness)))


def _die_with_parent(parent: int) -> None:
    """In the forked worker, before exec: have the kernel send SIGTERM (Celery's warm shutdown)
    when the service process dies, however it dies (``kill -9`` included), so a restarted
    service never shares the embedded broker with an orphaned worker. Exits at once if the
    service died before the request took effect."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        os._exit(1)
    if os.getppid() != parent:
        os._exit(1)


def _embedded_settings(data_dir: Path | None) -> Settings:
    """Settings of the embedded service: ``data_dir`` (if given) wins over the environment."""
    if data_dir is not None:
        os.environ["SEGASSIST_DATA_DIR"] = str(Path(data_dir).expanduser().resolve())
    get_settings.cache_clear()
    return get_settings()


class _Stop(Exception):
    """SIGINT/SIGTERM received: leave the API loop and stop the worker."""


def _raise_stop(signum: int, _frame: object) -> None:
    raise _Stop(signal.Signals(signum).name)


def run_embedded(host: str = "127.0.0.1", port: int = 8000, data_dir: Path | None = None) -> None:
    """Serve the API and run one worker until SIGINT/SIGTERM (see the module docstring).

    Returns normally after a signal, once the worker has stopped. (uvicorn hands a signal it
    caught back to the previous handler when it exits; ours turns it into a clean return.)
    """
    import uvicorn

    from segassist.server.main import create_app

    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    settings = _embedded_settings(data_dir)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate(settings.database_url)
    workers = [
        WorkerProcess(
            settings,
            settings.data_dir / "worker.log",
            worker_command(1, queues=(QUEUE_NAME,)),
            niceness=settings.training_niceness,
        ),
        WorkerProcess(
            settings,
            settings.data_dir / "worker-prediction.log",
            worker_command(settings.prediction_concurrency, queues=(PREDICTION_QUEUE,)),
        ),
        WorkerProcess(
            settings,
            settings.data_dir / "worker-refinement.log",
            worker_command(1, queues=(REFINEMENT_QUEUE,)),
            niceness=settings.refinement_niceness,
        ),
    ]
    server_file = settings.data_dir / SERVER_FILE
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for worker in workers:
            worker.start()
        url = f"http://{host}:{port}"
        info = {"url": url, "pid": os.getpid(), "host": host, "port": port}
        atomic_write_bytes(json.dumps(info).encode(), server_file)
        logger.info("segassist API at %s/docs, data in %s", url, settings.data_dir)
        uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
    except _Stop as stop:
        logger.info("%s received; stopping", stop)
    finally:
        # a second SIGINT/SIGTERM while the workers stop kills them at once (like a second
        # Ctrl-C to Celery); before, it killed this process alone, leaving them orphaned
        def kill_workers(_signum: int, _frame: object) -> None:
            for worker in workers:
                worker.kill()

        for sig in previous:
            signal.signal(sig, kill_workers)
        server_file.unlink(missing_ok=True)
        logger.info("stopping the workers; a second signal kills them")
        run_together([worker.stop for worker in workers])
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_together(calls: Sequence[Callable[[], None]]) -> None:
    """Run ``calls`` each in a thread of its own, return when all have (re-raising the first
    error): how the service stops its workers. One after the other, a busy worker's warm then
    cold shutdown (20 s, then a few) delayed the others': stopping took 40 s with a refinement
    running, and a caller that waits 30 s before SIGKILL (the tests did) left that worker
    orphaned, finishing its refinement for minutes. (The main thread's wait is interrupted by
    a second signal to run its handler.)"""
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        for running in [pool.submit(call) for call in calls]:
            running.result()


def run_worker(
    concurrency: int = 1,
    loglevel: str = "INFO",
    queues: tuple[str, ...] = WORKER_QUEUES["all"],
) -> None:
    """Become a worker (deployed: Redis + PostgreSQL); never returns.

    Migrates the database, then replaces this process with :func:`worker_command`, so signals
    from a container runtime reach Celery directly and its exit code is the process's.
    """
    settings = get_settings()
    migrate(settings.database_url)
    command = worker_command(concurrency, loglevel, queues)
    os.execve(command[0], command, _environment(settings))
