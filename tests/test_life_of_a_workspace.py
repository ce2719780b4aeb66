"""docs/design/life-of-a-workspace.md stays true: every ``file:function`` it names exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAP = ROOT / "docs" / "design" / "life-of-a-workspace.md"
HOP = re.compile(r"`([\w/]+\.py):([\w.]+)`")


def _hops() -> list[tuple[str, str]]:
    return HOP.findall(MAP.read_text())


def _module_name(path: str) -> str:
    name = path.removesuffix(".py").replace("/", ".")
    return name.removesuffix(".__init__")


def test_every_hop_of_the_map_can_be_imported():
    missing = []
    for path, qualname in _hops():
        assert (ROOT / path).is_file(), f"{path} named by the map does not exist"
        target = importlib.import_module(_module_name(path))
        for part in qualname.split("."):
            target = getattr(target, part, None)
            if target is None:
                missing.append(f"{path}:{qualname}")
                break
    assert not missing, "named by docs/design/life-of-a-workspace.md but not found: " + ", ".join(missing)


def test_the_map_covers_every_step_and_both_ends():
    paths = {path for path, _ in _hops()}
    steps = {p.stem for p in (ROOT / "steps").iterdir() if not p.name.startswith(("_", "."))}
    named = {Path(p).parts[1].removesuffix(".py") for p in paths if p.startswith("steps/")}
    assert named == steps
    assert {"api/crd.py", "controller/operator.py", "controller/decide.py", "pipelines/dags.py",
            "serving_bento/openai_api.py", "controller/status.py"} <= paths
