"""The ``--workers`` supervisor's runtime directory: one per supervisor, shared by its
workers, removed when it exits.

The workers keep there what they share as files: prometheus-client's multiprocess metrics
(``metrics/``), and whatever else needs one place for every worker (a rate limiter's
counters). It must be writable, and a read-only root (``podman run --read-only``, a
Kubernetes ``readOnlyRootFilesystem``) leaves few places that are: the candidates are
tried in the order of ``candidates``, and when none takes a directory the start-up fails
in one line that says what to mount.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence

import attrs

from .startup import StartupError

# Memory-backed where it exists (the metrics are memory-mapped files, rewritten on every
# request); /tmp and /var/tmp after it, as tempfile would try them.
FIXED_CANDIDATES = ("/dev/shm", "/tmp", "/var/tmp")
PREFIX = "regproxy-"
METRICS = "metrics"


def candidates(
    environ: Mapping[str, str], fixed: Sequence[str] = FIXED_CANDIDATES
) -> tuple[str, ...]:
    """Where to make the runtime directory, in order: what the service manager made for
    this service (systemd's ``RuntimeDirectory=`` sets ``$RUNTIME_DIRECTORY``, a
    colon-separated list when several), the user's runtime directory
    (``$XDG_RUNTIME_DIR``), an explicit ``$TMPDIR``, then ``fixed``. Each once."""
    named = [
        *environ.get("RUNTIME_DIRECTORY", "").split(":")[:1],
        environ.get("XDG_RUNTIME_DIR", ""),
        environ.get("TMPDIR", ""),
    ]
    ordered: list[str] = []
    for path in (*named, *fixed):
        if path and os.path.isabs(path) and path not in ordered:
            ordered.append(path)
    return tuple(ordered)


def unwritable_message(tried: Sequence[str], workers: int) -> str:
    return (
        f"--workers {workers}: the workers need a writable directory to share, and none of "
        f"{', '.join(tried)} is writable (a read-only root?): mount a tmpfs at /tmp "
        "(podman or docker run --tmpfs /tmp, an emptyDir volume in Kubernetes) or point "
        "RUNTIME_DIRECTORY at a writable directory"
    )


@attrs.frozen
class RuntimeDirectory:
    """A private directory (mode 0700) made in the first candidate that allows it, with
    the workers' metrics directory in it."""

    path: str

    @classmethod
    def make(
        cls,
        environ: Mapping[str, str],
        *,
        workers: int,
        fixed: Sequence[str] = FIXED_CANDIDATES,
    ) -> RuntimeDirectory:
        tried = candidates(environ, fixed)
        for parent in tried:
            try:
                path = tempfile.mkdtemp(prefix=PREFIX, dir=parent)
            except OSError:
                continue  # missing, read-only, not ours: the next one
            made = cls(path)
            os.mkdir(made.metrics, mode=0o700)
            return made
        raise StartupError(unwritable_message(tried, workers))

    @property
    def metrics(self) -> str:
        """prometheus-client's multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``)."""
        return os.path.join(self.path, METRICS)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
