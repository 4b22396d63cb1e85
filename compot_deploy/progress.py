"""The one progress-bar policy: shown on an interactive stderr when the caller asks for progress, never otherwise."""

from __future__ import annotations


def bar(iterable=None, *, total: int | None = None, desc: str, unit: str, progress: bool):
    """A tqdm bar over `iterable` (or counting to `total`)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None if progress else True, leave=False)
