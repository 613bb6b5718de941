"""The OpenAPI document as the service really answers (checked by Schemathesis in the tests).

FastAPI documents the success answer of each route and a 422 whose ``detail`` is a list; the
service answers every client error as :class:`~segassist.server.schemas.ErrorPublic` (``detail`` a string,
:mod:`segassist.server.errors`). :func:`install_openapi` rewrites the generated document once: each
operation declares the 4xx it can answer with that body, and the bearer security only where a
route declares a role (:mod:`segassist.server.auth`), as optional while the service may run open
(development without an API token: no token is needed until the first user exists).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI

from segassist.server.schemas import ErrorPublic
from segassist.server.settings import Settings

__all__ = ["install_openapi"]

_ERROR_REF = {"$ref": "#/components/schemas/ErrorPublic"}
_METHODS = ("get", "put", "post", "delete", "patch")
_PATH_PARAMETER = re.compile(r"\{(\w+)\}")
_REASONS = {
    "400": "the body is not well-formed (e.g. JSON that does not parse)",
    "401": "no token, or an unknown or revoked one",
    "403": "the caller's role is too weak",
    "404": "a resource named in the request does not exist",
    "409": "the request conflicts with the current state",
    "413": "the upload exceeds SEGASSIST_MAX_UPLOAD_BYTES",
    "422": "the request is invalid (the message names the problem)",
    "503": "a server the service relies on (task broker, DICOMweb server) cannot be reached",
}


def _error(code: str) -> dict[str, Any]:
    return {
        "description": _REASONS[code],
        "content": {"application/json": {"schema": _ERROR_REF}},
    }


def _declare_errors(path: str, operation: dict[str, Any], open_service: bool) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    codes = ["404", "409", "422", "503"]
    if path.endswith("/auth/token"):  # the login: a wrong user name or password
        codes.append("401")
    if operation.get("security"):
        codes += ["401", "403"]
        if open_service:
            operation["security"] = [*operation["security"], {}]
    content = operation.get("requestBody", {}).get("content", {})
    if "multipart/form-data" in content:
        codes.append("413")
    if content:
        codes.append("400")
    for code in codes:
        responses[code] = _error(code)


def _declare_path_parameters(path: str, operation: dict[str, Any]) -> None:
    """Declare the path's parameters a route does not read (``/monailabel/{dataset_id}/auth/``:
    the login is the same for every dataset)."""
    parameters: list[dict[str, Any]] = operation.setdefault("parameters", [])
    declared = {p["name"] for p in parameters if p.get("in") == "path"}
    for name in _PATH_PARAMETER.findall(path):
        if name not in declared:
            parameters.append(
                {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            )


def document(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """``schema`` (FastAPI's document) with the errors and security the service really has."""
    open_service = settings.environment != "production" and not settings.api_token
    for path, item in schema.get("paths", {}).items():
        for method in _METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            _declare_path_parameters(path, operation)
            if not path.endswith("/health"):
                _declare_errors(path, operation, open_service)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorPublic"] = ErrorPublic.model_json_schema()
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve :func:`document` of ``app``'s generated schema (built once, on first request)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(generate(), settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
