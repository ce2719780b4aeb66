"""steps.deploy.local_service (the local supervisor of ``bentoml serve``) and the local deploy through steps.deploy."""

from __future__ import annotations

import pytest

from serving_bento.client import ChatError, chat
from stepkit.common import StepError, run_step
from steps.deploy import main
from steps.deploy.local_service import listeners_on, pid_is_bento, read_service_file, resolve_url, stop_local



def test_chat_client_and_stop_helper_against_the_running_service(bento_tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("KAIFLOW_API_KEY", bento_tiny.api_key)
    by_url = chat(bento_tiny.url, "hello", max_new_tokens=4, temperature=0)
    by_workdir = chat(resolve_url(bento_tiny.workdir), "hello", max_new_tokens=4, temperature=0)
    assert isinstance(by_url, str) and by_url == by_workdir
    monkeypatch.setenv("KAIFLOW_API_KEY", "not-the-key-5f2a")
    with pytest.raises(ChatError, match="answered 401") as refused:
        chat(bento_tiny.url, "hello")
    assert "5f2a" not in str(refused.value)
    with pytest.raises(StepError, match="no running service"):
        resolve_url(tmp_path)
    assert resolve_url("http://127.0.0.1:1") == "http://127.0.0.1:1"
    assert stop_local(tmp_path) is False


def test_chat_client_names_an_unreachable_service():
    from steps.deploy.local_service import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ChatError, match=f"cannot reach the service at {url}"):
        chat(url, "hello", timeout=2)


def test_local_deploy_reports_a_failed_model_load(tmp_path, capsys):
    broken = tmp_path / "adapters" / "broken"
    broken.mkdir(parents=True)
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "target_modules": ["nope"], "r": 4}')
    argv = ["--mode", "local", "--workspace-name", "w", "--preset", "kaiflow-tiny-test",
            "--adapters-dir", str(tmp_path / "adapters"), "--workdir", str(tmp_path / "serve"),
            "--ready-timeout", "120", "--outputs", str(tmp_path / "out")]
    assert run_step(main, argv) == 2
    err = capsys.readouterr().err
    assert "failed to load its model" in err and "KAIFLOW_ADAPTERS" in err
    assert not (tmp_path / "serve" / "service.json").exists()


def test_a_port_in_use_is_refused(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["--mode", "local", "--workspace-name", "w", "--preset", "kaiflow-tiny-test", "--port", str(port),
                "--workdir", str(tmp_path / "serve"), "--outputs", str(tmp_path / "out")]
        assert run_step(main, argv) == 2
    assert f"--port {port}: another process already listens there" in capsys.readouterr().err


def test_a_shared_port_is_detected():
    """BentoML listens with SO_REUSEPORT; start_local must notice a second listener on its port."""
    import socket

    first = socket.socket()
    first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    first.bind(("127.0.0.1", 0))
    first.listen()
    port = first.getsockname()[1]
    with first, socket.socket() as second:
        assert listeners_on(port) == 1
        second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        second.bind(("127.0.0.1", port))
        second.listen()
        assert listeners_on(port) == 2


def test_local_deploy_chat_and_stop_end_to_end(tmp_path, tiny_adapters, capsys):
    """What `kaiflow run` / `kaiflow chat` / `kaiflow stop` do: deploy, ask, stop; no process left."""
    adapters_dir = tiny_adapters["alpha"].parent
    workdir = tmp_path / "serve"
    argv = ["--mode", "local", "--workspace-name", "demo", "--preset", "kaiflow-tiny-test",
            "--adapters-dir", str(adapters_dir), "--adapter", "alpha:0.5", "--workdir", str(workdir),
            "--ready-timeout", "180", "--outputs", str(tmp_path / "out")]
    try:
        assert run_step(main, argv) == 0, capsys.readouterr().err
        url = (tmp_path / "out" / "service-url").read_text()
        info = read_service_file(workdir)
        assert info["url"] == url and url.startswith("http://127.0.0.1:")
        assert info["adapters"] == [{"name": "alpha", "path": str(adapters_dir / "alpha"), "strength": 0.5}]
        assert isinstance(chat(resolve_url(workdir), "hello", max_new_tokens=4), str)
        port = int(url.rsplit(":", 1)[1])
        assert run_step(main, argv + ["--port", str(port)]) == 0  # a redeploy replaces the service
        replaced = read_service_file(workdir)
        assert replaced["pid"] != info["pid"] and not pid_is_bento(info["pid"]) and replaced["port"] == port
        assert isinstance(chat(resolve_url(workdir), "hello", max_new_tokens=4), str)
    finally:
        stopped = stop_local(workdir)
    assert stopped and not pid_is_bento(replaced["pid"]) and read_service_file(workdir) is None
