"""Progress bars at the CLI edge: one style for every long job (done/total, rate, elapsed, ETA)."""

from __future__ import annotations

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.text import Text

from .app import err_console


class RateColumn(ProgressColumn):
    """Items per second, e.g. "12.3 img/s"."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-" if speed is None else f"{speed:.1f} {self.unit}/s", style="progress.data.speed")


def progress_bar(unit: str = "img", *, stats: bool = False, disable: bool = False, console=None) -> Progress:
    """A bar showing done/total, rate in ``unit``/s, elapsed time and ETA (and a ``stats`` text field if asked)."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit)]
    if stats:
        columns.append(TextColumn("{task.fields[stats]}"))
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    return Progress(*columns, console=console or err_console, disable=disable, transient=False)


class Stages:
    """A ``progress(stage, done, total)`` callback that opens one task per stage on a bar."""

    def __init__(self, bar: Progress):
        self.bar, self.tasks = bar, {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.tasks[stage], completed=done, total=total)


class Counter:
    """A ``progress(done, total)`` callback for one task; the first report (work already done by an earlier,
    interrupted run) starts the task there, so img/s and the ETA count only this run's work."""

    def __init__(self, bar: Progress, description: str):
        self.bar, self.task, self.started = bar, bar.add_task(description, total=None), False

    def __call__(self, done: int, total: int) -> None:
        if not self.started:
            self.started = True
            self.bar.reset(self.task, total=total, completed=done)
        else:
            self.bar.update(self.task, completed=done, total=total)
