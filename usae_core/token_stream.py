"""`ActivationStore.iter_token_batches`, delivered on the training device at GPU speed.

Same batches, same order, same resume point as the store's own stream. Only the work moves:
a side thread copies each shuffle group's raw shard bytes (storage dtype, one copy out of the
memory-mapped files, split over a pool of threads) into pinned buffers; the upload runs on a copy stream
while the previous group trains; the permutation, the float32 conversion and the batching happen
on the device. The host then touches each stored byte once instead of converting and permuting
float32 arrays in NumPy.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch

from usae_core.host_copy import SideStreamUpload, read_rows
from usae_core.prefetch import stoppable_put
from usae_core.store import TORCH_DTYPES

_INDEX = "#permutation"
"""Key of the group's row permutation among its uploaded tensors (never a valid model name)."""


def _groups(store, seed: int, start_batch: int, batch_size: int, shuffle_shards: int, rank: int, world_size: int):
    """(shard indices, permutation) per shuffle group, exactly as `iter_token_batches` visits them."""
    skip_rows = start_batch * batch_size
    epoch = 0
    while True:
        order = np.random.default_rng([seed, epoch]).permutation(len(store.spans))[rank::world_size]
        for gi, start in enumerate(range(0, len(order), shuffle_shards)):
            group = order[start : start + shuffle_shards]
            rows = sum(store.spans[s].n_images for s in group) * store.tokens_per_image
            if skip_rows >= rows:
                skip_rows -= rows
                continue
            perm = np.random.default_rng([seed, epoch, gi, rank]).permutation(rows)[skip_rows:]
            skip_rows = 0
            yield group, perm
        epoch += 1


def _read_group(store, models: list[str], group, pin: bool, pool: ThreadPoolExecutor) -> dict[str, torch.Tensor]:
    """The group's rows in storage dtype, concatenated in shard order, in (pinned) host memory."""
    dtype = TORCH_DTYPES[store.dtype]
    return read_rows(pool, {m: [store.shard(m, store.spans[s].index) for s in group] for m in models}, dtype, pin)


def device_token_batches(
    store, batch_size: int, *, seed: int = 0, start_batch: int = 0, shuffle_shards: int = 4, rank: int = 0,
    world_size: int = 1, device: torch.device | str = "cuda", prefetch: int = 2,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless float32 batches `{model: [batch_size, dim]}` on `device` (see module docstring)."""
    device = torch.device(device)
    models = store.model_names
    pin = device.type == "cuda"
    ready: queue.Queue = queue.Queue(maxsize=prefetch)
    stop = threading.Event()

    def produce() -> None:
        with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
            try:
                for group, perm in _groups(store, seed, start_batch, batch_size, shuffle_shards, rank, world_size):
                    if not stoppable_put(ready, (_read_group(store, models, group, pin, pool), perm), stop):
                        return
            except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
                stoppable_put(ready, exc, stop)

    producer = threading.Thread(target=produce, name="token-stream", daemon=True)
    producer.start()
    uploads = SideStreamUpload(device)

    def upload():
        item = ready.get()
        if isinstance(item, BaseException):
            raise item
        host, perm = item
        index = torch.from_numpy(perm)
        return uploads.start({**host, _INDEX: index.pin_memory() if pin else index})

    try:
        leftover: dict[str, torch.Tensor] | None = None
        pending = upload()
        while True:
            raw = uploads.ready(pending)
            chunk = {m: raw[m].index_select(0, raw[_INDEX]).float() for m in models}
            pending = upload()  # the next group's copy overlaps this group's training
            if leftover is not None:
                chunk = {m: torch.cat([leftover[m], chunk[m]]) for m in models}
            n, pos = len(chunk[models[0]]), 0
            while n - pos >= batch_size:
                yield {m: chunk[m][pos : pos + batch_size] for m in models}
                pos += batch_size
            leftover = {m: chunk[m][pos:] for m in models}
    finally:  # see prefetch(): never leave the reader running inside torch
        stop.set()
        producer.join()
