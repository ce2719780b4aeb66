"""The Dockerfile's three stages, tested without a container engine (none runs here).

What is checked: each stage installs what pyproject.toml names (through tools/images/requirements.py,
so versions cannot drift), torch is the pinned version from a CUDA index, every package is copied,
every stage runs as the uid the manifests name, `make images` builds each stage under the name the
install uses, and each stage's entry point imports with only the packages that stage installs: the
controller's closure (run in a subprocess where the ML, OCI and serving packages cannot be
imported) never loads torch. What is not checked: that `docker build` succeeds (no engine), that
the CUDA base image and wheels exist on their registries, the images' sizes.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str):
    """A script of tools/images/ (not a package: the Dockerfile runs it on a bare Python)."""
    spec = importlib.util.spec_from_file_location(f"kaiflow_tools_{name}", ROOT / "tools" / "images" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


requirements = _tool("requirements").requirements
set_images = _tool("set_images").set_images

STAGES = ("pipeline", "serving", "controller")
# what the install calls each stage's image (controller/manifests/kustomization.yaml, pipelines/images.py)
IMAGE_NAMES = {"pipeline": "kaiflow-pipeline", "serving": "kaiflow-chat", "controller": "kaiflow-controller"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def _stages() -> dict[str, str]:
    """Stage name -> its text (FROM line to the next FROM)."""
    parts = re.split(r"^(?=FROM )", _dockerfile(), flags=re.MULTILINE)
    found = {}
    for part in parts[1:]:
        match = re.match(r"FROM (\S+) AS (\S+)", part)
        assert match, part.splitlines()[0]
        found[match.group(2)] = part
    return found


def _parent(stage: str) -> str:
    return re.match(r"FROM (\S+)", _stages()[stage]).group(1)


def _with_parents(stage: str) -> str:
    text = _stages()[stage]
    parent = _parent(stage)
    return (_with_parents(parent) + text) if parent in _stages() else text


def _arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)", _dockerfile(), re.MULTILINE)
    assert match, f"Dockerfile has no ARG {name}"
    return match.group(1)


def _extras(stage: str) -> list[str]:
    """The extras a stage (with its parents) installs via tools/images/requirements.py."""
    text = _with_parents(stage).replace("\\\n", " ")
    calls = re.findall(r"requirements\.py \S+pyproject\.toml ([a-z ]+?)\s*>", text)
    assert calls, f"stage {stage} installs no requirements from pyproject.toml"
    return [e for call in calls for e in call.split()]


def _cmd(stage: str) -> list[str]:
    cmds = re.findall(r"^CMD (\[.*\])$", _with_parents(stage), re.MULTILINE)
    assert cmds, f"stage {stage} has no CMD"
    return yaml.safe_load(cmds[-1])


def test_the_three_stages_exist():
    assert set(STAGES) <= set(_stages())
    assert _parent("serving") == "pipeline"  # shares the CUDA + torch layers
    assert "CUDA" not in _parent("controller").upper() and "SLIM" in _parent("controller").upper()


def test_each_stage_installs_pyprojects_requirements_and_the_helper_reads_them_exactly():
    project = _pyproject()["project"]
    assert _extras("pipeline") == ["ml", "oci", "serve", "controller", "azure"]
    assert _extras("controller") == ["controller", "azure"]
    for stage in STAGES:
        wanted = list(project["dependencies"])
        for extra in _extras(stage):
            wanted += project["optional-dependencies"][extra]
        got = requirements((ROOT / "pyproject.toml").read_text(), _extras(stage))
        assert [Requirement(r) for r in got] == [Requirement(r) for r in dict.fromkeys(wanted)]
    assert "COPY pyproject.toml tools/images/requirements.py" in _stages()["pipeline"]
    assert "COPY pyproject.toml tools/images/requirements.py" in _stages()["controller"]
    assert not re.search(r'pip install[^\n]*"(?!torch)[a-z-]+[<>=]', _dockerfile()), "a hand-written requirement"


def test_dockerfile_torch_is_the_pinned_version_from_a_cuda_index():
    pinned = next(r for r in _pyproject()["project"]["optional-dependencies"]["ml"] if r.startswith("torch"))
    assert pinned == f"torch=={_arg('TORCH_VERSION')}"
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", _arg("TORCH_INDEX_URL"))
    assert "pip install --index-url" not in _stages()["controller"] and "TORCH" not in _stages()["controller"]
    assert "ml" not in _extras("controller")


def test_dockerfile_copies_every_package_pyproject_ships():
    includes = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    for stage in ("pipeline", "controller"):
        copied = set(re.findall(r"^COPY (\S+) \./", _stages()[stage], re.MULTILINE))
        for pattern in includes:
            package = pattern.rstrip("*")
            assert package in copied, f"stage {stage} does not COPY {package}/"
            assert (ROOT / package).is_dir()
        assert "pip install --no-deps ." in _stages()[stage]


def test_every_stage_runs_as_the_uid_the_manifests_name():
    from pipelines.images import PIPELINE_UID, Images
    from steps.deploy.manifests import RUN_AS_USER

    controller = yaml.safe_load((ROOT / "controller/manifests/system/deployment.yaml").read_text())
    controller_uid = controller["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert int(_arg("KAIFLOW_UID")) == PIPELINE_UID == Images().pipeline_uid == RUN_AS_USER == controller_uid
    for stage in STAGES:
        assert re.search(r"^USER \$\{KAIFLOW_UID\}$", _with_parents(stage), re.MULTILINE), stage
    # the CUDA base's own uid-1000 user is removed first, else useradd --uid 1000 fails
    assert "userdel --remove ubuntu" in _stages()["pipeline"]


def test_the_stage_commands_are_what_the_manifests_run():
    from steps.deploy.manifests import BENTO_PORT, SERVICE_IMPORT

    assert _cmd("serving") == ["bentoml", "serve", SERVICE_IMPORT, "--host", "0.0.0.0", "--port", str(BENTO_PORT)]
    controller = yaml.safe_load((ROOT / "controller/manifests/system/deployment.yaml").read_text())
    (container,) = controller["spec"]["template"]["spec"]["containers"]
    assert _cmd("controller") == container["command"] == ["python", "-m", "controller"]
    assert container["image"].rsplit(":", 1)[0].endswith("/" + IMAGE_NAMES["controller"])


# Packages of the extras a stage does not install: importing one there fails, as it would in the image.
_BLOCK = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = set(sys.argv[1].split(","))
    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r} (not installed in this image stage)")
            return None
    sys.meta_path.insert(0, Absent())
    sys.argv = sys.argv[2:]
""")
NOT_IN_CONTROLLER = ("torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate", "gguf",
                     "safetensors", "tokenizers", "matplotlib", "oras", "bentoml", "starlette", "prometheus_client")


def _run_in_stage(blocked: tuple[str, ...], code: str, *argv: str) -> subprocess.CompletedProcess[str]:
    script = _BLOCK + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script, ",".join(blocked) or "-", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", "KUBECONFIG": "/nonexistent"})


def test_the_controller_stage_entry_point_imports_without_torch_or_the_ml_stack():
    result = _run_in_stage(NOT_IN_CONTROLLER, """
        import runpy, sys
        sys.argv = ["controller", "--help"]
        try:
            runpy.run_module("controller", run_name="__main__")
        except SystemExit as exc:
            assert exc.code in (0, None), exc.code
        # what the operator loads when it starts and when its finalizer releases nodes
        import controller.operator, controller.status, controller.decide
        import steps.provision.release, steps.provision.karpenter, steps.provision.aks
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "pyarrow", "transformers"))
        print("HEAVY", heavy)
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "usage" in result.stdout.lower()
    assert "HEAVY []" in result.stdout, result.stdout[-500:]


def test_the_pipeline_and_serving_entry_points_import():
    result = _run_in_stage((), """
        import importlib
        for module in ("kaiflow.cli", "serving_bento.service", "steps.tune", "steps.fetch_dataset", "steps.deploy",
                       "steps.provision", "steps.push_adapter", "steps.pull_adapters", "steps.eval_gate",
                       "steps.smoke_test"):
            importlib.import_module(module)
        print("OK")
    """)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_make_images_builds_each_stage_under_the_installs_name_and_push_pushes_them():
    out = subprocess.run(["make", "-n", "images", "push", "REGISTRY=myacr.azurecr.io/kaiflow", "TAG=0.2.0"], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=60).stdout
    for stage, name in IMAGE_NAMES.items():
        assert f"{stage}) name={name};;" in out
    assert "docker build  --target $stage -t myacr.azurecr.io/kaiflow/$name:0.2.0 ." in out
    assert "docker push myacr.azurecr.io/kaiflow/$name:0.2.0" in out
    for name in IMAGE_NAMES.values():
        assert name in out


def test_set_images_reaches_the_controller_the_workflows_and_the_chat_deployments(tmp_path):
    """One place: the kustomization's images; kubectl's kustomize carries it to the ConfigMap too."""
    import shutil

    manifests = tmp_path / "manifests"
    shutil.copytree(ROOT / "controller" / "manifests", manifests)
    kustomization = manifests / "kustomization.yaml"
    kustomization.write_text(set_images(kustomization.read_text(), "myacr.azurecr.io/kaiflow", "0.2.0"))
    out = subprocess.run(["/usr/bin/kubectl", "kustomize", str(manifests)], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    (images,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("kaiflow-images")]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == \
        "myacr.azurecr.io/kaiflow/kaiflow-controller:0.2.0"
    assert images["data"]["KAIFLOW_PIPELINE_IMAGE"] == "myacr.azurecr.io/kaiflow/kaiflow-pipeline:0.2.0"
    assert images["data"]["KAIFLOW_SERVING_IMAGE"] == "myacr.azurecr.io/kaiflow/kaiflow-chat:0.2.0"
    # and what the controller renders from that ConfigMap
    from pipelines.images import Images

    rendered = Images.from_env(images["data"])
    assert (rendered.pipeline, rendered.serving) == ("myacr.azurecr.io/kaiflow/kaiflow-pipeline:0.2.0",
                                                      "myacr.azurecr.io/kaiflow/kaiflow-chat:0.2.0")
    with pytest.raises(ValueError):
        set_images(kustomization.read_text(), "myacr.azurecr.io/kaiflow", "bad tag")
