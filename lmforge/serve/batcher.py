"""One worker thread owns the engine and runs a continuous batch (`DecodeBatch`): requests join
it between decode steps, as soon as there is room, and leave it the step they finish or their
client goes away.

Each row's tokens go to its own `Detokenizer`; text deltas and the end of each row are handed
back through the request's `emit` callback (thread-safe on the caller's side). Rows of one
request share its sampling parameters; a seeded request's rows draw from their own generator, so
their samples do not depend on their neighbours.

An encoder-decoder session's batch (`Seq2SeqBatch`) takes no rows while it runs: requests then wait for
it to empty, and those waiting are encoded together as the next batch.

With a drafter, a request for one sequence that speculative decoding can serve (sampling by temperature,
top-k and top-p only, no log-probs) is decoded speculatively instead, on its own at batch 1 beside the batch:
the worker checks one draft of each such sequence per step of the batch. Every other request is decoded in
the batch, as without a drafter. Either kind takes one of the `max_batch_size` rows."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmforge.generate.continuous import DecodeBatch, Row
from lmforge.generate.processing import TokenLogprob
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.session import Session
from lmforge.generate.speculative import Drafter, SpeculativeDecoding, SpeculativeStats
from lmforge.generate.text import Detokenizer

Event = tuple[Any, ...]
_ids = itertools.count()


@dataclass
class Job:
    """One API request: one row per prompt (and per choice when `n > 1`), all sampled with `params`
    (the batcher adds the model's end tokens to its stop tokens) and cut at the `stop` strings.
    `prompt_logprobs` (N alternatives) scores each prompt first; `score_only` generates nothing.

    Events passed to `emit`: ("prompt", row, [TokenLogprob | None per prompt token]),
    ("delta", row, text, [TokenLogprob of the tokens behind the text, when `params.logprobs` is set]),
    ("done", row, finish_reason, completion_tokens), ("error", message)."""

    prompts: Sequence[Sequence[int]]
    params: SamplingParams
    emit: Callable[[Event], None]
    stop: Sequence[str] = ()
    prompt_logprobs: int | None = None
    score_only: bool = False
    cancelled: bool = False
    id: int = field(default_factory=lambda: next(_ids))


@dataclass(eq=False)
class _Slot:
    """What the worker keeps per row: its request, its index there, and its text so far."""

    job: Job
    index: int
    detokenizer: Detokenizer
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of tokens whose text is not yet sent


@dataclass(eq=False)
class _Speculation:
    """A request decoded speculatively: its slot, its decoding, and the tokens it has generated."""

    slot: _Slot
    decoding: SpeculativeDecoding
    generated: int = 0


class Batcher:
    """Decodes the submitted jobs in a worker thread (see the module's docstring); `drafter` turns on speculative
    decoding, whose figures add up in `speculative` (with the count of requests decoded each way)."""

    def __init__(self, session: Session, *, max_batch_size: int = 16, window: float = 0.01,
                 drafter: Drafter | None = None) -> None:
        if drafter is not None and session.encoder_decoder:
            raise ValueError("speculative decoding runs a decoder-only model")
        self.session = session
        self.max_batch_size = max_batch_size
        self.window = window  # how long an idle worker waits for company after the first request
        self.drafter = drafter
        self.speculative = SpeculativeStats()
        self.requests = {"speculative": 0, "batched": 0}  # decoding requests served each way (with a drafter)
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
        batch = self.session.new_batch()
        waiting: deque[Job] = deque()
        speculating: list[_Speculation] = []
        while True:
            if not self._collect(waiting, idle=not len(batch) and not waiting and not speculating):
                return
            self._admit(batch, waiting, speculating)
            batch.leave([row for row in batch.rows if row.tag.job.cancelled])
            try:
                self._dispatch(batch, batch.step())
            except Exception as e:  # a failed step fails the requests in it, never the worker
                for job in {id(row.tag.job): row.tag.job for row in batch.rows}.values():
                    job.emit(("error", f"{type(e).__name__}: {e}"))
                batch.leave(batch.rows)
            speculating[:] = [run for run in speculating if self._speculate(run)]

    def _collect(self, waiting: deque[Job], idle: bool) -> bool:
        """Move queued requests to `waiting`; block first when idle. False once closed."""
        if idle:
            job = self._queue.get()
            if job is None:
                return False
            waiting.append(job)
            time.sleep(self.window)  # requests sent together are prefilled together
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            waiting.append(job)

    def _admit(self, batch: DecodeBatch, waiting: deque[Job], speculating: list[_Speculation]) -> None:
        """Prefill, in one forward pass, the waiting requests that fit the batch (first come first); those
        speculative decoding serves start on their own instead."""
        if len(batch) and not batch.joins_running:
            return
        joining: list[Job] = []
        rows = len(batch) + len(speculating)
        while waiting and rows + len(waiting[0].prompts) <= self.max_batch_size:
            job = waiting.popleft()
            if not job.cancelled:
                rows += len(job.prompts)
                if self.speculates(job):
                    self.requests["speculative"] += 1
                    speculating.extend(self._speculation(job))
                    continue
                if self.drafter is not None and not job.score_only:
                    self.requests["batched"] += 1
                joining.append(job)
        if not joining:
            return
        joining = [job for job in joining if self._score(job)]
        prompts, params, slots = [], [], []
        for job in joining:
            job_params = self.session.sampling(job.params)  # one object per job: its seeded rows share a generator
            for i, prompt in enumerate(job.prompts):
                prompts.append(prompt)
                params.append(job_params)
                slots.append(_Slot(job, i, Detokenizer(self.session.tokenizer, job.stop, min_tokens=job.params.min_tokens)))
        try:
            self._dispatch(batch, batch.join(prompts, params, slots))
        except Exception as e:
            for job in joining:
                job.emit(("error", f"{type(e).__name__}: {e}"))

    def speculates(self, job: Job) -> bool:
        """Whether `job` is decoded speculatively: with a drafter, one sequence sampled by temperature, top-k and
        top-p alone, without log-probs."""
        return (self.drafter is not None and len(job.prompts) == 1 and not job.score_only
                and job.prompt_logprobs is None and job.params.logprobs is None and not job.params.processes_logits)

    def _speculation(self, job: Job) -> list[_Speculation]:
        """The job's sequence, prefilled for speculative decoding (none if that failed: the job has its error)."""
        assert self.drafter is not None
        slot = _Slot(job, 0, Detokenizer(self.session.tokenizer, job.stop))
        try:
            decoding = SpeculativeDecoding(self.session.model, job.prompts[0], self.session.sampling(job.params),
                                           self.drafter.fork(), self.speculative)
        except Exception as e:
            job.emit(("error", f"{type(e).__name__}: {e}"))
            return []
        return [_Speculation(slot, decoding)]

    def _speculate(self, run: _Speculation) -> bool:
        """Check one draft of a speculated sequence and send its new tokens; False once it has finished."""
        slot = run.slot
        if slot.job.cancelled:
            return False
        try:
            tokens = run.decoding.step()
        except Exception as e:
            slot.job.emit(("error", f"{type(e).__name__}: {e}"))
            return False
        for token in tokens:
            run.generated += 1
            if token in run.decoding.stops:  # a stop token: not part of the text
                self._finish(slot, "stop", run.generated)
                return False
            if delta := slot.detokenizer.push(token):
                self._send(slot, delta)
            if slot.detokenizer.stopped:
                self._finish(slot, "stop", run.generated)
                return False
        if run.decoding.done:
            self._finish(slot, "length", run.generated)
        return not run.decoding.done

    def _score(self, job: Job) -> bool:
        """Send the prompt log-probs a job asks for; False when that was all it asked for (or it failed)."""
        if job.prompt_logprobs is not None:
            try:
                scored: dict[tuple[int, ...], list[TokenLogprob | None]] = {}
                for i, prompt in enumerate(job.prompts):
                    key = tuple(prompt)
                    if key not in scored:
                        scored[key] = self.session.engine.prompt_logprobs(prompt, job.prompt_logprobs)
                    job.emit(("prompt", i, scored[key]))
            except Exception as e:
                job.emit(("error", f"{type(e).__name__}: {e}"))
                return False
        if job.score_only:
            for i in range(len(job.prompts)):
                job.emit(("done", i, "length", 0))
        return not job.score_only

    def _dispatch(self, batch: DecodeBatch, tokens: list[tuple[Row, int]]) -> None:
        """Hand each row's new token to its request as text; end rows that stopped."""
        for row, token in tokens:
            slot: _Slot = row.tag
            if slot.job.cancelled:
                continue
            if row.finish == "stop" and token in row.stop_ids:  # a stop token: not part of the text
                self._finish(slot, "stop", row.generated)
                continue
            if row.state is not None and row.state.logprob is not None:
                slot.logprobs.append(row.state.logprob)
            if delta := slot.detokenizer.push(token):
                self._send(slot, delta)
            if slot.detokenizer.stopped:
                batch.leave([row])
                self._finish(slot, "stop", row.generated)
            elif row.finish:
                self._finish(slot, row.finish, row.generated)

    @staticmethod
    def _send(slot: _Slot, text: str) -> None:
        slot.job.emit(("delta", slot.index, text, slot.logprobs))
        slot.logprobs = []

    def _finish(self, slot: _Slot, reason: str, completion_tokens: int) -> None:
        if (tail := slot.detokenizer.flush()) or slot.logprobs:
            self._send(slot, tail)
        slot.job.emit(("done", slot.index, reason, completion_tokens))
