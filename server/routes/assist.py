"""``/datasets/{id}/assist``: the assist workflow, one job for every client."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, status
from sqlalchemy import select

from segassist.server.assist import resolve_assist
from segassist.server.auth import CurrentPrincipal, require_role
from segassist.server.db.tables import Dataset, Job, JobKind, Role
from segassist.server.deps import CeleryDep, IdPath, SessionDep
from segassist.server.errors import not_found
from segassist.server.routes.jobs import submit_job
from segassist.server.schemas import AssistCreate, JobPublic

__all__ = ["router"]

router = APIRouter(prefix="/datasets", tags=["assist"])


def _dataset(session: SessionDep, dataset_id: str) -> Dataset:
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    return dataset


@router.post(
    "/{dataset_id}/assist",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[Depends(require_role(Role.annotator))],
)
def start_assist(
    dataset_id: IdPath,
    session: SessionDep,
    celery: CeleryDep,
    principal: CurrentPrincipal,
    body: AssistCreate | None = None,
) -> JobPublic:
    """Segment images from the labelled slices: one ``assist`` job, polled at ``/jobs/{id}``.

    The server takes the slice axis and the classes from the labels, reuses the dataset's encoder
    (else the newest of the modality; else it pretrains briefly and continues in the
    background, refitting when the better encoder lands), fits the segmenter and stores a
    prediction of every requested image. The job's ``progress.phase`` names the phase
    (``encoder``, ``features``, ``fit``, ``export``, ``predict``); its ``result`` holds
    ``segmenter_id``, ``predictions`` (download URLs per image) and ``next_slice`` (per image,
    the unannotated slice the model is least sure of: where to label next).
    """
    dataset = _dataset(session, dataset_id)
    params = resolve_assist(session, dataset, body or AssistCreate())
    return submit_job(session, celery, JobKind.assist, dataset, params, principal.user_id)


@router.get("/{dataset_id}/assist")
def latest_assist(dataset_id: IdPath, session: SessionDep) -> JobPublic:
    """The dataset's most recent assist job (a viewer's starting point); 404 when none."""
    _dataset(session, dataset_id)
    job = session.scalar(
        select(Job)
        .where(Job.dataset_id == dataset_id, Job.kind == JobKind.assist)
        .order_by(Job.created_at.desc())
        .limit(1)
    )
    if job is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"dataset {dataset_id!r} has no assist job yet"
        )
    return JobPublic.model_validate(job)
