# syntax=docker/dockerfile:1.7
#
# Two images from one file:
#   docker build --target api    -t simclr-embed-api:0.1.0    .   # slim, no torch
#   docker build --target worker -t simclr-embed-worker:0.1.0 .   # CUDA, torch, Celery worker
# docker compose builds both (see docker-compose.yml).
#
# Layer order in both: pyproject.toml alone first, dependencies installed from it against
# a stub package, then the code, installed with --no-deps. Editing service/ or trainer/
# rebuilds only the last small layers; editing pyproject.toml reinstalls dependencies.
#
# Base images are pinned by tag; pin by digest too (image@sha256:...) for byte-for-byte
# reproducible builds in your registry.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# Torch wheels from PyPI bring their own CUDA user-space libraries; the cuDNN runtime image
# serves onnxruntime-gpu (CUDA 12, cuDNN 9) for re-embedding on the GPU. The host needs an
# NVIDIA driver recent enough for both, and the NVIDIA Container Toolkit.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

# ----------------------------------------------------------------------------------------
# api: dependencies (stub package, pyproject.toml only)
# ----------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS api-deps
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
 && pip install pip==26.3 setuptools==84.2.1 wheel==0.48.0
WORKDIR /build
COPY pyproject.toml ./
# A stub of the package lets pip resolve the `serving` extra from pyproject.toml alone;
# the stub itself is removed so that only the dependencies stay in this layer.
RUN mkdir -p service trainer \
 && touch service/__init__.py trainer/__init__.py README.md \
 && pip install --no-build-isolation ".[serving]" \
 && pip uninstall -y simclr-embed \
 && rm -rf /build/*

# ----------------------------------------------------------------------------------------
# api: the API server alone (FastAPI + ONNX Runtime CPU + FAISS). No torch.
# ----------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS api
ARG APP_UID=10001
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid ${APP_UID} simclr \
 && useradd --system --uid ${APP_UID} --gid simclr --create-home --home-dir /home/simclr --shell /usr/sbin/nologin simclr \
 && mkdir -p /data /datasets \
 && chown simclr:simclr /data
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SIMCLR_EMBED_DATA_DIR=/data \
    SIMCLR_EMBED_HOST=0.0.0.0 \
    SIMCLR_EMBED_PORT=8000
COPY --from=api-deps /opt/venv /opt/venv
WORKDIR /opt/simclr-embed/src
COPY pyproject.toml README.md ./
COPY service ./service
COPY trainer ./trainer
RUN pip install --no-build-isolation --no-deps . \
 && rm -rf /opt/simclr-embed/src/build /opt/simclr-embed/src/*.egg-info \
 && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
WORKDIR /home/simclr
USER ${APP_UID}:${APP_UID}
VOLUME ["/data"]
EXPOSE 8000
# Liveness. docker-compose.yml checks readiness (/readyz) instead.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SIMCLR_EMBED_PORT', '8000') + '/healthz', timeout=4)"]
CMD ["simclr-embed", "serve", "--host", "0.0.0.0", "--port", "8000"]

# ----------------------------------------------------------------------------------------
# worker: CUDA runtime + Python 3.11 (deadsnakes; Ubuntu 22.04 ships 3.10)
# ----------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS worker-base
ARG APP_UID=10001
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gnupg software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv libgomp1 \
 && apt-get purge -y --auto-remove software-properties-common gnupg \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid ${APP_UID} simclr \
 && useradd --system --uid ${APP_UID} --gid simclr --create-home --home-dir /home/simclr --shell /usr/sbin/nologin simclr \
 && mkdir -p /data /datasets \
 && chown simclr:simclr /data
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SIMCLR_EMBED_DATA_DIR=/data

# ----------------------------------------------------------------------------------------
# worker: dependencies (stub package, pyproject.toml only): torch, torchvision, ONNX tools
# ----------------------------------------------------------------------------------------
FROM worker-base AS worker-deps
# serving-gpu (onnxruntime-gpu) or serving (CPU onnxruntime): exactly one of them, never both.
ARG WORKER_EXTRAS=serving-gpu,training
RUN python3.11 -m venv /opt/venv \
 && pip install pip==26.3 setuptools==84.2.1 wheel==0.48.0
WORKDIR /build
COPY pyproject.toml ./
RUN mkdir -p service trainer \
 && touch service/__init__.py trainer/__init__.py README.md \
 && pip install --no-build-isolation ".[${WORKER_EXTRAS}]" \
 && pip uninstall -y simclr-embed \
 && rm -rf /build/*

# ----------------------------------------------------------------------------------------
# worker: Celery worker for the `train` (GPU pretraining) and `index` (re-embedding) queues
# ----------------------------------------------------------------------------------------
FROM worker-base AS worker
ARG APP_UID=10001
COPY --from=worker-deps /opt/venv /opt/venv
WORKDIR /opt/simclr-embed/src
COPY pyproject.toml README.md ./
COPY service ./service
COPY trainer ./trainer
RUN pip install --no-build-isolation --no-deps . \
 && rm -rf /opt/simclr-embed/src/build /opt/simclr-embed/src/*.egg-info
# Multi-node training entry point (deploy/README.md).
COPY --chmod=0755 deploy/torchrun-multinode.sh /usr/local/bin/simclr-embed-torchrun
WORKDIR /home/simclr
USER ${APP_UID}:${APP_UID}
VOLUME ["/data"]
# A worker that cannot reach its broker gets no work: check the broker connection.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, kombu; c = kombu.Connection(os.environ.get('SIMCLR_EMBED_BROKER_URL') or 'redis://redis:6379/0', connect_timeout=5); c.ensure_connection(max_retries=1); c.release()"]
CMD ["simclr-embed", "worker", "--queues", "train,index"]
