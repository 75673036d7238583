"""Write large arrays as .npy files straight to the disk (O_DIRECT), past the page cache.

A store shard is written once and read much later, so caching it gains nothing, and on a GPU
machine buffered writes cost twice: a memory copy into the page cache per byte, then writeback
that the writer threads wait on. Written with O_DIRECT from page-aligned memory (the
extractor's pinned shard buffers), the bytes go from the buffer to the disk, and several
writers keep the disk's queue full (on the H200 machine: 2.5-2.7 GB/s against 1.3 GB/s for
one buffered writer, docs/benchmarks.md).

The file is an ordinary .npy file whose header is padded to one 4096-byte block (the format
allows any header length), so that the data starts on a block boundary as O_DIRECT needs; any
reader of .npy files reads it. Where O_DIRECT is refused (tmpfs, some network file systems) or
the array is not page-aligned, the file is written through the page cache instead, with the
same bytes.
"""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import numpy as np

from usae_core.atomic import start_writeback

BLOCK = 4096
"""Alignment of memory, file offsets and lengths for O_DIRECT (a multiple of every common
logical block size)."""

MIN_DIRECT_BYTES = 1 << 20
"""Smaller arrays go through the page cache: O_DIRECT pays off for bulk data only."""


def padded_header(array: np.ndarray) -> bytes:
    """The .npy (version 1.0) header of `array`, padded with spaces to exactly BLOCK bytes."""
    d = np.lib.format.header_data_from_array_1_0(array)
    text = "{" + "".join(f"{k!r}: {d[k]!r}, " for k in sorted(d)) + "}"
    magic = np.lib.format.magic(1, 0)
    body_len = BLOCK - len(magic) - 2  # the header length field is a little-endian uint16
    text = text.ljust(body_len - 1) + "\n"
    if len(text) != body_len:
        raise ValueError(f"an .npy header of {len(text)} characters does not fit {BLOCK} bytes")
    return magic + body_len.to_bytes(2, "little") + text.encode("latin1")


def is_aligned(array: np.ndarray) -> bool:
    return array.flags.c_contiguous and array.ctypes.data % BLOCK == 0


def save_npy(path: str | os.PathLike, array: np.ndarray) -> bool:
    """Write `array` to `path` (created or truncated) as an .npy file. Returns whether it went
    to the disk directly (O_DIRECT); otherwise it was written through the page cache."""
    array = np.ascontiguousarray(array)  # the header says C order; a Fortran-ordered array is copied
    if array.nbytes >= MIN_DIRECT_BYTES and is_aligned(array):
        try:
            _save_direct(Path(path), array)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
    with open(path, "wb") as fh:
        if array.nbytes < MIN_DIRECT_BYTES:
            np.save(fh, array, allow_pickle=False)
        else:  # the same bytes as a direct write
            fh.write(padded_header(array))
            fh.write(memoryview(array).cast("B"))
        # Started now, the disk works while the job goes on (`start_writeback`).
        start_writeback(fh)
    return False


def _save_direct(path: Path, array: np.ndarray) -> None:
    """Header and whole blocks of data with O_DIRECT; the last partial block, if any, through
    the page cache (O_DIRECT lengths must be whole blocks)."""
    data = memoryview(array).cast("B")
    whole = len(data) - len(data) % BLOCK
    header = mmap.mmap(-1, BLOCK)  # page-aligned memory for the header block
    try:
        header.write(padded_header(array))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o666)
        try:
            _pwrite_all(fd, memoryview(header), 0)
            _pwrite_all(fd, data[:whole], BLOCK)
        finally:
            os.close(fd)
    finally:
        header.close()
    if whole < len(data):
        fd = os.open(path, os.O_WRONLY)
        try:
            _pwrite_all(fd, data[whole:], BLOCK + whole)
        finally:
            os.close(fd)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        if n <= 0:
            raise OSError(errno.EIO, f"the disk took 0 of {len(data)} bytes")
        data, offset = data[n:], offset + n
