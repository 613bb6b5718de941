"""Celery tasks ``segassist.<kind>`` for every job kind: pretrain, finetune, predict, assist,
features, refine.

Each takes only a job id; :func:`segassist.worker.jobs.run_job` re-reads the row and runs the pipeline of
:mod:`segassist.worker.pipelines`. The return value (the job's status) is informative only: the SQL job row
is the status of record.
"""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task

from segassist.server.settings import get_settings
from segassist.worker import assist as assist_pipelines
from segassist.worker import pipelines
from segassist.worker import refine as refine_pipelines
from segassist.worker.jobs import Pipeline, run_job

__all__ = ["assist", "features", "finetune", "predict", "pretrain", "refine"]


def _run(task: Task, job_id: str, pipeline: Pipeline) -> str:
    def publish(state: dict[str, Any]) -> None:
        task.update_state(state="PROGRESS", meta=state)

    return run_job(job_id, pipeline, get_settings(), publish=publish)


@shared_task(name="segassist.pretrain", bind=True)
def pretrain(self: Task, job_id: str) -> str:
    """Self-supervised pretraining of an encoder on a dataset's volumes."""
    return _run(self, job_id, pipelines.pretrain)


@shared_task(name="segassist.finetune", bind=True)
def finetune(self: Task, job_id: str) -> str:
    """Few-shot fit of a segmenter on labelled slices, exported to ONNX."""
    return _run(self, job_id, pipelines.finetune)


@shared_task(name="segassist.predict", bind=True)
def predict(self: Task, job_id: str) -> str:
    """ONNX predictions of a segmenter on a dataset's images."""
    return _run(self, job_id, pipelines.predict)


@shared_task(name="segassist.assist", bind=True)
def assist(self: Task, job_id: str) -> str:
    """The assist workflow: ensure an encoder, fit, predict, store (:mod:`segassist.worker.assist`)."""
    return _run(self, job_id, assist_pipelines.assist)


@shared_task(name="segassist.features", bind=True)
def features(self: Task, job_id: str) -> str:
    """Cache an encoder's decoder maps of images (a prefetch for the assist workflow)."""
    return _run(self, job_id, assist_pipelines.features)


@shared_task(name="segassist.refine", bind=True)
def refine(self: Task, job_id: str) -> str:
    """Train a network from scratch behind an assist; keep it if it validates better
    (:mod:`segassist.worker.refine`)."""
    return _run(self, job_id, refine_pipelines.refine)
