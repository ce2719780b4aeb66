"""``python -m steps.deploy --mode local``: the chat service on this machine (``kaiflow run``).

The adapters the earlier tasks pulled lie in ``--adapters-dir`` (one folder per adapter); the
service is started by :mod:`steps.deploy.local_service` and outlives the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from presets.catalog import UnknownPresetError, get_preset
from stepkit.common import StepError
from steps.deploy.local_service import start_local


@dataclass(frozen=True)
class LocalOptions:
    adapters_dir: str = field(default="", metadata={"help": "folder of pulled adapters (<dir>/<name>)"})
    workdir: str = field(default=".kaiflow/serve", metadata={"help": "where service.json and the log go"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=0, metadata={"help": "port; 0 picks a free one"})
    engine: str = field(default="batching", metadata={"help": "generate loop: batching or naive",
                                                      "choices": ("batching", "naive")})


def local_adapters(strengths: dict[str, float], adapters_dir: str) -> list[dict[str, Any]]:
    """The KAIFLOW_ADAPTERS list: every adapter named in ``strengths``, or all under the folder."""
    if not adapters_dir:
        if strengths:
            raise StepError("--adapter needs --adapters-dir in local mode (where the pulled adapters are)")
        return []
    root = Path(adapters_dir)
    if not root.is_dir():
        raise StepError(f"--adapters-dir {root}: no such folder")
    names = list(strengths) or sorted(p.name for p in root.iterdir() if (p / "adapter_config.json").is_file())
    if not names:
        raise StepError(f"--adapters-dir {root}: holds no adapter folders (with adapter_config.json)")
    adapters = []
    for name in names:
        path = root / name
        if not (path / "adapter_config.json").is_file():
            raise StepError(f"--adapter {name}: {path} holds no adapter_config.json")
        adapters.append({"name": name, "path": str(path.resolve()), "strength": strengths.get(name, 1.0)})
    return adapters


def deploy_local(workspace_name: str, preset: str, strengths: dict[str, float], options: LocalOptions,
                 ready_timeout: float) -> str:
    """Start (or replace) the local service; its URL once ``/readyz`` answers."""

    if not Path(preset).is_dir():
        try:
            get_preset(preset)
        except UnknownPresetError as exc:
            raise StepError(f"--preset: {exc}") from None
    service = start_local(preset, options.workdir, adapters=local_adapters(strengths, options.adapters_dir),
                          host=options.host, port=options.port, engine=options.engine, ready_timeout=ready_timeout,
                          workspace_name=workspace_name)
    return service.url
