# One image for both services: `gitfaas bridge` (the default) and `gitfaas consumer`.
#
#   docker build -t gitfaas:dev .
#   docker run --rm -p 5000:5000 -e NATS_URL=nats://host.docker.internal:4222 gitfaas:dev
#   docker run --rm -e GIT_URL=https://example.org/me/pipes.git gitfaas:dev consumer
#
# Both stages start from the same pinned base, so the virtual environment built in the first
# stage runs unchanged in the second (same /usr/local/bin/python).

# ---- build: a virtual environment ------------------------------------------------
FROM python:3.11.14-slim-bookworm AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# Dependencies first, from the lock file alone (exact versions and hashes, the same as `make up`
# installs): this layer is rebuilt only when the lock changes, not when the code does.
COPY requirements/runtime.txt ./requirements/runtime.txt
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --require-hashes --no-deps -r requirements/runtime.txt \
    && /opt/venv/bin/pip check

# Then the code: the project itself, installed without touching the dependencies.
COPY pyproject.toml README.md ./
COPY gitfaas ./gitfaas
COPY bridge ./bridge
COPY consumer ./consumer
COPY cli ./cli
RUN /opt/venv/bin/pip install --no-deps --no-build-isolation . \
    && /opt/venv/bin/python -m compileall -q /opt/venv/lib

# ---- runtime: no compilers, no pip cache ----------------------------------------
FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="gitfaas" \
      org.opencontainers.image.description="GitOps functions-as-a-service for data pipelines on Kubernetes, driven by NATS JetStream" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/gitfaas/gitfaas" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.14-slim-bookworm"

# git for GitPython (and ssh for ssh:// repositories); no recommends, no package lists left.
# Debian's security updates replace package versions in place, so pinning them would break
# rebuilds; the base image tag is what pins this layer.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git openssh-client ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric user: Kubernetes' runAsNonRoot can only verify a numeric UID.
RUN groupadd --system --gid 10001 gitfaas \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/gitfaas --create-home \
       --shell /usr/sbin/nologin gitfaas

COPY --from=build /opt/venv /opt/venv
# The example pipeline, so a fresh cluster has a configuration to load (GIT_URL in the dev overlay).
COPY examples /opt/gitfaas/examples

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LOG_FORMAT=json \
    HOME=/home/gitfaas

WORKDIR /home/gitfaas
USER 10001:10001

# 5000: the bridge (BRIDGE_PORT); 8080: the consumer's healthz/readyz/metrics (CONSUMER_HTTP_PORT).
EXPOSE 5000 8080

# Whichever service runs in this container answers /healthz on its own port.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request as r\nports = (os.environ.get('BRIDGE_PORT', '5000'), os.environ.get('CONSUMER_HTTP_PORT', '8080'))\nfor port in ports:\n    try:\n        r.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=3)\n        sys.exit(0)\n    except OSError:\n        pass\nsys.exit(1)"]

ENTRYPOINT ["gitfaas"]
CMD ["bridge"]
