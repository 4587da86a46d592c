"""The CPU engine ends, with every process it started, when the process that launched it dies.

The launcher also has the kernel send the engine SIGTERM then (launcher._parent_death_signal). This is the
engine's own guarantee on top: it holds however the engine was started with --parent-pid, and it takes down
the engine's descendants (a multiprocessing worker or resource tracker), which that signal never reaches.
"""

import atexit
import contextlib
import logging
import os
import threading
import time

import psutil

logger = logging.getLogger("megatron_dapo.rollout.cpu_engine")
POLL_S = 0.5  # how long the engine may outlive its parent


def exit_with_parent(parent_pid: int, poll_s: float = POLL_S) -> threading.Thread:
    """Once `parent_pid` is no longer this process's parent (it died: the orphan was adopted), kill this
    process's descendants and exit; at a normal exit, kill them too. Watches on a daemon thread."""
    atexit.register(kill_descendants)
    watcher = threading.Thread(target=_watch, args=(parent_pid, poll_s), name="parent-watcher", daemon=True)
    watcher.start()
    return watcher


def _watch(parent_pid: int, poll_s: float) -> None:
    while os.getppid() == parent_pid:
        time.sleep(poll_s)
    logger.warning("the process that launched this engine (pid %d) is gone: exiting", parent_pid)
    kill_descendants()
    os._exit(1)  # now, whatever the model and server threads are doing


def kill_descendants() -> None:
    """SIGKILL every process this one started, and theirs: found by parentage (psutil), never by name."""
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # it ended meanwhile
            process.kill()
