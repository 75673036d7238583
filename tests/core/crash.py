"""Crashes at a chosen rename: every crash-safe write in the store ends in `os.replace`, so
failing the n-th one stops a writer exactly where a kill at that point would."""

from __future__ import annotations

import os
from typing import Callable

import pytest


def stopped_at_rename(monkeypatch: pytest.MonkeyPatch, fail_at: int, action: Callable[[], object]) -> bool:
    """Run `action` with its `fail_at`-th `os.replace` raising OSError("simulated crash");
    True when that stopped it, False when it finished with fewer renames."""
    real_replace = os.replace
    calls = 0

    def failing_replace(src, dst):
        nonlocal calls
        calls += 1
        if calls == fail_at:
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    try:
        action()
    except OSError as exc:
        if str(exc) != "simulated crash":
            raise
        return True
    finally:
        monkeypatch.setattr(os, "replace", real_replace)
    return False
