# syntax=docker/dockerfile:1
# LoRA Enclave single-user image (Kubernetes: KubeSpawner servers and the runs service's Jobs,
# docker/k8s/values.yaml, hub/k8s_backend.py): jupyterhub-singleuser with only the guarded
# `lora` kernel, CUDA torch, running as a non-root user. See docs/deploy.md.
#
#   docker build -f docker/singleuser.Dockerfile -t lora-enclave/singleuser:0.1.0 \
#     --build-arg TORCH_SPEC="torch==2.13.0" \
#     --build-arg TORCH_INDEX_URL=https://pypi-mirror.example.internal/whl/cu128 .
#
# CUDA: the torch wheels from a CUDA index bring the CUDA runtime libraries (nvidia-* wheels);
# the node's driver comes in through the NVIDIA container toolkit / device plugin, so the base
# stays plain Debian. Without TORCH_INDEX_URL the image gets PyPI's default torch build.
#
# Base pinned by digest; refresh as described in docker/hub.Dockerfile:
#   docker buildx imagetools inspect debian:bookworm-slim --format '{{json .Manifest.Digest}}'
ARG BASE_IMAGE=debian:bookworm-slim@sha256:3783cc01769c7b2b1b83a5c5ad96c815348e28ed7da68e2e3687004faa906251

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
ARG PIP_INDEX_URL=
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=
ENV PIP_INDEX_URL=${PIP_INDEX_URL} PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv make ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/lora-enclave
COPY Makefile pyproject.toml requirements.lock.txt README.md ./
COPY lora_kernel/ lora_kernel/
COPY hub/ hub/
COPY notebooks/ notebooks/
COPY templates/ templates/
COPY policies/ policies/
# The Python half of `make setup` (no configurable-http-proxy: that is the hub's): venv, torch
# (TORCH_SPEC / TORCH_INDEX_URL), pinned requirements, the package, the `lora` kernelspec
# installed into the venv (--sys-prefix).
RUN make .venv/.setup-done SYSTEM_PYTHON=/usr/bin/python3.11 TORCH_SPEC="${TORCH_SPEC}" \
      TORCH_INDEX_URL="${TORCH_INDEX_URL}" \
 && .venv/bin/jupyter kernelspec list | grep -q '^ *lora ' \
 && find /opt/lora-enclave -name __pycache__ -prune -exec rm -rf {} + \
 && chmod -R go-w,a+rX /opt/lora-enclave

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="lora-enclave-singleuser" \
      org.opencontainers.image.description="LoRA Enclave single-user server: the guarded lora kernel, CUDA torch" \
      org.opencontainers.image.licenses="Apache-2.0"
ARG NB_USER=jovyan
ARG NB_UID=1000
ARG NB_GID=100
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 tini ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid "${NB_UID}" --gid "${NB_GID}" --create-home --shell /bin/bash "${NB_USER}"
COPY --from=build /opt/lora-enclave /opt/lora-enclave
ENV PATH=/opt/lora-enclave/.venv/bin:/usr/local/bin:/usr/bin:/bin \
    LORA_NOTEBOOKS=/opt/lora-enclave/notebooks \
    HOME=/home/${NB_USER} \
    LORA_HOME=/home/${NB_USER}/lora \
    NVIDIA_VISIBLE_DEVICES=void \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DIFFUSERS_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 WANDB_MODE=disabled
WORKDIR /home/${NB_USER}
# Non-root by default; KubeSpawner / the Jobs set the real user's uid (runAsUser).
USER ${NB_UID}:${NB_GID}
EXPOSE 8888
ENTRYPOINT ["/usr/bin/tini", "--"]
# The same restrictions the local spawner passes (hub/spawner.py get_args): only the `lora`
# kernel, no terminals; command-line options outrank the user's ~/.jupyter files.
CMD ["jupyterhub-singleuser", \
     "--config=/opt/lora-enclave/hub/singleuser/config.py", \
     "--ServerApp.kernel_spec_manager_class=hub.kernels.LoraOnlyKernelSpecManager", \
     "--MappingKernelManager.default_kernel_name=lora", \
     "--ServerApp.terminals_enabled=False"]
