"""The project's one progress bar: rich, transient, on stderr (what `export`, `bench`, heal and
`run` draw while they work)."""

from __future__ import annotations

from typing import Any


def progress_bar(label: str, *fields: str, console: Any = None, time_left: bool = True):
    """A started-by-``with`` (or ``.start()``) rich Progress: ``label`` (a rich template, e.g.
    ``{task.description}``), the bar, done/total, one text column per template in ``fields``
    (``{task.fields[loss]}``), and the time left. ``console`` defaults to stderr."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(),
               *(TextColumn(f) for f in fields), *([TimeRemainingColumn()] if time_left else [])]
    return Progress(*columns, console=console or Console(stderr=True), transient=True)
