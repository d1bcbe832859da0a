"""A real S3 implementation for tests: Ceph's RADOS Gateway on loopback.

A single-node cluster of its own (Debian ``ceph-mon ceph-osd radosgw``): one monitor, one
OSD with ``osd objectstore = memstore`` (data in RAM), pools of size 1, authentication off,
no manager. Two facts that cost time to find, kept here:

- with authentication off, ``ms mon client mode = crc`` and ``ms client mode = crc`` are
  needed: radosgw's built-in defaults (``secure`` + cephx) hang it on its monitor connection;
- without a manager some ``ceph`` commands (``ceph -s``, ``ceph config show``) hang: only
  ``mon stat``, ``osd new`` and ``osd dump`` are used, each with a connect timeout.

Ceph 16.2's RGW: ``If-None-Match: *`` on PUT works; ``CompleteMultipartUpload`` answers an
empty ETag (HEAD gives it); ``If-Match`` on PUT accepts only an unquoted ETag.

Every daemon is started in its own session and stopped by its PID (TERM, then KILL), also
when the start fails half-way. ``RGWServer`` is a context manager; ``new_bucket`` gives each
test a bucket of its own so one cluster can serve a whole session.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType

from .ports import free_port
from .tools import find_program
from .waiting import eventually

PROGRAMS = (
    "ceph-mon (Debian package ceph-mon)",
    "ceph-osd (Debian package ceph-osd)",
    "radosgw (Debian package radosgw)",
    "radosgw-admin (Debian package ceph-common)",
    "monmaptool (Debian package ceph-base)",
    "ceph-authtool (Debian package ceph-common)",
    "ceph (Debian package ceph-common)",
)
DEBIAN_PACKAGES = ("ceph-mon", "ceph-osd", "radosgw")
"""What ``apt-get install --no-install-recommends`` needs (ceph-common, ceph-base follow)."""


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if find_program(p.split(" ")[0]) is None]


_CONF = """\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
ms mon client mode = crc
ms client mode = crc
keyring = {dir}/keyring
run dir = {dir}/run
admin socket = {dir}/run/$cluster-$name.asok
pid file = {dir}/run/$cluster-$name.pid
log file = {dir}/log/$cluster-$name.log
mon cluster log file = {dir}/log/$cluster.log
crash dir = {dir}/crash
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon max pg per osd = 1000
mon data avail warn = 1
mon data avail crit = 0
mon warn on insecure global id reclaim allowed = false
osd objectstore = memstore
memstore device bytes = {memstore_bytes}

[mon]
mon data = {dir}/mon/$cluster-$id

[osd]
osd data = {dir}/osd/$cluster-$id
osd max object name len = 460
osd max object namespace len = 64

[client.rgw.test]
rgw data = {dir}/rgw
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw thread pool size = 64
rgw dns name = localhost
rgw gc obj min wait = 60
rgw gc processor period = 60
log file = {dir}/log/rgw.log
"""


class RGWServer:
    """A one-node Ceph cluster with RGW in a temporary directory; a context manager.

    ``endpoint``, ``access_key``, ``secret_key``; ``env()`` gives the AWS variables a client
    (regproxy) takes them from; ``new_bucket()`` creates an empty bucket."""

    def __init__(
        self,
        directory: Path | str | None = None,
        *,
        memstore_bytes: int = 4 * 1024**3,
        start_timeout: float = 90.0,
    ) -> None:
        self._own_dir = directory is None
        # Short: admin socket paths must fit in a sockaddr_un (108 bytes).
        self.directory = Path(directory or tempfile.mkdtemp(prefix="rgw-"))
        self.memstore_bytes = memstore_bytes
        self.start_timeout = start_timeout
        self.mon_port = free_port()
        self.rgw_port = free_port()
        self.access_key = "AK" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(24)
        self.conf = self.directory / "ceph.conf"
        self._pids: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.started_in: float | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.rgw_port}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> RGWServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> RGWServer:
        began = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.started_in = time.monotonic() - began
        return self

    def _ceph(self, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ceph", "-c", str(self.conf), "--connect-timeout", "5", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self._env,
            check=False,
        )

    def _run(self, *args: str) -> str:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=60, env=self._env, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
        return done.stdout

    def _spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        with open(self.directory / "log" / f"{name}.out", "ab") as out:
            process = subprocess.Popen(
                [*args, "-f"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env,
                start_new_session=True,
            )
        self._pids.append((name, process))
        return process

    def _alive(self, process: subprocess.Popen[bytes], name: str) -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited ({process.returncode}); see {self.directory}/log")
        return True

    def _start(self) -> None:
        d = self.directory
        for sub in ("run", "log", "mon/ceph-a", "osd/ceph-0", "rgw", "crash"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        self.conf.write_text(
            _CONF.format(
                fsid=fsid,
                mon_port=self.mon_port,
                rgw_port=self.rgw_port,
                dir=d,
                memstore_bytes=self.memstore_bytes,
            )
        )
        self._env = {**os.environ, "CEPH_CONF": str(self.conf)}
        keyring = str(d / "keyring")
        self._run("ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.")
        self._run("ceph-authtool", keyring, "--gen-key", "-n", "client.admin")
        monmap = str(d / "monmap")
        address = f"[v2:127.0.0.1:{self.mon_port}]"
        self._run("monmaptool", "--create", "--fsid", fsid, "--addv", "a", address, monmap)
        conf = str(self.conf)
        self._run("ceph-mon", "-c", conf, "--mkfs", "-i", "a", "--monmap", monmap)
        mon = self._spawn("mon", "ceph-mon", "-c", conf, "-i", "a")
        deadline = self.start_timeout
        eventually(
            lambda: self._alive(mon, "ceph-mon") and self._ceph("mon", "stat").returncode == 0,
            deadline,
            0.2,
            what="the monitor's quorum",
        )
        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph("osd", "new", osd_uuid).stdout.strip()
        if osd_id != "0":
            raise RuntimeError(f"unexpected OSD id {osd_id!r}")
        self._run("ceph-osd", "-c", conf, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        osd = self._spawn("osd", "ceph-osd", "-c", conf, "-i", "0")
        eventually(
            lambda: (
                self._alive(osd, "ceph-osd") and "osd.0 up" in self._ceph("osd", "dump").stdout
            ),
            deadline,
            0.2,
            what="the OSD up",
        )
        rgw = self._spawn("rgw", "radosgw", "-c", conf, "-n", "client.rgw.test")
        eventually(
            lambda: self._alive(rgw, "radosgw") and self._answers(),
            deadline,
            0.1,
            what="RGW answering",
        )
        self._run(
            "radosgw-admin",
            "-c",
            conf,
            "-n",
            "client.admin",
            "user",
            "create",
            "--uid=test",
            "--display-name=test",
            f"--access-key={self.access_key}",
            f"--secret={self.secret_key}",
        )

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """TERM every daemon started (RGW, OSD, monitor), KILL what is left after 15 s."""
        started, self._pids = list(reversed(self._pids)), []
        for _, process in started:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for _, process in started:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def kill(self, name: str) -> None:
        """SIGKILL one daemon (``rgw``, ``osd``, ``mon``): a store that vanishes."""
        for known, process in self._pids:
            if known == name and process.poll() is None:
                process.kill()
                process.wait()

    # -- buckets -----------------------------------------------------------------------------

    def client(self) -> object:
        """A ``minio.Minio`` client (blocking; for test set-up and checks only)."""
        from minio import Minio

        return Minio(
            f"127.0.0.1:{self.rgw_port}",
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region="us-east-1",
        )

    def new_bucket(self, prefix: str = "t") -> str:
        """A new empty bucket's name."""
        name = f"{prefix}-{secrets.token_hex(6)}"
        self.client().make_bucket(name)  # type: ignore[attr-defined]
        return name
