"""ApiError: a refused API request (HTTP status, message, the body field at fault), in OpenAI's error shape."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """A refused request: HTTP status, message, and the body field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The error object as the OpenAI API returns it."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
