"""Atomic writes: the new file or folder appears whole, with ordinary permissions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from usae_core import atomic
from tests.core.page_cache import dirty_pages
from usae_core.atomic import atomic_directory, atomic_path, atomic_write_json, remove_abandoned_builds, start_writeback
from usae_core.errors import UsaeError
from usae_core.store import import_activations


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022(monkeypatch):
    """A umask of 022 for plain writes, and for the atomic writes (which read it at import)."""
    old = os.umask(0o022)
    monkeypatch.setattr(atomic, "_UMASK", 0o022)
    yield
    os.umask(old)


def test_written_files_and_folders_get_the_permissions_of_a_plain_write(tmp_path, umask_022):
    """Temporary files are private; what is renamed into place must not stay so, or a server
    running as another user cannot read what the command line wrote."""
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    with atomic_path(tmp_path / "b.bin", durable=False) as tmp:
        tmp.write_bytes(b"data")
    with atomic_directory(tmp_path / "folder") as tmp:
        (tmp / "inside.txt").write_text("hi")
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    (tmp_path / "plain-dir").mkdir()
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "b.bin") == _mode(plain) == 0o644
    assert _mode(tmp_path / "folder") == _mode(tmp_path / "plain-dir") == 0o755
    store = import_activations(tmp_path / "store", {"m": np.zeros((2, 4, 3), np.float32)})
    assert _mode(store.root) == 0o755 and _mode(store.root / "manifest.json") == 0o644


def test_a_failed_block_leaves_the_old_file_and_no_temporary(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"version": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "a.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert (tmp_path / "a.json").read_text().strip().startswith("{") and "1" in (tmp_path / "a.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_finishing_a_cut_swap_that_another_process_finishes_first(tmp_path, monkeypatch):
    """Two readers may both find a swap cut between its renames: the one that loses the race to
    move the replacement in must accept the winner's result, not fail."""
    from pathlib import Path

    target = tmp_path / "store"
    new, old = atomic.replacement_folders(target)
    for folder, text in ((new, "new"), (old, "old")):
        folder.mkdir()
        (folder / "which").write_text(text)
    real_exists = Path.exists

    def exists(self, *args, **kwargs):
        if self == new and real_exists(new):
            os.replace(new, target)  # the other reader moves the replacement in right now
        return real_exists(self, *args, **kwargs)

    monkeypatch.setattr(Path, "exists", exists)
    atomic.finish_replacement(target)
    monkeypatch.undo()
    assert (target / "which").read_text() == "new"
    assert not old.exists() and not new.exists()


def test_two_builders_of_one_folder_each_finish_with_a_whole_folder(tmp_path):
    """Two processes building the same target (two `usae demo` at once) must not delete each
    other's half-built folder; the target ends up as one builder's complete folder."""
    import threading

    target = tmp_path / "set"
    a_started, b_done = threading.Event(), threading.Event()
    errors = []

    def builder(name: str, first: bool) -> None:
        try:
            with atomic_directory(target, overwrite=True) as tmp:
                (tmp / "one").write_text(name)
                if first:
                    a_started.set()
                    b_done.wait(10)
                (tmp / "two").write_text(name)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            if not first:
                b_done.set()

    a = threading.Thread(target=builder, args=("a", True))
    a.start()
    a_started.wait(10)
    builder("b", False)
    a.join(10)
    assert errors == []
    assert {(target / f).read_text() for f in ("one", "two")} in ({"a"}, {"b"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no build folders left


def test_overwriting_a_linked_folder_replaces_what_it_links_to_and_keeps_the_link(tmp_path):
    """A store kept on another disk behind a symbolic link: overwrites rebuild it there, twice."""
    real, link = tmp_path / "big" / "store", tmp_path / "data" / "store"
    real.mkdir(parents=True)
    (real / "which").write_text("old")
    link.parent.mkdir()
    link.symlink_to(real, target_is_directory=True)
    for version in ("first", "second"):
        with atomic_directory(link, overwrite=True) as tmp:
            (tmp / "which").write_text(version)
        assert link.is_symlink() and (link / "which").read_text() == version
    assert sorted(p.name for p in real.parent.iterdir()) == ["store"]
    assert sorted(p.name for p in link.parent.iterdir()) == ["store"]


def test_start_writeback_leaves_no_dirty_pages(tmp_path):
    """The file's pages go to the disk now (dirty -> writeback), while a file written the same
    way without it stays dirty."""
    data = np.random.default_rng(0).bytes(4 << 20)
    for name in ("control.bin", "flushed.bin"):
        with open(tmp_path / name, "wb") as fh:
            fh.write(data)
            if name == "flushed.bin":
                start_writeback(fh)
    control = dirty_pages(tmp_path / "control.bin")
    if not control:
        pytest.skip("this kernel or file system does not report dirty pages per file")
    assert dirty_pages(tmp_path / "flushed.bin") < control // 10
    assert (tmp_path / "flushed.bin").read_bytes() == data


def _builder(target: Path, ready: Path) -> subprocess.Popen:
    """A process building `target` with `atomic_directory`, stopped mid-build (it sleeps)."""
    return subprocess.Popen([sys.executable, "-c", (
        "import time; from pathlib import Path; from usae_core.atomic import atomic_directory\n"
        f"with atomic_directory({str(target)!r}, overwrite=True) as tmp:\n"
        "    (tmp / 'half.bin').write_bytes(b'x' * 1000)\n"
        f"    Path({str(ready)!r}).write_text(str(tmp))\n"
        "    time.sleep(60)\n")])


def _wait_for(path: Path) -> Path:
    for _ in range(300):
        if path.exists() and path.read_text():
            return Path(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def test_a_killed_builders_folder_is_removed_by_the_next_build_but_a_live_ones_is_kept(tmp_path):
    target = tmp_path / "demo-small"
    dead = _builder(target, tmp_path / "dead")
    dead_folder = _wait_for(tmp_path / "dead")
    dead.kill()
    dead.wait()
    assert dead_folder.name.endswith(".building") and (dead_folder / "half.bin").exists()
    live = _builder(target, tmp_path / "live")
    try:
        live_folder = _wait_for(tmp_path / "live")
        assert not dead_folder.exists()  # left by a killed build: the next build removed it
        with atomic_directory(target, overwrite=True) as tmp:
            (tmp / "ok").write_text("done")
        assert (live_folder / "half.bin").exists()  # its builder still runs: untouched
        assert (target / "ok").read_text() == "done"
    finally:
        live.kill()
        live.wait()
    assert remove_abandoned_builds(target) == [live_folder]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dead", "demo-small", "live"]


def test_an_output_that_is_a_file_is_never_replaced(tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("keep me")
    with pytest.raises(UsaeError, match="is a file, not a folder"):
        with atomic_directory(precious, overwrite=True):
            pass
    assert precious.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_where_folders_cannot_be_locked_building_works_and_nothing_is_taken_for_abandoned(tmp_path, monkeypatch):
    """Some NFS mounts refuse flock on a folder opened read-only (EBADF). Building must still
    work there, and with no lock to tell a live builder from a dead one, no folder is removed."""
    import errno

    def refuse(fd, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(atomic.fcntl, "flock", refuse)
    someone_elses = tmp_path / ".target.abcd1234.building"
    someone_elses.mkdir()
    with atomic.atomic_directory(tmp_path / "target") as tmp:
        (tmp / "data.txt").write_text("built")
    assert (tmp_path / "target" / "data.txt").read_text() == "built"
    assert someone_elses.is_dir() and atomic.remove_abandoned_builds(tmp_path / "target") == []
