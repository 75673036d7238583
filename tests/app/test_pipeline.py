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
