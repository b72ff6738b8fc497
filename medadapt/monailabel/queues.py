"""Inference off the request threads, in bounded queues: one model's work never holds another's.

Each model runs its inferences one at a time in a worker thread of its own, so a long
inference (a volume, a box carried through 100 slices) delays only later requests for the same
model; ``/info/``, the datastore and the other models keep answering. At most
`PER_MODEL_PENDING` requests of one model wait or run at once (429 beyond) and `TOTAL_PENDING`
of all models (503 beyond), each refusal with a Retry-After header: the model's recent
inference time times the requests ahead, so a client knows when to come back. The request
waits for its result (bounded by the inference timeout) in one of the server's request threads,
whose number is therefore kept above `TOTAL_PENDING` (see `medadapt.monailabel.server`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from fastapi import HTTPException

PER_MODEL_PENDING = 4
TOTAL_PENDING = 16
FIRST_GUESS_SECONDS = 5.0  # a model's inference time before one was measured
MAX_RETRY_AFTER = 600


class InferenceQueues:
    """Per-model worker threads and their bounded queues.

    Arguments:
      per_model: most requests of one model waiting or running at once.
      total: most requests of all models waiting or running at once.
    """

    def __init__(self, per_model: int = PER_MODEL_PENDING, total: int = TOTAL_PENDING):
        self.per_model, self.total = per_model, total
        self._lock = threading.Lock()
        self._workers: dict[str, ThreadPoolExecutor] = {}
        self._pending: dict[str, int] = defaultdict(int)
        self._seconds: dict[str, float] = {}  # recent inference time per model (moving average)

    def submit(self, model: str, work: Callable[[], Any]) -> Future:
        """Queue ``work`` (an inference of ``model``); HTTPException 429 / 503 with Retry-After
        when the model's or the server's queue is full."""
        with self._lock:
            ahead = self._pending[model]
            if ahead >= self.per_model:
                raise self._busy(429, f"model {model!r} has {ahead} inferences waiting or running (at most "
                                      f"{self.per_model})", model, ahead)
            if sum(self._pending.values()) >= self.total:
                raise self._busy(503, f"this server has {self.total} inferences waiting or running, its limit",
                                 model, ahead)
            self._pending[model] += 1
            worker = self._workers.get(model)
            if worker is None:
                worker = self._workers[model] = ThreadPoolExecutor(1, thread_name_prefix=f"INFER-{model}"[:40])
        try:
            return worker.submit(self._timed, model, work)
        except RuntimeError:  # the worker is shut down: the server is stopping
            self._done(model)
            raise HTTPException(503, "the server is stopping", headers={"Retry-After": "10"}) from None

    def pending(self, model: str) -> int:
        with self._lock:
            return self._pending[model]

    def _timed(self, model: str, work: Callable[[], Any]) -> Any:
        started = time.monotonic()
        try:
            return work()
        finally:
            seconds = time.monotonic() - started
            with self._lock:
                last = self._seconds.get(model)
                self._seconds[model] = seconds if last is None else 0.7 * last + 0.3 * seconds
            self._done(model)

    def _done(self, model: str) -> None:
        with self._lock:
            self._pending[model] -= 1

    def _busy(self, status: int, message: str, model: str, ahead: int) -> HTTPException:
        wait = self._seconds.get(model, FIRST_GUESS_SECONDS) * max(ahead, 1)
        seconds = min(MAX_RETRY_AFTER, max(1, math.ceil(wait)))
        return HTTPException(status, f"{message}: try again in {seconds} s", headers={"Retry-After": str(seconds)})
