"""``kphi.files``: the exclusive lock several processes share an output directory with."""

import subprocess
import sys
import time

import pytest

from kphi.files import exclusive_lock

fcntl = pytest.importorskip("fcntl", reason="locks coordinate processes only where fcntl exists")


def test_a_held_lock_is_refused_without_waiting_and_granted_once_released(tmp_path):
    path = tmp_path / "locks" / "run.lock"
    with exclusive_lock(path) as first:
        assert first and path.is_file()
        with exclusive_lock(path, wait=False) as second:  # another open file: as another process sees it
            assert second is False
    with exclusive_lock(path, wait=False) as again:
        assert again is True


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    """The point of an OS lock over a marker file: a process killed mid-run frees its runs for the others."""
    path = tmp_path / "run.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom kphi.files import exclusive_lock\n"
         f"with exclusive_lock({str(path)!r}):\n    print('held', flush=True)\n    time.sleep(600)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with exclusive_lock(path, wait=False) as got:
            assert got is False
    finally:
        holder.kill()
        holder.wait(timeout=60)
    deadline = time.monotonic() + 30
    while True:
        with exclusive_lock(path, wait=False) as got:
            if got or time.monotonic() > deadline:
                break
        time.sleep(0.1)
    assert got is True
