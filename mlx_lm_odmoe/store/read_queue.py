"""Read threads that take the forward pass's own reads before guesses.

A FIFO pool lets a layer's misses wait behind reads started on a guess for
it or a later layer; the compute then stalls on bytes nobody may use. Here
every read has a priority (demand first, then guesses) and runs in
submission order within it, so a guess only ever uses the disk when no
demanded read is waiting. A queued guess the layer turns out to need is
promoted to demand; one it turns out not to need can be withdrawn before
it costs any disk time.
"""

import heapq
import itertools
import threading
from concurrent.futures import Future

DEMAND = 0  # the forward pass waits for it
GUESS = 1  # a prefetch or a warm-start preload


class ReadQueue:
    """``threads`` workers running submitted calls by (priority, order)."""

    def __init__(self, threads: int, name: str = "odmoe-read"):
        self.threads = max(1, int(threads))
        self._name = name
        self._heap = []
        self._queued = {}  # future -> its live heap entry
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._workers = []
        self._closed = False

    def submit(self, priority: int, fn, *args) -> Future:
        fut = Future()
        with self._cond:
            if self._closed:
                raise RuntimeError("the read queue is closed")
            self._push(priority, fut, fn, args)
            if len(self._workers) < self.threads:
                self._start_worker()
            self._cond.notify()
        return fut

    def promote(self, futs) -> None:
        """Calls of ``futs`` still queued run as demand (after the demand
        already queued)."""
        with self._cond:
            for fut in futs:
                entry = self._queued.get(fut)
                if entry is not None and entry[0] > DEMAND:
                    entry[2] = None  # dead: the worker skips it
                    self._push(DEMAND, fut, entry[3], entry[4])

    def withdraw(self, futs) -> bool:
        """Cancel ``futs`` if none of them has started; whether it did."""
        with self._cond:
            if not all(fut in self._queued for fut in futs):
                return False
            for fut in futs:
                self._queued.pop(fut)[2] = None
                fut.cancel()
            return True

    def _push(self, priority, fut, fn, args):
        entry = [priority, next(self._order), fut, fn, args]
        self._queued[fut] = entry
        heapq.heappush(self._heap, entry)

    def _start_worker(self):
        t = threading.Thread(
            target=self._work, name=f"{self._name}_{len(self._workers)}", daemon=True
        )
        self._workers.append(t)
        t.start()

    def _next(self):
        with self._cond:
            while True:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if not self._heap:
                    return None  # closed and drained
                _, _, fut, fn, args = heapq.heappop(self._heap)
                if fut is not None:
                    del self._queued[fut]
                    return fut, fn, args

    def _work(self):
        while True:
            job = self._next()
            if job is None:
                return
            fut, fn, args = job
            if not fut.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:
                fut.set_exception(exc)

    def shutdown(self, wait: bool = True):
        """Run what is queued, then stop the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait:
            for t in self._workers:
                t.join()
