"""Files that fail to decode during extraction: zero rows, recorded per shard, dropped at finalize.

The reference for every case is the store extracted from the same folder without the bad file:
the compacted store must equal it row for row, image by image, whether the run was straight,
killed and resumed, or cut short in the middle of compacting. Only the shard that held the bad
file is rewritten (one image shorter), so the shard boundaries differ from the reference's."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import usae_core.store
from usae_core.errors import UsaeError
from usae_core.extract import extract_store
from usae_core.store import ActivationStore
from usae_core.store_compact import STAGING
from tests.core.crash import stopped_at_rename
from tests.core.test_extract import tiny_dinov2

BAD = "05-bad.jpg"
SHARD_IMAGES = 4
MODEL = "vit_small_patch14_dinov2"


@pytest.fixture(scope="module")
def backbone():
    return tiny_dinov2()


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """11 files, the 6th of them (shard 1 of 3 at 4 images a shard) not an image; and the same
    folder without it."""
    good = tmp_path_factory.mktemp("good")
    rng = np.random.default_rng(0)
    for i in range(10):
        name = f"{i if i < 5 else i + 1:02d}.png"
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(good / name)
    bad = tmp_path_factory.mktemp("with-bad")
    for f in good.iterdir():
        shutil.copy(f, bad / f.name)
    (bad / BAD).write_bytes(b"\xff\xd8\xff\xe0 not the rest of a jpeg")
    return good, bad


def _extract(folder: Path, backbone, out: Path, shard_images: int = SHARD_IMAGES) -> ActivationStore:
    return extract_store(folder, [backbone], out, batch_size=3, shard_images=shard_images, num_workers=0,
                         progress=False, dtype="float32")


@pytest.fixture(scope="module")
def reference(folders, backbone, tmp_path_factory) -> ActivationStore:
    return _extract(folders[0], backbone, tmp_path_factory.mktemp("ref") / "store")


def _rows(store: ActivationStore) -> np.ndarray:
    return np.concatenate([store.shard(MODEL, span.index) for span in store.spans])


def assert_same_rows(store: ActivationStore, reference: ActivationStore) -> None:
    assert store.image_ids == reference.image_ids and store.n_images == reference.n_images == 10
    assert [s.n_images for s in store.spans] == [4, 3, 3]  # the bad file's shard shrank, alone
    assert store.manifest["shard_sizes"] == [4, 3, 3]
    np.testing.assert_allclose(_rows(store), _rows(reference), rtol=1e-5, atol=1e-6)


def assert_same_store(store: ActivationStore, reference: ActivationStore) -> None:
    """Equal rows, and nothing left of the failure or the compaction."""
    assert_same_rows(store, reference)
    root = store.root
    assert not (root / STAGING).exists()
    assert sorted(p.name for p in (root / "done").iterdir()) == [f"shard-{i:06d}" for i in range(3)]
    assert all(p.read_text() == "ok\n" for p in (root / "done").iterdir())
    assert sorted(p.name for p in (root / MODEL).iterdir()) == [f"shard-{i:06d}.npy" for i in range(3)]


def test_a_bad_file_mid_store_gives_the_store_without_it(folders, backbone, reference, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        store = _extract(folders[1], backbone, tmp_path / "store")
    assert_same_store(store, reference)
    assert list(store.meta["skipped_images"]) == [BAD]
    assert store.meta["skipped_images"][BAD].startswith(("UnidentifiedImageError", "OSError"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"skipped 1 unreadable image in {folders[1].resolve()}: {BAD} "
                        f"({store.meta['skipped_images'][BAD]})"]
    # A rerun finds the compacted store complete and leaves it as it is.
    calls = []
    handle = backbone.register_forward_hook(lambda *_: calls.append(1))
    try:
        again = _extract(folders[1], backbone, tmp_path / "store")
    finally:
        handle.remove()
    assert not calls and again.image_ids == store.image_ids


def test_a_failure_in_a_shard_finished_before_a_crash_is_remembered(folders, backbone, reference, tmp_path):
    out = tmp_path / "store"
    batches = []

    def crash_in_the_third_shard(_module, inputs, _output):
        batches.append(inputs[0].shape[0])
        if len(batches) == 4:  # images 9-10: shards 0 and 1 (the one with the bad file) are done
            raise RuntimeError("simulated crash")

    handle = backbone.register_forward_hook(crash_in_the_third_shard)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _extract(folders[1], backbone, out)
    handle.remove()
    marker = json.loads((out / "done" / "shard-000001").read_text())
    assert list(marker["failed"]) == [BAD]
    assert (out / "done" / "shard-000000").read_text() == "ok\n"
    assert not (out / "done" / "shard-000002").exists()
    seen: list[int] = []
    handle = backbone.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].shape[0]))
    try:
        store = _extract(folders[1], backbone, out)
    finally:
        handle.remove()
    assert sum(seen) == 3  # only the last shard was extracted again; the bad file was not re-read
    assert_same_store(store, reference)
    assert list(store.meta["skipped_images"]) == [BAD]


@pytest.fixture(scope="module")
def uncompacted(folders, backbone, tmp_path_factory) -> Path:
    """Every shard done, the bad file recorded, finalize not yet run."""
    out = tmp_path_factory.mktemp("uncompacted") / "store"
    mp = pytest.MonkeyPatch()
    mp.setattr(usae_core.store, "compact_failed_images", _raise_stop)
    try:
        with pytest.raises(_Stop):
            _extract(folders[1], backbone, out)
    finally:
        mp.undo()
    return out


class _Stop(Exception):
    pass


def _raise_stop(*_args, **_kw):
    raise _Stop()


def test_compaction_rewrites_only_the_shard_that_held_the_bad_file(folders, backbone, reference, uncompacted,
                                                                   tmp_path):
    work = tmp_path / "store"
    shutil.copytree(uncompacted, work)
    files = sorted((work / MODEL).iterdir())
    before = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    store = _extract(folders[1], backbone, work)
    after = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    assert after["shard-000000.npy"] == before["shard-000000.npy"]
    assert after["shard-000002.npy"] == before["shard-000002.npy"]
    assert after["shard-000001.npy"][0] != before["shard-000001.npy"][0]  # renamed over: a new file
    assert_same_store(store, reference)


def test_a_shard_whose_images_all_failed_stays_empty_and_survives_losing_its_file(folders, backbone, reference,
                                                                                  tmp_path):
    out = tmp_path / "store"
    store = _extract(folders[1], backbone, out, shard_images=1)  # the bad file is shard 5, alone
    assert store.manifest["shard_sizes"] == [1] * 5 + [0] + [1] * 5
    assert [s.index for s in store.spans] == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10]
    assert np.load(out / MODEL / "shard-000005.npy").shape == (0, store.dims[MODEL])
    assert store.image_ids == reference.image_ids
    np.testing.assert_allclose(_rows(store), _rows(reference), rtol=1e-5, atol=1e-6)
    (out / MODEL / "shard-000005.npy").unlink()  # e.g. a power loss: the store is not flushed file by file
    calls = []
    handle = backbone.register_forward_hook(lambda *_: calls.append(1))
    try:
        again = _extract(folders[1], backbone, out, shard_images=1)
    finally:
        handle.remove()
    assert not calls  # the empty shard is rewritten without extracting anything
    assert np.load(out / MODEL / "shard-000005.npy").shape == (0, store.dims[MODEL])
    np.testing.assert_array_equal(_rows(again), _rows(store))


def test_compaction_cut_short_at_any_rename_is_finished_by_a_rerun(folders, backbone, reference, uncompacted,
                                                                   tmp_path, monkeypatch):
    """Every file move of the compaction (atomic writes and the roll-forward) fails in turn; the
    store is never readable in a wrong state, and the next run completes it."""
    crash_points = 0
    for fail_at in range(1, 100):
        work = tmp_path / f"crash-{fail_at}"
        shutil.copytree(uncompacted, work)
        if not stopped_at_rename(monkeypatch, fail_at, lambda: _extract(folders[1], backbone, work)):
            break
        crash_points += 1
        try:
            half = ActivationStore.open(work)
        except UsaeError as exc:
            assert "unfinished" in str(exc)
        else:  # only the clean-up after the manifest was left: the store is whole already
            assert_same_rows(half, reference)
        assert_same_store(_extract(folders[1], backbone, work), reference)
        shutil.rmtree(work)
    assert crash_points > 8  # staged shards, markers, manifest, commit and moves were all cut


def test_a_folder_of_nothing_but_unreadable_files_is_a_clear_error(backbone, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / BAD).write_bytes(b"not an image")
    with pytest.raises(UsaeError, match=f"none of the 1 images could be read .*{BAD}"):
        _extract(folder, backbone, tmp_path / "store")
