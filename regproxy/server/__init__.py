"""The process around the proxy: what runs it, not what it answers.

Listeners (plain and ``ssl:``, and the endpoints a ``--workers`` worker inherits), the
supervisor and its workers, signals (SIGTERM as a clean stop, SIGHUP as a reload), the
start-up report, the drain on stop, the upstream health checks and their log, and the
cache's periodic upkeep. Nothing here answers a request: the resources live in
``regproxy.web``, and this package only hands them sockets and a lifetime. It may import
the layers below it (web's types, the upstream client, the cache); none of them imports it.

The supervisor's own path (``supervisor``, ``handoff``, ``signals``, ``cpus``) imports no
HTTP client, cache or resource module: those are for workers only.
"""
