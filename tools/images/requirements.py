"""Print the requirements an image stage installs, read from pyproject.toml (one per line).

    python requirements.py pyproject.toml ml oci serve controller azure > requirements.txt

The Dockerfile runs this before copying the source, so every stage installs exactly the versions
pyproject.toml names (the project's core dependencies plus the extras given) and the two cannot
drift. Standard library only: it runs on the image's bare Python (3.11+, for tomllib).
"""

from __future__ import annotations

import sys
import tomllib


def requirements(pyproject_text: str, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject_text)["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(f"unknown extra(s) {unknown}; pyproject.toml has {sorted(optional)}")
    found = list(project["dependencies"])
    for extra in extras:
        found += [r for r in optional[extra] if r not in found]
    return found


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[0], "rb") as f:
        text = f.read().decode()
    print("\n".join(requirements(text, argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
