# syntax=docker/dockerfile:1
# cpis-bridge container image. Stage 1 builds the project's wheel (and its dependencies' wheels); stage 2 installs
# them into a virtualenv on a clean slim base with no compilers, running as a non-root user. Redis is external:
# set CPIS_REDIS_URL (the chart does). No secret is baked in: every secret arrives as an environment variable.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Compilers only here, for any dependency without a binary wheel for this platform (the distribution's current
# version: this stage is thrown away).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cpis_bridge ./cpis_bridge
RUN python -m pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="cpis-bridge" \
      org.opencontainers.image.description="Child protection information sharing: LA records, ED alerts over FHIR R4" \
      org.opencontainers.image.licenses="MIT"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CPIS_HOST=0.0.0.0 \
    CPIS_PORT=8080 \
    CPIS_DATA_DIR=/tmp/cpis
RUN groupadd --system --gid 10001 cpis \
    && useradd --system --uid 10001 --gid cpis --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin cpis
# The wheels are bind-mounted from the build stage: they never become a layer of this image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-index --find-links /wheels cpis-bridge \
    && /opt/venv/bin/cpis-bridge --help > /dev/null
# /tmp is the only writable path (an emptyDir under Kubernetes with a read-only root filesystem).
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('CPIS_PORT', '8080') + '/healthz', timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["cpis-bridge"]
CMD ["serve"]
