"""One table helper for every report: a header and rows of cells as GitHub Markdown, or as console text."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

_MARKS = {"l": ":---", "r": "---:", "c": ":---:", "-": "---"}


def markdown(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """A Markdown table; `align` has one letter per column: l, r, c, or - (unaligned, the default)."""
    marks = align.ljust(len(header), "-")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(_MARKS[a] for a in marks) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def console(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "", title: str | None = None) -> str:
    """The same table as plain console text (rich, no colours, never wrapped); `align` as in `markdown`."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    justify = {"r": "right", "c": "center"}
    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False)
    for i, h in enumerate(header):
        table.add_column(h, justify=justify.get(align[i:i + 1], "left"), no_wrap=True)
    for row in rows:
        table.add_row(*(str(c) for c in row))
    out = Console(file=io.StringIO(), width=10_000, color_system=None, record=True)
    out.print(table)
    return "\n".join(line.rstrip() for line in out.export_text().splitlines()).strip("\n")
