"""A progress bar for terminals and log files alike.

On a terminal: a tqdm bar. Anywhere else (a log file, a pipe, a CI job): whole lines, one every
``every`` seconds and at each tenth of the way, each with the count, elapsed and remaining time
and the latest ``set_postfix`` values, so a log shows the run moving (tqdm's ``\\r`` updates do not,
and its bar shows a stale count between refreshes).
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LineProgress:
    """Iterate ``iterable``, printing a progress line now and then to ``file`` (stderr)."""

    def __init__(
        self,
        iterable: Iterable[Any],
        desc: str = "",
        total: int | None = None,
        every: float = 20.0,
        file: TextIO | None = None,
    ):
        self.iterable = iterable
        self.desc = desc
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)  # type: ignore[arg-type]
        self.every = every
        self.file = file
        self.n = 0
        self.postfix = ""
        self._start = time.perf_counter()
        self._last = self._start
        self._printed = -1

    def set_postfix(self, values: dict[str, Any] | None = None, refresh: bool = True, **kw: Any) -> None:
        items = {**(values or {}), **kw}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def line(self) -> str:
        elapsed = time.perf_counter() - self._start
        where = f"{self.n}/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else f"{self.n}"
        left = ""
        if self.total and 0 < self.n < self.total:
            left = f", ~{_clock(elapsed / self.n * (self.total - self.n))} left"
        post = f", {self.postfix}" if self.postfix else ""
        return f"{self.desc}: {where} in {_clock(elapsed)}{left}{post}"

    def _print(self) -> None:
        print(self.line(), file=self.file or sys.stderr, flush=True)
        self._last = time.perf_counter()
        self._printed = self.n

    def __iter__(self) -> Iterator[Any]:
        tenth = max(1, self.total // 10) if self.total else None
        self._print()
        for item in self.iterable:
            yield item
            self.n += 1
            now = time.perf_counter()
            milestone = tenth is not None and self.n % tenth == 0 and now - self._last >= 1.0
            if now - self._last >= self.every or milestone:
                self._print()
        if self._printed != self.n:  # the final count, unless just printed
            self._print()

    def close(self) -> None:
        pass


def progress_bar(
    iterable: Iterable[Any],
    *,
    desc: str = "",
    total: int | None = None,
    disable: bool = False,
    every: float = 20.0,
) -> Any:
    """tqdm on a terminal, LineProgress elsewhere, a plain pass-through when disabled."""
    if disable:
        return LineProgress(
            iterable, desc, total, every=float("inf"), file=io.StringIO()
        )  # set_postfix works
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, mininterval=0.5)
    return LineProgress(iterable, desc, total, every=every)
