"""Waiting for processes to end, for the tests of servers that must not outlive what launched them."""

import time
from collections.abc import Sequence

import psutil


def wait_until_gone(processes: Sequence[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Those of `processes` still running after `timeout_s` (none: all ended). A zombie counts as ended: an
    orphan's exit status waits for a reaper that a container's init may never be."""
    deadline = time.monotonic() + timeout_s
    while (running := [p for p in processes if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return running


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
