"""``/datasets``: named collections of volumes with one modality and label schema."""

from __future__ import annotations

from fastapi import APIRouter, Depends, status
from sqlalchemy import func, select

from segassist.server.auth import require_role
from segassist.server.db.tables import Dataset, Image, Role
from segassist.server.deps import IdPath, SessionDep
from segassist.server.dicomweb import DicomwebServer
from segassist.server.errors import not_found
from segassist.server.routes.dicomweb import DICOMWEB_RESPONSES
from segassist.server.schemas import DatasetCreate, DatasetPublic

__all__ = ["router"]

router = APIRouter(prefix="/datasets", tags=["datasets"])


def _public(dataset: Dataset, image_count: int) -> DatasetPublic:
    return DatasetPublic.model_validate(
        {**{c: getattr(dataset, c) for c in DatasetPublic.model_fields if c != "image_count"}}
        | {"image_count": image_count}
    )


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    dependencies=[Depends(require_role(Role.annotator))],
    responses=DICOMWEB_RESPONSES,
)
def create_dataset(body: DatasetCreate, session: SessionDep) -> DatasetPublic:
    """Create a dataset; class ``0`` (background) is implicit, ``255`` means unannotated.

    With ``dicomweb``, the server is asked once first: 424 when it refuses the credentials, 503
    when it cannot be reached (nothing is created)."""
    if body.dicomweb is not None:
        DicomwebServer(body.dicomweb).check()
    dataset = Dataset(
        name=body.name,
        modality=body.modality,
        labels={k: v.model_dump() for k, v in body.labels.items()},
        dicomweb=body.dicomweb.stored() if body.dicomweb is not None else None,
    )
    session.add(dataset)
    session.commit()
    return _public(dataset, 0)


@router.get("")
def list_datasets(session: SessionDep) -> list[DatasetPublic]:
    """Every dataset, newest first, with its image count."""
    counts = (
        select(Image.dataset_id, func.count(Image.id).label("n"))
        .group_by(Image.dataset_id)
        .subquery()
    )
    rows = session.execute(
        select(Dataset, func.coalesce(counts.c.n, 0))
        .outerjoin(counts, counts.c.dataset_id == Dataset.id)
        .order_by(Dataset.created_at.desc())
    ).all()
    return [_public(dataset, int(n)) for dataset, n in rows]


@router.get("/{dataset_id}")
def get_dataset(dataset_id: IdPath, session: SessionDep) -> DatasetPublic:
    """One dataset with its image count."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    n = session.scalar(select(func.count(Image.id)).where(Image.dataset_id == dataset_id)) or 0
    return _public(dataset, n)
