"""Jobs: create (validated, then enqueued by task name), poll, cancel, logs."""

from __future__ import annotations

import logging
from typing import Annotated, Any

from celery import Celery
from fastapi import APIRouter, Depends, HTTPException, Query, status
from fastapi.responses import PlainTextResponse
from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from segassist.server.auth import CurrentPrincipal, Principal, require_role
from segassist.server.db.cancel import cancel_jobs
from segassist.server.db.tables import (
    FINAL_TAG,
    Dataset,
    Image,
    Job,
    JobKind,
    JobStatus,
    Label,
    ModelKind,
    ModelRecord,
    Role,
    utcnow,
)
from segassist.server.deps import CeleryDep, IdPath, IdQuery, SessionDep, StorageDep
from segassist.server.errors import not_found, unprocessable
from segassist.server.queue import enqueue_job
from segassist.server.schemas import (
    FinetuneParams,
    JobCreate,
    JobPublic,
    PretrainParams,
)

__all__ = ["router", "submit_job"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"])


def _conflict(message: str) -> HTTPException:
    return HTTPException(status.HTTP_409_CONFLICT, message)


def _check_images(session: Session, dataset: Dataset, image_ids: list[str] | None) -> None:
    if image_ids is None:
        if not session.scalar(select(exists().where(Image.dataset_id == dataset.id))):
            raise _conflict(f"dataset {dataset.id!r} has no images: upload a volume first")
        return
    if not image_ids:
        raise unprocessable("params.image_ids is empty (omit it to use every image)")
    found = set(
        session.scalars(
            select(Image.id).where(Image.id.in_(image_ids), Image.dataset_id == dataset.id)
        )
    )
    missing = [i for i in image_ids if i not in found]
    if missing:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"images not found in dataset {dataset.id!r}: {missing}"
        )


def _check_model(session: Session, model_id: str, kind: ModelKind, dataset: Dataset) -> None:
    model = session.get(ModelRecord, model_id)
    if model is None:
        raise not_found(str(kind), model_id)
    if model.kind != kind:
        raise unprocessable(f"model {model_id!r} is a {model.kind}, not a {kind}")
    if model.modality.lower() != dataset.modality.lower():
        raise unprocessable(
            f"{kind} {model_id!r} was trained on {model.modality}, "
            f"dataset {dataset.id!r} is {dataset.modality}"
        )


def _check_labels(session: Session, dataset: Dataset, label_ids: list[str] | None) -> None:
    in_dataset = select(Label.id).join(Image).where(Image.dataset_id == dataset.id)
    if label_ids is None:
        if session.scalar(select(exists(in_dataset.where(Label.tag == FINAL_TAG)))):
            return
        raise _conflict(
            f"dataset {dataset.id!r} has no labels: upload a label volume "
            f"(tag '{FINAL_TAG}') for at least one image before fine-tuning"
        )
    if not label_ids:
        raise unprocessable("params.label_ids is empty (omit it to use every final label)")
    found = set(session.scalars(in_dataset.where(Label.id.in_(label_ids))))
    missing = [i for i in label_ids if i not in found]
    if missing:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"labels not found in dataset {dataset.id!r}: {missing}"
        )


def _checked_params(session: Session, dataset: Dataset, body: JobCreate) -> dict[str, Any]:
    """``body.params`` (validated with the body) once the ids they name exist in ``dataset``."""
    params = body.params
    if isinstance(params, PretrainParams):
        _check_images(session, dataset, params.image_ids)
    elif isinstance(params, FinetuneParams):
        if params.encoder_id is not None:
            _check_model(session, params.encoder_id, ModelKind.encoder, dataset)
        _check_labels(session, dataset, params.label_ids)
    else:
        _check_model(session, params.model_id, ModelKind.segmenter, dataset)
        _check_images(session, dataset, params.image_ids)
    return params.model_dump(mode="json")


def _get_job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise not_found("job", job_id)
    return job


def submit_job(
    session: Session,
    celery: Celery,
    kind: JobKind,
    dataset: Dataset,
    params: dict[str, Any],
    owner: str | None = None,
) -> JobPublic:
    """Record a ``queued`` job with already checked ``params`` and enqueue it by name;
    ``owner`` is the id of the user starting it (who may cancel it besides admins).

    Raises:
        HTTPException: 503 when the broker cannot be reached (the job is then ``failed``).
    """
    job = Job(kind=kind, dataset_id=dataset.id, params=params, created_by=owner)
    session.add(job)
    session.commit()
    try:
        job.celery_task_id = enqueue_job(celery, job)
    except Exception as exc:
        logger.exception("could not enqueue job %s", job.id)
        job.status = JobStatus.failed
        job.error = f"could not reach the task broker: {exc}"
        job.finished_at = utcnow()
        session.commit()
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"job {job.id} not queued: {job.error}"
        ) from exc
    session.commit()
    return JobPublic.model_validate(job)


@router.post(
    "", status_code=status.HTTP_202_ACCEPTED, dependencies=[Depends(require_role(Role.annotator))]
)
def create_job(
    body: JobCreate, session: SessionDep, celery: CeleryDep, principal: CurrentPrincipal
) -> JobPublic:
    """Validate, record (``queued``) and enqueue a job; the worker picks it up by id."""
    dataset = session.get(Dataset, body.dataset_id)
    if dataset is None:
        raise not_found("dataset", body.dataset_id)
    return submit_job(
        session,
        celery,
        body.kind,
        dataset,
        _checked_params(session, dataset, body),
        principal.user_id,
    )


@router.get("")
def list_jobs(
    session: SessionDep,
    dataset_id: IdQuery = None,
    state: Annotated[JobStatus | None, Query(alias="status")] = None,
) -> list[JobPublic]:
    """Jobs, newest first, optionally of one dataset and/or in one state."""
    query = select(Job).order_by(Job.created_at.desc())
    if dataset_id is not None:
        query = query.where(Job.dataset_id == dataset_id)
    if state is not None:
        query = query.where(Job.status == state)
    return [JobPublic.model_validate(job) for job in session.scalars(query)]


@router.get("/{job_id}")
def get_job(job_id: IdPath, session: SessionDep) -> JobPublic:
    """State, progress, result and error of a job."""
    return JobPublic.model_validate(_get_job(session, job_id))


def _check_may_cancel(job: Job, principal: Principal) -> None:
    own = principal.user_id is not None and job.created_by == principal.user_id
    if not (own or principal.may(Role.admin)):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"job {job.id!r} was not started by {principal.name!r}: only its owner or an admin "
            "can cancel it",
        )


@router.post("/{job_id}/cancel", dependencies=[Depends(require_role(Role.annotator))])
def cancel_job(job_id: IdPath, session: SessionDep, principal: CurrentPrincipal) -> JobPublic:
    """Cancel a job: a queued job is cancelled at once; a running one gets ``cancel_requested``
    and stops at its next progress report. Finished jobs answer 409. Annotators cancel the jobs
    they started; admins any job."""
    job = _get_job(session, job_id)
    _check_may_cancel(job, principal)
    cancel_jobs(session, Job.id == job_id)
    session.commit()
    session.refresh(job)
    if job.status.finished and job.status != JobStatus.cancelled:
        raise _conflict(f"job {job_id!r} already {job.status}; nothing to cancel")
    return JobPublic.model_validate(job)


@router.get("/{job_id}/logs", response_class=PlainTextResponse)
def job_logs(job_id: IdPath, session: SessionDep, storage: StorageDep) -> PlainTextResponse:
    """The job's log (``data_dir/jobs/<id>/log.txt``); empty until the worker writes one."""
    _get_job(session, job_id)
    path = storage.job_log(job_id)
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    return PlainTextResponse(text)
