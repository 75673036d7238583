"""Overlap reading the next batches with computing on the current one."""

from __future__ import annotations

import queue
import threading
from typing import Iterator


def prefetch(it: Iterator, depth: int = 2) -> Iterator:
    """Read the next batches on a side thread while the current step computes."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = object()

    def worker() -> None:
        try:
            for item in it:
                q.put(item)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            q.put(exc)
        q.put(stop)

    threading.Thread(target=worker, daemon=True).start()
    while (item := q.get()) is not stop:
        if isinstance(item, BaseException):
            raise item
        yield item
