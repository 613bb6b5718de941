"""MONAI Label training on segassist: the trainer is the dataset's assist workflow.

``POST /train/segmentation`` starts one ``assist`` job on every image's ``final`` labels (the
same job ``POST /api/v1/datasets/{id}/assist`` starts); status, progress, cancel and
``train_stats`` are read off the dataset's assist jobs and the segmenter they register. A MONAI
Label task is that job seen through the upstream task shape::

    {"id", "status": "RUNNING"|"DONE"|"ERROR"|"STOPPED", "start_ts", "end_ts", "details": [...],
     "result", "request", "segassist": {"status", "phase", …}}

A queued job reports ``RUNNING`` as well: both plugins poll for exactly that word and stop
watching on anything else. ``details`` is the tail of the job's log and is never empty (Slicer
reads ``details[-1]`` when training stops).

``best_metric`` in ``train_stats`` is the Dice of the segmenter's stored predictions against the
annotated voxels it was fitted on (mean over classes): how well it reproduces the annotation,
not a validation score. It is computed once per segmenter and kept next to it.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from segassist.models.runtime.configs import IGNORE_INDEX
from segassist.models.runtime.nifti import read_nifti
from segassist.server.db.tables import Dataset, Job, JobKind, JobStatus, Label, ModelRecord
from segassist.server.monailabel.apps import SEGMENTATION_MODEL, latest_segmenter, monailabel_dir
from segassist.server.storage import Storage, atomic_write_bytes

__all__ = [
    "PHASES",
    "active_training",
    "latest_training",
    "task",
    "train_stats",
    "training_dice",
]

logger = logging.getLogger(__name__)

PHASES = ("encoder", "features", "fit", "export", "predict")
"""The assist job's phases in order (``progress.phase``); an unknown phase counts as ``fit``."""
_PHASE_ALIASES = {"pretrain": "encoder", "finetune": "fit", "mean_teacher": "fit"}
_STATUS = {
    JobStatus.queued: "RUNNING",
    JobStatus.running: "RUNNING",
    JobStatus.succeeded: "DONE",
    JobStatus.failed: "ERROR",
    JobStatus.cancelled: "STOPPED",
}
_DETAIL_LINES = 20
TOTAL_EPOCHS = 100
"""``train_stats`` express progress as ``epoch`` out of 100 (percent of the assist phases)."""


def latest_training(session: Session, dataset: Dataset | None) -> Job | None:
    """The dataset's newest assist job."""
    if dataset is None:
        return None
    return session.scalar(
        select(Job)
        .where(Job.dataset_id == dataset.id, Job.kind == JobKind.assist)
        .order_by(Job.created_at.desc())
        .limit(1)
    )


def active_training(session: Session, dataset: Dataset | None) -> Job | None:
    """The dataset's newest queued or running assist job."""
    if dataset is None:
        return None
    return session.scalar(
        select(Job)
        .where(
            Job.dataset_id == dataset.id,
            Job.kind == JobKind.assist,
            Job.status.in_([JobStatus.queued, JobStatus.running]),
        )
        .order_by(Job.created_at.desc())
        .limit(1)
    )


def _time(value: Any) -> str | None:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else None


def _percent(job: Job) -> int:
    """Progress of an assist job over its phases, 0…100."""
    if job.status == JobStatus.succeeded:
        return TOTAL_EPOCHS
    progress = job.progress or {}
    phase = str(progress.get("phase") or "")
    phase = _PHASE_ALIASES.get(phase, phase)
    if not phase:
        return 0
    index = PHASES.index(phase) if phase in PHASES else PHASES.index("fit")
    step, total = progress.get("step") or 0, progress.get("total") or 0
    within = min(max(float(step) / float(total), 0.0), 1.0) if total else 0.0
    return int(TOTAL_EPOCHS * (index + within) / len(PHASES))


def _details(job: Job, storage: Storage) -> list[str]:
    path = storage.job_log(job.id)
    lines: list[str] = []
    if path.is_file():
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - 16384))
            text = handle.read().decode("utf-8", errors="replace")
        lines = [line for line in text.splitlines() if line.strip()][-_DETAIL_LINES:]
    phase = (job.progress or {}).get("phase")
    summary = f"assist job {job.id}: {job.status}" + (f", phase {phase}" if phase else "")
    if job.cancel_requested and not job.status.finished:
        summary += "; cancel requested, stops at its next progress report"
    if job.error:
        summary += f"; {job.error}"
    return [*lines, summary]


def task(job: Job, storage: Storage) -> dict[str, Any]:
    """The MONAI Label task view of an assist job (module docstring)."""
    result = job.result or {}
    return {
        "id": job.id,
        "status": _STATUS[job.status],
        "start_ts": _time(job.started_at or job.created_at),
        "end_ts": _time(job.finished_at),
        "details": _details(job, storage),
        "result": result.get("segmenter_id") or job.error or str(job.status),
        "request": {"model": SEGMENTATION_MODEL, **(job.params or {})},
        "segassist": {
            "status": str(job.status),
            "phase": (job.progress or {}).get("phase"),
            "progress": _percent(job),
            "segmenter_id": result.get("segmenter_id"),
            "timings": result.get("timings"),
        },
    }


def _annotated_dice(label: np.ndarray, predicted: np.ndarray) -> dict[int, tuple[int, int]]:
    """Per class: (2·|overlap|, |label| + |prediction|) over the annotated voxels."""
    annotated = label != IGNORE_INDEX
    truth, guess = label[annotated], predicted[annotated]
    sums: dict[int, tuple[int, int]] = {}
    for c in np.unique(truth):
        if c == 0:
            continue
        t, g = truth == c, guess == c
        sums[int(c)] = (2 * int(np.count_nonzero(t & g)), int(t.sum() + g.sum()))
    return sums


def training_dice(session: Session, storage: Storage, segmenter: ModelRecord) -> float | None:
    """Dice of ``segmenter``'s stored predictions on the labels it was fitted on (cached).

    ``None`` while a prediction of a labelled image is missing (the job is still writing them).
    """
    cache = monailabel_dir(storage) / "train_stats" / f"{segmenter.id}.json"
    if cache.is_file():
        try:
            value = json.loads(cache.read_text()).get("dice")
            return None if value is None else float(value)
        except (OSError, ValueError):
            logger.warning("ignoring unreadable %s", cache)
    label_ids = list((segmenter.lineage or {}).get("label_ids") or [])
    totals: dict[int, list[int]] = {}
    for label in session.scalars(select(Label).where(Label.id.in_(label_ids))):
        predicted = storage.prediction_dir(segmenter.id, label.image_id) / "labels.nii.gz"
        if not predicted.is_file():
            return None
        truth = read_nifti(label.path)[0].astype(np.uint8)
        guess = read_nifti(predicted)[0].astype(np.uint8)
        for c, (overlap, size) in _annotated_dice(truth, guess).items():
            total = totals.setdefault(c, [0, 0])
            total[0] += overlap
            total[1] += size
    if not totals:
        return None
    dice = float(np.mean([o / s if s else 1.0 for o, s in totals.values()]))
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(json.dumps({"dice": dice, "label_ids": label_ids}).encode(), cache)
    return dice


def train_stats(session: Session, storage: Storage, dataset: Dataset | None) -> dict[str, Any]:
    """``info.train_stats``: ``{"segmentation": {epoch, total_epochs, best_metric, total_time, …}}``.

    While an assist job runs, ``epoch`` is its progress (percent) and ``total_time`` is 0 (Slicer
    shows ``epoch/total_epochs`` then); otherwise they describe the newest segmenter's fit.
    """
    segmenter = latest_segmenter(session, dataset)
    metrics = dict(segmenter.metrics or {}) if segmenter is not None else {}
    dice = training_dice(session, storage, segmenter) if segmenter is not None else None
    stats: dict[str, Any] = {
        "epoch": 0,
        "total_epochs": TOTAL_EPOCHS,
        "best_metric": dice if dice is not None else 0.0,
        "total_time": 0,
        "segmenter_id": segmenter.id if segmenter is not None else None,
        "final_loss": metrics.get("final_loss"),
        "method": segmenter.method if segmenter is not None else None,
    }
    job = latest_training(session, dataset)
    if job is not None:
        stats["job_id"] = job.id
        stats["status"] = _STATUS[job.status]
        stats["epoch"] = _percent(job)
        if job.status.finished and job.started_at is not None and job.finished_at is not None:
            stats["total_time"] = round((job.finished_at - job.started_at).total_seconds(), 3)
    return {SEGMENTATION_MODEL: stats}
