"""The serving service of a running ``reco serve``, over HTTP: the same methods and answers as
:class:`app.services.serving.ServingService`, so the UI and the CLI do not care where it runs."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from app.config import Settings
from app.remote import HttpClient, ServerError, ServerInfo
from app.services.memory_map import MapQuery, MemoryMap
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
    SearchAnswer,
    SearchQuery,
)


class ServingClient:
    def __init__(self, http: HttpClient) -> None:
        self.http = http

    @classmethod
    def connect(cls, settings: Settings, server: ServerInfo, client: str = "cli") -> ServingClient:
        return cls(HttpClient.for_settings(settings, server, client))

    @property
    def url(self) -> str:
        return self.http.server.url

    def predict(self, images: list[tuple[str, bytes]], query: PredictQuery) -> list[PredictionOut]:
        form: dict[str, Any] = {"top": str(query.top)}
        if query.mode is not None:  # omitted: the server's checkpoint picks its validated mode
            form["mode"] = str(query.mode)
        if query.k is not None:
            form["k"] = str(query.k)
        if query.templates:
            form["templates"] = query.templates
        if query.class_set is not None:
            form["class_set"] = query.class_set
        else:
            form["labels"] = list(query.labels or [])
        files = [("images", (name, data, "application/octet-stream")) for name, data in images]
        out = self.http.json("POST", "/v1/predict", data=form, files=files)
        return [PredictionOut.model_validate(p | {"via": f"reco serve ({self.url})"}) for p in out["predictions"]]

    def search(self, query: SearchQuery) -> SearchAnswer:
        body = query.model_dump(mode="json", exclude={"image_bytes"}, exclude_none=True)
        if query.image_bytes is not None:
            body["image_b64"] = base64.b64encode(query.image_bytes).decode("ascii")
        out = self.http.json("POST", "/v1/search", json=body)
        return SearchAnswer.model_validate(out | {"via": f"reco serve ({self.url})"})

    def prepare_classes(self, query: PredictQuery, progress: Any = None) -> ClassSetPrepared:
        body = query.model_dump(mode="json", exclude={"top"}, exclude_none=True)
        out = ClassSetPrepared.model_validate(self.http.json("POST", "/v1/classes/prepare", json=body))
        if progress is not None:
            n = out.classes * (2 if out.refined else 1)
            progress(n, n)
        return out

    def class_coverage(self, labels: list[str]) -> ClassCoverage:
        return ClassCoverage.model_validate(self.http.json("POST", "/v1/classes/coverage", json={"labels": labels}))

    def memory_map(self, query: MapQuery, image_bytes: bytes | None = None) -> MemoryMap:
        body = query.model_dump(mode="json")
        if image_bytes is not None:
            body["image_b64"] = base64.b64encode(image_bytes).decode("ascii")
        try:
            return MemoryMap.model_validate(self.http.json("POST", "/v1/map", json=body))
        except ServerError as exc:
            if exc.status == 404:
                raise LookupError(exc.message) from exc
            raise

    def list_items(self, *, filters: dict[str, Any] | None = None, offset: int = 0, limit: int = 50,
                   caption_contains: str | None = None) -> ItemsPage:
        params: dict[str, Any] = dict(filters or {}) | {"offset": offset, "limit": limit}
        if caption_contains:
            params["q"] = caption_contains
        return ItemsPage.model_validate(self.http.json("GET", "/v1/items", params=params))

    def get_item(self, item_id: str) -> ItemDetail:
        try:
            return ItemDetail.model_validate(self.http.json("GET", f"/v1/items/{item_id}"))
        except ServerError as exc:
            if exc.status == 404:
                raise LookupError(exc.message) from exc
            raise

    def item_image(self, item_id: str) -> tuple[bytes, str]:
        response = self.http.request("GET", f"/v1/items/{item_id}/image")
        return response.content, response.headers.get("content-type", "application/octet-stream")

    def neighbours_of_item(self, item_id: str, k: int | None = None) -> list[NeighbourOut]:
        out = self.http.json("GET", f"/v1/items/{item_id}/neighbours", params={"k": k} if k else {})
        return [NeighbourOut.model_validate(n) for n in out["neighbours"]]

    def delete_item(self, item_id: str, reason: str) -> DeleteOut:
        return DeleteOut.model_validate(self.http.json("DELETE", f"/v1/items/{item_id}", params={"reason": reason}))

    def ingest_upload(self, name: str, data: bytes, *, dataset: str | None = None,
                      caption_template: str | None = None) -> JobOut:
        form = {k: v for k, v in (("dataset", dataset), ("caption_template", caption_template)) if v}
        out = self.http.json("POST", "/v1/ingest", data=form,
                             files=[("file", (name, data, "application/octet-stream"))])
        return JobOut.model_validate(out)

    def ingest_path(self, path: Path, *, dataset: str | None = None, caption_template: str | None = None) -> JobOut:
        body = {"path": str(path)} | {k: v for k, v in (("dataset", dataset), ("caption_template", caption_template))
                                      if v}
        return JobOut.model_validate(self.http.json("POST", "/v1/ingest", json=body))

    def cancel_job(self, job_id: int) -> JobOut:
        try:
            return JobOut.model_validate(self.http.json("POST", f"/v1/jobs/{job_id}/cancel"))
        except ServerError as exc:
            if exc.status in (404, 409):
                raise LookupError(exc.message) from exc
            raise

    def get_job(self, job_id: int) -> JobOut:
        return JobOut.model_validate(self.http.json("GET", f"/v1/jobs/{job_id}"))

    def recent_jobs(self, limit: int = 20) -> list[JobOut]:
        return [JobOut.model_validate(j) for j in self.http.json("GET", "/v1/jobs", params={"limit": limit})["jobs"]]

    def status(self) -> dict[str, Any]:
        return dict(self.http.json("GET", "/v1/status"))

    def close(self) -> None:
        self.http.close()
