"""The pull-through cache: content-addressed objects on disk, coalesced verified downloads,
and zero-copy serving. Self-contained: it knows nothing of routes, resources or the upstream
client; the fetcher that wires it into the request path does."""
