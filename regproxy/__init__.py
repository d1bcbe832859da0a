"""regproxy: serve a container registry from your own domain, read-only and streaming."""

__version__ = "0.1.0"

import os as _os

# systemd's socket hand-over as this process received it: Twisted takes these variables out
# of the environment when twisted.internet.endpoints is first imported, and regproxy wants
# to say precisely what a supervisor did not hand over (see regproxy.server.listen).
SYSTEMD_HANDOVER = {
    name: value
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
    if (value := _os.environ.get(name)) is not None
}
