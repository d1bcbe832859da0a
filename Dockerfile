# regproxy container image (see README.rst, "The container image").
#
#   docker build -t registry.example.com/tools/regproxy:0.1.0 \
#       --build-arg REVISION="$(git rev-parse HEAD)" .
#
# Two stages. The build stage installs the Python dependencies from
# requirements/runtime.txt, a lock file with hashes (pip --require-hashes,
# wheels only), and regproxy itself into a virtual environment at
# /opt/regproxy, which has no pip, setuptools or wheel of its own; the
# dependencies' test suites are removed and the Twisted plugin cache is built.
# The runtime stage copies that environment onto the same base, removes the
# base's own pip, setuptools and wheel, and runs as the numeric user 10001
# with nothing to write (bytecode and plugin cache are made here), so a
# read-only root file system works.
#
# Base image: the tag for people, the digest for machines; both change
# together with deploy/docker/update-base-image (README.rst says how).
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
    PIP_ROOT_USER_ACTION=ignore

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

WORKDIR /src
COPY requirements/build.txt requirements/runtime.txt requirements/

RUN if [ -n "${EXTRA_CA_CERTS}" ]; then \
        printf '%s\n' "${EXTRA_CA_CERTS}" \
            | cat /etc/ssl/certs/ca-certificates.crt - > /tmp/ca-bundle.pem; \
        export PIP_CERT=/tmp/ca-bundle.pem; \
    fi \
    && python -m venv /opt/build-tools \
    && /opt/build-tools/bin/pip install --require-hashes --no-deps \
        -r requirements/build.txt \
    && python -m venv --without-pip /opt/regproxy \
    && /opt/build-tools/bin/pip --python /opt/regproxy/bin/python install \
        --require-hashes --no-deps --only-binary=:all: -r requirements/runtime.txt

COPY setup.cfg setup.py pyproject.toml README.rst ./
COPY regproxy/ regproxy/
COPY twisted/ twisted/

# `twist` finds `regproxy` through twisted/plugins/dropin.cache; build the
# cache now, because at run time its directory is read-only. The last step
# proves the environment starts without what was removed.
RUN /opt/build-tools/bin/pip wheel --no-deps --no-build-isolation \
        --wheel-dir /tmp/wheels . \
    && /opt/build-tools/bin/pip --python /opt/regproxy/bin/python install \
        --no-deps --no-index /tmp/wheels/regproxy-*.whl \
    && find /opt/regproxy/lib -depth -type d \( -name test -o -name tests \) \
        -path '*/site-packages/*' -exec rm -rf {} + \
    && /opt/regproxy/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && /opt/regproxy/bin/twist regproxy --version


FROM ${PYTHON_IMAGE}

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

ENV PATH=/opt/regproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PORT=8080

# The base's pip, setuptools and wheel are not needed to run; nor is a user
# with a home, a login shell or an entry in the lastlog database.
RUN PIP_ROOT_USER_ACTION=ignore python -m pip uninstall --yes --quiet --quiet \
        pip setuptools wheel \
    && rm -rf /usr/local/lib/python3.11/ensurepip /usr/local/bin/pip* \
    && groupadd --gid 10001 regproxy \
    && useradd --uid 10001 --gid 10001 --no-log-init \
       --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin regproxy

COPY --from=build /opt/regproxy /opt/regproxy

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading
# /etc/passwd.
USER 10001:10001

EXPOSE 8080

# No HEALTHCHECK: Kubernetes and Cloud Run ignore it and probe /healthz and
# /readyz themselves; under plain Docker add one that matches your --port.

# Logs: one JSON object per line when stdout is not a terminal (the case in
# a container); --log-format text (an argument like any other) for text.
ENTRYPOINT ["twist", "regproxy"]
