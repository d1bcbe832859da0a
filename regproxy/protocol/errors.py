"""OCI error bodies and the HTTP statuses that go with them.

Every answer the proxy makes up itself goes through here, so clients always get the
``{"errors": [{"code", "message", "detail"}]}`` shape the distribution spec defines.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

# The spec's codes with their usual statuses, plus the few the proxy needs for itself.
STATUS_BY_CODE: dict[str, int] = {
    "BLOB_UNKNOWN": 404,
    "DIGEST_INVALID": 400,
    "MANIFEST_INVALID": 400,
    "MANIFEST_UNKNOWN": 404,
    "NAME_INVALID": 400,
    "NAME_UNKNOWN": 404,
    "TAG_INVALID": 400,
    "UNAUTHORIZED": 401,
    "DENIED": 403,
    "UNSUPPORTED": 405,
    "TOOMANYREQUESTS": 429,
    "RANGE_INVALID": 416,
    "PAGINATION_NUMBER_INVALID": 400,
    "NOT_FOUND": 404,
    "REQUEST_INVALID": 400,
    "UPSTREAM_UNAVAILABLE": 502,
    "UPSTREAM_TIMEOUT": 504,
    "UNAVAILABLE": 503,
}


@attrs.frozen
class OCIError(Exception):
    """An error answered to the client in the OCI error format."""

    code: str
    message: str
    detail: Any = None
    status: int = attrs.field()
    # Headers that belong to the error (a 416's Content-Range).
    headers: tuple[tuple[bytes, bytes], ...] = ()

    @status.default
    def _status_from_code(self) -> int:
        return STATUS_BY_CODE.get(self.code, 400)

    def body(self) -> bytes:
        return error_body(self.code, self.message, self.detail)


def error_body(code: str, message: str, detail: Any = None) -> bytes:
    entry: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        entry["detail"] = detail
    return json.dumps({"errors": [entry]}).encode("utf-8")
