"""Job life cycle with a real worker: cancel, worker crash and recovery, failures, time limit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.worker.conftest import TINY_PRETRAIN, Service, Worker

LONG_STEPS = 100_000
"""More pretraining steps than any test waits for: the job runs until cancelled or killed."""


def _running(job: dict[str, object]) -> bool:
    progress = job["progress"]
    return job["status"] == "running" and isinstance(progress, dict) and (progress["step"] or 0) > 0


def _log(service: Service, job_id: str) -> str:
    response = service.client.get(f"/api/v1/jobs/{job_id}/logs")
    assert response.status_code == 200
    return str(response.text)


def test_cancel_running_and_queued_jobs(
    service: Service, start_worker: Callable[[], Worker]
) -> None:
    worker = start_worker()
    dataset_id, _ = service.dataset_with_labels()
    running = service.job(
        "pretrain", dataset_id, objective="pix2rep", steps=LONG_STEPS, config=TINY_PRETRAIN
    )
    queued = service.job("pretrain", dataset_id, objective="pix2rep", steps=2, config=TINY_PRETRAIN)
    service.wait(running, _running)

    service.post(f"/jobs/{queued}/cancel")
    service.post(f"/jobs/{running}/cancel")

    cancelled = service.finished(running)
    assert cancelled["status"] == "cancelled", cancelled
    assert 0 < cancelled["progress"]["step"] < LONG_STEPS
    assert "cancelled" in _log(service, running)
    skipped = service.finished(queued)
    assert skipped["status"] == "cancelled"
    assert skipped["attempts"] == 0  # never started

    # The worker survives a cancel and takes the next job.
    after = service.finished(
        service.job("pretrain", dataset_id, objective="pix2rep", steps=2, config=TINY_PRETRAIN)
    )
    assert after["status"] == "succeeded", after
    assert worker.alive()


def test_killed_worker_job_resumes_on_next_worker(
    service: Service, start_worker: Callable[[], Worker]
) -> None:
    first = start_worker()
    dataset_id, _ = service.dataset_with_labels()
    steps = 400
    job_id = service.job(
        "pretrain", dataset_id, objective="pix2rep", steps=steps, config=TINY_PRETRAIN
    )
    interrupted = service.wait(job_id, lambda job: _running(job) and job["progress"]["step"] >= 5)
    assert interrupted["progress"]["step"] < steps, "the job finished before the kill; raise steps"

    first.kill()
    assert service.get(f"/jobs/{job_id}")["status"] == "running"  # nobody recorded anything

    start_worker()
    done = service.finished(job_id)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    assert done["progress"]["step"] == steps
    log = _log(service, job_id)
    assert "was lost" in log
    assert "resuming pretraining" in log  # from the checkpoint, not from step 0
    encoder = service.get(f"/models/{done['result']['encoder_id']}")
    assert encoder["job_id"] == job_id


def test_failing_job_reports_a_readable_error(
    service: Service, start_worker: Callable[[], Worker]
) -> None:
    worker = start_worker()
    dataset_id, image_id = service.dataset_with_labels()
    image_file = Path(service.settings.data_dir) / "images" / image_id / "image.nii.gz"
    image_file.unlink()

    job_id = service.job("pretrain", dataset_id, objective="pix2rep", steps=2, config=TINY_PRETRAIN)
    failed = service.finished(job_id)
    assert failed["status"] == "failed", failed
    assert image_id in failed["error"] and "missing" in failed["error"]
    log = _log(service, job_id)
    assert "Traceback" in log and "missing" in log
    assert worker.alive()


@pytest.mark.parametrize(
    "settings",
    [("embedded", {"task_soft_time_limit": 5, "task_hard_time_limit": 600})],
    indirect=True,
)
def test_job_over_the_time_limit_fails(
    service: Service, start_worker: Callable[[], Worker]
) -> None:
    start_worker()
    dataset_id, _ = service.dataset_with_labels()
    job_id = service.job(
        "pretrain", dataset_id, objective="pix2rep", steps=LONG_STEPS, config=TINY_PRETRAIN
    )
    failed = service.finished(job_id)
    assert failed["status"] == "failed", failed
    assert "time limit of 5 s" in failed["error"]
