"""Talking to upstream registries: the one :class:`~regproxy.upstream.client.UpstreamClient`
(treq as the API, over regproxy's own agent and llhttp connections), credentials and tokens,
realms, redirects, and the upstream as a fetcher (``fetcher.UpstreamFetcher``) with its
streamed body (``body``). Imports only :mod:`regproxy.protocol`, :mod:`regproxy.tls` and
the configuration below it."""
