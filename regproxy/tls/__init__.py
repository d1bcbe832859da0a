"""TLS over Twisted connections with the standard library's ``ssl`` module.

One layer (``layer.TLSLayer``) for both directions: the upstream connections
(``regproxy.upstream._tls``) and the ``ssl:`` listeners (``regproxy.server.listen_tls``).
It sits below both packages and imports nothing of regproxy.
"""
