"""Ctrl-C between two steps of a loop (usae_core/interrupt.py)."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from usae_core.interrupt import interrupt_between_steps


def test_the_first_ctrl_c_is_a_request_the_second_stops_at_once_and_the_handler_is_put_back(ctrl_c_as_in_a_terminal):
    before = signal.getsignal(signal.SIGINT)
    with interrupt_between_steps() as requested:
        assert not requested.is_set()
        os.kill(os.getpid(), signal.SIGINT)  # handled in this thread before kill returns to Python
        assert requested.is_set()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_outside_the_main_thread_it_changes_nothing(ctrl_c_as_in_a_terminal):
    seen = []

    def worker() -> None:
        with interrupt_between_steps() as requested:
            seen.append((requested.is_set(), signal.getsignal(signal.SIGINT)))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [(False, signal.getsignal(signal.SIGINT))]


def test_where_ctrl_c_is_ignored_or_handled_elsewhere_nothing_changes():
    """`usae train ... &` from a script starts with SIGINT ignored: it must keep ignoring it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupt_between_steps() as requested:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert not requested.is_set()
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
