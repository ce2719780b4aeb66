"""The ``local`` provider: nothing to create — report this host as the one node.

Used by ``kaiflow run`` on a laptop. It checks nothing it cannot honour: a requested instance
type, node count or labels are logged and ignored, because the demo runs on whatever machine it
is given. GPUs are found with ``nvidia-smi`` when it is on PATH, else with ``torch.cuda`` when
torch is importable and a GPU driver's device files exist (torch is imported here only, and only
then, so the step takes a fraction of a second on a CPU laptop).
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import socket
import subprocess
from typing import Any

from steps.provision.base import Provider, ProvisionResult

log = logging.getLogger("kaiflow.steps.provision.local")


def host_report() -> dict[str, Any]:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return {
        "hostname": socket.gethostname(),
        "cpus": cpus,
        "memory_gib": round(memory / 2**30, 1),
        "gpus": gpus(),
    }


def gpus() -> list[dict[str, Any]]:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout
            found = []
            for line in out.splitlines():
                name, _, mib = line.rpartition(",")
                if name.strip():
                    found.append({"name": name.strip(), "memory_gib": round(float(mib) / 1024, 1)})
            return found
        except (subprocess.SubprocessError, OSError, ValueError) as exc:
            log.warning("nvidia-smi failed (%s); trying torch", exc)
    # Importing torch costs seconds; without a GPU driver's device files it cannot find one.
    if not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")):
        return []
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [
        {"name": torch.cuda.get_device_name(i),
         "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
        for i in range(torch.cuda.device_count())
    ]


class LocalProvider(Provider):
    name = "local"

    def provision(self) -> ProvisionResult:
        config = self.config
        if config.count > 1:
            log.warning("local provider: --count %d asked, this host is the one node", config.count)
        if config.instance_type:
            log.info("local provider: ignoring --instance-type %s (runs on this host)", config.instance_type)
        if config.labels:
            log.info("local provider: ignoring node labels %s", config.label_selector)
        report = host_report()
        gpu_text = ", ".join(g["name"] for g in report["gpus"]) or "no GPU"
        log.info("local node %s: %d CPUs, %.1f GiB memory, %s",
                 report["hostname"], report["cpus"], report["memory_gib"], gpu_text)
        return ProvisionResult(provider=self.name, nodes=[report["hostname"]], details={"host": report})
