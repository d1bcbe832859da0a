"""An in-memory upstream that sends part of a body, then stalls or hangs up."""

from __future__ import annotations

from twisted.web.resource import Resource
from twisted.web.server import Request


class Stalling(Resource):
    """An upstream that sends part of a body and then stalls or hangs up."""

    isLeaf = True

    def __init__(self, *, hang_up: bool, status: int = 200) -> None:
        super().__init__()
        self.hang_up = hang_up
        self.status = status
        self.requests: list[Request] = []
        self.gone: list[bool] = []

    def render(self, request: Request) -> object:
        from twisted.web.server import NOT_DONE_YET

        self.requests.append(request)
        request.notifyFinish().addBoth(lambda result: self.gone.append(result is not None))
        request.setResponseCode(self.status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"100")
        request.write(b"x" * 40)
        if self.hang_up:
            request.loseConnection()
        return NOT_DONE_YET
