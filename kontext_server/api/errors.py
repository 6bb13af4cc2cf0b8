"""Error bodies of the /inference family of routes: {"error": code, "message": text, "detail": [...]}.

Every error a route returns goes through here, so the shape is the same everywhere: validation errors name the
field; 429 and 503 carry Retry-After. Errors raised outside a route (middleware, FastAPI's own 404 / 405 / 422) take
the shape of the route family their path belongs to (`error_body_for`): OpenAI's under /v1, this one elsewhere."""
from __future__ import annotations

from fastapi.responses import JSONResponse

from kontext_server import engine as eng
from kontext_server.request import suggest_field
from kontext_server.api.bfl import errors as bfl_errors
from kontext_server.api.openai import errors as openai_errors


def error_response(status: int, code: str, message: str, detail=None, headers=None) -> JSONResponse:
    body = {"error": code, "message": message}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


def error_body_for(path: str, status: int, code: str, message: str) -> dict:
    """The body of an error answered for `path` outside its route, in that route family's shape."""
    if bfl_errors.is_bfl_path(path):
        return bfl_errors.error_body(message)
    if openai_errors.is_openai_path(path):
        return openai_errors.error_body(status, message, code=code)
    return {"error": code, "message": message}


def field_error(status: int, code: str, field: str, message: str, kind: str = "value_error") -> JSONResponse:
    """One field's error: the message names the field, the detail lists it."""
    return error_response(status, code, f"{field}: {message}", [{"field": field, "message": message, "type": kind}])


def clean_errors(errors, content_type: str | None = None) -> list[dict]:
    """pydantic errors without the raw input (it may be huge, binary or unserialisable), with what to do where the
    cause is a common one: a body that is not JSON, a field named as another API names it."""
    out = []
    for e in errors:
        kind = str(e.get("type", "value_error"))
        msg = str(e.get("msg", "invalid"))
        loc = [str(p) for p in e.get("loc", ()) if p != "body"]
        if kind == "json_invalid":  # its location is a character offset, not a field
            msg, loc = f"{msg} at character {loc[-1] if loc else '?'}", []
        elif kind == "model_attributes_type" and not loc and "json" not in (content_type or ""):
            msg = (f"the body must be a JSON object sent with Content-Type: application/json "
                   f"(this request's Content-Type: {content_type or 'none'})")
        elif kind == "extra_forbidden" and loc:
            hint = suggest_field(loc[-1])
            if hint:
                msg += f"; did you mean `{hint}`?"
        out.append({"field": ".".join(loc) or "body", "message": msg, "type": kind})
    return out


def engine_error_response(exc: eng.EngineError, engine: eng.Engine) -> JSONResponse:
    headers = None
    if exc.status in (429, 503):
        headers = {"Retry-After": str(engine.retry_after_seconds())}
    field = getattr(exc, "field", None)
    if field:  # an input the job found unusable: the same shape as a validation error
        return field_error(exc.status, exc.code, field, str(exc), getattr(exc, "kind", "value_error"))
    return error_response(exc.status, exc.code, str(exc), headers=headers)


def not_ready_response(state: str) -> JSONResponse:
    return error_response(503, "not_ready", f"model is {state}", headers={"Retry-After": "5"})
