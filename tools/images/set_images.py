"""Point an install at a registry and tag: rewrite the `images:` of a kustomization in place.

    python tools/images/set_images.py controller/manifests/kustomization.yaml myacr.azurecr.io/kaiflow 0.2.0

Only the newName/newTag lines of kaiflow's three images change (comments and the rest stay); the
controller Deployment and the kaiflow-images ConfigMap (what the rendered Workflows and the chat
Deployments run) follow from that one list (controller/manifests/images-config.yaml).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

NAMES = ("kaiflow-controller", "kaiflow-pipeline", "kaiflow-chat")
_ENTRY = re.compile(r"(?P<head>- name: \S*/(?P<image>kaiflow-[a-z]+)\n)(?P<indent>\s+)newName: \S+\n\s+newTag: \S+\n")


def set_images(text: str, registry: str, tag: str) -> str:
    registry = registry.rstrip("/")
    if not registry or ":" in registry.rsplit("/", 1)[-1] or not re.fullmatch(r"[\w.\-]+", tag):
        raise ValueError(f"registry {registry!r} / tag {tag!r}: expected e.g. myacr.azurecr.io/kaiflow and 0.2.0")
    seen = []

    def replace(m: re.Match) -> str:
        seen.append(m["image"])
        return f'{m["head"]}{m["indent"]}newName: {registry}/{m["image"]}\n{m["indent"]}newTag: "{tag}"\n'

    out = _ENTRY.sub(replace, text)
    if sorted(seen) != sorted(NAMES):
        raise ValueError(f"expected images {NAMES} in the kustomization, found {seen}")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    path = Path(argv[0])
    path.write_text(set_images(path.read_text(), argv[1], argv[2]))
    print(f"{path}: images from {argv[1]} with tag {argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
