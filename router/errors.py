"""The router's few error types and the one handler that shapes them like OpenAI's.

The `openai` SDK picks its typed exception from the status code and reads
`{"error": {message, type, param, code}}`, so every failure -- ours, vLLM's,
Starlette's unknown path -- leaves through `error_response`, which also replaces any
server path in the message (`app.state.public`).
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """A request the router answers with an error; `code` is for machines, `message` for people."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}


class Unavailable(APIError):
    """vLLM is down or restarting: the client should retry after a moment."""

    def __init__(self, message: str, retry_after_s: int = 2):
        super().__init__(503, message, "upstream_unavailable", headers={"Retry-After": str(retry_after_s)})


def error_response(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, APIError):
        status, message, code, param, headers = exc.status, exc.message, exc.code, exc.param, exc.headers
    elif isinstance(exc, HTTPException):
        status, message, code, param, headers = exc.status_code, str(exc.detail), "http_error", None, {}
    else:
        status, message, code, param, headers = 500, f"internal error: {exc!r}", "internal_error", None, {}
    message = request.app.state.public.scrub(message)
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "api_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)
