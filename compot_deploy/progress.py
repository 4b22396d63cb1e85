"""The one progress-bar policy, when the caller asks for progress: a live bar on an interactive stderr; on a log
file or pipe, whole lines (start, at most one every LOG_INTERVAL seconds, end), never carriage returns."""

from __future__ import annotations

import sys

LOG_INTERVAL = 30.0  # seconds between progress lines when stderr is not a terminal


class _Lines:
    """A file for tqdm that turns its in-place redraws into separate lines (blank redraws dropped)."""

    def __init__(self, f):
        self.f = f

    def write(self, s: str) -> None:
        s = s.replace("\r", "").replace("\x1b[A", "")
        if s.strip():
            self.f.write(s.rstrip("\n") + "\n")

    def flush(self) -> None:
        self.f.flush()


def bar(iterable=None, *, total: int | None = None, desc: str, unit: str, progress: bool):
    """A tqdm bar over `iterable` (or counting to `total`)."""
    from tqdm.auto import tqdm

    if not progress:
        return tqdm(iterable, total=total, disable=True)
    err = sys.stderr
    if getattr(err, "isatty", lambda: False)():
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, file=err)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=True, file=_Lines(err), ascii=True,
                mininterval=LOG_INTERVAL, maxinterval=LOG_INTERVAL, dynamic_ncols=False, ncols=100)
