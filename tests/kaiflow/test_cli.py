"""The CLI face: exit codes, messages, and that validate stays light."""

import subprocess
import sys
from pathlib import Path

from kaiflow.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_validate_examples_ok(capsys):
    files = sorted(str(p) for p in (ROOT / "examples").glob("*.yaml"))
    assert main(["validate", *files]) == 0
    out = capsys.readouterr().out
    assert out.count("ok ") == len(files)


def test_validate_lists_every_error_and_exits_1(capsys):
    bad = sorted(str(p) for p in (ROOT / "tests" / "api" / "bad_workspaces").glob("*.yaml"))
    good = str(ROOT / "examples" / "kaito_workspace_phi_3.yaml")
    assert main(["validate", good, *bad]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("FAIL ") == len(bad)
    assert "tuning.method: must be 'lora' or 'qlora'" in captured.err
    assert "ok " in captured.out


def test_validate_does_not_import_torch():
    code = (
        "import sys; from kaiflow.cli import main; "
        f"rc = main(['validate', r'{ROOT / 'examples' / 'kaito_workspace_tuning_phi_3.yaml'}']); "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'bentoml') if m in sys.modules]; "
        "assert rc == 0 and not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_presets_table(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "phi-3-mini-4k-instruct" in out and "smollm2-135m-instruct" in out and "Standard_" in out


def test_crd_command(capsys):
    assert main(["crd"]) == 0
    assert "name: workspaces.kaito.sh" in capsys.readouterr().out
