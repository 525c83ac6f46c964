"""How long-running stages report to the user: rich progress bars on a terminal, plain lines otherwise."""

from __future__ import annotations

import time
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
        self.console.print(message, highlight=False, soft_wrap=True)  # a log line stays one line

    def table(self, table: Table) -> None:
        self.console.print(table)

    @contextmanager
    def task(self, description: str, total: int) -> Iterator["Step"]:
        if not self.bars:
            self.info(f"{description} ({total} steps)")
            yield Step(None, None, lambda done, text: self.info(text), description, total)
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=False) as progress:
            yield Step(progress, progress.add_task(description, total=total))


class Step:
    """One task's progress: a bar on a terminal; otherwise one line per step (CI logs), with the
    elapsed time and an ETA, so a long stage never goes silent."""

    def __init__(self, progress: Progress | None, task_id, log=None, description: str = "", total: int = 0):
        self.progress, self.task_id, self.log = progress, task_id, log
        self.description, self.total, self.done, self.start = description, total, 0, time.monotonic()

    def advance(self, description: str | None = None) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress.update(self.task_id, advance=1, **({"description": description} if description else {}))
        elif self.log is not None:
            elapsed = time.monotonic() - self.start
            eta = elapsed / self.done * max(self.total - self.done, 0)
            self.log(self.done, f"{description or self.description}: {self.done}/{self.total}, {elapsed:.1f} s, ETA {eta:.0f} s")


class Silent(Reporter):
    """For library use and tests."""

    def __init__(self):
        super().__init__(Console(quiet=True), bars=False)
