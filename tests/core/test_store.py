"""ActivationStore: layout, streaming, exact resume of the batch stream, statistics, bad input."""

from __future__ import annotations

import itertools
import json
import re
import os
from pathlib import Path

import numpy as np
import torch
import pytest

from tests.core.crash import stopped_at_rename
from tests.core.page_cache import dirty_pages
from usae_core.errors import UsaeError
from usae_core.store import ActivationStore, from_storage, import_activations, to_storage


def _aligned_arrays(n_images=20, n_tokens=9, seed=0):
    """Model b is a fixed function of model a's row, so row alignment can be checked."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n_images, n_tokens, 6)).astype(np.float32)
    b = np.concatenate([a * 2, a[..., :2] - 1], axis=-1)
    return {"a": a, "b": b}


def test_import_round_trips_in_image_order(tmp_path):
    arrays = _aligned_arrays()
    store = import_activations(tmp_path / "s", arrays, dtype="float32", shard_images=6)
    assert store.dims == {"a": 6, "b": 8}
    assert store.grid == (3, 3) and store.n_images == 20 and store.n_tokens == 180
    assert len(store.spans) == 4 and store.spans[-1].n_images == 2
    np.testing.assert_array_equal(store.image_tokens("b", 13), arrays["b"][13])
    np.testing.assert_array_equal(store.image_tokens("a", 19), arrays["a"][19])  # the last
    for outside in (20, -1):  # refused like everything the library refuses, not an IndexError or a wrap-around
        with pytest.raises(UsaeError, match=f"image {outside} is outside the store's 20 images"):
            store.image_tokens("a", outside)
    # By image id too (what pages, the top images and a folder listing name), and np.int64 indices.
    ids = store.image_ids
    np.testing.assert_array_equal(store.image_tokens("a", ids[13]), arrays["a"][13])
    np.testing.assert_array_equal(store.image_tokens("b", np.int64(7)), arrays["b"][7])
    with pytest.raises(UsaeError, match=r"the store has no image 'nope.png' \(image ids are paths relative to the "
                                        rf"image folder, e\.g\. '{re.escape(ids[0])}'\)"):
        store.image_tokens("a", "nope.png")
    with pytest.raises(UsaeError, match="an image is an index or an image id"):
        store.image_tokens("a", 1.5)
    seen = []
    for start, batch in store.iter_images(batch_images=4):
        np.testing.assert_array_equal(batch["a"], arrays["a"][start : start + len(batch["a"])])
        seen.append(start)
    assert seen == [0, 4, 6, 10, 12, 16, 18]
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["format"] == "usae-activation-store"


def test_import_takes_torch_tensors_and_names_a_wrong_container(tmp_path):
    arrays = _aligned_arrays(n_images=4)
    tensors = {"a": torch.from_numpy(arrays["a"]).to(torch.bfloat16), "b": torch.from_numpy(arrays["b"])}
    store = import_activations(tmp_path / "t", tensors, dtype="float32")
    np.testing.assert_array_equal(store.image_tokens("b", 3), arrays["b"][3])
    np.testing.assert_array_equal(store.image_tokens("a", 1), tensors["a"][1].float().numpy())
    with pytest.raises(UsaeError, match="maps each model's name to its activations.*got a list"):
        import_activations(tmp_path / "u", list(arrays.items()))
    assert not (tmp_path / "u").exists()


def test_token_batches_keep_rows_aligned_and_visit_every_token(tmp_path):
    store = import_activations(tmp_path / "s", _aligned_arrays(), dtype="float32", shard_images=6)
    it = store.iter_token_batches(30, seed=5, shuffle_shards=2)
    rows = []
    for _ in range(6):  # 6 * 30 = 180 = exactly one epoch
        batch = next(it)
        np.testing.assert_allclose(batch["b"][:, :6], batch["a"] * 2)
        np.testing.assert_allclose(batch["b"][:, 6:], batch["a"][:, :2] - 1)
        rows.append(batch["a"])
    epoch = np.concatenate(rows)
    flat = _aligned_arrays()["a"].reshape(-1, 6)
    assert sorted(map(tuple, epoch)) == sorted(map(tuple, flat))
    assert not np.array_equal(epoch, flat)  # shuffled


def test_token_stream_resumes_exactly_from_any_batch(tmp_path):
    store = import_activations(tmp_path / "s", _aligned_arrays(), dtype="float32", shard_images=6)
    it = store.iter_token_batches(25, seed=1)
    straight = [next(it) for _ in range(20)]  # crosses several epochs and partial chunks
    for start in (1, 7, 13):
        resumed = store.iter_token_batches(25, seed=1, start_batch=start)
        for i in range(start, 20):
            np.testing.assert_array_equal(next(resumed)["b"], straight[i]["b"])


def test_ranks_read_disjoint_shards(tmp_path):
    store = import_activations(tmp_path / "s", _aligned_arrays(), dtype="float32", shard_images=5)
    r0 = np.concatenate([next(store.iter_token_batches(45, seed=2, rank=0, world_size=2))["a"]])
    r1 = np.concatenate([next(store.iter_token_batches(45, seed=2, rank=1, world_size=2))["a"]])
    assert not set(map(tuple, r0)) & set(map(tuple, r1))


@pytest.mark.parametrize("dtype, tol", [("float16", 1e-3), ("bfloat16", 8e-3), ("float32", 0)])
def test_storage_dtypes_round_trip(dtype, tol):
    x = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32)
    back = from_storage(to_storage(x, dtype), dtype)
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, x, rtol=tol, atol=tol)


def test_stats_match_a_float64_recomputation(tmp_path):
    arrays = _aligned_arrays(seed=3)
    arrays["a"] = arrays["a"] * 3 + 5
    store = import_activations(tmp_path / "s", arrays, dtype="float32", shard_images=7)
    stats = store.compute_stats(batch_images=3)
    flat = arrays["a"].reshape(-1, 6).astype(np.float64)
    np.testing.assert_allclose(stats["a"]["mean"], flat.mean(0), rtol=1e-5)
    expected_scale = np.sqrt(((flat - flat.mean(0)) ** 2).sum(1).mean() / 6)
    np.testing.assert_allclose(stats["a"]["scale"], expected_scale, rtol=1e-5)


def test_stats_pass_shows_a_bar_counting_every_image(tmp_path, capsys):
    """The statistics pass before training can take minutes on a large store: with `progress`
    its bar reaches the store's image count, and the numbers are the same as without."""
    store = import_activations(tmp_path / "s", _aligned_arrays(seed=3), dtype="float32", shard_images=7)
    quiet = store.compute_stats(batch_images=3)
    assert "statistics" not in capsys.readouterr().err
    shown = store.compute_stats(batch_images=3, progress=True)
    bar = capsys.readouterr().err
    assert "statistics" in bar and f"{store.n_images}/{store.n_images}" in bar
    for m in quiet:
        np.testing.assert_array_equal(quiet[m]["mean"], shown[m]["mean"])


def _good():
    rng = np.random.default_rng(0)
    return {"a": rng.standard_normal((4, 9, 3)).astype(np.float32), "b": rng.standard_normal((4, 9, 5)).astype(np.float32)}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(b=d["b"][:3]), "image counts differ"),
        (lambda d: d.update(b=d["b"][:, :4]), "token counts differ"),
        (lambda d: d["a"].__setitem__((1, 2, 0), np.nan), "NaN or Inf"),
        (lambda d: d["b"].__setitem__((0, 0, 0), np.inf), "NaN or Inf"),
        (lambda d: d.update(a=d["a"][0]), "expected shape"),
        (lambda d: d.update({"bad/name": d.pop("a")}), "invalid model name"),
        (lambda d: d.update(a=d["a"].astype(np.int32)), "floating-point"),
    ],
)
def test_bad_input_is_rejected_and_leaves_nothing(tmp_path, mutate, message):
    arrays = _good()
    mutate(arrays)
    with pytest.raises(UsaeError, match=message):
        import_activations(tmp_path / "s", arrays)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite_and_survives_a_failed_overwrite(tmp_path):
    import_activations(tmp_path / "s", _good())
    with pytest.raises(UsaeError, match="--overwrite"):
        import_activations(tmp_path / "s", _good())
    bad = _good()
    bad["a"][0, 0, 0] = np.nan
    with pytest.raises(UsaeError, match="NaN"):
        import_activations(tmp_path / "s", bad, overwrite=True)
    assert ActivationStore.open(tmp_path / "s").n_images == 4  # the old store is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    import_activations(tmp_path / "s", {"a": _good()["a"][:2]}, overwrite=True)
    assert ActivationStore.open(tmp_path / "s").n_images == 2


def test_overwrite_never_deletes_a_folder_that_is_not_a_store(tmp_path):
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(UsaeError, match="holds no activation store"):
        import_activations(precious, _good(), overwrite=True)
    with pytest.raises(UsaeError, match="holds no activation store"):  # not "pass --overwrite", which is refused
        ActivationStore.create(precious, models={"a": 4}, grid=(1, 3), image_ids=["x"])
    assert [p.name for p in precious.iterdir()] == ["notes.txt"] and (precious / "notes.txt").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert import_activations(empty, _good(), overwrite=True).n_images == 4


def test_an_overwrite_cut_at_any_rename_leaves_the_old_or_the_new_store(tmp_path, monkeypatch):
    """The new store is built beside the old one and swapped in by renames; a crash at any of
    them leaves a whole store for the next reader (the old one, or the new one moved in), and
    the next writer leaves nothing but the store behind."""
    old, new = _good(), {"a": _good()["a"][:2]}
    outcomes = set()
    for fail_at in itertools.count(1):
        work = tmp_path / f"crash-{fail_at}"
        work.mkdir()
        import_activations(work / "s", old)
        if not stopped_at_rename(monkeypatch, fail_at, lambda: import_activations(work / "s", new, overwrite=True)):
            break
        n_images = ActivationStore.open(work / "s").n_images  # never a missing or mixed store
        assert n_images in (2, 4)
        outcomes.add(n_images)
        import_activations(work / "s", old, overwrite=True)  # the next run
        assert [p.name for p in work.iterdir()] == ["s"] and ActivationStore.open(work / "s").n_images == 4
    assert fail_at > 3  # the shard, its marker, the manifests and the swap's renames were all cut
    assert outcomes == {2, 4}  # cut before the swap: the old store; between its renames: the new one


def test_unfinished_store_cannot_be_opened_and_resumes(tmp_path):
    arrays = _good()
    ids = [f"i{i}" for i in range(4)]
    writer = ActivationStore.create(tmp_path / "s", models={"a": 3, "b": 5}, grid=(3, 3), image_ids=ids,
                                    shard_images=2)
    writer.write_shard(0, {m: a[:2] for m, a in arrays.items()})
    with pytest.raises(UsaeError, match="unfinished"):
        ActivationStore.open(tmp_path / "s")
    again = ActivationStore.create(tmp_path / "s", models={"a": 3, "b": 5}, grid=(3, 3), image_ids=ids,
                                   shard_images=2, resume=True)
    assert [s.index for s in again.pending()] == [1]
    again.write_shard(1, {m: a[2:] for m, a in arrays.items()})
    store = again.finalize()
    np.testing.assert_allclose(store.image_tokens("b", 3), arrays["b"][3], atol=1e-2)
    with pytest.raises(UsaeError, match=r"different layout \(saved vs given: models .*\); rerun with the settings"):
        ActivationStore.create(tmp_path / "s", models={"a": 3}, grid=(3, 3), image_ids=ids, shard_images=2,
                               resume=True)
    with pytest.raises(UsaeError, match=r"saved vs given: grid \[3, 3\] vs \[4, 4\]\)"):  # only what differs
        ActivationStore.create(tmp_path / "s", models={"a": 3, "b": 5}, grid=(4, 4), image_ids=ids, shard_images=2,
                               resume=True)
    with pytest.raises(UsaeError, match=r"saved vs given: the image list\)"):
        ActivationStore.create(tmp_path / "s", models={"a": 3, "b": 5}, grid=(3, 3), image_ids=ids[::-1],
                               shard_images=2, resume=True)


def test_a_shard_cut_short_after_its_marker_is_rewritten_on_resume(tmp_path):
    """Shards are renamed into place without a disk flush: after a power loss a marker may
    outlive its data. Resume must treat such a shard as missing, and reading it must say so."""
    arrays = _good()
    ids = [f"i{i}" for i in range(4)]
    layout = dict(models={"a": 3, "b": 5}, grid=(3, 3), image_ids=ids, shard_images=2)
    writer = ActivationStore.create(tmp_path / "s", **layout)
    for i in range(2):
        writer.write_shard(i, {m: a[2 * i : 2 * i + 2] for m, a in arrays.items()})
    store = writer.finalize()
    shard_file = next((tmp_path / "s").rglob("*.npy"))
    shard_file.write_bytes(shard_file.read_bytes()[:-7])  # lost tail of the write
    with pytest.raises(UsaeError, match="missing or damaged"):
        for m in store.model_names:
            for span in store.spans:
                ActivationStore.open(tmp_path / "s").shard(m, span.index)
    again = ActivationStore.create(tmp_path / "s", **layout, resume=True)
    assert len(again.pending()) == 1
    damaged = again.pending()[0].index
    again.write_shard(damaged, {m: a[2 * damaged : 2 * damaged + 2] for m, a in arrays.items()})
    fixed = again.finalize()
    for m in fixed.model_names:
        for i in range(4):
            np.testing.assert_allclose(fixed.image_tokens(m, i), arrays[m][i], atol=1e-2)


def test_shard_writes_start_their_writeback_at_once(tmp_path):
    """A shard leaves no dirty pages behind it: its writeback starts as it is written, so the
    store's final durable manifest write does not wait for every shard at once. A file written
    plainly beside it is the control (it stays dirty until the kernel's writeback timer). On ext4
    the temporary file's truncate-then-write also starts it (`auto_da_alloc`); other file
    systems rely on `start_writeback` alone, which tests/core/test_atomic.py checks."""
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((2, 64, 4096)).astype(np.float32)}  # 2 MB: 512 pages
    writer = ActivationStore.create(tmp_path / "s", models={"a": 4096}, grid=(8, 8), image_ids=["x", "y"],
                                    dtype="float32")
    control = tmp_path / "control.bin"
    control.write_bytes(arrays["a"].tobytes())
    writer.write_shard(0, arrays)
    control_dirty = dirty_pages(control)
    if not control_dirty:
        pytest.skip("this kernel or file system does not report dirty pages per file")
    shard = next((tmp_path / "s").rglob("*.npy"))
    assert dirty_pages(shard) < control_dirty // 10
    np.testing.assert_array_equal(writer.finalize().shard("a", 0), arrays["a"].reshape(-1, 4096))


def test_write_shard_checks_shapes(tmp_path):
    writer = ActivationStore.create(tmp_path / "s", models={"a": 3}, grid=(2, 2), image_ids=["x", "y"])
    with pytest.raises(UsaeError, match="expected"):
        writer.write_shard(0, {"a": np.zeros((2, 3, 3), np.float32)})
    with pytest.raises(UsaeError, match="got models"):
        writer.write_shard(0, {"z": np.zeros((2, 4, 3), np.float32)})


def test_open_rejects_non_stores(tmp_path):
    with pytest.raises(UsaeError, match="not an activation store"):
        ActivationStore.open(tmp_path)
    # A mistyped name says it is not there, and which stores are.
    import_activations(tmp_path / "stores" / "line3", _good())
    with pytest.raises(UsaeError, match=f"^there is no activation store at {tmp_path / 'stores' / 'line4'} "
                                        r"\(stores beside it: line3\)$"):
        ActivationStore.open(tmp_path / "stores" / "line4")
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(UsaeError, match="not valid JSON"):
        ActivationStore.open(tmp_path)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_shard_writes_reject_non_finite_values_in_every_dtype(tmp_path, dtype):
    writer = ActivationStore.create(tmp_path / "s", models={"a": 3}, grid=(2, 2), image_ids=["x"], dtype=dtype)
    bad = np.ones((1, 4, 3), np.float32)
    bad[0, 1, 2] = -np.inf if dtype == "bfloat16" else 1e6  # 1e6 overflows float16
    with pytest.raises(UsaeError, match="NaN or Inf"):
        writer.write_shard(0, {"a": bad})
    assert not writer.is_done(0)


def _finalize_with_failures(root, arrays, failed, *, shard_images, dtype):
    """A store written shard by shard whose images `failed` (indices) could not be read: zero
    rows, named in the done markers. Returns the writer, ready to finalize."""
    n_images = len(arrays["a"])
    ids = [f"img-{i:02d}.png" for i in range(n_images)]
    writer = ActivationStore.create(root, models={"a": 6, "b": 8}, grid=(3, 3), image_ids=ids, dtype=dtype,
                                    shard_images=shard_images)
    for span in writer.spans:
        mine = [i for i in range(span.start, span.stop) if i in failed]
        rows = {m: a[span.start : span.stop].copy() for m, a in arrays.items()}
        for m in rows:
            rows[m][[i - span.start for i in mine]] = 0
        writer.write_shard(span.index, rows, failed={ids[i]: f"bad {i}" for i in mine})
    return writer


def _rows(store, model):
    return np.concatenate([store.shard(model, span.index) for span in store.spans])


VARIABLE_FAILED = {3, 6, 7, 8, 9, 10, 11, 19}
"""Of 20 images in shards of 6: one alone, all of shard 1, the last one -> shard sizes [5, 0, 6, 1]."""


def test_finalize_drops_the_images_a_writer_could_not_read(tmp_path):
    """Images named as failed in the done markers are dropped at finalize: the store equals one
    built without them, image by image and bit for bit (bf16 included). Only the shards that held
    them are rewritten; a shard that lost every image stays, empty."""
    arrays = _aligned_arrays()
    store = _finalize_with_failures(tmp_path / "s", arrays, VARIABLE_FAILED, shard_images=6,
                                    dtype="bfloat16").finalize()
    kept = [i for i in range(20) if i not in VARIABLE_FAILED]
    ids = [f"img-{i:02d}.png" for i in range(20)]
    ref = import_activations(tmp_path / "r", {m: a[kept] for m, a in arrays.items()},
                             image_ids=[ids[i] for i in kept], dtype="bfloat16", shard_images=6)
    assert store.image_ids == ref.image_ids and store.n_images == 12
    assert store.manifest["shard_sizes"] == [5, 0, 6, 1]
    assert [(s.index, s.start, s.stop) for s in store.spans] == [(0, 0, 5), (2, 5, 11), (3, 11, 12)]
    assert store.meta["skipped_images"] == {ids[i]: f"bad {i}" for i in sorted(VARIABLE_FAILED)}
    for m in ("a", "b"):
        np.testing.assert_array_equal(_rows(store, m), _rows(ref, m))
    assert sorted(p.name for p in (tmp_path / "s" / "a").iterdir()) == [f"shard-{i:06d}.npy" for i in range(4)]
    assert np.load(tmp_path / "s" / "a" / "shard-000001.npy").shape == (0, 6)
    assert [p.read_text() for p in sorted((tmp_path / "s" / "done").iterdir())] == ["ok\n"] * 4
    # A resumed writer with the first layout keeps every shard, the empty one included.
    again = ActivationStore.create(tmp_path / "s", models={"a": 6, "b": 8}, grid=(3, 3), image_ids=ids,
                                   dtype="bfloat16", shard_images=6, resume=True)
    assert again.pending() == [] and again.failures() == {}


def test_compaction_rewrites_only_the_shards_that_held_failed_images(tmp_path, monkeypatch):
    """Ten shards, a failure in shard 4 and all of shard 7: no other shard file is written, and
    the store equals one built without those images, image by image."""
    arrays = _aligned_arrays(n_images=30)
    failed = {13, 21, 22, 23}
    writer = _finalize_with_failures(tmp_path / "s", arrays, failed, shard_images=3, dtype="float16")
    root = tmp_path / "s"
    shards = sorted(root.glob("[ab]/shard-*.npy"))
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in shards}
    written = []
    real_replace = os.replace

    def recording_replace(src, dst):
        written.append(Path(dst).relative_to(root).as_posix())
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    store = writer.finalize()
    monkeypatch.setattr(os, "replace", real_replace)
    moved_into_the_store = sorted(w for w in written if w.endswith(".npy") and not w.startswith(".compact"))
    assert moved_into_the_store == ["a/shard-000004.npy", "a/shard-000007.npy",
                                    "b/shard-000004.npy", "b/shard-000007.npy"]
    for p, (ino, mtime, data) in before.items():
        if p.name not in ("shard-000004.npy", "shard-000007.npy"):
            assert (p.stat().st_ino, p.stat().st_mtime_ns) == (ino, mtime), p
            assert p.read_bytes() == data
    assert store.manifest["shard_sizes"] == [3, 3, 3, 3, 2, 3, 3, 0, 3, 3]
    kept = [i for i in range(30) if i not in failed]
    assert store.n_images == 26 and len(store.spans) == 9
    for m in ("a", "b"):
        want = to_storage(arrays[m][kept], "float16")
        for i in range(26):
            np.testing.assert_array_equal(store.image_tokens(m, i), from_storage(want[i], "float16"))


def test_readers_of_a_store_with_shards_of_different_sizes(tmp_path):
    """Every reader maps images to shards by the manifest's sizes, and skips the empty shard."""
    import torch

    from usae_core.mining import iter_image_batches
    from usae_core.token_stream import device_token_batches

    arrays = _aligned_arrays()
    store = _finalize_with_failures(tmp_path / "s", arrays, VARIABLE_FAILED, shard_images=6,
                                    dtype="float32").finalize()
    kept = {m: a[[i for i in range(20) if i not in VARIABLE_FAILED]] for m, a in arrays.items()}
    assert [s.n_images for s in store.spans] == [5, 6, 1]
    for i in range(12):
        np.testing.assert_array_equal(store.image_tokens("b", i), kept["b"][i])
    with pytest.raises(UsaeError, match="image 12 is outside the store's 12 images"):
        store.image_tokens("a", 12)
    starts = []
    for start, batch in store.iter_images(batch_images=4):
        np.testing.assert_array_equal(batch["a"], kept["a"][start : start + len(batch["a"])])
        starts.append(start)
    assert starts == [0, 4, 5, 9, 11]
    mined = list(iter_image_batches(store, 4, torch.device("cpu")))
    # Batches stay inside a shard, and the first ones ramp up (1, 2, then 4 images).
    assert [(first, n) for first, n, _ in mined] == [(0, 1), (1, 2), (3, 2), (5, 4), (9, 2), (11, 1)]
    np.testing.assert_array_equal(torch.cat([rows["b"] for _, _, rows in mined]).numpy(),
                                  kept["b"].reshape(-1, 8))
    # One epoch (12 images * 9 tokens = 9 batches of 12) visits every kept token once, rows aligned.
    epoch = list(itertools.islice(store.iter_token_batches(12, seed=4, shuffle_shards=2), 9))
    for batch in epoch:
        np.testing.assert_array_equal(batch["b"][:, :6], batch["a"] * 2)
    assert sorted(map(tuple, np.concatenate([b["a"] for b in epoch]))) == sorted(map(tuple, kept["a"].reshape(-1, 6)))
    for kwargs in ({}, {"start_batch": 5}, {"rank": 2, "world_size": 3, "shuffle_shards": 1}):
        want = itertools.islice(store.iter_token_batches(10, seed=3, **kwargs), 25)  # > one epoch
        got = itertools.islice(device_token_batches(store, 10, seed=3, device="cpu", **kwargs), 25)
        for w, g in zip(want, got, strict=True):
            np.testing.assert_array_equal(g["a"].numpy(), w["a"])
    ranks = [set(map(tuple, next(store.iter_token_batches(9, seed=1, rank=r, world_size=3))["a"])) for r in range(3)]
    assert len(set.union(*ranks)) == 27  # one shard each, disjoint
    with pytest.raises(UsaeError, match="3 shards, fewer than the 4 ranks"):
        next(store.iter_token_batches(9, rank=0, world_size=4))


def test_a_store_without_shard_sizes_keeps_the_fixed_layout(tmp_path):
    """Stores written before `shard_sizes` existed (and any store no compaction shrank) read as
    `shard_images` images a shard; a compaction that leaves that layout does not record sizes."""
    store = import_activations(tmp_path / "s", _aligned_arrays(), dtype="float32", shard_images=6)
    assert "shard_sizes" not in store.manifest
    assert [(s.start, s.stop) for s in ActivationStore.open(tmp_path / "s").spans] == [(0, 6), (6, 12), (12, 18),
                                                                                        (18, 20)]
    last_failed = _finalize_with_failures(tmp_path / "t", _aligned_arrays(), {19}, shard_images=6,
                                          dtype="float32").finalize()
    assert "shard_sizes" not in last_failed.manifest and last_failed.n_images == 19
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    (tmp_path / "s" / "manifest.json").write_text(json.dumps({**manifest, "shard_sizes": [6, 6, 6]}))
    with pytest.raises(UsaeError, match="add up to 18 images, n_images says 20"):
        ActivationStore.open(tmp_path / "s")


def test_large_shards_with_block_headers_are_read_and_compacted(tmp_path):
    """Shards of 1 MB or more carry a 4 KiB .npy header (usae_core.npy_direct); readers and a
    compaction take them like NumPy's own files, and the rewritten shard gets NumPy's header."""
    a = np.random.default_rng(3).standard_normal((16, 64, 1024)).astype(np.float16)  # 1 MB a shard
    ids = [f"img-{i:02d}.png" for i in range(16)]
    writer = ActivationStore.create(tmp_path / "s", models={"a": 1024}, grid=(8, 8), image_ids=ids,
                                    dtype="float16", shard_images=8)
    for span in writer.spans:
        rows = a[span.start : span.stop].copy()
        failed = {}
        if span.index == 0:
            rows[3] = 0
            failed = {ids[3]: "bad"}
        writer.write_shard(span.index, {"a": rows}, failed=failed)
    offsets = [np.load(tmp_path / "s" / "a" / f"shard-{i:06d}.npy", mmap_mode="r").offset for i in (0, 1)]
    assert offsets == [4096, 4096]
    store = writer.finalize()
    assert np.load(tmp_path / "s" / "a" / "shard-000000.npy", mmap_mode="r").offset < 4096  # rewritten
    assert np.load(tmp_path / "s" / "a" / "shard-000001.npy", mmap_mode="r").offset == 4096  # untouched
    kept = [i for i in range(16) if i != 3]
    assert store.image_ids == [ids[i] for i in kept]
    for j, i in enumerate(kept):
        np.testing.assert_array_equal(store.image_tokens("a", j), a[i].astype(np.float32))
    batch = next(store.iter_token_batches(64, seed=0))
    assert batch["a"].shape == (64, 1024) and np.isfinite(batch["a"]).all()


def test_a_store_says_what_it_holds(tmp_path):
    store = import_activations(tmp_path / "s", _aligned_arrays(), dtype="float32", shard_images=6)
    assert repr(store) == f"ActivationStore('{tmp_path / 's'}', 20 images, grid 3x3, float32, models: a (6), b (8))"
