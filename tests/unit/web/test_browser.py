"""People in a browser are sent to the upstream's own page for the repository."""

from __future__ import annotations

import pytest

from regproxy.config import Route, Upstream
from regproxy.web.browser import upstream_page

HUB = Upstream.from_url("https://registry-1.docker.io")


@pytest.mark.parametrize(
    ("route", "path", "page"),
    [
        # Official images on Docker Hub have pages of their own under /_/.
        (Route(HUB), "/nginx", "https://hub.docker.com/_/nginx"),
        (Route(HUB), "/library/nginx", "https://hub.docker.com/_/nginx"),
        (Route(HUB, prefix="library"), "/nginx", "https://hub.docker.com/_/nginx"),
        (Route(HUB), "/grafana/grafana", "https://hub.docker.com/r/grafana/grafana"),
        (Route(HUB, prefix="grafana"), "/loki", "https://hub.docker.com/r/grafana/loki"),
        (Route(HUB), "/", "https://hub.docker.com/"),
        # Elsewhere: the upstream's own origin, scheme included, prefix included.
        (
            Route(Upstream.from_url("https://gcr.io"), prefix="my-project"),
            "/app",
            "https://gcr.io/my-project/app",
        ),
        (
            Route(Upstream.from_url("http://127.0.0.1:5000"), prefix="proj"),
            "/team/app",
            "http://127.0.0.1:5000/proj/team/app",
        ),
        (Route(Upstream.from_url("http://127.0.0.1:5000")), "/", "http://127.0.0.1:5000"),
    ],
)
def test_upstream_page(route: Route, path: str, page: str) -> None:
    assert upstream_page(route, path) == page
