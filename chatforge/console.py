"""Shared rich console, stage logging and progress bars."""
from __future__ import annotations

import functools
import sys
import time
from typing import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from chatforge.errors import ChatforgeError

console = Console(stderr=True, highlight=False)
_stage_started = time.perf_counter()


def stage_seconds() -> float:
    """Seconds since the running stage's entry point started; every stage report carries it as
    `wall_seconds`, which the report card's time table reads."""
    return round(time.perf_counter() - _stage_started, 1)


def log(stage: str, message: str) -> None:
    console.print(f"[bold cyan]{stage}[/] {message}", soft_wrap=True)


def progress(transient: bool = False) -> Progress:
    """A progress bar with count, elapsed and remaining time; extra fields render via `{task.fields}`."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=transient,
    )


def run_stage(main: Callable[[], None]) -> Callable[[], None]:
    """Wrap a stage or command entry point: ChatforgeError becomes one red line and exit code 1."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        global _stage_started
        start = _stage_started = time.perf_counter()
        try:
            result = main(*args, **kwargs)
        except ChatforgeError as error:
            console.print(f"[bold red]error:[/] {error}", soft_wrap=True)  # one line, however long
            sys.exit(1)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            sys.exit(130)
        console.print(f"[dim]{main.__module__} done in {time.perf_counter() - start:.1f}s[/]")
        return result

    return wrapper
