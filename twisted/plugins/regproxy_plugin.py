from twisted.application.service import ServiceMaker

regproxy = ServiceMaker(
    "regproxy",
    "regproxy.tap",
    "A read-only, streaming reverse proxy for container registries.",
    "regproxy",
)
