"""Issue 17 (Low): local mode's secret files are created 0600, never written with the umask's mode
and chmod-ed after (the registry's http secret, its config holding it, htpasswd, docker configs).
The test sets umask 0 and makes chmod a no-op: a file that was not created 0600 shows it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from local_runner.local_registry import RegistryProcess
from stepkit.common import write_private


@pytest.fixture
def wide_open(monkeypatch):
    old = os.umask(0)
    monkeypatch.setattr(Path, "chmod", lambda self, mode, **kw: None)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_registry_secrets_are_created_0600(tmp_path, wide_open):
    registry = RegistryProcess(tmp_path / "registry", username="alice", password="s3cret")
    files = [registry.workdir / "http-secret", registry.workdir / "config.yml", registry.workdir / "htpasswd",
             registry.write_docker_config(tmp_path / "docker-config.json")]
    for path in files:
        assert mode(path) == 0o600, (path.name, oct(mode(path)))
    assert (registry.workdir / "htpasswd").read_text().startswith("alice:$2")


def test_write_private_tightens_an_existing_file_and_refuses_a_symlink(tmp_path, wide_open):
    existing = tmp_path / "key"
    existing.write_text("old")
    os.chmod(existing, 0o644)
    write_private(existing, "new")
    assert mode(existing) == 0o600 and existing.read_text() == "new"
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OSError):
        write_private(tmp_path / "link", "secret")
    assert target.read_text() == "untouched"
