"""Progress bars and summary tables (rich), shared by every command."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

T = TypeVar("T")


def console():
    return Console(stderr=True)


def secondary() -> bool:
    """A process of rank > 0 under `accelerate launch` / `torchrun`: rank 0 speaks for the run."""
    return os.environ.get("RANK", "0") not in ("0", "")


def quiet() -> bool:
    return os.environ.get("PONDER_QUIET", "0") not in ("0", "") or secondary()


@contextmanager
def progress_bar(description: str, total: int | None, unit: str = ""):
    """Yields ``advance(n=1)``; draws a rich bar on a terminal, a few plain lines otherwise."""
    if quiet():
        yield lambda n=1: None
        return
    cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*cols, console=console(), transient=False, disable=not sys.stderr.isatty()) as p:
        task = p.add_task(description, total=total)
        yield lambda n=1: p.advance(task, n)


class Bar:
    """A progress bar that lives across callbacks (a trainer's steps): `advance(n, description)`, `close()`.
    Draws nothing when PONDER_QUIET is set or stderr is not a terminal."""

    def __init__(self, description: str, total: int | None, unit: str = ""):
        self.description = description
        self._p = None
        if not quiet():
            cols = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn()]
            self._p = Progress(*cols, console=console(), transient=False, disable=not sys.stderr.isatty())
            self._p.start()
            self._task = self._p.add_task(description, total=total)

    def advance(self, n: int = 1, description: str | None = None) -> None:
        if self._p is not None:
            self._p.update(self._task, advance=n, **({"description": description} if description else {}))

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_bar(description, total) as advance:
        for x in items:
            yield x
            advance()


#: How tables show a number that is undefined (a rate with no cases: None or NaN), never as 0.
UNDEFINED = "—"


def fmt(v: Any) -> str:
    if v is None or isinstance(v, float) and v != v:
        return UNDEFINED
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    if secondary():
        return
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[fmt(v) for v in r])
    Console().print(t)


def info(msg: str) -> None:
    if not quiet():
        console().print(msg)


def warn(msg: str) -> None:
    """A warning: printed even when PONDER_QUIET is set (something the user should change); once per run."""
    if secondary():
        return
    console().print(f"[yellow]warning:[/] {msg}", highlight=False, soft_wrap=True)
