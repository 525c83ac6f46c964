"""How long-running stages report to the user: rich progress bars on a terminal, plain lines otherwise."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class Reporter:
    def __init__(self, console: Console | None = None, bars: bool | None = None):
        self.console = console or Console(stderr=True)
        self.bars = self.console.is_terminal if bars is None else bars

    def info(self, message: str) -> None:
        self.console.print(message, highlight=False)

    def table(self, table: Table) -> None:
        self.console.print(table)

    @contextmanager
    def task(self, description: str, total: int) -> Iterator["Step"]:
        if not self.bars:
            self.info(f"{description} ({total} steps)")
            yield Step(None, None)
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=False) as progress:
            yield Step(progress, progress.add_task(description, total=total))


class Step:
    def __init__(self, progress: Progress | None, task_id):
        self.progress, self.task_id = progress, task_id

    def advance(self, description: str | None = None) -> None:
        if self.progress is not None:
            self.progress.update(self.task_id, advance=1, **({"description": description} if description else {}))


class Silent(Reporter):
    """For library use and tests."""

    def __init__(self):
        super().__init__(Console(quiet=True), bars=False)
