"""Talking to upstream registries: HTTP client wiring, credentials and tokens."""
