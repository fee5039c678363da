"""Progress bars for long work (pruning scores, saving and loading many adapter layers).

A bar is shown on a terminal only, and built only when shown: otherwise :func:`progress` returns a
:class:`QuietBar` that iterates the same items and ignores ``update`` / ``close``. Shown bars take a
thread lock of their own, never tqdm's default lock: that one is a multiprocessing lock shared with
forked children, so a child killed while drawing a bar would leave it held and hang the parent.
"""
from __future__ import annotations

import sys
import threading
from typing import Iterable, Optional

_BAR = []  # the tqdm subclass, built on first use


class QuietBar:
    """The bar when none is shown: iterates its items; ``update`` and ``close`` do nothing."""

    def __init__(self, items: Iterable):
        self._items = items

    def __iter__(self):
        return iter(self._items)

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _on_terminal(stream) -> bool:
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _bar_class():
    if not _BAR:
        from tqdm.auto import tqdm

        class Bar(tqdm):
            _lock = threading.RLock()  # a thread lock: nothing shared with forked processes

        _BAR.append(Bar)
    return _BAR[0]


def progress(items: Iterable, desc: str, total: Optional[int] = None, min_steps: int = 2):
    """A bar over ``items`` (``total`` steps: default ``len(items)``) on a terminal when there are at least
    ``min_steps`` steps; else a :class:`QuietBar`. Both iterate ``items`` and have ``update`` / ``close``."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    if (total or 0) < min_steps or not _on_terminal(sys.stderr):
        return QuietBar(items)
    return _bar_class()(items, desc=desc, total=total, leave=False, file=sys.stderr)
