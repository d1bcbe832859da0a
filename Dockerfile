# regproxy container image.
#
# Two stages: the first builds a virtual environment at /opt/regproxy, the
# second copies it onto a clean base of the same Python image, so compilers,
# pip caches and the source tree stay out of the final image.
#
# The runtime image writes nothing to its file system (bytecode and the
# Twisted plugin cache are produced here at build time), so it runs with a
# read-only root file system as the non-root numeric user 10001.

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/regproxy/bin:$PATH

RUN python -m venv /opt/regproxy

WORKDIR /src
COPY . .

# `twist` finds `regproxy` through twisted/plugins/dropin.cache; build the
# cache now, because at run time its directory is read-only.
RUN pip install --no-cache-dir . \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"


FROM python:3.11-slim

ENV PATH=/opt/regproxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PORT=8080

RUN groupadd --system --gid 10001 regproxy \
    && useradd --system --uid 10001 --gid 10001 \
       --home-dir /nonexistent --no-create-home \
       --shell /usr/sbin/nologin regproxy

COPY --from=build /opt/regproxy /opt/regproxy

# Numeric, so Kubernetes' runAsNonRoot can verify it without reading
# /etc/passwd.
USER 10001:10001

EXPOSE 8080

# No HEALTHCHECK: Kubernetes and Cloud Run ignore it and probe /healthz and
# /readyz themselves; under plain Docker add one that matches your --port.

# twist's own options (e.g. --log-format=json) go before "regproxy", so to
# change them override the entrypoint, not just the arguments.
ENTRYPOINT ["twist", "regproxy"]
