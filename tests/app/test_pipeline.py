"""Pieces of the demo pipeline that need no demo run."""

from __future__ import annotations

from app.pipeline import _read_record


def test_a_missing_or_garbled_training_record_means_train_afresh(tmp_path):
    """The record decides whether a rerun continues a training; a file that is not the JSON the
    demo wrote (edited by hand, say) must not crash the demo, only stop it from resuming."""
    (tmp_path / "garbled.json").write_text('{"store": "ab')
    (tmp_path / "good.json").write_text('{"store": "ab"}')
    assert _read_record(tmp_path / "garbled.json") is None
    assert _read_record(tmp_path / "missing.json") is None
    assert _read_record(tmp_path / "good.json") == {"store": "ab"}


def test_only_checkpoints_written_after_the_record_are_continued(tmp_path):
    """A demo stopped between writing its record and starting the new run leaves an earlier
    training's checkpoints behind: they must not pass for the recorded training's."""
    import os

    from app.pipeline import _checkpointed_since

    record = tmp_path / "record.json"
    record.write_text("{}")
    run = tmp_path / "runs" / "demo"
    stale = run / "checkpoints" / "step-00000150"
    stale.mkdir(parents=True)
    os.utime(stale, ns=(record.stat().st_mtime_ns - 10**9,) * 2)
    assert not _checkpointed_since(record, run)  # an unfinished first run, from before the record
    os.utime(stale, ns=(record.stat().st_mtime_ns + 10**9,) * 2)
    assert _checkpointed_since(record, run)
    replacing = tmp_path / "runs" / ".demo.replacing"
    (replacing / "checkpoints").mkdir(parents=True)  # an overwrite under way: its folder decides
    assert not _checkpointed_since(record, run)
    (run / "config.json").write_text("{}")
    fresh = replacing / "checkpoints" / "step-00000300"
    fresh.mkdir()
    os.utime(fresh, ns=(record.stat().st_mtime_ns + 10**9,) * 2)
    assert _checkpointed_since(record, run)
    import shutil
    shutil.rmtree(replacing)
    assert not _checkpointed_since(record, run)  # a finished run has nothing to continue
