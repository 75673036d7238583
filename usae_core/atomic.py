"""Atomic file and directory writes: write to a temporary sibling, then rename.

A crash at any point leaves either the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from usae_core.locks import forget, not_inherited

try:
    import fcntl
except ImportError:  # not POSIX: building folders are not locked, and none is removed as abandoned
    fcntl = None

_UMASK = os.umask(0)
os.umask(_UMASK)
"""The process's umask: temporary files and folders are created private (0600 / 0700), and are
given the permissions a plain `open` or `mkdir` would have given them before they are renamed
into place, so a server running as another user can read what the CLI wrote."""


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (renames into it) to disk."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def start_writeback(fh) -> None:
    """Ask the kernel to start writing the open file `fh` to disk now, without waiting for it.

    Bulk files written without a flush (store shards) otherwise stay dirty in the page cache
    until the kernel's writeback timer, and the next durable write (the store's manifest) can
    then wait for gigabytes at once. Started as each file is written, the disk works while the
    job goes on. Linux's `sync_file_range(SYNC_FILE_RANGE_WRITE)`; a no-op where it is missing."""
    fh.flush()
    if _sync_file_range is not None:
        _sync_file_range(fh.fileno(), 0, 0, _SYNC_FILE_RANGE_WRITE)  # best effort: errors change nothing


def _load_sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, *, durable: bool = True, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to `target`; rename it onto `target` if the block succeeds.

    `durable` flushes the file and the directory to disk first, so the new file also survives a
    power loss. Bulk data whose loss a reader can detect (store shards: their size is checked)
    skips it, since the flush ties the writer to the disk's bandwidth. The file gets `mode`
    (else what the umask allows) before anything is written to it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.fchmod(fd, mode if mode is not None else 0o666 & ~_UMASK)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if durable:
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp_path, target)
        if durable:
            fsync_dir(target.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(target: str | os.PathLike, data: bytes, *, mode: int | None = None) -> None:
    with atomic_path(target, mode=mode) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(target: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(target, (json.dumps(obj, indent=2) + "\n").encode())


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory beside `target` and move it into place only on success.

    With `overwrite`, an existing `target` is replaced only after the new one is complete
    (`swap_in_replacement`); a block that fails leaves `target` as it was and removes the
    partial folder. Building folders that killed builders left are removed first
    (`remove_abandoned_builds`); those of builders still running are not.
    """
    from usae_core.errors import UsaeError

    target = _real(Path(target))
    if target.exists() and not target.is_dir():
        raise UsaeError(f"{target} is a file, not a folder; choose another path")
    if target.exists() and not overwrite:
        raise UsaeError(f"{target} already exists; pass --overwrite to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    finish_replacement(target)
    remove_abandoned_builds(target)
    with _building_folder(target) as tmp:
        try:
            yield tmp
            new, _ = replacement_folders(target)
            shutil.rmtree(new, ignore_errors=True)  # an abandoned build of an earlier process
            os.replace(tmp, new)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    swap_in_replacement(target)


_BUILDING, _STARTING = ".building", ".starting"
_STARTING_MAX_AGE_S = 3600
"""A `.starting` folder lives for the microseconds between its creation and its rename; one older
than this was left by a builder killed in between."""


@contextlib.contextmanager
def _building_folder(target: Path) -> Iterator[Path]:
    """A private folder beside `target` to build it in, locked (`flock`) while this process
    builds, so `remove_abandoned_builds` tells a live builder's folder from a dead one's: the
    lock ends with its holder. Each builder has a folder of its own, so two processes building
    the same target never share one; it takes the replacement's fixed name only for the swap.

    The folder is created as `.starting` and renamed to `.building` only once locked: a cleaner
    never sees a `.building` folder unlocked while its builder lives."""
    start = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=_STARTING, dir=target.parent))
    start.chmod(0o777 & ~_UMASK)
    fd = os.open(start, os.O_RDONLY)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                not_inherited(fd)  # a render worker outliving a killed builder must not keep it alive
            except OSError:  # a file system that cannot lock a folder (some NFS): no cleaner can tell, none removes it
                pass
        tmp = start.with_name(start.name[: -len(_STARTING)] + _BUILDING)
        try:
            os.replace(start, tmp)  # the lock belongs to the open folder, so it moves with it
        except BaseException:
            start.rmdir()
            raise
        yield tmp
    finally:
        forget(fd)
        os.close(fd)  # ends the lock (the folder is renamed or deleted by now)


def remove_abandoned_builds(target: str | os.PathLike) -> list[Path]:
    """Delete the building folders of `target` that builders killed mid-build left (a killed
    `import-activations` or demo set build), and return them. A folder whose builder still runs
    holds its lock and is kept, so concurrent builders never lose their work."""
    target = _real(Path(target))
    removed = []
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return removed
    prefix = f".{target.name}."
    for entry in entries:
        name = entry.name
        if not name.startswith(prefix) or entry.is_symlink() or not entry.is_dir():
            continue
        if name.endswith(_BUILDING):
            if _remove_if_unlocked(entry):
                removed.append(entry)
        elif name.endswith(_STARTING):
            with contextlib.suppress(OSError):
                if time.time() - entry.stat().st_mtime > _STARTING_MAX_AGE_S:
                    entry.rmdir()  # never holds anything: its builder renames it before writing
                    removed.append(entry)
    return removed


def _remove_if_unlocked(folder: Path) -> bool:
    if fcntl is None:  # no locks to tell the live from the dead: keep everything
        return False
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # its builder is running (BlockingIOError), or locks are not to be had here: keep it
        os.close(fd)
        return False
    try:  # locked by us now: a builder that would take it is dead, none can come back
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        os.close(fd)
    return True


def remove_stale_temp_files(root: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that `atomic_path` writes left under `root` when their
    process was killed (`.NAME.RANDOM.tmp`), and return them. Only for a folder the caller
    holds the lock of (`usae_core.locks.exclusive_lock`): a live writer's file would go too."""
    removed = []
    for path in Path(root).rglob(".*.tmp"):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def replacement_folders(target: Path) -> tuple[Path, Path]:
    """(new, old): where a replacement of the folder `target` is built, and where the folder it
    replaces is renamed before it is deleted. Both are hidden siblings of `target` (of the folder
    it links to, for a symbolic link: the link stays, and the data stays on its disk), so every
    rename stays inside one directory of one file system."""
    target = _real(target)
    return target.parent / f".{target.name}.replacing", target.parent / f".{target.name}.replaced"


def _real(target: Path) -> Path:
    """The folder a symbolic link points to (even while that folder is missing mid-swap)."""
    return Path(os.path.realpath(target)) if Path(target).is_symlink() else Path(target)


def _remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def start_replacement(target: Path) -> Path:
    """An empty folder to build a replacement of `target` in. What earlier replacements left is
    cleaned up first: a swap cut between its renames is finished, an abandoned build deleted."""
    new, _ = replacement_folders(target)
    finish_replacement(target)
    _remove(new)
    new.mkdir(parents=True)
    return new


def swap_in_replacement(target: Path) -> None:
    """Move the finished replacement of `target` into place: the old folder is renamed aside,
    the new one renamed in, then the old one deleted. A crash between the two renames leaves
    `target` missing with both folders beside it; `finish_replacement` completes the swap."""
    target = _real(target)
    new, old = replacement_folders(target)
    if not target.exists():
        os.replace(new, target)
        fsync_dir(target.parent)
        return
    _remove(old)  # left by an earlier swap that stopped before deleting it
    os.replace(target, old)
    finish_replacement(target)  # the second rename, and the deletion of the old folder


def finish_replacement(target: Path) -> None:
    """Complete a swap that a crash cut short. With `target` missing and the old folder aside,
    the replacement (complete before the swap began) moves in, or, without one, the old folder
    moves back; an old folder left beside `target` is deleted. A replacement still being built
    is never touched, so readers may call this too."""
    target = _real(target)
    new, old = replacement_folders(target)
    if not old.exists() and not old.is_symlink():
        return
    if not target.exists():
        try:
            os.replace(new if new.exists() else old, target)
        except OSError:  # another process finished it first (its target is in place, not empty)
            if not target.exists():
                raise
        fsync_dir(target.parent)
    _remove(old)
