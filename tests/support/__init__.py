"""Real-process helpers for the integration tests: registry, token issuer, TLS, images, proxy."""
