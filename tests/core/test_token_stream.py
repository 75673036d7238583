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
