"""The HTTP API of ``reco serve`` (FastAPI; OpenAPI at ``/docs``): thin routes over the serving service.

Versioned under ``/v1``; every ``/v1`` route needs an API key with the route's scope (``read``, ``write``,
``admin``); ``/healthz``, ``/readyz`` and ``/metrics`` are open (bind the server to localhost, the default,
or put it behind a proxy). Bodies are capped (``RECO_API_MAX_BODY_BYTES``), uploads by count and bytes,
images decoded with the same safe decoder as ingestion.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUpload

from api import errors
from api.auth import KeyChecker, require
from api.errors import ApiError
from api.limits import BodySizeLimit
from api.memory_routes import router as memory_router
from api.metrics import Metrics
from app.config import Settings
from app.db.apikeys import ApiKeyRepo
from app.manifest import resolve_confined
from app.schemas import RefineMode
from app.services.memory_map import MapQuery, MemoryMap
from app.services.search import SearchOptions
from app.services.serving import (
    ClassCoverage,
    ClassSetPrepared,
    DeleteOut,
    ItemDetail,
    ItemsPage,
    JobOut,
    NeighbourOut,
    PredictionOut,
    PredictQuery,
    RefineOptions,
    SearchAnswer,
    SearchQuery,
    ServingService,
    ingest_roots,
)

READ, WRITE, ADMIN = Depends(require("read")), Depends(require("write")), Depends(require("admin"))
READ_CHUNK = 1 << 20
ITEM_FILTERS = ("dataset", "split", "label", "source", "image_hash")


class PredictAnswer(BaseModel):
    predictions: list[PredictionOut]


class NeighboursAnswer(BaseModel):
    neighbours: list[NeighbourOut]


class JobsAnswer(BaseModel):
    jobs: list[JobOut]


class IngestOptions(BaseModel):
    dataset: str | None = Field(default=None, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.-]*$",
                                description="The dataset name the items are filed under (default: the folder's)")
    caption_template: str | None = Field(
        default=None, max_length=200,
        description="For a tree of class folders: caption each uncaptioned image as this template with {folder} "
                    "replaced by its folder's name, and label it with that class, e.g. 'a photo of a {folder}.'")

    @field_validator("caption_template")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from ingestion.classfolders import check_template

        return check_template(value)


class IngestPath(IngestOptions):
    path: str = Field(max_length=4096, description="A folder or manifest on the server, inside the allowed roots")


class CoverageBody(BaseModel):
    labels: list[str] | None = Field(default=None, max_length=5000)
    class_set: str | None = Field(default=None, max_length=128)


class PrepareBody(CoverageBody):
    mode: RefineMode | None = None  # omitted: the checkpoint's validated mode
    k: int | None = Field(default=None, ge=1, le=1000)
    templates: str | None = Field(default=None, max_length=200)


class MapBody(MapQuery):
    image_b64: str | None = Field(default=None, max_length=64 * 1024 * 1024)


class SearchBody(SearchOptions, RefineOptions):
    """A search as JSON: a text, or an image as base64 in ``image_b64``."""

    text: str | None = Field(default=None, max_length=4000)
    image_b64: str | None = Field(default=None, max_length=64 * 1024 * 1024)


async def read_capped(upload: StarletteUpload, cap: int, what: str) -> bytes:
    """An uploaded file's bytes, refused (413) as soon as it passes ``cap``."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await upload.read(READ_CHUNK):
        size += len(chunk)
        if size > cap:
            raise ApiError(413, "too_large", f"{what} is over the cap of {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _labels(raw: list[str] | None) -> list[str] | None:
    """Labels as repeated form fields, or one field with comma/newline separated labels, or a JSON array."""
    if not raw:
        return None
    out: list[str] = []
    for value in raw:
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except ValueError as exc:
                raise ApiError(400, "invalid_request", f"labels: not a JSON array ({exc})") from exc
            if not isinstance(parsed, list) or not all(isinstance(x, str) for x in parsed):
                raise ApiError(400, "invalid_request", "labels: a JSON array of strings expected")
            out += parsed
        else:
            out += [p for p in text.replace("\n", ",").split(",")]
    return out


def _image_from_b64(value: str | None) -> bytes | None:
    """A request's base64 image field decoded, or a 400 that says it is not base64."""
    if value is None:
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "invalid_request", f"image_b64 is not base64: {exc}") from exc


def create_app(settings: Settings, service: ServingService, *, uploads: Any = None) -> FastAPI:
    """``uploads``: the ingestion layer's upload storage (``ingestion.uploads``), for ``POST /v1/ingest``."""
    app = FastAPI(title="RECO memory service", version="1", description=__doc__,
                  docs_url="/docs", openapi_url="/openapi.json", redoc_url=None)
    app.state.settings = settings
    app.state.service = service
    app.state.keys = KeyChecker(ApiKeyRepo(service.repo.session_factory))
    app.state.ready = True
    metrics = Metrics(service)
    app.state.metrics = metrics
    errors.install(app)
    app.middleware("http")(metrics.middleware)
    app.add_middleware(BodySizeLimit, max_bytes=settings.api_max_body_bytes)
    app.include_router(memory_router)

    # --- health ---------------------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz(request: Request) -> JSONResponse:
        try:
            live = service.live()
            service.store.list_collections()
        except Exception as exc:  # noqa: BLE001 - not ready, whatever the reason: say it
            return errors.respond(503, "not_ready", f"{type(exc).__name__}: {exc}")
        if not request.app.state.ready:
            return errors.respond(503, "not_ready", "starting")
        return JSONResponse({"status": "ready", "encoder_id": live.encoder.encoder_id,
                             "checkpoint": live.checkpoint_label, "memory": service.store.location})

    @app.get("/metrics", tags=["health"])
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- predict and search ------------------------------------------------------------------------------
    @app.post("/v1/predict", dependencies=[READ], tags=["method"])
    async def predict(
        images: Annotated[list[UploadFile], File(description="One or more images")],
        labels: Annotated[list[str] | None, Form(description="Class names (repeat, or comma-separated)")] = None,
        class_set: Annotated[str | None, Form(description="A dataset's classes.txt by name")] = None,
        mode: Annotated[RefineMode | None, Form(description="omitted: the checkpoint's validated mode")] = None,
        k: Annotated[int | None, Form(ge=1, le=1000, description="k' neighbours")] = None,
        top: Annotated[int, Form(ge=1, le=100)] = 5,
        templates: Annotated[str | None, Form(max_length=200)] = None,
    ) -> PredictAnswer:
        """Zero-shot classification of each image: CLIP's top classes beside RECO's, with the neighbours
        (caption, similarity, attention) that explain the change."""
        if len(images) > settings.upload_max_files:
            raise ApiError(413, "too_many_files", f"{len(images)} images > cap {settings.upload_max_files}")
        query = PredictQuery(labels=_labels(labels), class_set=class_set, mode=mode, k=k, top=top,
                             templates=templates)
        data = [(f.filename or f"image-{i}", await read_capped(f, settings.max_image_bytes, f.filename or "an image"))
                for i, f in enumerate(images)]
        return PredictAnswer(predictions=await run_in_threadpool(service.predict, data, query))

    @app.post("/v1/classes/coverage", dependencies=[READ], tags=["method"])
    def class_coverage(body: CoverageBody) -> ClassCoverage:
        """Which classes of a class set (labels, or a dataset's classes.txt by name) the memory holds: some
        caption mentions the class. RECO out of its memory's domain can turn right answers wrong."""
        labels = service.resolve_classes(PredictQuery(labels=body.labels, class_set=body.class_set))
        return service.class_coverage(labels)

    @app.post("/v1/classes/prepare", dependencies=[READ], tags=["method"])
    def prepare_classes(body: PrepareBody) -> ClassSetPrepared:
        """Compute the class embeddings a prediction against these classes needs (CLIP's and, for modes
        text/both, the refined ones), batched and cached: send a large set in chunks to show progress."""
        return service.prepare_classes(PredictQuery(labels=body.labels, class_set=body.class_set, mode=body.mode,
                                                    k=body.k, templates=body.templates))

    @app.post("/v1/search", dependencies=[READ], tags=["method"])
    def search(body: SearchBody) -> SearchAnswer:
        """Text or image (base64) query; ``target`` image or text vectors; filters, k, score threshold;
        ``mode`` clip or a RECO mode that refines the query."""
        image = _image_from_b64(body.image_b64)
        if image is not None and len(image) > settings.max_image_bytes:
            raise ApiError(413, "too_large", f"the image is over the cap of {settings.max_image_bytes} bytes")
        fields = body.model_dump(exclude={"image_b64"})
        query = SearchQuery.model_validate(fields | {"image_bytes": image})
        return service.search(query)

    @app.post("/v1/map", dependencies=[READ], tags=["items"])
    def memory_map(body: MapBody) -> MemoryMap:
        """A 2-D PCA map of the memory's image vectors (one point per image, class names), with an item or an
        uploaded image (base64) marked as the query and its nearest images as neighbours."""
        image = _image_from_b64(body.image_b64)
        return service.memory_map(MapQuery.model_validate(body.model_dump(exclude={"image_b64"})), image)

    # --- items --------------------------------------------------------------------------------------------
    @app.get("/v1/items", dependencies=[READ], tags=["items"])
    def items(
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        dataset: str | None = None, split: str | None = None, label: int | None = None,
        source: str | None = None, image_hash: str | None = None,
        q: Annotated[str | None, Query(max_length=200, description="caption contains")] = None,
    ) -> ItemsPage:
        values = {"dataset": dataset, "split": split, "label": label, "source": source, "image_hash": image_hash}
        return service.list_items(filters={k: v for k, v in values.items() if v is not None}, offset=offset,
                                  limit=limit, caption_contains=q)

    @app.get("/v1/items/{item_id}", dependencies=[READ], tags=["items"])
    def item(item_id: str) -> ItemDetail:
        return service.get_item(item_id)

    @app.get("/v1/items/{item_id}/image", dependencies=[READ], tags=["items"])
    def item_image(item_id: str) -> Response:
        data, media = service.item_image(item_id)
        return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/v1/items/{item_id}/neighbours", dependencies=[READ], tags=["items"])
    def item_neighbours(item_id: str, k: Annotated[int | None, Query(ge=1, le=100)] = None) -> NeighboursAnswer:
        service.get_item(item_id)  # 404 for an unknown or deleted item
        return NeighboursAnswer(neighbours=service.neighbours_of_item(item_id, k))

    @app.delete("/v1/items/{item_id}", dependencies=[ADMIN], tags=["items"])
    def delete_item(item_id: str, reason: Annotated[str, Query(max_length=2000)] = "deleted") -> DeleteOut:
        """Takedown: vectors removed from every version, metadata kept as deleted (time, reason), caches
        dropped; the item is never returned again and ingesting it again is refused."""
        return service.delete_item(item_id, reason)

    # --- ingestion -----------------------------------------------------------------------------------------
    @app.post("/v1/ingest", dependencies=[WRITE], tags=["ingestion"], status_code=202,
              openapi_extra={"requestBody": {"content": {
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "file": {"type": "string", "format": "binary",
                               "description": "a CSV/JSONL manifest or a zip of images (+ captions/manifest)"}}}},
                  "application/json": {"schema": IngestPath.model_json_schema()}}}})
    async def ingest(request: Request) -> JSONResponse:
        """Start an ingestion job: an uploaded manifest or zip (multipart ``file``), or ``{"path": ...}`` of a
        folder or manifest on the server inside the allowed roots. Answers at once with the job."""
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            job = await _ingest_upload(request)
        elif kind.startswith("application/json"):
            try:
                body = IngestPath.model_validate(await request.json())
            except ValueError as exc:
                raise ApiError(400, "invalid_request", f"a JSON body {{'path': ...}} expected: {exc}") from exc
            job = await run_in_threadpool(_ingest_path, body.path, body)
        else:
            raise ApiError(415, "unsupported_media_type", "send multipart/form-data with a file, or JSON with a path")
        return JSONResponse(job.model_dump(mode="json"), status_code=202)

    async def _ingest_upload(request: Request) -> JobOut:
        if uploads is None:
            raise ApiError(501, "not_available", "this server was started without the ingestion layer")
        form = await request.form(max_files=1, max_fields=8)
        file = form.get("file")
        if not isinstance(file, StarletteUpload):
            raise ApiError(400, "invalid_request", "multipart field 'file' (a manifest or a zip) is required")
        name = file.filename or "upload"
        try:
            options = IngestOptions.model_validate({k: form.get(k) for k in ("dataset", "caption_template")
                                                    if isinstance(form.get(k), str) and form.get(k)})
        except ValidationError as exc:
            raise ApiError(400, "invalid_request", str(exc)) from exc
        data = await read_capped(file, settings.upload_max_total_bytes, name)
        try:
            stored = await run_in_threadpool(uploads.store_upload, name, data, settings)
        except uploads.UploadRejected as exc:
            raise ApiError(413 if exc.reason == "too_large" else 400, str(exc.reason), exc.detail) from exc
        return await run_in_threadpool(lambda: service.start_ingest(
            stored.source, kind="upload", total=stored.images or None, dataset=options.dataset,
            caption_template=options.caption_template))

    def _ingest_path(raw: str, options: IngestOptions) -> JobOut:
        roots = ingest_roots(settings)
        try:
            resolved = resolve_confined(roots[0], raw, roots[1:])
        except ValueError as exc:
            raise ApiError(403, "path_outside_root", f"{exc} (allowed: {', '.join(map(str, roots))})") from exc
        if not resolved.exists():
            raise ApiError(404, "not_found", f"{raw} does not exist on the server")
        return service.start_ingest(resolved, kind="manifest" if resolved.is_file() else "folder",
                                    dataset=options.dataset, caption_template=options.caption_template)

    @app.get("/v1/jobs/{job_id}", dependencies=[READ], tags=["ingestion"])
    def job(job_id: int) -> JobOut:
        return service.get_job(job_id)

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=[WRITE], tags=["ingestion"])
    def cancel_job(job_id: int) -> JobOut:
        """Stop a running job between two batches (it ends as ``cancelled``; what it stored stays)."""
        try:
            return service.cancel_job(job_id)
        except LookupError as exc:
            if "not run by this process" in str(exc):
                raise ApiError(409, "not_possible", str(exc)) from exc
            raise

    @app.get("/v1/jobs", dependencies=[READ], tags=["ingestion"])
    def jobs(limit: Annotated[int, Query(ge=1, le=200)] = 20) -> JobsAnswer:
        return JobsAnswer(jobs=service.recent_jobs(limit))

    @app.get("/v1/status", dependencies=[READ], tags=["status"])
    def status() -> dict[str, Any]:
        return service.status()

    @app.get("/", include_in_schema=False)
    def root() -> PlainTextResponse:
        return PlainTextResponse("RECO memory service API: /docs for the OpenAPI description\n")

    return app

