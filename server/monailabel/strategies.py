"""Active-learning strategies: which unlabelled image to annotate next.

Candidates are the dataset's images without a ``final`` label, oldest first.

- ``first``: the oldest candidate.
- ``random``: any candidate, uniformly.
- ``uncertainty``: the candidate whose latest prediction is least certain: the mean normalised
  entropy of the newest segmenter's prediction of it, as the assist job that trained the
  segmenter reported it (``result.uncertainty``), else from the ``uncertainty.nii.gz`` a later
  prediction wrote (``infer`` asks for it). A candidate with neither counts as fully uncertain
  (1.0), so images never predicted come first; ties go to the oldest.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from segassist.models.runtime.nifti import read_nifti
from segassist.server.db.tables import FINAL_TAG, Dataset, Image, Job, JobKind, JobStatus, Label
from segassist.server.monailabel.apps import latest_segmenter
from segassist.server.storage import Storage

__all__ = ["STRATEGIES", "next_sample"]

STRATEGIES = {
    "random": "an unlabelled image, drawn uniformly",
    "first": "the oldest unlabelled image",
    "uncertainty": "the unlabelled image whose latest prediction is least certain "
    "(mean normalised entropy)",
}

_RECENT_JOBS = 20
_MEANS: dict[tuple[str, int], float] = {}
"""(uncertainty file, mtime in ns) → mean: a map is read once per process."""


def _candidates(session: Session, dataset: Dataset) -> list[Image]:
    labelled = select(Label.image_id).where(Label.tag == FINAL_TAG)
    return list(
        session.scalars(
            select(Image)
            .where(Image.dataset_id == dataset.id, Image.id.not_in(labelled))
            .order_by(Image.created_at, Image.id)
        )
    )


def _reported_uncertainty(
    session: Session, dataset: Dataset, segmenter_id: str
) -> dict[str, float]:
    """Image id → mean uncertainty, from the result of the assist job that made the segmenter."""
    jobs = session.scalars(
        select(Job)
        .where(
            Job.dataset_id == dataset.id,
            Job.kind == JobKind.assist,
            Job.status == JobStatus.succeeded,
        )
        .order_by(Job.created_at.desc())
        .limit(_RECENT_JOBS)
    )
    for job in jobs:
        result = job.result or {}
        if result.get("segmenter_id") == segmenter_id:
            reported = result.get("uncertainty") or {}
            return {str(k): float(v) for k, v in reported.items() if v is not None}
    return {}


def _mean_uncertainty(path: Path) -> float:
    if not path.is_file():
        return 1.0
    key = (str(path), path.stat().st_mtime_ns)
    if key not in _MEANS:
        if len(_MEANS) > 4096:
            _MEANS.clear()
        _MEANS[key] = float(np.mean(read_nifti(path)[0], dtype=np.float64))
    return _MEANS[key]


def next_sample(
    session: Session,
    storage: Storage,
    dataset: Dataset | None,
    strategy: str,
    rng: Callable[[int], int] | None = None,
) -> Image | None:
    """The image ``strategy`` picks, or ``None`` when every image is labelled.

    Raises:
        KeyError: ``strategy`` is not one of :data:`STRATEGIES`.
    """
    if strategy not in STRATEGIES:
        raise KeyError(strategy)
    if dataset is None:
        return None
    candidates = _candidates(session, dataset)
    if not candidates:
        return None
    if strategy == "first":
        return candidates[0]
    if strategy == "random":
        draw = rng or random.randrange
        return candidates[draw(len(candidates))]
    segmenter = latest_segmenter(session, dataset)
    if segmenter is None:
        return candidates[0]
    reported = _reported_uncertainty(session, dataset, segmenter.id)
    scores = [
        reported[image.id]
        if image.id in reported
        else _mean_uncertainty(
            storage.prediction_dir(segmenter.id, image.id) / "uncertainty.nii.gz"
        )
        for image in candidates
    ]
    best = max(range(len(candidates)), key=lambda i: (scores[i], -i))
    return candidates[best]
