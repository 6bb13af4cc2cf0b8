"""Errors of the BFL-shaped routes (and of /v1/files), in the shape BFL's API answers with (a FastAPI app):
- 422: `{"detail": [{"loc": ["body", "<field>"], "msg": "<why>", "type": "<kind>"}]}`, one entry per field at fault;
- every other status: `{"detail": "<message>"}`; 429 and 503 carry Retry-After.
Chosen over our /inference shape so that BFL clients, which read `detail`, show our messages as they show BFL's."""
from __future__ import annotations

from fastapi.responses import JSONResponse

from kontext_server import engine as eng

PATHS = ("/v1/flux-kontext-dev", "/v1/get_result")
PREFIXES = ("/v1/jobs/", "/v1/files/")


def is_bfl_path(path: str) -> bool:
    return path in PATHS or path.startswith(PREFIXES)


def error_body(message: str) -> dict:
    return {"detail": message}


def error_response(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message), status_code=status, headers=headers)


def field_errors(errors: list[dict], status: int = 422) -> JSONResponse:
    """clean_errors()' entries (field, message, type) as FastAPI's / BFL's 422 detail list."""
    detail = [{"loc": _loc(e["field"]), "msg": e["message"].removeprefix("Value error, "), "type": e["type"]}
              for e in errors]
    return JSONResponse({"detail": detail}, status_code=status)


def _loc(field: str) -> list[str]:
    parts = field.split(".")
    if parts[0] in ("query", "path", "header", "body"):
        return parts
    return ["body", *parts]


def field_error(field: str, message: str, kind: str = "value_error", status: int = 422) -> JSONResponse:
    if status == 422:
        return field_errors([{"field": field, "message": message, "type": kind}])
    return error_response(status, f"{field}: {message}")


def engine_error_response(exc: eng.EngineError, retry_after: int) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if exc.status in (429, 503) else None
    return error_response(exc.status, str(exc), headers)


def not_ready_response(state: str) -> JSONResponse:
    return error_response(503, f"model is {state}", headers={"Retry-After": "5"})
