"""The one progress-bar factory: every long loop (extraction, training epochs, evaluation, prototypes, predict,
explain, selection) shows the same kind of ``rich`` bar, built by :func:`progress_bar`.

A disabled bar (``enabled=False``) is a real :class:`rich.progress.Progress` with ``disable=True``: callers use it the
same way (context manager, ``add_task``, ``advance``, ``update``) and nothing is drawn. rich is imported when a bar is
built, not when this module is imported.
"""

from __future__ import annotations

from typing import Any

__all__ = ["progress_bar"]


def progress_bar(*, enabled: bool = True, transient: bool = True, stderr: bool = False, rate: str | None = None,
                 info: bool = False, elapsed: bool = False) -> Any:
    """A :class:`rich.progress.Progress` with the columns description, bar, ``done/total`` and time remaining.

    ``transient``: the bar disappears when it stops (else its last state stays on screen). ``stderr``: draw on
    standard error (for commands whose standard output is data). ``rate``: add a speed column in that unit
    (``"img/s"``). ``info``: add a column showing the task's ``info`` field (``add_task(..., info="")``, then
    ``update(task, info="loss 0.31")``). ``elapsed``: show elapsed instead of remaining time (for bars whose total is
    a time budget).
    """
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            return Text(f"{task.speed:.1f} {rate}" if task.speed else f"- {rate}")

    columns: list[Any] = [TextColumn("{task.description}"), BarColumn()]
    if not elapsed:
        columns.append(MofNCompleteColumn())
    if rate:
        columns.append(Rate())
    if info:
        columns.append(TextColumn("{task.fields[info]}"))
    columns.append(TimeElapsedColumn() if elapsed else TimeRemainingColumn())
    kwargs: dict[str, Any] = {"console": Console(stderr=True)} if stderr else {}
    return Progress(*columns, transient=transient, disable=not enabled, **kwargs)
