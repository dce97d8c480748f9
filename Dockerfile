# syntax=docker/dockerfile:1
# titan-fusion: the gRPC fusion service, CPU-only torch, run as an unprivileged user.
#   docker build -t titan-fusion .        (or: docker compose up, which also starts Prometheus and Grafana)
# Both stages use the same base image: the virtualenv built in the first is copied into the second.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: a virtualenv with CPU torch (pinned like the Makefile's TORCH_VERSION) and the package ---
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CPU index: an open requirement would pull a multi-GB CUDA build.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY client/ client/
COPY server/ server/
RUN pip install --no-cache-dir "/src[server]" \
    && titan-fusion --help > /dev/null

# --- runtime: the virtualenv, a non-root user, the data directory as a volume ---
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="titan-fusion" \
      org.opencontainers.image.description="gRPC service fusing trading experts' probability forecasts with an online-learning transformer" \
      org.opencontainers.image.licenses="MIT"
RUN groupadd --system --gid 10001 fusion \
    && useradd --system --uid 10001 --gid fusion --create-home --home-dir /home/fusion --shell /usr/sbin/nologin fusion \
    && mkdir /data \
    && chown fusion:fusion /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /home/fusion
USER 10001:10001
# Checkpoints, the outcome journal and the lock: keep them across containers.
VOLUME ["/data"]
# gRPC, Prometheus /metrics
EXPOSE 50051 9464
# SIGTERM: the service stops accepting, lets in-flight calls finish (service.grace_seconds, 5 s),
# saves a checkpoint of what is unsaved and exits 0: well within docker's 10 s stop timeout
# (docker-compose.yml allows 30 s).
STOPSIGNAL SIGTERM
# The gRPC health service, asked through the project's own torch-free client command. With TLS or
# protect_health, override it (docker-compose.secure.yml shows how).
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["titan-fusion", "health", "--target", "127.0.0.1:50051"]
CMD ["titan-fusion", "serve", "--host", "0.0.0.0", "--metrics-host", "0.0.0.0", "--data-dir", "/data"]
