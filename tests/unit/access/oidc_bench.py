"""The in-memory issuer the OIDC unit tests verify against.

:class:`FakeIssuer` is a twisted Resource serving a :class:`TokenMint`'s discovery
document and JWKS behind ``treq.testing.StubTreq`` (real HTTP parsing, no network);
:class:`Bench` wires an :class:`OIDCVerifier` to it on a ``Clock``. The issuer can be
made unreachable, hold its answers until released, or answer what a test sets.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from treq.testing import StubTreq
from twisted.internet.defer import Deferred, ensureDeferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from regproxy.access.oidc import OIDCRefused, OIDCVerifier
from regproxy.config import OIDCConfig
from tests.support.oidc_issuer import AUDIENCE, DISCOVERY_PATH, TokenMint

ISSUER = "https://issuer.example"
# On another host than the issuer, as Google's and Kubernetes' are: allowed.
JWKS_URI = "https://keys.example/jwks"
CONFIG = OIDCConfig(name="github", issuer=ISSUER, audience=AUDIENCE)
START = 1_000_000.0  # far from time.time(): a verifier reading the wall clock fails


class FakeIssuer(Resource):
    isLeaf = True

    def __init__(self, mint: TokenMint) -> None:
        super().__init__()
        self.mint = mint
        self.requests: Counter[str] = Counter()  # by URL
        self.cache_control: str | None = "max-age=300"
        self.age: str | None = None
        self.discovery: dict[str, Any] | None = None  # instead of the mint's
        self.jwks: Any = None  # instead of the mint's
        self.answer: dict[str, tuple[int, dict[str, str], bytes]] = {}  # by URL
        self.chunked: dict[str, list[bytes]] = {}  # by URL: sent in parts, no length
        self.hold = False
        self.held: list[tuple[Request, bytes]] = []

    def render_GET(self, request: Request) -> Any:
        url = request.URLPath()
        key = f"https://{url.netloc.decode()}{request.path.decode()}"
        self.requests[key] += 1
        if key in self.answer:
            status, headers, body = self.answer[key]
            request.setResponseCode(status)
            for name, value in headers.items():
                request.setHeader(name, value)
            return body
        if key in self.chunked:
            for part in self.chunked[key]:
                request.write(part)
            request.finish()
            return NOT_DONE_YET
        if key == ISSUER + DISCOVERY_PATH:
            document = self.discovery or self.mint.discovery(JWKS_URI)
        elif key == JWKS_URI:
            document = self.mint.jwks() if self.jwks is None else self.jwks
            if self.cache_control is not None:
                request.setHeader("cache-control", self.cache_control)
            if self.age is not None:
                request.setHeader("age", self.age)
        else:
            request.setResponseCode(404)
            return b"{}"
        request.setHeader("content-type", "application/json")
        body = json.dumps(document).encode()
        if not self.hold:
            return body
        self.held.append((request, body))
        return NOT_DONE_YET

    def release(self) -> None:
        held, self.held = self.held, []
        for request, body in held:
            request.write(body)
            request.finish()

    def fetches(self) -> int:
        """Refreshes that reached the issuer (discovery documents served)."""
        return self.requests[ISSUER + DISCOVERY_PATH]


class Http:
    """StubTreq's ``get``, unless the issuer is ``down`` (connections refused)."""

    def __init__(self, issuer: FakeIssuer) -> None:
        self.stub = StubTreq(issuer)
        self.down = False
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        self.calls.append((url, kwargs))
        if self.down:
            return fail(ConnectionRefusedError())
        return self.stub.get(url, **kwargs)  # type: ignore[no-any-return]


def outcome(d: Deferred[Any]) -> Any:
    """What ``d`` has fired with (a result or a Failure); it must have fired."""
    box: list[Any] = []
    d.addBoth(box.append)
    assert box, "the verification is still waiting"
    return box[0]


class Bench:
    def __init__(self, config: OIDCConfig = CONFIG, *, leeway: float | None = None) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.mint = TokenMint(ISSUER)
        self.issuer = FakeIssuer(self.mint)
        self.http = Http(self.issuer)
        skew = {} if leeway is None else {"leeway": leeway}  # None: the verifier's default
        self.verifier = OIDCVerifier(config, reactor=self.clock, http=self.http, **skew)

    def token(self, **kwargs: Any) -> str:
        return self.mint.mint(now=self.clock.seconds(), **kwargs)

    def start(self, token: str) -> Deferred[str]:
        d = ensureDeferred(self.verifier.verify(token))
        self.flush()
        return d

    def flush(self) -> None:
        self.http.stub.flush()

    def verify(self, token: str) -> str:
        result = outcome(self.start(token))
        if isinstance(result, Failure):
            result.raiseException()
        assert isinstance(result, str)
        return result

    def refused(self, token: str) -> str:
        """The reason ``token`` is refused for (it must be)."""
        result = outcome(self.start(token))
        assert isinstance(result, Failure), f"accepted: {result!r}"
        assert isinstance(result.value, OIDCRefused), result.getTraceback()
        return result.value.reason

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
