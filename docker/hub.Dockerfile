# syntax=docker/dockerfile:1
# LoRA Enclave hub image: JupyterHub + configurable-http-proxy + the runs and audit services,
# and (compose, one GPU server) the users' single-user servers and kernels, which the local
# GPU spawner starts inside this container as each user's uid. See docs/deploy.md.
#
#   docker build -f docker/hub.Dockerfile -t lora-enclave/hub:0.1.0 \
#     --build-arg TORCH_SPEC="torch==2.13.0" \
#     --build-arg TORCH_INDEX_URL=https://pypi-mirror.example.internal/whl/cu128 .
#
# The build context is the repository root (docker/hub.Dockerfile.dockerignore keeps .venv,
# node_modules, homes and state out of it).
#
# Base image, pinned by digest so that a rebuild starts from the same bytes. The digest below
# was NOT resolved from this repository's CI (no registry access there): refresh it on a machine
# that can reach your registry mirror, before the first build and whenever Debian publishes
# security updates:
#   docker buildx imagetools inspect debian:bookworm-slim --format '{{json .Manifest.Digest}}'
# then update BASE_IMAGE here and in docker/singleuser.Dockerfile (or pass
# --build-arg BASE_IMAGE=registry.example.internal/debian:bookworm-slim@sha256:<digest>).
ARG BASE_IMAGE=debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
# Wheel and npm mirrors inside the enclave (nothing here reaches the internet by itself).
ARG PIP_INDEX_URL=
ARG NPM_CONFIG_REGISTRY=
# Same knobs as the Makefile: CPU torch by default, a CUDA build for GPU servers.
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=
ENV PIP_INDEX_URL=${PIP_INDEX_URL} NPM_CONFIG_REGISTRY=${NPM_CONFIG_REGISTRY} \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv make nodejs npm \
      ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/lora-enclave
COPY Makefile pyproject.toml requirements.lock.txt README.md ./
COPY lora_kernel/ lora_kernel/
COPY hub/ hub/
COPY notebooks/ notebooks/
COPY templates/ templates/
COPY policies/ policies/
# `make setup`: the venv from Debian's python3.11, torch (TORCH_SPEC / TORCH_INDEX_URL), the
# pinned requirements, the package (editable, as in a checkout), the `lora` kernelspec and the
# pinned configurable-http-proxy.
RUN make setup SYSTEM_PYTHON=/usr/bin/python3.11 TORCH_SPEC="${TORCH_SPEC}" \
      TORCH_INDEX_URL="${TORCH_INDEX_URL}" \
 && find /opt/lora-enclave -name __pycache__ -prune -exec rm -rf {} + \
 && chmod -R go-w,a+rX /opt/lora-enclave

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="lora-enclave-hub" \
      org.opencontainers.image.description="LoRA Enclave: JupyterHub, GPU spawner, runs and audit services" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
# Runtime only: the interpreter the venv was built from, node for the proxy, PAM (in the base),
# tini as PID 1 (reaps the kernels' orphans, forwards signals). No compilers, no npm, no pip
# caches.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 nodejs tini ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/lora-enclave /opt/lora-enclave
COPY docker/entrypoint-hub.sh /usr/local/bin/entrypoint-hub.sh
# (permissions set in the build stage: a chmod -R here would copy the venv into a
# second layer). The service account has a fixed uid: docker/k8s/services.yaml runs the runs and
# audit services as 990 directly.
RUN chmod 0755 /usr/local/bin/entrypoint-hub.sh \
 && mkdir -p /var/lib/lora-enclave /srv/lora-enclave/hub /srv/lora-enclave/models \
 && useradd --system --uid 990 --user-group --no-create-home --shell /usr/sbin/nologin lora-svc
WORKDIR /opt/lora-enclave
# Production defaults: PAM users; the hub listens on every interface of the container (the
# compose network is internal: only the gateway reaches it). Override in compose.yaml.
ENV LORA_HUB_AUTH=pam \
    LORA_HUB_IP=0.0.0.0 \
    LORA_HUB_PORT=8000 \
    LORA_STATE=/var/lib/lora-enclave \
    LORA_HUB_DIR=/srv/lora-enclave/hub \
    LORA_SERVICE_USER=lora-svc \
    PATH=/opt/lora-enclave/.venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
VOLUME ["/var/lib/lora-enclave", "/srv/lora-enclave/hub"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["/opt/lora-enclave/.venv/bin/python", "-c", "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8000/hub/health', timeout=4); sys.exit(0)"]
# The hub runs as root: PAM, per-user uids for servers and runs, the service account's state.
USER root
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/entrypoint-hub.sh"]
