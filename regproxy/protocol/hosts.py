"""Which registry hosts a credential belongs to."""

from __future__ import annotations

GOOGLE_REGISTRY_SUFFIXES = (".gcr.io", ".pkg.dev")


def is_google_registry(host: str) -> bool:
    """gcr.io, its regional mirrors (eu.gcr.io, ...) and Artifact Registry (*-docker.pkg.dev).

    Google credentials (an ambient GOOGLE_APPLICATION_CREDENTIALS) are meant for these only;
    anywhere else they would hand Google access tokens to a stranger.
    """
    host = host.lower().rstrip(".")
    return host == "gcr.io" or host.endswith(GOOGLE_REGISTRY_SUFFIXES)
