"""``twist regproxy`` as operators meet it: errors in one line, logs as JSON lines, start-up.

Every test runs the real command (``python -m twisted regproxy``) as a subprocess.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from regproxy import __version__
from tests.support.curl import curl
from tests.support.images import skopeo_copy
from tests.support.oauth import OAuthEndpoint
from tests.support.ports import free_port, port_open
from tests.support.proxy import RegproxyProcess
from tests.support.seed import SeededRegistry
from tests.support.tls import make_ca_and_cert
from tests.support.tools import require_capability, require_program, systemd_socket_activate
from tests.support.waiting import eventually

REPO_ROOT = Path(__file__).resolve().parents[2]
ACCEPT = "Accept: application/vnd.oci.image.manifest.v1+json"


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "GOOGLE_"))}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def twist(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``twist regproxy ARGS`` that is expected to end by itself."""
    return subprocess.run(
        [sys.executable, "-m", "twisted", "regproxy", *args],
        cwd=REPO_ROOT,
        env=environment(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_version_is_regproxy_s() -> None:
    result = twist("--version")
    assert result.returncode == 0
    assert result.stdout.startswith(f"regproxy {__version__} (Twisted ")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--bogus"], "Error: option --bogus not recognized"),
        (["--upstream", "not a url"], "Error: --upstream: 'not a url' is not a registry URL"),
        (["--shutdown-grace", "soon"], "Error: --shutdown-grace: "),
        (["--port", "0"], "Error: --port: 0 is not a TCP port number"),
        (["--upstream-username", "robot"], "Error: --upstream-username and --upstream-password"),
    ],
)
def test_usage_errors_are_one_line_and_a_pointer_to_help(args: list[str], error: str) -> None:
    result = twist(*args)
    assert result.returncode == os.EX_USAGE
    lines = result.stderr.splitlines()
    assert len(lines) == 2, result.stderr
    assert lines[0].startswith(error), lines[0]
    assert lines[1] == "see: twist regproxy --help"
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--port", "tcp:notaport"], "Error: --port tcp:notaport: 'notaport' is not a port"),
        (["--port", "nonsense:1"], "Error: --port nonsense:1: Unknown endpoint type"),
        (["--metrics-port", "tcp:x"], "Error: --metrics-port tcp:x: 'x' is not a port number"),
        (
            ["--port", "systemd:domain=INET:index=0"],
            "Error: --port systemd:domain=INET:index=0: the supervisor passed no such socket",
        ),
    ],
)
def test_listen_errors_are_one_line_naming_the_option(args: list[str], error: str) -> None:
    result = twist(*args)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(error), result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_port_in_use_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = twist("--port", f"tcp:{port}:interface=127.0.0.1")
    assert result.returncode != 0
    assert result.stderr == (
        f"Error: --port tcp:{port}:interface=127.0.0.1: the address is already in use: "
        "stop what listens there or choose another port\n"
    )
    assert "Traceback" not in result.stdout


def test_supervisor_start_up_failures_are_one_line(tmp: Path) -> None:
    """Under --workers the supervisor binds: its failures read as a single process's do."""
    tls = make_ca_and_cert(tmp)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [
            (
                ["--port", f"tcp:{port}:interface=127.0.0.1"],
                f"Error: --port tcp:{port}:interface=127.0.0.1: the address is already in use",
            ),
            (
                ["--metrics-port", f"tcp:{port}:interface=127.0.0.1"],
                f"Error: --metrics-port tcp:{port}:interface=127.0.0.1: the address is already",
            ),
            (
                ["--port", f"ssl:0:privateKey={tmp}/missing.pem:certKey={tls.cert}"],
                f"Error: --port ssl:0:privateKey={tmp}/missing.pem:certKey={tls.cert}: "
                "[Errno 2] No such file or directory",
            ),
            (
                ["--port", f"unix:{tmp}/socket"],
                f"Error: --port 'unix:{tmp}/socket': with --workers above 1, use tcp:",
            ),
        ]
        for args, error in cases:
            result = twist(
                "--workers",
                "2",
                "--port",
                "tcp:0:interface=127.0.0.1",
                *args,
                env={"RUNTIME_DIRECTORY": str(tmp)},
            )
            assert result.returncode == 1
            assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr
            assert result.stderr.startswith(error), result.stderr
            assert "Traceback" not in result.stdout
    assert list(tmp.glob("regproxy-*")) == []  # the runtime directory went with it


def test_workers_in_a_read_only_root_say_what_to_mount_in_one_line() -> None:
    """podman run --read-only without --tmpfs: read-only /tmp, /dev/shm and /var/tmp (bind
    mounts made read-only in a mount namespace of a user namespace, unprivileged)."""
    unshare = require_program("unshare (Debian package util-linux)", "read-only mounts")
    # Read-only views of the same directories, not empty ones: a checkout (and its venv)
    # under /tmp stays visible, as a read-only root's files are.
    readonly = (
        "for d in /tmp /var/tmp /dev/shm; do"
        " mount --bind $d $d && mount -o remount,bind,ro $d || exit 3; done"
    )
    probe = subprocess.run(
        [unshare, "-rm", "sh", "-c", f"{readonly} && ! touch /tmp/x 2>/dev/null"],
        capture_output=True,
        check=False,
    )
    require_capability(probe.returncode == 0, "read-only mounts", "unshare -rm (user namespaces)")
    env = environment()
    for variable in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR", "TMPDIR"):
        env.pop(variable, None)
    command = [
        sys.executable,
        "-m",
        "twisted",
        "regproxy",
        "--workers",
        "2",
        "--port",
        "tcp:0:interface=127.0.0.1",
    ]
    result = subprocess.run(
        [unshare, "-rm", "sh", "-c", f'{readonly} && exec "$@"', "sh", *command],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr == (
        "Error: --workers 2: the workers need a writable directory to share, and none of "
        "/dev/shm, /tmp, /var/tmp is writable (a read-only root?): mount a tmpfs at /tmp "
        "(podman or docker run --tmpfs /tmp, an emptyDir volume in Kubernetes) or point "
        "RUNTIME_DIRECTORY at a writable directory\n"
    )
    assert "Traceback" not in result.stdout


def test_check_names_the_file_once_per_line_and_refuses_what_the_flag_refuses(
    tmp: Path,
) -> None:
    bad_url = tmp / "url.toml"
    bad_url.write_text('[[routes]]\nname = "a"\nupstream = "not a url"\ncolour = 1\n')
    result = twist("--config", str(bad_url), "--check")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f'{bad_url}: route "a": unknown key "colour"',
        f"{bad_url}: route \"a\": upstream: 'not a url' is not a registry URL; give one such "
        "as https://gcr.io",
    ]
    flag = twist("--upstream", "not a url")
    assert "'not a url' is not a registry URL; give one such as https://gcr.io" in flag.stderr
    broken = tmp / "broken.toml"
    broken.write_text('[[routes]]\nname = "a\n')
    result = twist("--config", str(broken), "--check")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"{broken}: not valid TOML: ") and line.count(str(broken)) == 1


def test_a_bare_port_number_is_a_tcp_port(prefixed_registry: SeededRegistry, tmp: Path) -> None:
    port = free_port()
    proxy = RegproxyProcess(
        ["--upstream", prefixed_registry.url], port_option="--port", directory=tmp / "p"
    )
    # The helper adds its own --port; this one is a bare number on top of it.
    proxy.args += ["--port", str(port)]
    with proxy:
        assert curl(f"http://127.0.0.1:{port}/healthz").status == 200


class PipedProxy:
    """regproxy with stdout a pipe, as under a container runtime or systemd."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "twisted",
                "regproxy",
                "--port",
                f"tcp:{self.port}:interface=127.0.0.1",
                *args,
            ],
            cwd=REPO_ROOT,
            env=environment(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.stdout = ""
        self.stderr = ""
        # Answering, not just bound: the port is bound before twist runs its reactor, and a
        # SIGTERM before that point meets no handler at all.
        try:
            eventually(self._answers_while_running, timeout=20, what="an answer on /healthz")
        except AssertionError as error:
            self.stop()
            raise AssertionError(f"regproxy did not start ({error}): {self.stderr}") from None

    def _answers_while_running(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"exited with {self.process.returncode}")
        return self._answers()

    def _answers(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", "/healthz")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, signal_first: bool = True) -> int:
        """SIGTERM (unless it was sent already), then wait for the exit and read the output."""
        if signal_first and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            out, err = self.process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, err = self.process.communicate()
        self.stdout, self.stderr = out, err
        return self.process.returncode

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.stdout.splitlines()]


@pytest.fixture
def piped():
    started: list[PipedProxy] = []

    def start(args: list[str], env: dict[str, str] | None = None) -> PipedProxy:
        proxy = PipedProxy(args, env)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


def test_every_line_on_a_piped_stdout_is_one_json_object(
    piped, prefixed_registry: SeededRegistry
) -> None:
    proxy = piped(["--upstream", prefixed_registry.url, "--repo-prefix", "proj"])
    curl(proxy.url + "/v2/app/manifests/v1", "-H", ACCEPT)
    curl(proxy.url + "/v2/Invalid/manifests/v1")
    # A malformed Host is refused (RFC 9112), and logged like any answer.
    curl(f"{proxy.url}/v2/app/manifests/v1", "-H", ACCEPT, "-H", "Host: \u00e9.example")
    assert proxy.stop() == 0
    assert "\x1e" not in proxy.stdout
    # json.loads on every line, as it is: a line that is not one object fails here.
    records = proxy.records()
    assert records and all(isinstance(record, dict) for record in records)
    for record in records:
        assert {"time", "severity", "message", "logger"} <= set(record)
        assert record["severity"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        assert str(record["time"]).endswith("Z") and "T" in str(record["time"])
        assert not [key for key in record if key.startswith(("log_", "__"))]
    access = [r for r in records if r["logger"] == "regproxy.access" and r["path"] != "/healthz"]
    assert [r["status"] for r in access] == [200, 400, 400]
    ok = access[0]
    assert {
        "method": ok["method"],
        "path": ok["path"],
        "upstream_status": ok["upstream_status"],
        "route": ok["route"],
        "client": ok["client"],
    } == {
        "method": "GET",
        "path": "/v2/app/manifests/v1",
        "upstream_status": 200,
        "route": "default",
        "client": "127.0.0.1",
    }
    assert isinstance(ok["bytes"], int) and ok["bytes"] > 0
    assert isinstance(ok["duration"], float)
    assert isinstance(ok["request_id"], str)
    assert str(ok["message"]).startswith("127.0.0.1 GET /v2/app/manifests/v1 200 ")


def test_text_format_on_request(piped, prefixed_registry: SeededRegistry) -> None:
    proxy = piped(["--upstream", prefixed_registry.url, "--log-format", "text"])
    assert proxy.stop() == 0
    assert proxy.stdout and not proxy.stdout.lstrip().startswith("{")
    assert "[regproxy.server.startup" in proxy.stdout


def test_start_up_says_what_it_serves(piped, prefixed_registry: SeededRegistry) -> None:
    proxy = piped(["--upstream", prefixed_registry.url, "--repo-prefix", "proj"])
    proxy.stop()
    messages = [str(r["message"]) for r in proxy.records()]
    assert f"regproxy {__version__} (Twisted" in messages[0]
    assert (
        f"route default: upstream {prefixed_registry.url}, prefix proj, "
        "credentials none (clients bring their own), cache off"
    ) in messages
    assert (
        f"listening on 127.0.0.1:{proxy.port} (registry API; --port "
        f"tcp:{proxy.port}:interface=127.0.0.1)"
    ) in messages
    assert not [r for r in proxy.records() if r["severity"] == "WARNING"]


def test_all_interfaces_with_credentials_is_a_warning(
    piped, prefixed_registry: SeededRegistry
) -> None:
    proxy = piped(
        ["--upstream", prefixed_registry.url, "--port", "tcp:0"],
        env={"AUTH_HEADER": "Basic c2VjcmV0OnNlY3JldA=="},
    )
    proxy.stop()
    warnings = [str(r["message"]) for r in proxy.records() if r["severity"] == "WARNING"]
    assert len(warnings) == 1
    assert "is every interface of this host" in warnings[0]
    assert "holds upstream credentials" in warnings[0]
    assert "c2VjcmV0" not in proxy.stdout


def test_ambient_google_credentials_never_reach_a_non_google_upstream(
    piped, prefixed_registry: SeededRegistry, tmp: Path
) -> None:
    """The key file's token_uri is a loopback canary: it must hear nothing."""
    with OAuthEndpoint("ya29.canary") as canary:
        key_file = canary.write_key_file(tmp / "key.json")
        proxy = piped(
            ["--upstream", prefixed_registry.url, "--repo-prefix", "proj"],
            env={"GOOGLE_APPLICATION_CREDENTIALS": str(key_file)},
        )
        port_url = proxy.url.removeprefix("http://")
        result = skopeo_copy(f"docker://{port_url}/app:v1", tmp / "out")
        assert result.digest == prefixed_registry["app:v1"]
        proxy.stop()
        assert canary.grants == []
    warnings = [str(r["message"]) for r in proxy.records() if r["severity"] == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].startswith("GOOGLE_APPLICATION_CREDENTIALS is ignored: the upstream")


def test_drain_delay_keeps_accepting_then_closes(piped, prefixed_registry: SeededRegistry) -> None:
    proxy = piped(["--upstream", prefixed_registry.url, "--drain-delay", "3"])
    proxy.process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    # New connections are still accepted during the delay, and told to go elsewhere.
    eventually(lambda: curl(proxy.url + "/readyz").status == 503, timeout=2, what="draining")
    assert curl(proxy.url + "/healthz").status == 200
    assert time.monotonic() - signalled < 3
    eventually(
        lambda: not port_open("127.0.0.1", proxy.port),
        timeout=10 - (time.monotonic() - signalled),
        what="the listener closed",
    )
    assert time.monotonic() - signalled >= 2.9
    assert proxy.stop(signal_first=False) == 0


def test_an_idle_proxy_exits_promptly_after_sigterm(
    piped, prefixed_registry: SeededRegistry, tmp: Path
) -> None:
    proxy = piped(["--upstream", prefixed_registry.url, "--repo-prefix", "proj"])
    port_url = proxy.url.removeprefix("http://")
    skopeo_copy(f"docker://{port_url}/app:v1", tmp / "out")  # pooled upstream connections
    started = time.monotonic()
    assert proxy.stop() == 0
    assert time.monotonic() - started < 2.0


def test_unnamed_sockets_from_a_supervisor_are_one_line(tmp: Path) -> None:
    """systemd-socket-activate without --fdname: LISTEN_FDS but no LISTEN_FDNAMES."""
    activate = systemd_socket_activate()
    port = free_port()
    log = tmp / "activate.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                *(activate, "-l", f"127.0.0.1:{port}"),
                *(sys.executable, "-m", "twisted", "regproxy"),
                *("--port", "systemd:domain=INET:index=0"),
            ],
            cwd=REPO_ROOT,
            env=environment(),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            eventually(
                lambda: port_open("127.0.0.1", port), what=lambda: f"listening: {log.read_text()}"
            )
            # The first connection makes systemd-socket-activate start regproxy.
            with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
                client.settimeout(20)
                with contextlib.suppress(ConnectionResetError):
                    assert client.recv(1) == b""
            assert process.wait(20) != 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    errors = [line for line in log.read_text().splitlines() if line.startswith("Error:")]
    assert errors == [
        "Error: --port systemd:domain=INET:index=0: the supervisor passed sockets without "
        "names (no LISTEN_FDNAMES), and Twisted adopts named sockets only; name them "
        "(FileDescriptorName= in the .socket unit, --fdname for systemd-socket-activate)"
    ]
    assert "Traceback" not in log.read_text()


def test_a_hanging_upstream_check_does_not_hold_up_the_exit(piped) -> None:
    """An upstream that accepts and never answers: SIGTERM still ends an idle proxy."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        proxy = piped(["--upstream", f"http://127.0.0.1:{hole.getsockname()[1]}"])
        started = time.monotonic()
        assert proxy.stop() == 0
        assert time.monotonic() - started < 2.0
