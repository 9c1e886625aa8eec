"""One worker thread owns the engine: requests wait in a queue, and every waiting request (up to
`max_batch_size` rows) is decoded together as one `Engine.stream` batch.

Requests are grouped by their sampling parameters (greedy requests all share one group; a seeded
request runs alone so that its samples do not depend on its neighbours). Each row's tokens go to
its own `Detokenizer`; text deltas and the end of each row are handed back through the request's
`emit` callback (thread-safe on the caller's side). A cancelled request's rows are ignored, and a
batch stops as soon as every row has ended or been cancelled."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmforge.generate.engine import SamplingParams
from lmforge.generate.session import Session
from lmforge.generate.text import Detokenizer, stop_token_ids

Event = tuple[Any, ...]
_ids = itertools.count()


@dataclass
class Job:
    """One API request: one row per prompt (and per choice when `n > 1`).

    Events passed to `emit`: ("delta", row, text), ("done", row, finish_reason, completion_tokens),
    ("error", message)."""

    prompts: Sequence[Sequence[int]]
    max_tokens: int
    emit: Callable[[Event], None]
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    cancelled: bool = False
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share one engine batch."""
        if self.temperature == 0:
            return ("greedy",)
        if self.seed is not None:
            return ("seeded", self.id)
        return (self.temperature, self.top_k, self.top_p)

    def params(self, max_new_tokens: int, stop_ids: Sequence[int]) -> SamplingParams:
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=self.seed, stop_token_ids=stop_ids)


class Batcher:
    def __init__(self, session: Session, *, max_batch_size: int = 16, window: float = 0.01) -> None:
        self.session = session
        self.max_batch_size = max_batch_size
        self.window = window  # how long the worker waits for company after the first request
        self.stop_ids = stop_token_ids(session.model.config, session.tokenizer)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="lmforge-batcher", daemon=True)
                self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def submit(self, job: Job) -> None:
        self.start()
        self._queue.put(job)

    # ---- the worker -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs, closing = self._gather(first)
            for batch in self._group([j for j in jobs if not j.cancelled]):
                self._run_batch(batch)
            if closing:
                return

    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        jobs, rows = [first], len(first.prompts)
        deadline = time.monotonic() + self.window
        while rows < self.max_batch_size:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            rows += len(job.prompts)
        return jobs, False

    def _group(self, jobs: list[Job]) -> list[list[Job]]:
        """Batches of jobs with equal sampling keys that fit the context together (left padding
        makes the longest prompt plus the most new tokens the batch's length)."""
        context = self.session.context
        batches: list[list[Job]] = []
        for job in jobs:
            for batch in batches:
                if batch[0].key != job.key:
                    continue
                rows = sum(len(j.prompts) for j in batch) + len(job.prompts)
                longest = max(len(p) for j in [*batch, job] for p in j.prompts)
                steps = max(j.max_tokens for j in [*batch, job])
                if rows <= self.max_batch_size and longest + steps <= context:
                    batch.append(job)
                    break
            else:
                batches.append([job])
        return batches

    def _run_batch(self, batch: list[Job]) -> None:
        tokenizer, engine = self.session.tokenizer, self.session.engine
        rows = [(job, i, list(prompt)) for job in batch for i, prompt in enumerate(job.prompts)]
        detoks = [Detokenizer(tokenizer, job.stop) for job, _, _ in rows]
        counts = [0] * len(rows)
        ended = [False] * len(rows)
        stop_ids = set(self.stop_ids)

        def finish(r: int, reason: str) -> None:
            ended[r] = True
            job, i, _ = rows[r]
            if tail := detoks[r].flush():
                job.emit(("delta", i, tail))
            job.emit(("done", i, reason, counts[r]))

        try:
            params = batch[0].params(max(job.max_tokens for job in batch), self.stop_ids)
            for step in engine.stream([prompt for _, _, prompt in rows], params):
                for r, token in enumerate(step):
                    job, i, _ = rows[r]
                    if ended[r]:
                        continue
                    if job.cancelled:
                        ended[r] = True
                        continue
                    if token is None:
                        continue
                    counts[r] += 1
                    if token in stop_ids:
                        finish(r, "stop")
                        continue
                    if delta := detoks[r].push(token):
                        job.emit(("delta", i, delta))
                    if detoks[r].stopped:
                        finish(r, "stop")
                    elif counts[r] >= job.max_tokens:
                        finish(r, "length")
                if all(ended):
                    break
            for r in range(len(rows)):
                if not ended[r] and not rows[r][0].cancelled:
                    finish(r, "length")  # the engine reached the end of the context
        except Exception as e:  # a failed batch fails its requests, never the worker
            for job in {id(job): job for job, _, _ in rows}.values():
                job.emit(("error", f"{type(e).__name__}: {e}"))
