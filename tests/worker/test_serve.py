"""The embedded service: API + one worker from one process, the worker restarted if it dies."""

from __future__ import annotations

import functools
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from segassist.server.queue import PREDICTION_QUEUE, QUEUE_NAME, REFINEMENT_QUEUE
from segassist.worker.serve import SERVER_FILE, run_together
from tests.worker.conftest import (
    JOB_DEADLINE_SECONDS,
    LABEL_SCHEMA,
    TINY_FEWSHOT,
    nifti_bytes,
    sparse_label,
    synthetic_volume,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    """Child processes of ``pid`` (of all its threads: the worker is restarted from a thread)."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return sorted(children)


def _niceness(service: int) -> dict[str, int]:
    """Queue → niceness of the service's worker consuming it, which its pool processes and
    its session's autogroup (where the kernel has them) share."""
    found = {}
    for pid in _children(service):
        args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        niceness = {os.getpriority(os.PRIO_PROCESS, p) for p in [pid, *_children(pid)]}
        autogroup = Path(f"/proc/{pid}/autogroup")
        if autogroup.exists():
            niceness.add(int(autogroup.read_text().split("nice")[1]))
        assert len(niceness) == 1, f"worker {pid}, its pool and autogroup differ: {niceness}"
        found[args[args.index("-Q") + 1]] = niceness.pop()
    return found


def _until(check: object, what: str) -> None:
    end = time.monotonic() + JOB_DEADLINE_SECONDS
    while time.monotonic() < end:
        if callable(check) and check():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], httpx.Client, Path]]:
    """``run_embedded`` in a subprocess on a free port; answers once /health is 200."""
    data_dir = tmp_path / "data"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEGASSIST_")}
    env |= {"SEGASSIST_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    code = f"from segassist.worker.serve import run_embedded; run_embedded('127.0.0.1', {port}, {str(data_dir)!r})"
    log = (tmp_path / "serve.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}/api/v1", timeout=30)

    def healthy() -> bool:
        if process.poll() is not None:
            pytest.fail(f"the service exited: {(tmp_path / 'serve.log').read_text()}")
        try:
            return client.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    _until(healthy, "the embedded API")
    try:
        yield process, client, data_dir
    finally:
        client.close()
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def _labelled_image(client: httpx.Client, label: np.ndarray) -> tuple[str, str]:
    """A new CT dataset holding the synthetic volume labelled with ``label``: (dataset, image)."""
    dataset = client.post(
        "/datasets", json={"name": "box", "modality": "CT", "labels": LABEL_SCHEMA}
    ).json()
    image = client.post(
        f"/datasets/{dataset['id']}/images",
        files={"file": ("ct.nii.gz", io.BytesIO(nifti_bytes(synthetic_volume())), "x")},
    ).json()
    client.post(
        f"/images/{image['id']}/labels",
        files={"file": ("l.nii.gz", io.BytesIO(nifti_bytes(label)), "x")},
    ).raise_for_status()
    return dataset["id"], image["id"]


def _segment(client: httpx.Client) -> dict[str, object]:
    """Upload a volume and a sparse label, fit on a random encoder; the finished job."""
    dataset_id, _ = _labelled_image(client, sparse_label())
    config = {"encoder": {"channels": [4, 8], "num_clusters": 3}, **TINY_FEWSHOT}
    body = {"kind": "finetune", "dataset_id": dataset_id, "params": {"config": config}}
    return _finished(client, client.post("/jobs", json=body).json()["id"])


def test_embedded_service_runs_jobs_and_restarts_a_dead_worker(
    embedded: tuple[subprocess.Popen[bytes], httpx.Client, Path],
) -> None:
    process, client, data_dir = embedded
    info = json.loads((data_dir / SERVER_FILE).read_text())
    assert info["pid"] == process.pid
    assert (data_dir / "segassist.db").exists()  # SQLite under the data directory

    assert _segment(client)["status"] == "succeeded"
    assert any((data_dir / "broker").rglob("*")), "the filesystem broker lives in the data dir"

    workers = _children(process.pid)
    assert len(workers) == 3  # the training, prediction and refinement workers
    own = os.getpriority(os.PRIO_PROCESS, process.pid)
    niceness = {
        QUEUE_NAME: min(19, own + 19),
        PREDICTION_QUEUE: own,
        REFINEMENT_QUEUE: min(19, own + 10),
    }
    assert _niceness(process.pid) == niceness
    os.killpg(workers[0], signal.SIGKILL)
    _until(
        lambda: len(_children(process.pid)) == 3 and workers[0] not in _children(process.pid),
        "a new worker",
    )
    restarted = next(pid for pid in _children(process.pid) if pid not in workers)
    assert _segment(client)["status"] == "succeeded"
    assert _niceness(process.pid) == niceness  # the restarted one's too

    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0
    assert not (data_dir / SERVER_FILE).exists()
    with pytest.raises(ProcessLookupError):
        os.kill(restarted, 0)  # the worker stopped with the service


def test_a_refinement_runs_beside_a_pretraining(
    embedded: tuple[subprocess.Popen[bytes], httpx.Client, Path],
) -> None:
    """An assist's background refinement has a worker of its own: it ends while a long
    pretraining still holds the training queue."""
    _, client, _ = embedded
    label = sparse_label()
    label[6:16, 5:14, 3] = 1  # a third labelled slice: one to hold out
    dataset_id, _ = _labelled_image(client, label)
    encoder = {"channels": [4, 8], "batch_size": 1, "image_size": 16, "num_clusters": 3}
    short = {"objective": "pix2rep", "steps": 2, "config": encoder | {"kmeans_slices": 1}}
    _finished(client, client.post("/jobs", json=_pretrain(dataset_id, short)).json()["id"])
    long = _pretrain(dataset_id, short | {"steps": 100_000})
    pretraining = client.post("/jobs", json=long).json()
    _until(lambda: _job(client, pretraining["id"])["status"] == "running", "the pretraining")

    fewshot = {**TINY_FEWSHOT, "steps": 30, "eval_every": 10, "patience": 2}
    assist = client.post(f"/datasets/{dataset_id}/assist", json={"config": fewshot}).json()
    done = _finished(client, assist["id"])
    assert done["status"] == "succeeded", done
    refinement = _finished(client, done["result"]["refine_job_id"])
    assert refinement["status"] == "succeeded", refinement
    assert refinement["result"]["outcome"] in ("refined", "kept")
    assert _job(client, pretraining["id"])["status"] == "running"
    client.post(f"/jobs/{pretraining['id']}/cancel").raise_for_status()


def _pretrain(dataset_id: str, params: dict[str, object]) -> dict[str, object]:
    return {"kind": "pretrain", "dataset_id": dataset_id, "params": params}


def _job(client: httpx.Client, job_id: str) -> dict[str, object]:
    job: dict[str, object] = client.get(f"/jobs/{job_id}").json()
    return job


def _finished(client: httpx.Client, job_id: str) -> dict[str, object]:
    state: dict[str, object] = {}

    def finished() -> bool:
        state.update(_job(client, job_id))
        return state["status"] in ("succeeded", "failed", "cancelled")

    _until(finished, f"job {job_id}")
    return state


def test_the_workers_are_stopped_together() -> None:
    """Each stop returns only once all three have begun: run one after the other, the first
    would wait for the others until the barrier broke."""
    begun = threading.Barrier(3, timeout=30)
    stopped: list[int] = []

    def stop(worker: int) -> None:
        begun.wait()
        stopped.append(worker)

    run_together([functools.partial(stop, i) for i in range(3)])
    assert sorted(stopped) == [0, 1, 2] and not begun.broken


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its adopter) is gone for our purpose
    return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()


def test_a_killed_service_leaves_no_worker_behind(
    embedded: tuple[subprocess.Popen[bytes], httpx.Client, Path],
) -> None:
    """``kill -9`` of ``segassist serve``: its workers stop too, so a restart finds none."""
    process, _, _ = embedded
    workers = _children(process.pid)
    assert len(workers) == 3
    process.kill()
    process.wait()
    _until(lambda: not any(_alive(pid) for pid in workers), "the orphaned workers to stop")


def test_a_second_signal_while_stopping_kills_the_workers(
    embedded: tuple[subprocess.Popen[bytes], httpx.Client, Path], tmp_path: Path
) -> None:
    """Ctrl-C twice: the first starts the warm shutdown, which waits for a running pretraining;
    the second kills the workers, and the service exits without leaving one behind."""
    process, client, _ = embedded
    dataset = client.post(
        "/datasets", json={"name": "box", "modality": "CT", "labels": LABEL_SCHEMA}
    ).json()
    client.post(
        f"/datasets/{dataset['id']}/images",
        files={"file": ("ct.nii.gz", io.BytesIO(nifti_bytes(synthetic_volume())), "x")},
    ).raise_for_status()
    config = {"channels": [4, 8], "batch_size": 1, "image_size": 16, "num_clusters": 3}
    params = {"objective": "pix2rep", "steps": 100_000, "config": config | {"kmeans_slices": 1}}
    job = client.post(
        "/jobs", json={"kind": "pretrain", "dataset_id": dataset["id"], "params": params}
    ).json()
    _until(lambda: client.get(f"/jobs/{job['id']}").json()["status"] == "running", "pretraining")
    workers = _children(process.pid)
    assert len(workers) == 3

    process.send_signal(signal.SIGTERM)
    log = tmp_path / "serve.log"
    _until(lambda: "a second signal kills them" in log.read_text(), "the workers' stop")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=JOB_DEADLINE_SECONDS) == 0
    _until(lambda: not any(_alive(pid) for pid in workers), "the workers to be killed")
