"""``kaiflow chat`` / ``kaiflow stop`` over the chat client and the local supervisor (no step internals)."""

from __future__ import annotations

import json

from kaiflow.cli import main


def test_chat_asks_the_service_a_workdir_records(bento_tiny, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KAIFLOW_API_KEY", bento_tiny.api_key)
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "service.json").write_text(json.dumps({"url": bento_tiny.url, "pid": -1}))
    assert main(["chat", "hello", "--workdir", str(tmp_path), "--max-new-tokens", "4"]) == 0
    by_workdir = capsys.readouterr().out
    assert main(["chat", "hello", "--url", bento_tiny.url, "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == by_workdir  # greedy by default: the same answer
    # pid -1 is no bentoml server of ours: stop signals nothing, and forgets the record
    assert main(["stop", "--workdir", str(tmp_path)]) == 0
    assert "no local service was running" in capsys.readouterr().out
    assert not (tmp_path / "serve" / "service.json").exists()


def test_chat_without_a_service_is_one_line(tmp_path, capsys):
    assert main(["chat", "hello", "--workdir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no running service recorded in") and "Traceback" not in err
