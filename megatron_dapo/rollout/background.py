"""An asyncio event loop on a thread of its own, for the engine client of a process that is not asyncio-based.

The trainer's training thread blocks on engine calls (weight sync, memory release, generation) while the
client's coroutines run here; the client's HTTP session binds to this loop at its first request.
"""

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

T = TypeVar("T")


class BackgroundLoop:
    """An asyncio event loop on a daemon thread, for a training process that is not asyncio-based.

    Create the engine client anywhere and use it only through this loop (its HTTP session binds to the loop
    of its first request); close the client with `run(client.close())` before `close()`.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.submit(coroutine).result()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        """Start the coroutine on the loop and return at once; `.result()` waits for it."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    def __enter__(self) -> "BackgroundLoop":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
