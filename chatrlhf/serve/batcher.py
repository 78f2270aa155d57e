"""Concurrent requests batched on the model: one thread owns the generator and runs every batch.

HTTP handlers submit `Work` (a request's choices and where their text goes) and return to the event loop; the
model thread takes the first waiting work, lets others join it for `wait_s` (up to `max_batch_size` choices in all)
and generates them together with one `Generator.complete` call, each request with its own sampling settings. Work
that arrives while a batch runs waits for the next one (batches are not joined once they have started), and work
that would make a batch too large starts the next one. A failure while generating fails the batch's requests only;
the thread goes on with the next batch.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

from chatrlhf.engine.generation import Completion, Generator, Request

CLOSE = None
"""Put on the queue to stop the thread after the work already queued."""


@dataclass
class Work:
    """One API request's choices."""

    requests: list[Request]
    on_update: Callable[[int, str, Completion | None], None]
    """Called from the model thread as `Generator.complete`'s `on_update`, with indices into `requests`."""
    on_error: Callable[[BaseException], None]
    """Called from the model thread when its batch fails."""


@dataclass
class Stats:
    """Counts since the start, for /health."""

    requests: int = 0
    """Choices generated (a request with n choices counts n)."""
    batches: int = 0
    largest_batch: int = 0
    failed_batches: int = 0


class Batcher:
    def __init__(self, generator: Generator, max_batch_size: int, wait_s: float):
        self.generator, self.max_batch_size, self.wait_s = generator, max_batch_size, wait_s
        self.queue: queue.Queue[Work | None] = queue.Queue()
        self.carried: collections.deque[Work] = collections.deque()
        self.stats = Stats()
        self.thread = threading.Thread(target=self._loop, name="chatrlhf-model", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, work: Work) -> None:
        self.queue.put(work)

    def close(self) -> None:
        """Finish the queued work, then stop the thread."""
        self.queue.put(CLOSE)
        self.thread.join()

    def _next(self, timeout: float | None) -> Work | None:
        """The next work: carried over from the last batch first; None on CLOSE or when `timeout` passes."""
        if self.carried:
            return self.carried.popleft()
        try:
            work = self.queue.get(timeout=timeout) if timeout is None or timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None
        if work is CLOSE:
            self.queue.put(CLOSE)  # seen again by the loop once this batch is done
        return work

    def _loop(self) -> None:
        while True:
            first = self._next(timeout=None)
            if first is None:
                return
            batch, size = [first], len(first.requests)
            deadline = time.monotonic() + self.wait_s
            while size < self.max_batch_size:
                work = self._next(timeout=deadline - time.monotonic())
                if work is None:
                    break
                if size + len(work.requests) > self.max_batch_size:
                    self.carried.append(work)
                    break
                batch.append(work)
                size += len(work.requests)
            self._run(batch)

    def _run(self, batch: list[Work]) -> None:
        slots = [(work, k) for work in batch for k in range(len(work.requests))]

        def on_update(i: int, text: str, done: Completion | None) -> None:
            work, k = slots[i]
            work.on_update(k, text, done)

        try:
            self.generator.complete([work.requests[k] for work, k in slots], on_update)
        except Exception as e:
            traceback.print_exc()
            self.stats.failed_batches += 1
            for work in batch:
                work.on_error(e)
            return
        self.stats.requests += len(slots)
        self.stats.batches += 1
        self.stats.largest_batch = max(self.stats.largest_batch, len(slots))
