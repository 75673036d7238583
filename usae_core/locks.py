"""One job at a time per output: an exclusive lock file beside it, held while the job writes.

Two `usae train` runs writing the same run folder would interleave checkpoints and logs, and
one's `--overwrite` swap could replace the other's run under it. `flock` locks end with their
process, so a killed job never leaves its output locked; its lock file may stay behind, unlocked,
and the next job takes it over and removes it when it ends.

A `flock` lock lasts while any copy of its file descriptor is open, and forked children
(DataLoader workers, process pools) inherit copies: a child that outlives its killed parent for
a few seconds would keep the output locked. Children therefore close their copies as they
start (`os.register_at_fork`); the parent's lock is not affected."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Iterator

from usae_core.errors import UsaeError

try:
    import fcntl
except ImportError:  # not POSIX: no locking, as before
    fcntl = None


_held_fds: set[int] = set()
"""Lock file descriptors this process holds, closed in every forked child."""


def _close_inherited_locks() -> None:
    for fd in _held_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _held_fds.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def not_inherited(fd: int) -> None:
    """Have forked children close their copy of the locked descriptor `fd` (see above)."""
    _held_fds.add(fd)


def forget(fd: int) -> None:
    """`fd` is about to be closed by this process."""
    _held_fds.discard(fd)


def _is_running(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def exclusive_lock(target: str | os.PathLike, job: str, *, held: bool = True) -> Iterator[None]:
    """Hold `target`'s lock file for the block; a second holder fails at once with a
    `UsaeError` that names the process holding it. `held=False` takes no lock (the ranks of a
    torchrun job other than rank 0, which holds it for all of them)."""
    if fcntl is None or not held:
        yield
        return
    path = lock_path(Path(target))
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = (os.pread(fd, 300, 0).decode(errors="replace").strip().splitlines() or ["unknown"])[0]
            os.close(fd)
            pid, _, host = holder.partition(" on ")
            # A holder on another machine (a shared disk) or in another container cannot be checked.
            if holder != "unknown" and host in ("", socket.gethostname()) and not _is_running(pid):
                # Its worker processes (forked before this fix, or by code that re-opens the
                # file) still hold the lock for the seconds they take to notice.
                raise UsaeError(f"{target} is still locked by child processes of a {job} (process {holder}) "
                                "that has ended; they exit within seconds, so try again shortly") from None
            raise UsaeError(f"{target} is being written by another {job} (process {holder}); "
                            f"wait for it to end or stop it first") from None
        # The holder before us removes the file as it ends: a lock taken on a file that is no
        # longer at `path` locks nothing the next job would see, so take the current one.
        try:
            current = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    _held_fds.add(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        _held_fds.discard(fd)
        os.close(fd)
