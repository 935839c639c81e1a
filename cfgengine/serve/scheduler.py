"""The step-level batcher: one running batch on the device, advanced by one worker thread.

Between two steps (a step boundary) the worker drops cancelled and expired requests, admits
queued requests in FIFO order while their rows fit under `max_rows` (guided rows count twice),
and lays out the new batch; after a step, finished requests leave and are answered at once. The
HTTP side only enqueues jobs and waits for their answers; it never touches torch.
"""
from __future__ import annotations

import collections
import threading
import time

import torch

from cfgengine.serve.batch import Engine, Member, RunningBatch
from cfgengine.serve.metrics import Metrics
from cfgengine.serve.schema import Job, RequestError


class Scheduler:
    """FIFO admission into one running batch; `submit` may raise RequestError 429 (queue full)
    or 503 (draining)."""

    def __init__(self, engine: Engine, *, max_rows: int = 64, max_queue: int = 256,
                 metrics: Metrics | None = None):
        self.engine, self.max_rows, self.max_queue = engine, max_rows, max_queue
        self.metrics = metrics or Metrics()
        self.batch = RunningBatch(engine)
        self.queue: collections.deque[Job] = collections.deque()
        self.draining = False
        self._wake = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._step_seconds = 0.0  # moving average, for Retry-After

    def start(self) -> None:
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="cfgengine-serve",
                                                daemon=True)
                self._thread.start()

    def submit(self, job: Job) -> None:
        with self._wake:
            if self.draining:
                raise RequestError(503, "the server is shutting down", {"Retry-After": "5"})
            if len(self.queue) >= self.max_queue:
                raise RequestError(429, f"the queue is full ({self.max_queue} requests)",
                                   {"Retry-After": str(self.retry_after())})
            self.queue.append(job)
            self.metrics.queue_depth = len(self.queue)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """The client went away: its rows leave the batch at the next step boundary."""
        with self._wake:
            job.cancelled = True
            self._wake.notify()

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved: queued requests × their mean steps × the
        recent step time, at least 1."""
        steps = sum(j.combo.steps for j in self.queue) / max(len(self.queue), 1)
        return max(1, round(self._step_seconds * steps))

    def drain(self) -> None:
        """Refuse new requests (503); queued and running ones finish."""
        with self._wake:
            self.draining = True
            self._wake.notify()

    def idle(self) -> bool:
        with self._wake:
            return not self.queue and not self.batch.members

    def wait_idle(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.idle():
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self) -> None:
        """End the worker (after `drain` and `wait_idle` for a clean stop)."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        with torch.inference_mode():
            while self._boundary():
                start = time.perf_counter()
                try:
                    finished = self.batch.step()
                except Exception as err:  # a crash of the model: fail the batch, keep serving
                    self._fail_batch(err)
                    continue
                self._finish(finished)
                self._record_step(time.perf_counter() - start)

    def _boundary(self) -> bool:
        """Wait for work, then drop, admit and re-lay out; False when the worker should end."""
        with self._wake:
            while not self._stop and not self.queue and not self.batch.members:
                self._wake.wait()
            if self._stop:
                return False
            now = time.monotonic()
            keep = [m for m in self.batch.members if self._still_wanted(m.job, now)]
            self._drop_queued(now)
            admitted = self._admit(sum(m.job.cost for m in keep))
        if admitted or len(keep) != len(self.batch.members):
            self.batch.compose(keep + [self.batch.admit(job) for job in admitted])
        self._update_gauges()
        return True

    def _admit(self, used: int) -> list[Job]:
        """Jobs from the queue's head, in order, while they fit (FIFO: no overtaking)."""
        admitted = []
        while self.queue and used + self.queue[0].cost <= self.max_rows:
            job = self.queue.popleft()
            used += job.cost
            admitted.append(job)
        return admitted

    def _drop_queued(self, now: float) -> None:
        waiting = [j for j in self.queue if self._still_wanted(j, now)]
        self.queue.clear()
        self.queue.extend(waiting)

    def _still_wanted(self, job: Job, now: float) -> bool:
        """False (and the client answered, if it is still there) for a cancelled or expired job."""
        if job.cancelled:  # its HTTP side answers (and counts) 499
            return False
        if now > job.deadline:
            self._answer(job, RequestError(504, "the request's deadline passed"))
            return False
        return True

    def _finish(self, finished: list[Member]) -> None:
        for member in finished:
            x_hat = self.batch.rows_of(member).float().cpu()  # the one sync a request needs
            if not bool(torch.isfinite(x_hat).all()):
                self._answer(member.job, RequestError(500, "sampling produced NaN/inf"))
            else:
                self._answer(member.job, x_hat)
        if finished:
            with self._wake:
                self.batch.compose([m for m in self.batch.members if not m.done])
            self._update_gauges()

    def _fail_batch(self, err: Exception) -> None:
        for member in self.batch.members:
            self._answer(member.job, RequestError(500, f"sampling failed: {err}"))
        with self._wake:
            self.batch.compose([])

    def _answer(self, job: Job, outcome) -> None:
        """Hand `outcome` to the HTTP side, which answers (and counts the answer)."""
        if job.on_done is not None:
            job.on_done(outcome)

    def _record_step(self, seconds: float) -> None:
        self._step_seconds = seconds if not self._step_seconds else \
            0.9 * self._step_seconds + 0.1 * seconds
        self.metrics.steps += 1

    def _update_gauges(self) -> None:
        self.metrics.queue_depth = len(self.queue)
        self.metrics.rows_in_flight = self.batch.rows
        self.metrics.cost_in_flight = sum(m.job.cost for m in self.batch.members)
