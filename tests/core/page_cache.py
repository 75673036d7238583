"""What the kernel's page cache holds of a file."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path


def dirty_pages(path: Path) -> int | None:
    """Pages of `path` waiting in the page cache to be written (Linux >= 6.5 `cachestat`);
    None where the kernel cannot say."""
    return _cachestat(path, "dirty")


def cached_pages(path: Path) -> int | None:
    """Pages of `path` in the page cache, dirty or clean; None where the kernel cannot say."""
    return _cachestat(path, "cache")


def _cachestat(path: Path, field: str) -> int | None:
    libc = ctypes.CDLL(None, use_errno=True)
    fields = ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    stat = (ctypes.c_uint64 * len(fields))()
    whole_file = (ctypes.c_uint64 * 2)(0, 0)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syscall(451, fd, whole_file, stat, 0) != 0:  # 451: cachestat on every architecture
            return None
    finally:
        os.close(fd)
    return stat[fields.index(field)]
