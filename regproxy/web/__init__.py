"""The resource tree and the one place that writes answers to clients (``answer``): the
registry API, the token proxy, health, metrics and browser redirects; the Site and Request
with the per-request record (``record``) and the access log and metrics (``observe``)."""
