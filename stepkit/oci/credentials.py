"""Registry credentials from a docker config file (the mounted imagePushSecret/imagePullSecret).

Credentials come only from the file given, never from ``~/.docker/config.json``; errors name the
file and the ``auths`` key, never a secret.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api.labels import DOCKER_CONFIG_SECRET_KEY
from stepkit.common import StepError

__all__ = ["Credentials", "credentials_for", "load_docker_config"]


@dataclass(frozen=True)
class Credentials:
    """One registry's entry from a docker config; secrets stay out of repr."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    registry_token: str | None = field(default=None, repr=False)

    @property
    def basic(self) -> bool:
        return bool(self.username) and self.password is not None


def _normalise_host(key: str) -> str:
    host = re.sub(r"^[a-z]+://", "", key.strip()).split("/")[0]
    return {"index.docker.io": "docker.io", "registry-1.docker.io": "docker.io"}.get(host, host)


def load_docker_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a ``.dockerconfigjson`` (or ``~/.docker/config.json``-style) file.

    A directory is taken as a mounted Secret: its ``.dockerconfigjson`` (or ``config.json``) is read.
    """
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in (DOCKER_CONFIG_SECRET_KEY, "config.json") if (path / name).is_file()]
        if not found:
            raise StepError(f"--docker-config {path}: directory without .dockerconfigjson or config.json")
        path = found[0]
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise StepError(f"--docker-config {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StepError(f"--docker-config {path}: cannot read: {exc.__class__.__name__}") from None
    except json.JSONDecodeError as exc:
        # The position only: the document holds secrets, so no excerpt of it goes into the error.
        raise StepError(f"--docker-config {path}: not valid JSON (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(document, dict) or not isinstance(document.get("auths", {}), dict):
        raise StepError(f"--docker-config {path}: expected a JSON object with an 'auths' object")
    return document


def credentials_for(document: dict[str, Any], registry: str, source: str = "docker config") -> Credentials | None:
    """The entry of ``auths`` whose key names ``registry`` (scheme, path and localhost/127.0.0.1 ignored)."""
    wanted = {_normalise_host(registry)}
    wanted |= {h.replace("localhost", "127.0.0.1") for h in wanted} | {h.replace("127.0.0.1", "localhost") for h in wanted}
    for key, entry in document.get("auths", {}).items():
        if _normalise_host(key) not in wanted:
            continue
        if not isinstance(entry, dict):
            raise StepError(f"{source}: auths[{key!r}] must be an object")
        if entry.get("registrytoken"):
            return Credentials(registry_token=str(entry["registrytoken"]))
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                raise StepError(f"{source}: auths[{key!r}].auth is not base64 of 'username:password'") from None
            username, sep, password = decoded.partition(":")
            if not sep:
                raise StepError(f"{source}: auths[{key!r}].auth decodes to no 'username:password' pair")
            return Credentials(username=username, password=password)
        if entry.get("identitytoken"):
            # ACR/`docker login` refresh tokens: sent as the password of the token request.
            return Credentials(username=entry.get("username") or "00000000-0000-0000-0000-000000000000",
                               password=str(entry["identitytoken"]))
        if entry.get("username") and entry.get("password") is not None:
            return Credentials(username=str(entry["username"]), password=str(entry["password"]))
        raise StepError(f"{source}: auths[{key!r}] has none of auth, username+password, identitytoken, registrytoken")
    return None
