"""Shard files written past the page cache are ordinary .npy files, whichever path wrote them."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from tests.core.page_cache import cached_pages
from usae_core import npy_direct
from usae_core.npy_direct import BLOCK, save_npy


def aligned(shape: tuple[int, ...], dtype, seed: int = 0) -> np.ndarray:
    """Random values in page-aligned memory, as the extractor's shard buffers are."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(n + BLOCK, np.uint8)
    start = -raw.ctypes.data % BLOCK
    out = raw[start : start + n].view(dtype).reshape(shape)
    out[...] = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    assert out.ctypes.data % BLOCK == 0
    return out


def direct_io_works(folder) -> bool:
    try:
        fd = os.open(folder / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


@pytest.mark.parametrize("rows", [2048, 2045])  # whole blocks; a partial last block
def test_aligned_arrays_round_trip_and_start_on_a_block(tmp_path, rows):
    array = aligned((rows, 384), np.float16)
    went_direct = save_npy(tmp_path / "a.npy", array)
    assert went_direct == direct_io_works(tmp_path)
    back = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert back.offset == BLOCK and back.dtype == np.float16 and back.shape == (rows, 384)
    np.testing.assert_array_equal(back, array)
    assert os.path.getsize(tmp_path / "a.npy") == BLOCK + array.nbytes


def test_direct_writes_leave_nothing_in_the_page_cache(tmp_path):
    if not direct_io_works(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    array = aligned((2048, 512), np.float32)  # 4 MB
    save_npy(tmp_path / "direct.npy", array)
    (tmp_path / "control.bin").write_bytes(array.tobytes())
    control = cached_pages(tmp_path / "control.bin")
    if not control:
        pytest.skip("this kernel does not report cached pages per file")
    assert cached_pages(tmp_path / "direct.npy") < control // 10


def test_unaligned_small_and_bfloat16_arrays_take_the_page_cache_with_the_same_format(tmp_path):
    big = aligned((1025, 256), np.float32)
    unaligned = big.reshape(-1)[1:].reshape(-1)[: 1024 * 256].reshape(1024, 256)
    small = np.arange(12, dtype=np.float16).reshape(3, 4)
    bf16_bits = aligned((512, 1024), np.uint16)
    for name, array, direct in (("unaligned", unaligned, False), ("small", small, False),
                                ("bf16", bf16_bits, direct_io_works(tmp_path))):
        assert save_npy(tmp_path / f"{name}.npy", array) == direct, name
        np.testing.assert_array_equal(np.load(tmp_path / f"{name}.npy"), array)
    assert np.load(tmp_path / "unaligned.npy", mmap_mode="r").offset == BLOCK


def test_a_file_system_refusing_o_direct_gets_the_same_file(tmp_path, monkeypatch):
    array = aligned((2045, 384), np.float16)
    save_npy(tmp_path / "reference.npy", array)

    def refuse(path, array):
        open(path, "wb").write(b"partial")  # what a refused write may leave: overwritten below
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(npy_direct, "_save_direct", refuse)
    assert save_npy(tmp_path / "fallback.npy", array) is False
    assert (tmp_path / "fallback.npy").read_bytes() == (tmp_path / "reference.npy").read_bytes()


def test_other_write_errors_are_raised(tmp_path, monkeypatch):
    def disk_full(path, array):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(npy_direct, "_save_direct", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_npy(tmp_path / "a.npy", aligned((2048, 384), np.float16))


def test_the_padded_header_is_what_numpy_reads():
    for array in (np.zeros((50176, 768), np.float16), np.zeros((7, 3), np.float32), np.zeros(0, np.uint16)):
        header = npy_direct.padded_header(array)
        assert len(header) == BLOCK
        import io

        fh = io.BytesIO(header)
        assert np.lib.format.read_magic(fh) == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        assert (shape, fortran, dtype) == (array.shape, False, array.dtype)


def test_fortran_ordered_arrays_are_written_in_their_values(tmp_path):
    for shape in ((1024, 600), (3, 4)):  # the large path and np.save's
        array = np.asfortranarray(np.random.default_rng(1).standard_normal(shape).astype(np.float16))
        save_npy(tmp_path / "f.npy", array)
        np.testing.assert_array_equal(np.load(tmp_path / "f.npy"), array)
