"""The resource tree: registry API, token proxy, health, metrics and browser redirects."""
