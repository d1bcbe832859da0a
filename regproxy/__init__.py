"""regproxy: serve a container registry from your own domain, read-only and streaming."""

__version__ = "0.1.0"
