"""The device token stream yields exactly the store's own batches, resumes and rank splits included."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from usae_core.store import import_activations
from usae_core.token_stream import device_token_batches


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_device_stream_matches_the_store_stream(tmp_path, dtype):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((40, 9, 6)).astype(np.float32),
              "b": rng.standard_normal((40, 9, 10)).astype(np.float32)}
    store = import_activations(tmp_path / "store", arrays, dtype=dtype, shard_images=4)
    for kwargs in ({}, {"start_batch": 7}, {"rank": 1, "world_size": 2, "shuffle_shards": 3}):
        want = itertools.islice(store.iter_token_batches(50, seed=3, **kwargs), 25)  # > one epoch
        got = itertools.islice(device_token_batches(store, 50, seed=3, device="cpu", **kwargs), 25)
        for w, g in zip(want, got, strict=True):
            assert w.keys() == g.keys()
            for m in w:
                np.testing.assert_array_equal(g[m].numpy(), w[m])


def test_copy_rows_splits_copies_into_pieces_and_rejects_mismatched_shapes(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from usae_core import host_copy

    monkeypatch.setattr(host_copy, "PIECE_BYTES", 40)  # 10 float32 values: 2 rows of 5 per piece
    rng = np.random.default_rng(0)
    src = [rng.standard_normal((7, 5)).astype(np.float32), rng.standard_normal((1, 5)).astype(np.float32)]
    dst = [np.zeros_like(s) for s in src]
    with ThreadPoolExecutor(3) as pool:
        host_copy.copy_rows(pool, list(zip(dst, src)))
        for d, s in zip(dst, src):
            np.testing.assert_array_equal(d, s)
        with pytest.raises(ValueError, match="copy of"):
            host_copy.copy_rows(pool, [(np.zeros((3, 5)), src[0])])
