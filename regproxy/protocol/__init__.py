"""Pure registry rules: names, references, scopes, challenges, OCI errors, header and body
rewriting, and the fetch interface (what a request for registry content is, what an answer
is).

Nothing here talks to the network, starts a reactor or knows of the cache, the web layer or
the upstream client: importing any of these modules loads no treq, no httptools and no
reactor (``tests/integration/test_protocol_purity.py`` checks it).
"""
