# The kaiflow pipeline image: every DAG step (`python -m steps.<name> ...`) runs in it.
# Built elsewhere (CI with Docker); no container engine runs on the development machines:
#   docker build -t ghcr.io/kaiflow/kaiflow-pipeline:0.1.0 .
# then point an install at it with KAIFLOW_PIPELINE_IMAGE (see docs/pipelines.md).
#
# The dependency list below mirrors pyproject.toml ([project] dependencies and the ml, oci, serve,
# controller and azure extras); tests/test_dockerfile.py fails when the two drift. They are
# installed before the source is copied so that a code change does not reinstall torch.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

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

# kaiflow dependencies (keep in step with pyproject.toml)
RUN pip install \
    "pydantic>=2.14" \
    "pyyaml>=6.0" \
    "hera>=7.1.0,<8" \
    "rich>=15.0" \
    "httpx>=0.28" \
    "croniter>=7.0" \
    "pyarrow>=26.0" \
    "numpy>=2.0" \
    "tenacity>=9.2" \
    "requests>=2.32" \
    "urllib3>=2.0" \
    "transformers>=5.24" \
    "peft>=0.21" \
    "trl>=1.16" \
    "bitsandbytes>=0.50.2" \
    "datasets>=5.2" \
    "accelerate>=1.15" \
    "gguf>=0.19" \
    "safetensors>=0.5" \
    "tokenizers>=0.22" \
    "matplotlib>=3.11" \
    "psutil>=5.9" \
    "oras>=0.2.43,<0.3" \
    "bentoml>=1.4.40" \
    "starlette>=0.40" \
    "prometheus-client>=0.20" \
    "kopf>=1.45" \
    "kubernetes>=37.0" \
    "azure-mgmt-containerservice>=41.8" \
    "azure-identity>=1.27" \
    "azure-core>=1.35"

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
 && python -c "import stepkit.common, pipelines, api, presets"

# Ubuntu 24.04 images already have a user `ubuntu` with uid/gid 1000: remove it so kaiflow gets that
# uid, which the rendered Workflows' securityContext (runAsUser, fsGroup) names (pipelines/images.py).
ARG KAIFLOW_UID=1000
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && groupadd --gid ${KAIFLOW_UID} kaiflow \
 && useradd --uid ${KAIFLOW_UID} --gid ${KAIFLOW_UID} --create-home kaiflow
USER ${KAIFLOW_UID}
WORKDIR /home/kaiflow
ENV HF_HOME=/home/kaiflow/.cache/huggingface
CMD ["python", "-m", "kaiflow.cli", "--help"]
