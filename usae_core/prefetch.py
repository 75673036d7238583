"""Overlap reading the next batches with computing on the current one."""

from __future__ import annotations

import queue
import threading
from typing import Iterator

_END = object()


def stoppable_put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put `item`, giving up once `stop` is set: a producer must never block forever on a consumer
    that has gone away. Returns whether the item was queued."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def prefetch(it: Iterator, depth: int = 2) -> Iterator:
    """Read the next batches on a side thread while the current step computes.

    Closing the generator (or leaving a loop over it by an exception) stops the reader and joins
    it: a reader thread left running inside torch while the interpreter exits can abort the
    process ("terminate called without an active exception")."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def reader() -> None:
        try:
            for item in it:
                if not stoppable_put(q, item, stop):
                    return
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            stoppable_put(q, exc, stop)
            return
        stoppable_put(q, _END, stop)

    thread = threading.Thread(target=reader, name="prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
