"""Per-direction submit threads of the copy engine.

Enqueuing a large staged job is CPU work: per chunk a kernel launch, events, a driver copy call
(~0.1 ms each, 32 chunks for a 1 GiB job). Done inside `submit_store`, it delays whatever the
caller submits next, so a load submitted right after a store starts its copies milliseconds
late, while the link's other direction idles. With a worker per direction, submit only records
the ordering event and queues the job; the two workers enqueue their chunks side by side (the
launches and driver calls release the GIL), and each direction keeps its jobs in submit order.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

_STOP = None


class SubmitWorker:
    """A daemon thread running queued callables in order. `put` is safe from any thread; the
    callables must not raise (the engine turns every failure into a failed job)."""

    def __init__(self, name: str) -> None:
        self._q: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, fn: Callable[[], None]) -> None:
        self._q.put(fn)

    def _loop(self) -> None:
        while True:
            fn = self._q.get()
            if fn is _STOP:
                return
            fn()

    def close(self) -> None:
        """Run what is queued, then stop the thread (idempotent)."""
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join()
