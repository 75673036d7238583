"""Getting stored rows to the device: host copies split over a thread pool, and uploads on a
side CUDA stream.

One thread copying out of the page cache moves about 5 GB/s; a GPU step consumes more. NumPy
releases the GIL while it copies, so pieces of one copy run in parallel on several cores. The
upload of the next batch then runs on its own stream while the current batch computes."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch

PIECE_BYTES = 16 << 20
"""Rows per piece are chosen so that a piece moves about this many bytes."""


def copy_rows(pool: ThreadPoolExecutor, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """`np.copyto(dst, src)` for every `(dst, src)` pair of equal shapes, in row pieces over `pool`."""
    pieces = []
    for dst, src in pairs:
        if dst.shape != src.shape:
            raise ValueError(f"copy of {src.shape} into {dst.shape}")
        row_bytes = max(1, src[:1].nbytes)
        step = max(1, PIECE_BYTES // row_bytes)
        pieces += [(dst[lo : lo + step], src[lo : lo + step]) for lo in range(0, len(src), step)]
    for _ in pool.map(lambda p: np.copyto(*p), pieces):
        pass


def read_rows(pool: ThreadPoolExecutor, parts: Mapping[str, Sequence[np.ndarray]], dtype: torch.dtype,
              pin: bool) -> dict[str, torch.Tensor]:
    """For each key, the rows of its `parts` (memory-mapped shard slices in a store's storage
    dtype; bfloat16 as its uint16 bit patterns) concatenated into one CPU tensor of `dtype`,
    pinned when `pin` (for fast asynchronous upload).

    The pieces of every key go to the pool together: one model's rows alone are too few pieces
    to keep all the threads busy."""
    out, pairs = {}, []
    for key, key_parts in parts.items():
        rows = torch.empty(sum(len(p) for p in key_parts), key_parts[0].shape[1], dtype=dtype, pin_memory=pin)
        view = rows.view(torch.int16).numpy() if dtype == torch.bfloat16 else rows.numpy()
        at = 0
        for p in key_parts:
            pairs.append((view[at : at + len(p)], p.view(view.dtype)))
            at += len(p)
        out[key] = rows
    copy_rows(pool, pairs)
    return out


class Upload(NamedTuple):
    tensors: dict
    """Device tensors (the host tensors themselves when there is no side stream)."""
    done: "torch.cuda.Event | None"
    host: Mapping | None
    """The pinned sources, referenced until the upload is consumed."""


class SideStreamUpload:
    """Host tensors copied to `device` on a side stream, so the next batch's copy overlaps the
    current batch's compute. On CPU the tensors pass through unchanged."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, host: Mapping) -> Upload:
        """Queue the copies of `host` ({key: pinned tensor}) and return at once."""
        if self.stream is None:
            return Upload(dict(host), None, None)
        with torch.cuda.stream(self.stream):
            tensors = {key: t.to(self.device, non_blocking=True) for key, t in host.items()}
            done = torch.cuda.Event()
            done.record(self.stream)
        return Upload(tensors, done, host)

    def ready(self, upload: Upload) -> dict:
        """The uploaded tensors, safe to use on the current stream: it waits for the copies, and
        the caching allocator learns that these side-stream tensors are used there."""
        if upload.done is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(upload.done)
            for t in upload.tensors.values():
                t.record_stream(current)
        return upload.tensors
