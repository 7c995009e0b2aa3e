"""One progress bar for every long job (harvest, SAE training, atlas build, explanations, NLA stages, sweeps).

It shows a count, a rate, the elapsed time and an ETA; it is silent when disabled (tests, benchmarks, ranks other
than 0); and where stderr is a log file rather than a terminal it prints a plain line every `log_every_s` seconds,
because a log gets no live bar.
"""

from __future__ import annotations

import time


class ProgressBar:
    """A rich bar on stderr, used as a context manager or closed explicitly.

    `update(completed=..., info=...)` or `advance(n, info=...)`; `info` is free text shown after the counts
    (a loss, a validation score). `unit` names what is counted ("tok", "steps", "features") and sets the rate's label.
    """

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        start: int = 0,
        unit: str = "",
        enabled: bool = True,
        transient: bool = False,
        log_every_s: float = 30.0,
    ):
        self.enabled = enabled
        self.label, self.total, self.unit = label, total, unit
        self.start, self.completed = start, start
        self.t0 = self.last_line = time.perf_counter()
        self.log_every_s = log_every_s
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.console = Console(stderr=True)
            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                transient=transient,
            )
            self._task = self._bar.add_task(label, total=total, completed=start, rate="", info="")
            self._bar.start()

    def rate(self) -> float:
        """Items per second since this bar (not the job) started, so a resumed job shows its own speed."""
        dt = time.perf_counter() - self.t0
        return (self.completed - self.start) / dt if dt > 0 else 0.0

    def update(self, completed: int | None = None, *, info: str | None = None) -> None:
        if completed is not None:
            self.completed = completed
        if self._bar is None:
            return
        rate = self.rate()
        fields = {"rate": f"{rate:,.1f} {self.unit}/s".strip() if rate < 100 else f"{rate:,.0f} {self.unit}/s"}
        if info is not None:
            fields["info"] = info
        self._bar.update(self._task, completed=self.completed, **fields)
        now = time.perf_counter()
        if not self.console.is_terminal and now - self.last_line >= self.log_every_s:
            self.last_line = now
            left = (self.total - self.completed) / rate if rate > 0 and self.total else float("nan")
            self.console.print(
                f"{self.label}: {self.completed:,}/{self.total or '?'} {self.unit}, "
                f"{fields['rate']}, ETA {left / 60:.1f} min {info or ''}".rstrip()
            )

    def grow(self, n: int) -> None:
        """More work than first estimated (a search that decides to go on): the total rises by n."""
        self.total = (self.total or 0) + n
        if self._bar is not None:
            self._bar.update(self._task, total=self.total)

    def advance(self, n: int = 1, *, info: str | None = None) -> None:
        self.update(self.completed + n, info=info)

    def note(self, message: str) -> None:
        """A line printed above the bar (a warning, a checkpoint)."""
        if self._bar is not None:
            self.console.print(f"[yellow]{message}[/yellow]")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
