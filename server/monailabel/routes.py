"""The MONAI Label REST API, at the server's root and at ``/monailabel/{dataset_id}``.

The routes, paths (trailing slashes included: Slicer follows no redirect) and answers are the
ones the MONAI Label plugins of 3D Slicer and OHIF call (``shared/MONAILABEL.md``);
:func:`monailabel_routers` builds the same routes twice, once per way of choosing the app
(:mod:`segassist.server.monailabel.apps`).

Authentication (:mod:`segassist.server.auth`): when it is on, every route takes the same bearer tokens
and roles as ``/api/v1`` (reads: viewer; uploads, labels, inference, training: annotator),
except ``GET /auth/`` and ``POST /auth/token``, the login: user name = a segassist user's name,
password = that user's token (answered with the token itself); or the user and password of
``SEGASSIST_MONAILABEL_USERNAME``/``_PASSWORD``, or any user name with ``SEGASSIST_API_TOKEN``
as the password (answered with the API token). Outside ``production``, ``GET /datastore/image``
with an image **id** needs no token either: Slicer's sample-data loader downloads that URL
without any header, so an image id (128 random bits, handed out only to authenticated callers)
is itself the permission to download that one image. In production it needs a token like
every other route.
"""

# No ``from __future__ import annotations``: the routes are built in a function whose ``AppDep``
# alias FastAPI must see evaluated (string annotations are resolved in the module's globals).

import re
import secrets
from collections.abc import Callable
from importlib import metadata
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Form, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError
from sqlalchemy import select

from segassist.models.runtime.configs import DEFAULT_HEAD, PROBE_HEADS
from segassist.server.assist import resolve_assist
from segassist.server.auth import (
    Credentials,
    CurrentPrincipal,
    Principal,
    authentication_required,
    authorise,
    find_principal,
    require_role,
)
from segassist.server.db.tables import FINAL_TAG, ID_PATTERN, Dataset, Job, JobKind, Role
from segassist.server.deps import CeleryDep, IdPath, SessionDep, SettingsDep, StorageDep
from segassist.server.errors import format_errors, not_found, unprocessable
from segassist.server.monailabel import sessions
from segassist.server.monailabel.apps import (
    CLUSTERS_MODEL,
    SEGMENTATION_MODEL,
    App,
    class_names,
    cluster_count,
    datastore_json,
    datastore_status,
    default_dataset,
    file_name,
    find_image,
    image_entry,
    unknown,
)
from segassist.server.monailabel.datastore import parse_params, save_label, store_image, upload_name
from segassist.server.monailabel.inference import encode, multipart, plan, wait_for_job
from segassist.server.monailabel.strategies import STRATEGIES, next_sample
from segassist.server.monailabel.training import active_training, latest_training, task, train_stats
from segassist.server.routes.jobs import cancel_job, submit_job
from segassist.server.schemas import AssistCreate
from segassist.server.storage import Storage
from segassist.server.uploads import multipart_openapi, receive_upload, release_connection

__all__ = ["DATASET_PREFIX", "monailabel_routers"]

DATASET_PREFIX = "/monailabel/{dataset_id}"
CLIENT_ID = "segassist"
_ID = re.compile(ID_PATTERN)
_TRAINER_KEYS = ("method", "head", "probabilities", "objective", "encoder_id", "axis", "config")

Resolver = Callable[..., App]


def _root_app(session: SessionDep, settings: SettingsDep, storage: StorageDep) -> App:
    """The server root's app: the default dataset (``None`` until the first upload)."""
    return App(default_dataset(session, settings, storage), is_default=True)


def _dataset_app(dataset_id: IdPath, session: SessionDep) -> App:
    """``/monailabel/{dataset_id}``: that dataset's app."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None:
        raise not_found("dataset", dataset_id)
    return App(dataset, is_default=False)


def _download_auth(
    request: Request,
    settings: SettingsDep,
    credentials: Credentials,
    image: str | None = None,
) -> None:
    """A viewer's token; outside production an image id instead (module docstring: Slicer's
    loader sends no header). The route itself requires ``image``: checked after this gate."""
    if settings.environment == "production" or not _ID.fullmatch(image or ""):
        authorise(request, None if credentials is None else credentials.credentials, Role.viewer)


_download_auth.required_role = Role.viewer  # type: ignore[attr-defined]


def _version() -> str:
    try:
        return metadata.version("segassist")
    except metadata.PackageNotFoundError:
        return "unknown"


def _same(a: str, b: str) -> bool:
    return secrets.compare_digest(a.encode(), b.encode())


def _trainer_config() -> dict[str, Any]:
    """The trainer's options as Slicer shows them (a list is a drop-down, first = default)."""
    return {
        "method": ["linear", "finetune", "mean_teacher", "auto"],
        "head": [DEFAULT_HEAD, *(h for h in PROBE_HEADS if h != DEFAULT_HEAD)],
        "objective": ["any", "pix2rep", "pix2rep_barlow", "iic_boundary"],
        "probabilities": False,
    }


def _assist_request(params: dict[str, Any] | None) -> AssistCreate:
    picked = {k: v for k, v in (params or {}).items() if k in _TRAINER_KEYS and v not in (None, "")}
    if picked.get("objective") == "any":
        picked.pop("objective")
    try:
        return AssistCreate.model_validate(picked)
    except ValidationError as exc:
        raise unprocessable(format_errors(exc.errors(), prefix="params")) from exc


async def _request_params(request: Request) -> dict[str, Any]:
    """``params`` of an infer request: the multipart/urlencoded field, or a JSON body."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        async with request.form(max_files=8, max_fields=64) as form:
            raw = form.get("params")
            return parse_params(raw if isinstance(raw, str) else None)
    body = await request.body()
    return parse_params(body.decode("utf-8", "replace") if body else None)


def build_router(resolve: Resolver, prefix: str = "") -> APIRouter:
    """Every MONAI Label route, with ``resolve`` choosing the app of a request."""
    AppDep = Annotated[App, Depends(resolve)]
    router = APIRouter(prefix=prefix, tags=["MONAI Label"])
    protected = APIRouter(dependencies=[Depends(require_role(Role.viewer))])

    # -- auth ------------------------------------------------------------------------------------
    @router.get("/auth/")
    def auth_enabled(settings: SettingsDep, session: SessionDep) -> dict[str, Any]:
        """Whether a login is needed; 404 when authentication is off (what clients expect)."""
        if not authentication_required(settings, session):
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                "authentication is off (development, no SEGASSIST_API_TOKEN, no user)",
            )
        return {"enabled": True, "client_id": CLIENT_ID, "realm": ""}

    @router.post("/auth/token")
    def auth_token(
        settings: SettingsDep,
        session: SessionDep,
        username: Annotated[str, Form(min_length=1)],
        password: Annotated[str, Form(min_length=1)],
    ) -> dict[str, Any]:
        """The bearer token for a login (module docstring: user name and token, or the
        configured MONAI Label user, or the API token)."""
        if not authentication_required(settings, session):
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, "authentication is off: no token is needed"
            )
        configured_user = bool(settings.api_token and settings.monailabel_password) and (
            (not settings.monailabel_username or _same(username, settings.monailabel_username))
            and _same(password, settings.monailabel_password)
        )
        if configured_user:
            return {"access_token": settings.api_token, "token_type": "bearer"}
        principal = find_principal(settings, session, password)
        if principal is None or (principal.user_id is not None and principal.name != username):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "wrong user name or password (a user's name and token, "
                "SEGASSIST_MONAILABEL_USERNAME/_PASSWORD, or any name with the API token)",
            )
        return {"access_token": password, "token_type": "bearer"}

    @protected.get("/auth/token/valid")
    def auth_token_valid(principal: CurrentPrincipal) -> dict[str, Any]:
        """200 when the bearer token is accepted."""
        return {"valid": True, "username": principal.name}

    # -- info ------------------------------------------------------------------------------------
    @protected.get("/info/")
    def info(app: AppDep, session: SessionDep, storage: StorageDep) -> dict[str, Any]:
        """The app: labels, models, trainer, strategies, train stats, datastore counts."""
        dataset = app.dataset
        labels = class_names(dataset)
        clusters = cluster_count(session, dataset)
        name = dataset.name if dataset is not None else "monailabel"
        return {
            "name": f"segassist: {name}",
            "description": "Few-shot segmentation on a self-supervised encoder (segassist)",
            "version": _version(),
            "labels": labels,
            "models": {
                SEGMENTATION_MODEL: {
                    "type": "segmentation",
                    "labels": labels,
                    "dimension": 3,
                    "description": "the dataset's few-shot segmenter (train it first)",
                    "config": {},
                },
                CLUSTERS_MODEL: {
                    "type": "segmentation",
                    "labels": [f"cluster {k}" for k in range(1, clusters + 1)],
                    "dimension": 3,
                    "description": "the encoder's cluster map: what it learned without labels",
                    "config": {},
                },
            },
            "trainers": {
                SEGMENTATION_MODEL: {
                    "description": "the assist workflow on every final label: encoder, "
                    "few-shot fit, prediction of every image",
                    "config": _trainer_config(),
                }
            },
            "strategies": {k: {"description": v, "config": {}} for k, v in STRATEGIES.items()},
            "scoring": {},
            "train_stats": train_stats(session, storage, dataset),
            "datastore": datastore_status(session, dataset),
        }

    # -- datastore -------------------------------------------------------------------------------
    @protected.get("/datastore/")
    def datastore(
        app: AppDep, session: SessionDep, output: Literal["stats", "all", "train"] | None = None
    ) -> Any:
        """Counts (default), every image and label (``output=all``) or the training pairs."""
        if output == "all":
            return datastore_json(session, app.dataset)
        if output == "train":
            objects = datastore_json(session, app.dataset)["objects"]
            return [
                {"image": image_id, "label": image_id}
                for image_id, entry in objects.items()
                if FINAL_TAG in entry["labels"]
            ]
        return datastore_status(session, app.dataset)

    async def add_image(
        request: Request,
        app: AppDep,
        session: SessionDep,
        settings: SettingsDep,
        storage: StorageDep,
        celery: CeleryDep,
        image: Annotated[str | None, Query(max_length=255)] = None,
    ) -> dict[str, Any]:
        """Upload a volume (multipart ``file`` + ``params``): NIfTI, zipped DICOM or NRRD."""
        await release_connection(session)
        with storage.upload_tmp() as tmp:
            upload = await receive_upload(request, tmp, settings.max_upload_bytes, "file")
            parse_params(upload.fields.get("params"))
            name = upload_name(upload.filename, image)
            stored = await run_in_threadpool(
                store_image, session, settings, storage, celery, app, upload, name
            )
        return {"image": stored.id, "name": stored.name}

    upload = Depends(require_role(Role.annotator))
    volume_body = multipart_openapi()
    protected.put(
        "/datastore/",
        summary="Upload a volume (as Slicer calls it)",
        dependencies=[upload],
        openapi_extra=volume_body,
    )(add_image)
    protected.put(
        "/datastore/image",
        summary="Upload a volume",
        dependencies=[upload],
        openapi_extra=volume_body,
    )(add_image)

    @router.get(
        "/datastore/image", dependencies=[Depends(_download_auth)], response_class=FileResponse
    )
    def download_image(image: str, app: AppDep, session: SessionDep) -> FileResponse:
        """The stored volume (NIfTI, gzip); by id without a token (module docstring)."""
        found = find_image(session, app.require(), image)
        return FileResponse(found.path, media_type="application/gzip", filename=file_name(found))

    @protected.get("/datastore/image/info")
    def image_info(image: str, app: AppDep, session: SessionDep) -> dict[str, Any]:
        """What the datastore knows about an image."""
        return image_entry(find_image(session, app.require(), image))

    @protected.put(
        "/datastore/label",
        dependencies=[Depends(require_role(Role.annotator))],
        openapi_extra=multipart_openapi("label"),
    )
    async def put_label(
        request: Request,
        image: str,
        app: AppDep,
        session: SessionDep,
        settings: SettingsDep,
        storage: StorageDep,
        tag: str = FINAL_TAG,
    ) -> dict[str, Any]:
        """Save a label volume (multipart ``label`` + ``params``) as the image's new version.

        A viewer's full volume (unpainted = 0) becomes a sparse label by the rule of
        :mod:`segassist.server.monailabel.sparse`; ``params.label_info`` names its segments.
        """
        await release_connection(session)
        with storage.upload_tmp() as tmp:
            upload = await receive_upload(request, tmp, settings.max_upload_bytes, "label")
            params = parse_params(upload.fields.get("params"))
            return await run_in_threadpool(
                save_label, session, storage, app, image, upload, tag or FINAL_TAG, params
            )

    @protected.get("/datastore/label", response_class=FileResponse)
    def get_label(
        label: str, app: AppDep, session: SessionDep, tag: str = FINAL_TAG
    ) -> FileResponse:
        """The newest label of an image (``label`` = the image's id or name) with ``tag``."""
        found = find_image(session, app.require(), label)
        stored = next((v for v in found.labels if v.tag == tag), None)  # newest first
        if stored is None:
            raise not_found(f"label with tag {tag!r} of image", found.id)
        return FileResponse(stored.path, media_type="application/gzip", filename=file_name(found))

    # -- infer -----------------------------------------------------------------------------------
    @protected.post(
        "/infer/{model}",
        dependencies=[Depends(require_role(Role.annotator))],
        responses={200: {"content": {"multipart/form-data": {}, "application/octet-stream": {}}}},
    )
    async def infer(
        model: str,
        request: Request,
        app: AppDep,
        session: SessionDep,
        storage: StorageDep,
        celery: CeleryDep,
        image: str | None = None,
        session_id: str | None = None,
        output: Literal["image", "json", "all"] | None = None,
    ) -> Response:
        """Segment an image with ``segmentation`` or ``clusters`` (:mod:`.inference`)."""
        params = await _request_params(request)
        result = await run_in_threadpool(
            plan, session, storage, celery, app, model, image, session_id
        )
        if result.job_id is not None:
            await wait_for_job(session, result.job_id)
        content, filename, answer = await run_in_threadpool(encode, result, model, params, output)
        if output == "json":
            return JSONResponse(answer)
        if output == "image":
            return Response(
                content,
                media_type="application/octet-stream",
                headers={"Content-Disposition": f'attachment; filename="{filename}"'},
            )
        body, content_type = multipart(answer, filename, content)
        return Response(body, media_type=content_type)

    # -- train -----------------------------------------------------------------------------------
    def start(
        model: str,
        params: dict[str, Any] | None,
        app: App,
        session: SessionDep,
        storage: StorageDep,
        celery: CeleryDep,
        principal: Principal,
    ) -> dict[str, Any]:
        if model != SEGMENTATION_MODEL:
            raise unknown("trainer", model, [SEGMENTATION_MODEL])
        dataset = app.dataset
        if dataset is None:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                "nothing to train on yet: upload a volume and save a label with a few painted "
                "slices first",
            )
        running = active_training(session, dataset)
        if running is not None:
            raise HTTPException(
                status.HTTP_409_CONFLICT,
                f"training job {running.id} is already {running.status}: wait for it or stop it "
                "(DELETE /train/)",
            )
        body = _assist_request(params)
        job = submit_job(
            session,
            celery,
            JobKind.assist,
            dataset,
            resolve_assist(session, dataset, body),
            principal.user_id,
        )
        row = session.get(Job, job.id)
        if row is None:  # pragma: no cover - just committed
            raise RuntimeError(f"job {job.id} vanished")
        return task(row, storage)

    @protected.post("/train/", dependencies=[Depends(require_role(Role.annotator))])
    def train_all(
        app: AppDep,
        session: SessionDep,
        storage: StorageDep,
        celery: CeleryDep,
        principal: CurrentPrincipal,
        params: Annotated[dict[str, Any] | None, Body()] = None,
    ) -> dict[str, Any]:
        """Start the trainer (OHIF's call): the assist workflow on every final label."""
        return start(SEGMENTATION_MODEL, params, app, session, storage, celery, principal)

    @protected.post("/train/{model}", dependencies=[Depends(require_role(Role.annotator))])
    def train_model(
        model: str,
        app: AppDep,
        session: SessionDep,
        storage: StorageDep,
        celery: CeleryDep,
        principal: CurrentPrincipal,
        params: Annotated[dict[str, Any] | None, Body()] = None,
    ) -> dict[str, Any]:
        """Start trainer ``model`` (Slicer's call); 409 while a training runs."""
        return start(model, params, app, session, storage, celery, principal)

    @protected.get("/train/")
    def train_status(
        app: AppDep,
        session: SessionDep,
        storage: StorageDep,
        check_if_running: bool = False,
        all_tasks: Annotated[bool, Query(alias="all")] = False,
    ) -> Any:
        """The newest training task; ``check_if_running=true``: 404 unless one is running."""
        if check_if_running:
            running = active_training(session, app.dataset)
            if running is None:
                raise HTTPException(status.HTTP_404_NOT_FOUND, "no training is running")
            return task(running, storage)
        if all_tasks and app.dataset is not None:
            jobs = session.scalars(
                select(Job)
                .where(Job.dataset_id == app.dataset.id, Job.kind == JobKind.assist)
                .order_by(Job.created_at)
            )
            return [task(job, storage) for job in jobs]
        latest = latest_training(session, app.dataset)
        if latest is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND,
                f"no training task yet: POST /train/{SEGMENTATION_MODEL} starts one",
            )
        return task(latest, storage)

    @protected.delete("/train/", dependencies=[Depends(require_role(Role.annotator))])
    def train_stop(
        app: AppDep, session: SessionDep, storage: StorageDep, principal: CurrentPrincipal
    ) -> Any:
        """Cancel the running training (an annotator's own; an admin's any); ``null`` when none
        runs."""
        running = active_training(session, app.dataset)
        if running is None:
            return None
        try:
            cancel_job(running.id, session, principal)
        except HTTPException as exc:  # finished meanwhile
            if exc.status_code != status.HTTP_409_CONFLICT:
                raise
        session.refresh(running)
        return task(running, storage)

    # -- active learning ---------------------------------------------------------------------------
    @protected.post("/activelearning/{strategy}")
    def activelearning(
        strategy: str,
        app: AppDep,
        session: SessionDep,
        storage: StorageDep,
        params: Annotated[dict[str, Any] | None, Body()] = None,
    ) -> dict[str, Any]:
        """The next image to annotate (``{}`` when every image is labelled)."""
        if strategy not in STRATEGIES:
            raise unknown("strategy", strategy, list(STRATEGIES))
        picked = next_sample(session, storage, app.dataset, strategy)
        return {} if picked is None else {**image_entry(picked), "strategy": strategy}

    # -- sessions --------------------------------------------------------------------------------
    @protected.put(
        "/session/",
        dependencies=[Depends(require_role(Role.annotator))],
        openapi_extra=multipart_openapi("files"),
    )
    async def create_session(
        request: Request,
        app: AppDep,
        session: SessionDep,
        settings: SettingsDep,
        storage: StorageDep,
        celery: CeleryDep,
        expiry: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        """Upload a volume (multipart ``files``) to refer to by session id for ``expiry`` s."""
        await release_connection(session)
        with storage.upload_tmp() as tmp:
            upload = await receive_upload(request, tmp, settings.max_upload_bytes, "files")
            name = upload_name(upload.filename, None)
            stored = await run_in_threadpool(
                store_image, session, settings, storage, celery, app, upload, name
            )
        record = sessions.create(
            storage,
            stored.dataset_id,
            stored.id,
            name,
            expiry or sessions.DEFAULT_EXPIRY_SECONDS,
        )
        return record.public(stored.path)

    def _session(
        storage: Storage, app: App, session_id: str, touch: bool
    ) -> sessions.SessionRecord:
        record = sessions.get(storage, session_id, touch=touch)
        if record is None or app.dataset is None or record.dataset_id != app.dataset.id:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"session {session_id!r} is unknown or expired"
            )
        return record

    @protected.get("/session/{session_id}", responses={200: {"content": {"application/gzip": {}}}})
    def get_session(
        session_id: str,
        app: AppDep,
        session: SessionDep,
        storage: StorageDep,
        update_ts: bool = False,
        image: bool = False,
    ) -> Any:
        """A live session (``image=true``: its volume)."""
        record = _session(storage, app, session_id, update_ts)
        found = find_image(session, app.require(), record.image_id, by_name=False)
        if image:
            return FileResponse(
                found.path, media_type="application/gzip", filename=file_name(found)
            )
        return record.public(found.path)

    @protected.delete("/session/{session_id}", dependencies=[Depends(require_role(Role.annotator))])
    def delete_session(
        session_id: str, app: AppDep, session: SessionDep, storage: StorageDep
    ) -> dict[str, Any]:
        """End a session (its image stays in the dataset)."""
        record = _session(storage, app, session_id, False)
        sessions.remove(storage, session_id)
        found = find_image(session, app.require(), record.image_id, by_name=False)
        return record.public(found.path)

    router.include_router(protected)
    return router


def monailabel_routers() -> list[APIRouter]:
    """The MONAI Label API on the default dataset (root) and on every dataset (by id)."""
    return [build_router(_root_app), build_router(_dataset_app, DATASET_PREFIX)]
