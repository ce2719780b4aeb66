# kaiflow's three images, one Dockerfile, one stage each (`make images REGISTRY=... TAG=...`):
#
#   pipeline    every DAG step (`python -m steps.<name> ...`): CUDA, torch and the ML stack
#   serving     the chat service the deploy step rolls out (`bentoml serve serving_bento.service:KaiflowChat`);
#               the pipeline stage with its own entry point: the CUDA + torch layers are shared, so a
#               GPU node that ran the tune pod already holds most of it
#   controller  the operator (`python -m controller`): no torch, no CUDA, a slim Python base
#
# Built elsewhere (CI with Docker); no container engine runs on the development machines.
# Each stage installs the requirements tools/images/requirements.py reads from pyproject.toml
# (core dependencies plus the extras named), so the versions cannot drift from pyproject.toml
# (tests/test_dockerfile.py). They are installed before the source is copied so that a code
# change does not reinstall torch. All three run as uid 1000: the rendered Workflows, the chat
# Deployment and the controller Deployment name that uid (pipelines/images.py,
# steps/deploy/manifests.py, controller/manifests/system/deployment.yaml).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG SLIM_IMAGE=python:3.12-slim-bookworm
ARG KAIFLOW_UID=1000

# ---- pipeline ------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS pipeline
ARG KAIFLOW_UID
# torch: the CUDA build of the version pyproject.toml pins for CPU machines.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BENTOML_DO_NOT_TRACK=True \
    HF_HUB_DISABLE_TELEMETRY=1 \
    VIRTUAL_ENV=/opt/kaiflow \
    PATH=/opt/kaiflow/bin:$PATH

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/kaiflow \
 && ln -sf /opt/kaiflow/bin/python /usr/local/bin/python

RUN pip install --index-url ${TORCH_INDEX_URL} "torch==${TORCH_VERSION}"

# kaiflow's dependencies, as pyproject.toml names them (torch==2.13.0 is already satisfied by the
# CUDA build above: 2.13.0+cu128 matches the pin).
COPY pyproject.toml tools/images/requirements.py /opt/kaiflow-build/
RUN python /opt/kaiflow-build/requirements.py /opt/kaiflow-build/pyproject.toml ml oci serve controller azure \
      > /opt/kaiflow-build/requirements.txt \
 && pip install -r /opt/kaiflow-build/requirements.txt

WORKDIR /opt/kaiflow-src
COPY pyproject.toml README.md ./
COPY api ./api
COPY presets ./presets
COPY stepkit ./stepkit
COPY steps ./steps
COPY pipelines ./pipelines
COPY local_runner ./local_runner
COPY controller ./controller
COPY serving_bento ./serving_bento
COPY kaiflow ./kaiflow
# --no-deps: everything was installed above; this adds kaiflow's own packages only.
RUN pip install --no-deps . \
 && python -c "import stepkit.common, pipelines, api, presets, serving_bento.service"

# Ubuntu 24.04 images already have a user `ubuntu` with uid/gid 1000: remove it so kaiflow gets that
# uid, which the rendered Workflows' securityContext (runAsUser, fsGroup) names (pipelines/images.py).
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && groupadd --gid ${KAIFLOW_UID} kaiflow \
 && useradd --uid ${KAIFLOW_UID} --gid ${KAIFLOW_UID} --create-home kaiflow
USER ${KAIFLOW_UID}
WORKDIR /home/kaiflow
ENV HF_HOME=/home/kaiflow/.cache/huggingface
CMD ["python", "-m", "kaiflow.cli", "--help"]

# ---- serving -------------------------------------------------------------------------------------
# The Deployment (steps/deploy/manifests.py) runs this command with runAsUser 1000, a read-only root
# filesystem and HF_HOME/BENTOML_HOME on an emptyDir; its init container runs steps.pull_adapters
# from the same image.
FROM pipeline AS serving
EXPOSE 3000
CMD ["bentoml", "serve", "serving_bento.service:KaiflowChat", "--host", "0.0.0.0", "--port", "3000"]

# ---- controller ----------------------------------------------------------------------------------
FROM ${SLIM_IMAGE} AS controller
ARG KAIFLOW_UID
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/kaiflow \
    PATH=/opt/kaiflow/bin:$PATH
RUN python -m venv /opt/kaiflow
# core dependencies + kopf/kubernetes + the Azure SDK (its finalizer releases AKS agent pools);
# no ml, oci or serve extra: tests/test_dockerfile.py runs the entry point with those absent.
COPY pyproject.toml tools/images/requirements.py /opt/kaiflow-build/
RUN python /opt/kaiflow-build/requirements.py /opt/kaiflow-build/pyproject.toml controller azure \
      > /opt/kaiflow-build/requirements.txt \
 && pip install -r /opt/kaiflow-build/requirements.txt
WORKDIR /opt/kaiflow-src
COPY pyproject.toml README.md ./
COPY api ./api
COPY presets ./presets
COPY stepkit ./stepkit
COPY steps ./steps
COPY pipelines ./pipelines
COPY local_runner ./local_runner
COPY controller ./controller
COPY serving_bento ./serving_bento
COPY kaiflow ./kaiflow
RUN pip install --no-deps . \
 && python -c "import controller.operator, steps.provision.release; import sys; assert 'torch' not in sys.modules"
RUN groupadd --gid ${KAIFLOW_UID} kaiflow \
 && useradd --uid ${KAIFLOW_UID} --gid ${KAIFLOW_UID} --create-home kaiflow
USER ${KAIFLOW_UID}
WORKDIR /home/kaiflow
CMD ["python", "-m", "controller"]
