"""Workload-identity tokens verified against a real HTTPS issuer on loopback.

The issuer (tests/support/oidc_issuer.py) serves its discovery document and JWKS over TLS
with the test CA; the verifiers are built as the proxy builds them (``oidc_verifiers``:
regproxy's upstream TLS client trusting the provider's ``ca``). Time for the rate limits
is the reactor's, shifted by the tests where a minute must pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import TestCase

from regproxy.access._issuer import MIN_CACHE
from regproxy.access.oidc import OIDCRefused, OIDCVerifier, oidc_verifiers
from regproxy.config import OIDCConfig
from regproxy.upstream.treq_client import make_client, make_pool
from tests.support.oidc_issuer import AUDIENCE, BAD_KINDS, SUBJECT, OIDCIssuer
from tests.support.tls import make_ca_and_cert

REASONS = {
    "expired": "expired (exp)",
    "wrong_audience": "wrong audience (aud)",
    "wrong_issuer": "wrong issuer (iss)",
    "unknown_kid": "no key 'never-published' at the issuer",
    "alg_none": "algorithm 'none' not accepted",
    "hs256_public_pem": "algorithm 'HS256' not accepted",
    "future_nbf": "not valid yet (nbf)",
}


class ShiftedClock:
    """The reactor's time, moved forward by ``shift``: a minute passes without waiting."""

    def __init__(self) -> None:
        self.shift = 0.0

    def seconds(self) -> float:
        return float(reactor.seconds()) + self.shift  # type: ignore[attr-defined]

    def callLater(self, delay: float, f: Any, *args: Any, **kwargs: Any) -> Any:
        return reactor.callLater(delay, f, *args, **kwargs)  # type: ignore[attr-defined]

    def getDelayedCalls(self) -> Any:
        return reactor.getDelayedCalls()  # type: ignore[attr-defined]


class VerifyingAgainstARealIssuer(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.tls = make_ca_and_cert(Path(self.mktemp()))
        self.issuer = self.serve()
        self.pool = make_pool(reactor)
        self.addCleanup(self.pool.closeCachedConnections)

    def serve(self, **kwargs: Any) -> OIDCIssuer:
        issuer = OIDCIssuer(self.tls, **kwargs).start()
        self.addCleanup(issuer.stop)
        return issuer

    def config(self, issuer: OIDCIssuer | None = None, *, ca: bool = True) -> OIDCConfig:
        issuer = issuer or self.issuer
        return OIDCConfig("ci", issuer.issuer, AUDIENCE, ca=str(self.tls.ca_cert) if ca else None)

    def shifted(self, issuer: OIDCIssuer | None = None) -> tuple[OIDCVerifier, ShiftedClock]:
        """A verifier as ``oidc_verifiers`` makes it, on a clock the test moves."""
        config = self.config(issuer)
        clock = ShiftedClock()
        http = make_client(reactor, pool=self.pool, ca_file=config.ca)
        return OIDCVerifier(config, reactor=clock, http=http), clock  # type: ignore[arg-type]

    async def refusal(self, verifier: OIDCVerifier, token: str) -> str:
        try:
            accepted = await verifier.verify(token)
        except OIDCRefused as refused:
            return refused.reason
        raise AssertionError(f"accepted: {accepted}")

    def test_valid_tokens_verify_and_the_keys_are_fetched_once(self) -> Any:
        async def run() -> None:
            verifier = oidc_verifiers([self.config()], reactor, pool=self.pool)["ci"]
            for alg in ("RS256", "ES256", "RS256"):
                self.assertEqual(await verifier.verify(self.issuer.mint.mint(alg=alg)), SUBJECT)
            self.assertEqual((self.issuer.discovery_count, self.issuer.jwks_count), (1, 1))

        return ensureDeferred(run())

    def test_an_issuer_under_a_path_is_found_there(self) -> Any:
        async def run() -> None:
            issuer = self.serve(path="/tenant/7")
            verifier = oidc_verifiers([self.config(issuer)], reactor, pool=self.pool)["ci"]
            self.assertEqual(await verifier.verify(issuer.mint.mint()), SUBJECT)
            self.assertEqual(issuer.discovery_count, 1)

        return ensureDeferred(run())

    def test_bad_tokens_are_refused(self) -> Any:
        async def run() -> None:
            verifier = oidc_verifiers([self.config()], reactor, pool=self.pool)["ci"]
            await verifier.verify(self.issuer.mint.mint())
            for kind in BAD_KINDS:
                reason = await self.refusal(verifier, self.issuer.mint.bad(kind))
                self.assertEqual(reason, REASONS[kind], kind)

        return ensureDeferred(run())

    def test_a_rotated_key_works_after_the_rotation(self) -> Any:
        async def run() -> None:
            verifier, clock = self.shifted()
            mint = self.issuer.mint
            old = mint.key("RS256")
            old_token = mint.mint(key=old, lifetime=3600)
            self.assertEqual(await verifier.verify(old_token), SUBJECT)
            new = mint.add_key("RS256")
            mint.retire_key(old.kid)
            # Within the minute the new key is not asked for; after it, it is.
            reason = await self.refusal(verifier, mint.mint(key=new))
            self.assertEqual(reason, f"no key '{new.kid}' at the issuer")
            self.assertEqual(self.issuer.jwks_count, 1)
            clock.shift = MIN_CACHE
            self.assertEqual(await verifier.verify(mint.mint(key=new)), SUBJECT)
            self.assertEqual(self.issuer.jwks_count, 2)
            reason = await self.refusal(verifier, old_token)
            self.assertEqual(reason, f"no key '{old.kid}' at the issuer")

        return ensureDeferred(run())

    def test_the_issuer_is_not_trusted_without_its_ca(self) -> Any:
        async def run() -> None:
            config = self.config(ca=False)
            verifier = oidc_verifiers([config], reactor, pool=self.pool)["ci"]
            reason = await self.refusal(verifier, self.issuer.mint.mint())
            self.assertEqual(
                reason,
                "no keys from the issuer: the discovery document could not be fetched "
                "(ResponseNeverReceived: SSLCertVerificationError)",
            )
            self.assertEqual(self.issuer.discovery_count, 0)

        return ensureDeferred(run())

    def test_an_issuer_gone_away_leaves_the_keys_held_in_use(self) -> Any:
        async def run() -> None:
            verifier, clock = self.shifted()
            token = self.issuer.mint.mint(lifetime=3600)
            self.assertEqual(await verifier.verify(token), SUBJECT)
            self.issuer.stop()
            clock.shift = 300  # the JWKS's max-age: a refresh is due, and fails
            self.assertEqual(await verifier.verify(token), SUBJECT)
            fresh, _ = self.shifted()
            reason = await self.refusal(fresh, token)
            self.assertTrue(reason.startswith("no keys from the issuer: "), reason)

        return ensureDeferred(run())
