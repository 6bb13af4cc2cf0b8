"""Errors of the /v1 routes in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with OpenAI's statuses,
so the official SDKs raise their typed exceptions (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError,
429 RateLimitError, 5xx InternalServerError).

`type` follows the status: invalid_request_error (4xx), rate_limit_error (429), server_error (5xx). `param` names
the request field at fault (validation errors are 400 here, not 422). 429 and 503 carry Retry-After."""
from __future__ import annotations

from fastapi.responses import JSONResponse

from kontext_server import engine as eng

PREFIX = "/v1"


def is_openai_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def invalid(param: str | None, message: str, code: str = "invalid_value", status: int = 400) -> JSONResponse:
    """A bad request field: the message names it, `param` is its name."""
    text = f"{param}: {message}" if param else message
    return error_response(status, text, param=param, code=code)


def validation_response(errors: list[dict]) -> JSONResponse:
    """pydantic's errors (kontext_server.api.errors.clean_errors' form) as one 400 naming the first field."""
    first = errors[0] if errors else {"field": None, "message": "invalid request", "type": "value_error"}
    param = None if first["field"] in (None, "body") else first["field"]
    message = "; ".join(f"{e['field']}: {e['message'].removeprefix('Value error, ')}" for e in errors)
    message = message or "invalid request"
    code = "unknown_parameter" if first.get("type") == "extra_forbidden" else "invalid_value"
    return error_response(400, message, param=param, code=code)


def engine_error_response(exc: eng.EngineError, engine: eng.Engine) -> JSONResponse:
    headers = {"Retry-After": str(engine.retry_after_seconds())} if exc.status in (429, 503) else None
    return error_response(exc.status, str(exc), code=exc.code, headers=headers)


def moderation_blocked(verdict) -> JSONResponse:
    """400 moderation_blocked, as OpenAI answers a request its safety system rejects (`param`: prompt when the input
    was blocked, none when the generated image was)."""
    from kontext_server.api.moderation import blocked_message
    from kontext_server.safety import INPUT

    return error_response(400, blocked_message(verdict), param="prompt" if verdict.stage == INPUT else None,
                          code="moderation_blocked")


def safety_failed(exc) -> JSONResponse:
    return error_response(500, str(exc), code="safety_check_failed")


def not_ready_response(state: str) -> JSONResponse:
    return error_response(503, f"model is {state}", code="not_ready", headers={"Retry-After": "5"})
