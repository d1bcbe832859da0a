"""OCI image layouts with random layers, built in pure Python, and skopeo/HTTP helpers."""

from __future__ import annotations

import atexit
import base64
import gzip
import hashlib
import io
import json
import os
import shutil
import ssl
import subprocess
import tarfile
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST])
REF_NAME = "org.opencontainers.image.ref.name"

SKOPEO_TIMEOUT = 120.0


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class ImageInfo:
    """A single-platform image written into an OCI layout."""

    layout: Path
    tag: str
    arch: str
    manifest_digest: str
    manifest_size: int
    manifest_bytes: bytes
    config: Blob
    layers: tuple[Blob, ...]

    @property
    def digest(self) -> str:
        return self.manifest_digest

    @property
    def layer_digests(self) -> list[str]:
        return [layer.digest for layer in self.layers]

    @property
    def oci_ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


@dataclass(frozen=True)
class IndexInfo:
    """A multi-platform image: an OCI image index referencing one manifest per architecture."""

    layout: Path
    tag: str
    index_digest: str
    index_size: int
    index_bytes: bytes
    images: tuple[ImageInfo, ...]

    @property
    def digest(self) -> str:
        return self.index_digest

    @property
    def manifest_digests(self) -> dict[str, str]:
        return {image.arch: image.manifest_digest for image in self.images}

    @property
    def layer_digests(self) -> list[str]:
        return [d for image in self.images for d in image.layer_digests]

    @property
    def oci_ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


# -- layout writing ------------------------------------------------------------------------------


def _write_blob(layout: Path, data: bytes, media_type: str) -> Blob:
    digest = sha256_digest(data)
    path = layout / "blobs" / "sha256" / digest.split(":", 1)[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_bytes(data)
    return Blob(digest=digest, size=len(data), media_type=media_type)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _init_layout(layout: Path) -> None:
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    if not (layout / "index.json").exists():
        (layout / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
        )


def _add_ref(layout: Path, blob: Blob, tag: str) -> None:
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    manifests = [m for m in index["manifests"] if m.get("annotations", {}).get(REF_NAME) != tag]
    manifests.append({**blob.descriptor(), "annotations": {REF_NAME: tag}})
    index["manifests"] = manifests
    index_path.write_text(json.dumps(index, indent=2))


def _layer_tar(size: int, name: str) -> bytes:
    payload = os.urandom(size)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mode = 0o644
        info.mtime = 0
        tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


def _write_image(
    layout: Path, layers: Sequence[int], arch: str, compress: bool, tag: str
) -> tuple[Blob, bytes, Blob, tuple[Blob, ...]]:
    layer_blobs: list[Blob] = []
    diff_ids: list[str] = []
    for number, size in enumerate(layers):
        tar = _layer_tar(size, f"data/{arch}-layer{number}.bin")
        diff_ids.append(sha256_digest(tar))
        if compress:
            data = gzip.compress(tar, compresslevel=1, mtime=0)
            layer_blobs.append(_write_blob(layout, data, OCI_LAYER_GZIP))
        else:
            layer_blobs.append(_write_blob(layout, tar, OCI_LAYER_TAR))
    config = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin"], "Labels": {"regproxy.test.tag": tag}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "regproxy tests"}],
    }
    config_blob = _write_blob(layout, _canonical(config), OCI_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config_blob.descriptor(),
        "layers": [blob.descriptor() for blob in layer_blobs],
    }
    manifest_bytes = json.dumps(manifest, indent=3).encode()
    manifest_blob = _write_blob(layout, manifest_bytes, OCI_MANIFEST)
    return manifest_blob, manifest_bytes, config_blob, tuple(layer_blobs)


def build_image(
    directory: Path | str,
    layers: Sequence[int] = (1024, 4096),
    arch: str = "amd64",
    tag: str = "latest",
    compress: bool = True,
) -> ImageInfo:
    """Write an image with one random file per layer (sizes in bytes) into an OCI layout.

    Several images may share one layout directory under different tags.
    """
    layout = Path(directory)
    _init_layout(layout)
    manifest, manifest_bytes, config, layer_blobs = _write_image(
        layout, layers, arch, compress, tag
    )
    _add_ref(layout, manifest, tag)
    return ImageInfo(
        layout=layout,
        tag=tag,
        arch=arch,
        manifest_digest=manifest.digest,
        manifest_size=manifest.size,
        manifest_bytes=manifest_bytes,
        config=config,
        layers=layer_blobs,
    )


def build_multiarch(
    directory: Path | str,
    archs: Sequence[str] = ("amd64", "arm64"),
    layers: Sequence[int] = (1024, 2048),
    tag: str = "latest",
    compress: bool = True,
) -> IndexInfo:
    """Write an OCI image index with one manifest per architecture into an OCI layout."""
    layout = Path(directory)
    _init_layout(layout)
    images: list[ImageInfo] = []
    entries: list[dict[str, Any]] = []
    for arch in archs:
        manifest, manifest_bytes, config, layer_blobs = _write_image(
            layout, layers, arch, compress, tag
        )
        images.append(
            ImageInfo(
                layout=layout,
                tag=tag,
                arch=arch,
                manifest_digest=manifest.digest,
                manifest_size=manifest.size,
                manifest_bytes=manifest_bytes,
                config=config,
                layers=layer_blobs,
            )
        )
        platform: dict[str, str] = {"architecture": arch, "os": "linux"}
        if arch == "arm64":
            platform["variant"] = "v8"
        entries.append({**manifest.descriptor(), "platform": platform})
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    index_bytes = json.dumps(index, indent=3).encode()
    index_blob = _write_blob(layout, index_bytes, OCI_INDEX)
    _add_ref(layout, index_blob, tag)
    return IndexInfo(
        layout=layout,
        tag=tag,
        index_digest=index_blob.digest,
        index_size=index_blob.size,
        index_bytes=index_bytes,
        images=tuple(images),
    )


class LayoutError(AssertionError):
    pass


def verify_layout(
    directory: Path | str, expected_digest: str | None = None, tag: str | None = None
) -> str:
    """Check an ``oci:`` directory: every blob hashes to its name, every referenced blob exists.

    Returns the digest of the top manifest (the ``tag`` entry of index.json, or the only entry)
    and asserts it equals *expected_digest* when given.
    """
    layout = Path(directory)
    blob_dir = layout / "blobs" / "sha256"
    for path in blob_dir.iterdir():
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != path.name:
            raise LayoutError(f"blob {path.name} hashes to {actual}")
    index = json.loads((layout / "index.json").read_text())
    entries = index["manifests"]
    if tag is not None:
        entries = [e for e in entries if e.get("annotations", {}).get(REF_NAME) == tag]
    if len(entries) != 1:
        raise LayoutError(f"expected one top manifest in {layout}, found {len(entries)}")
    top = entries[0]

    def check(descriptor: dict[str, Any]) -> None:
        digest = descriptor["digest"]
        path = blob_dir / digest.split(":", 1)[1]
        if not path.exists():
            raise LayoutError(f"missing blob {digest}")
        if path.stat().st_size != descriptor["size"]:
            raise LayoutError(f"blob {digest} size {path.stat().st_size} != {descriptor['size']}")
        media_type = descriptor.get("mediaType", "")
        if media_type in (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST):
            doc = json.loads(path.read_bytes())
            for child in doc.get("manifests", []):
                check(child)
            if "config" in doc:
                check(doc["config"])
            for layer in doc.get("layers", []):
                check(layer)

    check(top)
    digest: str = top["digest"]
    if expected_digest is not None and digest != expected_digest:
        raise LayoutError(f"top manifest digest {digest} != expected {expected_digest}")
    return digest


# -- skopeo ---------------------------------------------------------------------------------------


class SkopeoError(RuntimeError):
    def __init__(self, args: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        super().__init__(f"skopeo failed ({returncode}): {' '.join(args)}\n{stderr.strip()}")
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


_env_lock = threading.Lock()
_skopeo_env: dict[str, str] | None = None


def skopeo_env() -> dict[str, str]:
    """Environment isolating skopeo from the machine: empty auth file, empty registries.conf."""
    global _skopeo_env
    with _env_lock:
        if _skopeo_env is None:
            home = Path(tempfile.mkdtemp(prefix="regproxy-skopeo-"))
            atexit.register(shutil.rmtree, home, ignore_errors=True)
            auth = home / "auth.json"
            auth.write_text("{}")
            registries = home / "registries.conf"
            registries.write_text("")
            (home / "registries.d").mkdir()
            env = {
                k: v
                for k, v in os.environ.items()
                if not k.startswith(("REGISTRY_", "CONTAINERS_", "DOCKER_"))
                and k not in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
            }
            env.update(
                REGISTRY_AUTH_FILE=str(auth),
                CONTAINERS_REGISTRIES_CONF=str(registries),
                DOCKER_CONFIG=str(home / "docker"),
                XDG_RUNTIME_DIR=str(home),
                NO_PROXY="*",
            )
            _skopeo_env = env
        return dict(_skopeo_env)


def skopeo_binary() -> str | None:
    return shutil.which("skopeo")


def _docker_ref(ref: str) -> str:
    if ref.startswith(("docker://", "oci:", "dir:", "oci-archive:", "docker-archive:")):
        return ref
    return f"docker://{ref}"


def run_skopeo(
    args: Sequence[str], timeout: float = SKOPEO_TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``skopeo --insecure-policy ARGS`` isolated from the host configuration."""
    binary = skopeo_binary()
    if binary is None:
        raise RuntimeError("skopeo is not installed")
    argv = [binary, "--insecure-policy", *args]
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=skopeo_env(),
        stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise SkopeoError(argv, result.returncode, result.stdout, result.stderr)
    return result


def _tls_args(prefix: str, tls_verify: bool, cert_dir: Path | str | None) -> list[str]:
    args = [f"--{prefix}tls-verify={'true' if tls_verify or cert_dir else 'false'}"]
    if cert_dir is not None:
        args.append(f"--{prefix}cert-dir={cert_dir}")
    return args


def _creds_args(prefix: str, creds: tuple[str, str] | str | None) -> list[str]:
    if creds is None:
        return [f"--{prefix}no-creds"]
    if isinstance(creds, tuple):
        creds = f"{creds[0]}:{creds[1]}"
    return [f"--{prefix}creds={creds}"]


def push(
    layout_dir: Path | str,
    ref_tag: str,
    dest_url_ref: str,
    creds: tuple[str, str] | str | None = None,
    tls_verify: bool = False,
    cert_dir: Path | str | None = None,
    timeout: float = SKOPEO_TIMEOUT,
) -> None:
    """``skopeo copy --all --preserve-digests oci:DIR:TAG docker://HOST:PORT/NAME:TAG``."""
    run_skopeo(
        [
            "copy",
            "--all",
            "--preserve-digests",
            "--retry-times=0",
            *_tls_args("dest-", tls_verify, cert_dir),
            *_creds_args("dest-", creds),
            f"oci:{layout_dir}:{ref_tag}",
            _docker_ref(dest_url_ref),
        ],
        timeout=timeout,
    )


@dataclass
class CopyResult:
    returncode: int
    digest: str | None
    stdout: str
    stderr: str
    dest: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def skopeo_copy(
    src_ref: str,
    dest_dir: Path | str,
    extra_args: Sequence[str] = (),
    creds: tuple[str, str] | str | None = None,
    tls_verify: bool = False,
    cert_dir: Path | str | None = None,
    tag: str = "latest",
    check: bool = True,
    timeout: float = SKOPEO_TIMEOUT,
) -> CopyResult:
    """Copy *src_ref* (``HOST:PORT/name:tag`` or ``docker://...``) into ``oci:DEST_DIR:TAG``.

    ``result.digest`` is the digest of the copied top-level manifest (from ``--digestfile``).
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(prefix="digest-", delete=False) as handle:
        digest_file = Path(handle.name)
    try:
        dest = f"oci:{dest_dir}:{tag}"
        result = run_skopeo(
            [
                "copy",
                "--retry-times=0",
                f"--digestfile={digest_file}",
                *_tls_args("src-", tls_verify, cert_dir),
                *_creds_args("src-", creds),
                *extra_args,
                _docker_ref(src_ref),
                dest,
            ],
            timeout=timeout,
            check=check,
        )
        digest = (digest_file.read_text().strip() or None) if result.returncode == 0 else None
        return CopyResult(result.returncode, digest, result.stdout, result.stderr, dest)
    finally:
        digest_file.unlink(missing_ok=True)


def skopeo_inspect(
    ref: str,
    raw: bool = False,
    creds: tuple[str, str] | str | None = None,
    tls_verify: bool = False,
    cert_dir: Path | str | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = SKOPEO_TIMEOUT,
) -> Any:
    """``skopeo inspect [--raw]``, parsed as JSON (with --raw: the manifest document itself)."""
    return json.loads(
        skopeo_inspect_bytes(ref, raw, creds, tls_verify, cert_dir, extra_args, timeout)
    )


def skopeo_inspect_bytes(
    ref: str,
    raw: bool = True,
    creds: tuple[str, str] | str | None = None,
    tls_verify: bool = False,
    cert_dir: Path | str | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = SKOPEO_TIMEOUT,
) -> bytes:
    """``skopeo inspect --raw`` output as exact bytes (hash them to check a manifest digest)."""
    binary = skopeo_binary()
    if binary is None:
        raise RuntimeError("skopeo is not installed")
    argv = [
        binary,
        "--insecure-policy",
        "inspect",
        "--retry-times=0",
        *_tls_args("", tls_verify, cert_dir),
        *_creds_args("", creds),
        *(["--raw"] if raw else []),
        *extra_args,
        _docker_ref(ref),
    ]
    result = subprocess.run(
        argv, capture_output=True, timeout=timeout, env=skopeo_env(), stdin=subprocess.DEVNULL
    )
    if result.returncode != 0:
        raise SkopeoError(
            argv,
            result.returncode,
            result.stdout.decode(errors="replace"),
            result.stderr.decode(errors="replace"),
        )
    return result.stdout


def skopeo_list_tags(
    ref: str,
    creds: tuple[str, str] | str | None = None,
    tls_verify: bool = False,
    cert_dir: Path | str | None = None,
    timeout: float = SKOPEO_TIMEOUT,
) -> list[str]:
    """``skopeo list-tags docker://HOST:PORT/name`` -> the tag list."""
    result = run_skopeo(
        [
            "list-tags",
            "--retry-times=0",
            *_tls_args("", tls_verify, cert_dir),
            *_creds_args("", creds),
            _docker_ref(ref),
        ],
        timeout=timeout,
    )
    tags: list[str] = json.loads(result.stdout)["Tags"]
    return tags


# -- direct registry HTTP -------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    header_list: list[tuple[str, str]] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Parse ``Bearer realm="...",service="...",scope="..."`` into (scheme, params)."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    i = 0
    while i < len(rest):
        while i < len(rest) and rest[i] in " ,":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        key = rest[i:eq].strip().lower()
        i = eq + 1
        if i < len(rest) and rest[i] == '"':
            i += 1
            value = []
            while i < len(rest) and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < len(rest):
                    i += 1
                value.append(rest[i])
                i += 1
            i += 1
            params[key] = "".join(value)
        else:
            end = rest.find(",", i)
            end = len(rest) if end < 0 else end
            params[key] = rest[i:end].strip()
            i = end
    return scheme.lower(), params


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class RegistryClient:
    """Minimal distribution API client: Basic auth or the Bearer token dance, done on 401.

    ``request()`` never raises on HTTP status; redirects are not followed.
    """

    def __init__(
        self,
        base_url: str,
        creds: tuple[str, str] | None = None,
        cafile: Path | str | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.creds = creds
        self.timeout = timeout
        context = ssl.create_default_context(cafile=str(cafile)) if cafile else None
        handlers: list[Any] = [_NoRedirect()]
        if context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)
        self._context = context
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()

    def _basic(self) -> str:
        assert self.creds is not None
        raw = f"{self.creds[0]}:{self.creds[1]}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def raw(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
    ) -> Response:
        request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return Response(
                    response.status,
                    dict(response.headers.items()),
                    response.read(),
                    list(response.headers.items()),
                )
        except urllib.error.HTTPError as error:
            body = error.read()
            return Response(
                error.code, dict(error.headers.items()), body, list(error.headers.items())
            )

    def token(self, realm: str, service: str | None, scopes: Iterable[str]) -> str:
        query: list[tuple[str, str]] = []
        if service:
            query.append(("service", service))
        query.extend(("scope", s) for s in scopes)
        if self.creds:
            query.append(("account", self.creds[0]))
        url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        headers = {"Authorization": self._basic()} if self.creds else {}
        response = self.raw("GET", url, headers)
        if response.status != 200:
            raise PermissionError(f"token request failed: {response.status} {response.body!r}")
        body = response.json()
        token: str = body.get("token") or body["access_token"]
        return token

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        data: bytes | None = None,
        scope: str | None = None,
    ) -> Response:
        """*path* starts with ``/v2/``; *scope* overrides the scope used for a Bearer token."""
        url = self.base_url + path
        headers = dict(headers or {})
        with self._lock:
            auth = self._tokens.get(scope or path)
        if auth:
            headers["Authorization"] = auth
        response = self.raw(method, url, headers, data)
        challenge = response.headers.get("WWW-Authenticate") or response.headers.get(
            "Www-Authenticate"
        )
        if response.status != 401 or not challenge:
            return response
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if self.creds is None:
                return response
            auth = self._basic()
        elif scheme == "bearer":
            scopes = [scope] if scope else ([params["scope"]] if "scope" in params else [])
            auth = "Bearer " + self.token(params["realm"], params.get("service"), scopes)
        else:
            return response
        with self._lock:
            self._tokens[scope or path] = auth
        headers["Authorization"] = auth
        return self.raw(method, url, headers, data)

    def get_manifest(self, name: str, reference: str) -> Response:
        return self.request(
            "GET",
            f"/v2/{name}/manifests/{reference}",
            {"Accept": MANIFEST_ACCEPT},
            scope=f"repository:{name}:pull",
        )

    def put_manifest(self, name: str, reference: str, body: bytes, media_type: str) -> Response:
        return self.request(
            "PUT",
            f"/v2/{name}/manifests/{reference}",
            {"Content-Type": media_type},
            body,
            scope=f"repository:{name}:pull,push",
        )


def push_tags(
    registry_url: str,
    name: str,
    source_reference: str,
    tags: Iterable[str],
    creds: tuple[str, str] | None = None,
    cafile: Path | str | None = None,
    workers: int = 8,
) -> str:
    """Tag an existing manifest many times by PUTting its exact bytes; returns its digest."""
    client = RegistryClient(registry_url, creds=creds, cafile=cafile)
    source = client.get_manifest(name, source_reference)
    if source.status != 200:
        raise RuntimeError(f"GET manifest {name}:{source_reference}: {source.status}")
    media_type = source.headers.get("Content-Type", OCI_MANIFEST)
    body = source.body
    # get a push token once, before fanning out
    first, *rest = list(tags) or [None]

    def put(tag: str) -> None:
        response = client.put_manifest(name, tag, body, media_type)
        if response.status != 201:
            raise RuntimeError(f"PUT manifest {name}:{tag}: {response.status} {response.body!r}")

    if first is not None:
        put(first)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(put, rest))
    return sha256_digest(body)
