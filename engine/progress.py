"""Progress while a run streams: notes committed, pairs/s and ETA (rich in a terminal, plain lines otherwise)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

PLAIN_EVERY_SECONDS = 15


class RunProgress:
    def __init__(self, console: Console):
        self.console = console
        self.counts = {"answered": 0, "not_in_note": 0, "error": 0}
        self.progress = Progress(
            TextColumn("[bold]notes"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, transient=False, disable=not console.is_terminal,
        )
        self.task = None
        self.started = time.time()
        self.last_line = 0.0
        self.pairs = 0

    def say(self, line: str) -> None:
        """A line before the progress starts (e.g. that a limit leaves notes out)."""
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def start(self, total_notes: int, done_notes: int) -> None:
        self.total = total_notes
        self.done = done_notes
        if done_notes:
            self.console.print(f"resuming: {done_notes} of {total_notes} notes already committed")
        self.progress.start()
        self.task = self.progress.add_task("notes", total=total_notes, completed=done_notes, rate="", status="starting (Ray, model)...")

    def advance(self, notes: float, pairs: int, statuses: dict[str, int]) -> None:
        """Called for every batch part that is staged (a shard is committed when all its parts are in)."""
        self.done += notes
        self.pairs += pairs
        for status, count in statuses.items():
            self.counts[status] = self.counts.get(status, 0) + count
        elapsed = max(time.time() - self.started, 1e-9)
        status = " ".join(f"{k}={v}" for k, v in self.counts.items())
        self.progress.update(self.task, advance=notes, rate=f"{self.pairs / elapsed:.1f} pairs/s", status=status)
        if not self.console.is_terminal and time.time() - self.last_line > PLAIN_EVERY_SECONDS:
            self.last_line = time.time()
            self.console.print(f"notes {self.done:.0f}/{self.total}  {self.pairs / elapsed:.1f} pairs/s  {status}")

    def stop(self) -> None:
        self.progress.stop()
