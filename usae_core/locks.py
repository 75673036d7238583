"""One job at a time per output: an exclusive lock file beside it, held while the job writes.

Two `usae train` runs writing the same run folder would interleave checkpoints and logs, and
one's `--overwrite` swap could replace the other's run under it. `flock` locks end with their
process, so a killed job never leaves its output locked; its lock file may stay behind, unlocked,
and the next job takes it over and removes it when it ends."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from usae_core.errors import UsaeError

try:
    import fcntl
except ImportError:  # not POSIX: no locking, as before
    fcntl = None


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
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
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
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
