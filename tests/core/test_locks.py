"""One job per output: the lock beside it refuses a second holder and dies with its process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from usae_core.errors import UsaeError
from usae_core.locks import exclusive_lock, lock_path


def test_a_second_holder_is_refused_with_the_first_ones_process(tmp_path):
    target = tmp_path / "run"
    with exclusive_lock(target, "usae train"):
        # The holder is named by process id and machine: the disk may be shared with other machines.
        with pytest.raises(UsaeError, match=rf"being written by another usae train \(process \d+ on {socket.gethostname()}\)"):
            with exclusive_lock(target, "usae train"):
                pass
    assert not lock_path(target).exists()
    with exclusive_lock(target, "usae train"):  # free again once the first holder ends
        assert lock_path(target).exists()


def test_a_killed_holder_leaves_the_output_unlocked(tmp_path):
    target = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from usae_core.locks import exclusive_lock\n"
        f"with exclusive_lock({str(target)!r}, 'usae train'):\n"
        "    print('locked', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsaeError, match=f"process {holder.pid}"):
            with exclusive_lock(target, "usae train"):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(target).exists()  # a kill leaves the file, but not the lock
    started = time.monotonic()
    with exclusive_lock(target, "usae train"):
        pass
    assert time.monotonic() - started < 5 and not lock_path(target).exists()


def test_a_child_forked_by_a_killed_holder_does_not_keep_the_output_locked(tmp_path):
    """DataLoader workers are forked while the lock is held; one outliving its killed parent
    used to keep the lock (so a rerun blamed the dead parent). Children close their copy."""
    target = tmp_path / "store"
    child_pid = tmp_path / "child.pid"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, time; from usae_core.locks import exclusive_lock\n"
        f"with exclusive_lock({str(target)!r}, 'usae extract'):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        time.sleep(30); os._exit(0)\n"
        f"    open({str(child_pid)!r}, 'w').write(str(pid))\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n")])
    holder.wait(timeout=30)
    pid = int(child_pid.read_text())
    try:
        os.kill(pid, 0)  # the orphan still runs
        with exclusive_lock(target, "usae extract"):
            pass
    finally:
        os.kill(pid, signal.SIGKILL)


def test_a_holder_on_another_machine_is_never_called_ended(tmp_path):
    """Its process id means nothing here (a shared disk, another container): the message says the
    output is being written, not that the holder ended, whatever runs here under that id."""
    import fcntl
    import os

    target = tmp_path / "run"
    fd = os.open(lock_path(target), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, b"999999 on another-machine\n", 0)
        with pytest.raises(UsaeError, match=r"being written by another usae extract \(process 999999 on another-machine\)"):
            with exclusive_lock(target, "usae extract"):
                pass
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"999999 on {socket.gethostname()}\n".encode(), 0)  # this machine: that process is gone
        with pytest.raises(UsaeError, match="has ended"):
            with exclusive_lock(target, "usae extract"):
                pass
    finally:
        os.close(fd)
