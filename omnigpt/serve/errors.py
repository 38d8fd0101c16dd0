"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, with OpenAI's status codes.

FastAPI's own answers are re-shaped here: a validation failure is a 400 (not 422), an unknown path a 404,
and an unexpected exception a 500 whose body says nothing about the server's insides.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        headers = {**({"WWW-Authenticate": "Bearer"} if self.status == 401 else {}), **(headers or {})}
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


def _param(loc: tuple) -> str | None:
    """pydantic's location ("body", "messages", 0, "role") -> OpenAI's param ("messages[0].role")."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not any(c in str(part) for c in "[]()"):  # skip pydantic's union tags like "list[str]"
            out += ("." if out else "") + str(part)
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": ()}
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                        code="invalid_json")
    param = _param(tuple(first.get("loc", ())))
    if first.get("type") == "missing":
        return APIError(400, f"missing required parameter: {param!r}", param=param, code="missing_required_parameter")
    value = first.get("input")
    shown = json.dumps(value)[:100] if _jsonable(value) else repr(value)[:100]
    where = f"{param}: " if param else ""
    return APIError(400, f"invalid value for {where}{first['msg']} (got {shown})", param=param, code="invalid_value")


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        messages = {404: f"no such endpoint: {request.method} {request.url.path}",
                    405: f"method {request.method} is not allowed on {request.url.path}"}
        message = messages.get(exc.status_code, str(exc.detail))
        return APIError(exc.status_code, message).response(headers=getattr(exc, "headers", None))  # e.g. 405's Allow

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "internal server error").response()
