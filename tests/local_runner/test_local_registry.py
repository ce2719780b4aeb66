"""local_runner.local_registry: the local OCI registry of local runs, and `kaiflow registry`."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from local_runner.local_registry import (
    LocalRegistryError,
    RegistryProcess,
    ensure_local_registry,
    free_port,
    registry_answers,
)
from steps import push_adapter as push
from stepkit.oci import OCI_MANIFEST, RegistryAuthError, RegistryOptions
from tests.fixtures.registry import make_adapter_dir

ROOT = Path(__file__).resolve().parents[2]


def test_ensure_starts_one_once_and_reuses_a_running_one(tmp_path):
    host = f"127.0.0.1:{free_port()}"
    started = ensure_local_registry(host, tmp_path / "registry")
    try:
        assert started is not None and started.host == host and registry_answers(host)
        assert ensure_local_registry(host, tmp_path / "other") is None, "one already answers there"
        assert not (tmp_path / "other").exists()
        result = push.push_adapter(push.PushConfig(str(make_adapter_dir(tmp_path / "a")), f"{host}/adapters/x:v1"),
                                   RegistryOptions(insecure=True))
        assert result.digest.startswith("sha256:")
        assert (tmp_path / "registry" / "storage" / "docker").is_dir()
    finally:
        started.stop()
    assert not registry_answers(host)


def test_restart_keeps_storage_and_its_upload_secret(tmp_path):
    registry = RegistryProcess(tmp_path / "r").start()
    try:
        secret = (tmp_path / "r" / "http-secret").read_text()
        push.push_adapter(push.PushConfig(str(make_adapter_dir(tmp_path / "a")), f"{registry.host}/adapters/k:v1"),
                          RegistryOptions(insecure=True))
        registry.stop()
        again = RegistryProcess(tmp_path / "r", port=registry.port).start()
        request = urllib.request.Request(f"{again.url}/v2/adapters/k/manifests/v1", headers={"Accept": OCI_MANIFEST})
        urllib.request.urlopen(request, timeout=5).close()
        assert (tmp_path / "r" / "http-secret").read_text() == secret
        again.stop()
    finally:
        registry.stop()


@pytest.mark.parametrize("host_port", ["10.0.0.1:5000", "example.com:5000", "127.0.0.1", "127.0.0.1:port"])
def test_only_local_addresses(host_port, tmp_path):
    with pytest.raises(LocalRegistryError, match="127.0.0.1:PORT or localhost:PORT only"):
        ensure_local_registry(host_port, tmp_path)


def test_a_port_taken_by_something_else_is_named(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(LocalRegistryError, match=f"port {port} on 127.0.0.1 is taken"):
            ensure_local_registry(f"127.0.0.1:{port}", tmp_path)


def test_kaiflow_registry_command_with_htpasswd(tmp_path):
    port = free_port()
    (tmp_path / "password").write_text("local-secret-123\n")
    process = subprocess.Popen(
        [sys.executable, "-m", "kaiflow.cli", "registry", "--port", str(port), "--root", str(tmp_path / "reg"),
         "--username", "me", "--password-file", str(tmp_path / "password")],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not registry_answers(f"127.0.0.1:{port}") and time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read()
            time.sleep(0.1)
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=5)
        assert denied.value.code == 401
        adapter = make_adapter_dir(tmp_path / "a")
        with pytest.raises(RegistryAuthError, match="requires a username and password"):
            push.push_adapter(push.PushConfig(str(adapter), f"127.0.0.1:{port}/adapters/x:v1"),
                              RegistryOptions(insecure=True, attempts=1))
        registry = RegistryProcess(tmp_path / "reg", port=port, username="me", password="local-secret-123")
        config = registry.write_docker_config(tmp_path / "docker.json")
        result = push.push_adapter(push.PushConfig(str(adapter), f"127.0.0.1:{port}/adapters/x:v1"),
                                   RegistryOptions(insecure=True, docker_config=str(config)))
        assert result.digest.startswith("sha256:")
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=15)
    assert process.returncode == 0
    assert f"registry 127.0.0.1:{port}" in out
    assert "local-secret-123" not in out
    assert not registry_answers(f"127.0.0.1:{port}")


def test_kaiflow_registry_username_needs_a_password_file(capsys):
    from kaiflow.cli import main

    assert main(["registry", "--username", "me"]) == 2
    assert "--username needs --password-file" in capsys.readouterr().err
