"""The one progress bar: label, count, fields, on stderr unless told otherwise."""

import io

from rich.console import Console

from slimgraph.progress import progress_bar


def test_bar_shows_label_count_and_fields():
    out = io.StringIO()
    bar = progress_bar("heal", "loss {task.fields[loss]}",
                       console=Console(file=out, force_terminal=True, width=120))
    with bar:
        task = bar.add_task("heal", total=10, loss="0.25")
        bar.update(task, completed=3)
        bar.refresh()
    text = out.getvalue()
    assert "heal" in text and "3/10" in text and "loss 0.25" in text


def test_default_console_is_stderr():
    assert progress_bar("run", "samples").console.stderr
