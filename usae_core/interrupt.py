"""Ctrl-C that stops a loop between two of its steps, never inside one.

A KeyboardInterrupt raised wherever the main thread happens to be can land inside a checkpoint
write, or between a lock's acquire and its `with` block (a progress bar's lock, say), which then
stays held: the exit path that needs it waits forever. A training loop asks `requested()` after
each step instead and stops there; a second Ctrl-C raises at once, for a step that hangs.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def interrupt_between_steps() -> Iterator[threading.Event]:
    """Within the block, the first SIGINT sets the yielded event; the next raises
    KeyboardInterrupt. Only where Ctrl-C would raise KeyboardInterrupt anyway: outside the main
    thread (no signals reach it), or where SIGINT is ignored (`usae train ... &` from a script)
    or handled by someone else, nothing changes and the event is never set."""
    requested = threading.Event()
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield requested
        return

    def on_sigint(signum, frame) -> None:
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)
