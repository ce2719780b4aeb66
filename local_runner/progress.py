"""Live per-task progress of a local run (rich): status, Argo-style ``done/total``, elapsed time.

The numbers come from the same ``ARGO_PROGRESS_FILE`` the steps write for the Argo UI; the
runner points each task at its own file and calls ``update`` while the task runs. On a terminal
the table redraws in place; elsewhere (CI logs, tests) rich prints it once at the end.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

STYLE = {"Succeeded": "green", "Failed": "bold red", "Running": "cyan", "Skipped": "yellow",
         "Omitted": "dim", "Pending": "dim"}
SYMBOL = {"Succeeded": "✔", "Failed": "✘", "Running": "▶", "Skipped": "↷", "Omitted": "·", "Pending": " "}


def _bar(progress: str, width: int = 20) -> str:
    try:
        done, total = (int(x) for x in progress.split("/", 1))
    except ValueError:
        return progress
    filled = int(width * done / total) if total else 0
    return f"{'█' * filled}{'░' * (width - filled)} {done}/{total}"


class ProgressDisplay:
    def __init__(self, console: Any = None):
        self.console = console or Console(stderr=True)
        self.live = None
        self._run = None

    def __enter__(self) -> ProgressDisplay:
        self.live = Live(console=self.console, refresh_per_second=4, transient=False,
                         get_renderable=self._renderable)
        self.live.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.live is not None:
            self.live.__exit__(*exc_info)
            if not self.live.console.is_terminal:  # rich leaves the last frame unterminated there
                self.live.console.line()

    def update(self, run: Any) -> None:
        self._run = run
        if self.live is not None:
            self.live.refresh()

    def _renderable(self) -> Any:
        table = Table(title=self._run.workflow_name if self._run else "kaiflow run", title_justify="left",
                      show_edge=False)
        table.add_column("task")
        table.add_column("status")
        table.add_column("progress")
        table.add_column("time", justify="right")
        if self._run is None:
            return table
        for name, record in self._run.records.items():
            style = STYLE.get(record.status, "")
            detail = _bar(record.progress) if record.progress else record.message
            elapsed = f"{record.elapsed:.1f}s" if record.started else ""
            table.add_row(name, f"[{style}]{SYMBOL.get(record.status, ' ')} {record.status}[/]", detail, elapsed)
        return table
