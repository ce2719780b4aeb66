"""Every `kaiflow ...` command shown in README.md and docs/ parses with the CLI; docs/reference/cli.md
lists every subcommand and option (the command-contract idea of tests/pipelines/test_step_contract.py,
applied to the docs)."""

import re
import shlex
from pathlib import Path

import pytest

from kaiflow.cli import command

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "DEVELOPERS.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```.*?$(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`(kaiflow [^`]+)`")
# Where a shown command line ends: a pipe, a list, a redirection, a comment, a background job.
END = re.compile(r"\s(\||&&|;|>|#|&$|2>)")
# Usage synopses (`kaiflow registry [--port N]`) and placeholders are not commands.
SYNOPSIS = re.compile(r"[\[\]<>]|\.\.\.|…")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$")  # COMMAND, N, FILE: a synopsis, not a command


def _commands(text: str) -> list[str]:
    found = []
    for block in FENCE.findall(text):
        for line in block.splitlines():
            line = line.strip().removeprefix("$ ")
            for part in re.split(r"\|\s*|\$\(|<\(", line):
                part = part.strip()
                if part.startswith("kaiflow "):
                    found.append(part)
    found += INLINE.findall(text)
    commands = []
    for command_line in found:
        command_line = END.split(" " + command_line, maxsplit=1)[0].strip().removesuffix("&").strip()
        if command_line.count(")") > command_line.count("("):  # the end of `<(kaiflow ...)`
            command_line = command_line.rstrip(")")
        if not SYNOPSIS.search(command_line) and not any(PLACEHOLDER.match(t) for t in command_line.split()[1:]):
            commands.append(command_line)
    return commands


SHOWN = sorted({(path.relative_to(ROOT).as_posix(), c) for path in DOCS for c in _commands(path.read_text())})


def _parse(args: list[str]) -> None:
    """Parse as `kaiflow` would, run nothing: every subcommand's function replaced by a no-op."""
    cli = command()
    for sub in cli.commands.values():
        sub.callback = lambda *a, **k: 0
    cli.main(args=args, prog_name="kaiflow", standalone_mode=False)


def test_the_docs_show_commands():
    shown = {c.split()[1] for _, c in SHOWN if len(c.split()) > 1}
    assert {"validate", "render", "run", "registry", "completion", "chat", "stop", "presets"} <= shown


@pytest.mark.parametrize("where,line", SHOWN, ids=[f"{w}:{c}" for w, c in SHOWN])
def test_a_shown_command_parses(where, line):
    args = shlex.split(line)[1:]
    if args[:1] == ["controller"]:  # the operator's own options (controller/options.py)
        return
    if len(args) == 1 and not args[0].startswith("-"):  # prose naming a subcommand: `kaiflow chat`
        assert args[0] in command().commands, f"{where}: `{line}` names no subcommand"
        return
    try:
        _parse(args)
    except SystemExit as exc:  # --version
        assert exc.code == 0, f"{where}: `{line}` exits {exc.code}"
    except Exception as exc:  # click's usage errors, as Typer vendors them
        pytest.fail(f"{where}: `{line}` does not parse: {exc}")


def test_the_cli_reference_lists_every_subcommand_and_option():
    reference = (ROOT / "docs" / "reference" / "cli.md").read_text()
    missing = []
    for name, sub in command().commands.items():
        if f"## {name}" not in reference and not re.search(rf"^## .*\b{name}\b", reference, re.M):
            missing.append(f"subcommand {name}")
        for param in sub.params:
            for opt in getattr(param, "opts", []) + getattr(param, "secondary_opts", []):
                if opt.startswith("-") and opt not in ("-h", "--help") and f"`{opt}" not in reference:
                    missing.append(f"{name} {opt}")
    assert not missing, missing


LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_and_anchors_resolve():
    broken = []
    for path in DOCS:
        for target in LINK.findall(FENCE.sub("", path.read_text())):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            resolved = (path.parent / file).resolve() if file else path
            if not resolved.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
                continue
            if anchor and resolved.suffix == ".md":
                headings = {_anchor(h) for h in re.findall(r"^#+ (.+)$", FENCE.sub("", resolved.read_text()), re.M)}
                if anchor not in headings:
                    broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken
