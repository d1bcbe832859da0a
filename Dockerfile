# regproxy container image (docs/image.rst).
#
#   docker build -t registry.example.com/tools/regproxy:0.1.0 \
#       --build-arg REVISION="$(git rev-parse HEAD)" .
#   podman build --format docker ...       (the same; see docs/image.rst)
#
# Two stages. The build stage installs the Python dependencies from
# requirements/runtime.txt, a lock file with hashes (pip --require-hashes,
# wheels only), and regproxy itself into a virtual environment at
# /opt/regproxy, which has no pip, setuptools or wheel of its own; the
# dependencies' test suites are removed, everything is compiled to bytecode
# once and the Twisted plugin cache is built last. deploy/docker/slim-root then
# copies what that environment needs to run (the interpreter, the standard
# library without its tests and tools, the shared libraries, the CA
# certificates, a passwd file) into /runtime. The runtime stage starts from
# scratch with /runtime and the environment, two layers, and runs as the
# numeric user 10001 with nothing to write: a read-only root works.
#
# No RUN line needs a SHELL option (podman and buildah build OCI images by
# default, where SHELL is ignored): no pipes, every step joined with &&.
#
# Base image: the tag for people, the digest for machines; both change
# together with deploy/docker/update-base-image. Without access to it, any
# Python 3.11 image with venv and pip will do, a mirrored copy or a local one
# (deploy/docker/standin-base builds one from a Debian mirror):
#   --build-arg PYTHON_IMAGE=mirror.example.com/library/python:3.11-slim-bookworm
ARG PYTHON_IMAGE=python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b

FROM ${PYTHON_IMAGE} AS build

# Behind a corporate proxy or mirror: a package index (pip reads
# PIP_INDEX_URL) and an extra CA bundle in PEM, trusted for the downloads of
# this stage only:
#   --build-arg PIP_INDEX_URL=https://pypi.example.com/simple
#   --build-arg EXTRA_CA_CERTS="$(cat corporate-ca.pem)"
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG EXTRA_CA_CERTS=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY requirements/build.txt requirements/runtime.txt requirements/

RUN if [ -n "${EXTRA_CA_CERTS}" ]; then \
        printf '%s\n' "${EXTRA_CA_CERTS}" > /tmp/extra-ca.pem \
        && cat /etc/ssl/certs/ca-certificates.crt /tmp/extra-ca.pem > /tmp/ca-bundle.pem \
        && export PIP_CERT=/tmp/ca-bundle.pem; \
    fi \
    && python3 -m venv /opt/build-tools \
    && /opt/build-tools/bin/pip install --require-hashes --no-deps \
        -r requirements/build.txt \
    && python3 -m venv --without-pip /opt/regproxy \
    && /opt/build-tools/bin/pip --python /opt/regproxy/bin/python install --no-compile \
        --require-hashes --no-deps --only-binary=:all: -r requirements/runtime.txt \
    && find /opt/regproxy/lib -depth -type d \( -name test -o -name tests \) \
        -path '*/site-packages/*' -exec rm -rf {} +

COPY setup.cfg setup.py pyproject.toml README.rst ./
COPY regproxy/ regproxy/
COPY twisted/ twisted/
COPY deploy/docker/slim-root deploy/docker/check-root /usr/local/sbin/

# `twist` finds `regproxy` through twisted/plugins/dropin.cache; build the
# cache now, because at run time its directory is read-only. Twisted rebuilds
# (and tries to write) the cache when a plugin module is not strictly older
# than it, in whole seconds as image layers keep them: so the modules are
# dated 1980 first. The last steps prove the environment starts without what
# was removed, in /runtime alone, as the user it runs as.
RUN /opt/build-tools/bin/pip wheel --no-deps --no-build-isolation \
        --wheel-dir /tmp/wheels . \
    && /opt/build-tools/bin/pip --python /opt/regproxy/bin/python install --no-compile \
        --no-deps --no-index /tmp/wheels/regproxy-*.whl \
    && find /opt/regproxy/lib -name __pycache__ -prune -exec rm -rf {} + \
    && python3 -m compileall -q -j 0 --invalidation-mode unchecked-hash /opt/regproxy/lib \
    && find /opt/regproxy/lib -path '*/twisted/plugins/*.py' -exec touch -d 1980-01-01T00:00:00Z {} + \
    && /opt/regproxy/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && python3 /usr/local/sbin/slim-root /opt/regproxy /runtime 10001 \
    && mkdir /runtime/opt \
    && cp -a /opt/regproxy /runtime/opt/ \
    && chroot --userspec=10001:10001 /runtime /opt/regproxy/bin/twist regproxy --version \
    && cp /usr/local/sbin/check-root /runtime/opt/ \
    && chroot --userspec=10001:10001 /runtime /opt/regproxy/bin/python /opt/check-root \
    && rm -rf /runtime/opt


FROM scratch

ARG VERSION=0.1.0
ARG REVISION=""
ARG CREATED=""
ARG SOURCE=""
ARG PYTHON_IMAGE

LABEL org.opencontainers.image.title="regproxy" \
      org.opencontainers.image.description="A read-only, streaming reverse proxy for container registries" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# The interpreter, its libraries, CA certificates, /etc/passwd, /tmp; then
# the environment, the layer that changes with each release.
COPY --from=build /runtime /
COPY --from=build /opt/regproxy /opt/regproxy

ENV PATH=/opt/regproxy/bin:/usr/local/bin:/usr/bin:/bin \
    LANG=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PORT=8080

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading
# /etc/passwd.
USER 10001:10001

EXPOSE 8080

# No HEALTHCHECK: Kubernetes and Cloud Run ignore it and probe /healthz and
# /readyz themselves. The image has no shell and no curl; under plain Docker
# use Python, with your --port:
#   HEALTHCHECK CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]

# Logs: one JSON object per line when stdout is not a terminal (the case in
# a container); --log-format text (an argument like any other) for text.
ENTRYPOINT ["twist", "regproxy"]
