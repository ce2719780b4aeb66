"""Reading Workspace files as users keep them, refusing what YAML would otherwise let slip.

PyYAML's ``safe_load`` keeps the last of two equal keys without a word, decodes whatever bytes it
is given, recurses without limit and expands aliases into shared objects that a walk then
multiplies. A Workspace file is small and flat, so this reader refuses, naming the line:

* bytes that are not UTF-8 (Kubernetes reads UTF-8 only);
* a mapping with the same key twice;
* nesting deeper than ``MAX_DEPTH`` or more than ``MAX_NODES`` values (aliases counted each time
  they are used), and files over ``MAX_FILE_BYTES``.

A file holds one or more Workspaces and the ConfigMaps and PersistentVolumeClaims they use
(``COMPANION_KINDS``), and Secrets as Kaito's gated-model examples carry them: kaiflow never
reads a Secret's data, it passes the document through to what ``kaiflow render`` prints (as
``kubectl apply`` would create it) and references the Secret by name everywhere else.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# etcd stores a Workspace as one object of at most 1.5 MiB: no larger file could be applied anyway.
MAX_FILE_BYTES = 1536 * 1024
MAX_DEPTH = 32
MAX_NODES = 20_000
COMPANION_KINDS = ("ConfigMap", "PersistentVolumeClaim")


class DocumentError(ValueError):
    """The file cannot be read as Workspace YAML; the message names the line where it can."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise DocumentError(
                    f"line {line}: duplicate key {key!r} (first at line {seen[key]}); YAML would silently keep only the last"
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _check_shape(document: Any, index: int) -> None:
    count = 0
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise DocumentError(f"document {index}: more than {MAX_NODES} values (aliases included); not a Workspace file")
        if depth > MAX_DEPTH:
            raise DocumentError(f"document {index}: nested deeper than {MAX_DEPTH} levels; not a Workspace file")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def parse_documents(data: bytes | str) -> list[Any]:
    """Every non-empty YAML document in ``data``; DocumentError for anything refused above."""
    if isinstance(data, bytes):
        if len(data) > MAX_FILE_BYTES:
            raise DocumentError(f"file is {len(data)} bytes, over the {MAX_FILE_BYTES}-byte limit for a Workspace file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise DocumentError(f"line {line}: not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") from None
    else:
        text = data
    limit = sys.getrecursionlimit()
    try:
        # The composer recurses once per nesting level; the shape check below gives the message.
        sys.setrecursionlimit(max(limit, 10_000))
        documents = [d for d in yaml.load_all(text, Loader=_UniqueKeyLoader) if d is not None]
    except RecursionError:
        raise DocumentError(f"nested deeper than {MAX_DEPTH} levels; not a Workspace file") from None
    except yaml.YAMLError as exc:
        raise DocumentError(f"not valid YAML: {exc}") from None
    finally:
        sys.setrecursionlimit(limit)
    for i, document in enumerate(documents, 1):
        _check_shape(document, i)
    return documents


def read_source(source: str | Path) -> tuple[bytes, str]:
    """(bytes, display name) of a file, or of standard input for ``-``."""
    if str(source) == "-":
        return sys.stdin.buffer.read(), "<stdin>"
    path = Path(source)
    try:
        return path.read_bytes(), str(path)
    except OSError as exc:
        raise DocumentError(f"cannot read file: {exc.strerror}") from None


@dataclass
class Bundle:
    """A file's Workspaces with their companion ConfigMaps/PVCs, and the warnings validation gave."""

    source: str
    workspaces: list[Any] = field(default_factory=list)
    companions: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[Any] = field(default_factory=list)
    # Secrets of the file, passed through untouched (never logged); ``kaiflow render`` prints them first.
    secrets: list[dict[str, Any]] = field(default_factory=list)

    def config_map(self, name: str | None) -> dict[str, Any] | None:
        if not name:
            return None
        for doc in self.companions:
            if doc.get("kind") == "ConfigMap" and (doc.get("metadata") or {}).get("name") == name:
                return doc
        return None

    def companions_for(self, workspace: Any) -> list[dict[str, Any]]:
        """The companions a Workspace uses: its config ConfigMap and the PVCs its volumes claim."""
        spec = workspace.tuning or workspace.inference
        wanted_maps = {getattr(spec, "config", None)}
        claims = set()
        if workspace.tuning is not None:
            for volume in (workspace.tuning.input.volume_source, workspace.tuning.output.volume_source):
                claim = (volume or {}).get("persistentVolumeClaim") or {}
                if claim.get("claimName"):
                    claims.add(claim["claimName"])
        chosen = []
        for doc in self.companions:
            name = (doc.get("metadata") or {}).get("name")
            if (doc["kind"] == "ConfigMap" and name in wanted_maps) or (doc["kind"] == "PersistentVolumeClaim" and name in claims):
                chosen.append(doc)
        return chosen
