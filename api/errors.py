"""Every error the API gives: a JSON body ``{"error": {"code", "message"}}`` and a 4xx/5xx status."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.imaging import ImageRejected
from app.manifest import ManifestError
from app.memory.base import MemoryStoreError, UnknownFilterField
from app.services.method_common import MethodError


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def respond(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status)


def _validation_message(errors: list[Any]) -> str:
    parts = []
    for e in errors[:5]:
        where = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path"))
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> JSONResponse:
        return respond(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return respond(400, "invalid_request", _validation_message(list(exc.errors())))

    @app.exception_handler(ValidationError)
    async def _invalid_model(_: Request, exc: ValidationError) -> JSONResponse:
        return respond(400, "invalid_request", _validation_message(list(exc.errors())))

    @app.exception_handler(UnknownFilterField)
    async def _filter(_: Request, exc: UnknownFilterField) -> JSONResponse:
        return respond(400, "unknown_filter_field", str(exc))

    @app.exception_handler(ImageRejected)
    async def _image(_: Request, exc: ImageRejected) -> JSONResponse:
        return respond(413 if exc.reason == "too_large" else 400, str(exc.reason), exc.detail)

    @app.exception_handler(ManifestError)
    async def _manifest(_: Request, exc: ManifestError) -> JSONResponse:
        return respond(400, "bad_manifest", str(exc))

    @app.exception_handler(LookupError)
    async def _missing(_: Request, exc: LookupError) -> JSONResponse:
        return respond(404, "not_found", str(exc).strip("'\""))

    @app.exception_handler(MethodError)
    async def _method(_: Request, exc: MethodError) -> JSONResponse:
        return respond(409, "not_possible", str(exc))

    @app.exception_handler(MemoryStoreError)
    async def _store(_: Request, exc: MemoryStoreError) -> JSONResponse:
        return respond(503, "memory_unavailable", str(exc))

    @app.exception_handler(ValueError)
    async def _value(_: Request, exc: ValueError) -> JSONResponse:
        return respond(400, "invalid_request", str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}
        return respond(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))
