"""Continuous batching (Orca's iteration-level scheduling): sequences join a running batch between
decode steps and leave it the step they finish, so a request that arrives mid-batch waits for one
step rather than for the whole batch, and a finished or abandoned row stops costing compute.

All rows share one KV cache and one write position. A joining group is prefilled on its own (one
left-padded forward pass) and stacked under the running rows, right-aligned: each row's left
padding grows so that every row ends at the shared position, and its positions (slot minus
padding) are unchanged. When rows leave, the leading slots no remaining row uses are trimmed, so
the cache never spans more than the longest live row.

An encoder-decoder model batches one group at a time instead (`Seq2SeqBatch`): its rows all start at
the decoder-start token and share the decoder's positions, so new rows join only an empty batch."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lmforge.generate.engine import Engine
from lmforge.generate.seq2seq import Seq2SeqEngine
from lmforge.generate.processing import RowState, process, record, row_states
from lmforge.generate.sampling import SamplingParams, sample
from lmforge.kv_cache import KVCache


@dataclass(eq=False)
class Row:
    """One sequence in the batch. `finish` becomes "stop" or "length" when it ends; `state` holds
    what logits processing remembers (and the latest token's log-prob, when asked for)."""

    prompt_tokens: int
    limit: int  # most new tokens: the request's, or what is left of the context
    params: SamplingParams
    generator: torch.Generator | None
    tag: Any = None  # the caller's handle
    generated: int = 0
    finish: str | None = None
    stop_ids: frozenset[int] = field(default_factory=frozenset)
    state: RowState | None = None
    fed: list[int] = field(default_factory=list)  # prompt and sampled tokens, for `Engine.refill`

    @property
    def sampling_key(self) -> Hashable:
        """Rows with equal keys are sampled together in one call."""
        p = self.params
        if p.temperature == 0:
            return "greedy"
        if self.generator is not None:  # seeded rows draw from their own generator only
            return id(self.generator)
        return (p.temperature, p.top_k, p.top_p)


class DecodeBatch:
    """The running batch: `join` prefills new prompts and returns their first tokens, `step`
    decodes one token for every live row, `leave` drops rows (finished rows leave by themselves)."""

    joins_running = True  # new rows may join while others decode

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._reset()

    def _reset(self) -> None:
        self.rows: list[Row] = []
        self.cache: KVCache | None = None
        self.pads = torch.zeros(0, dtype=torch.long, device=self.engine.device)
        self.next_tokens = torch.zeros(0, dtype=torch.long, device=self.engine.device)

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def join(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
        tags: Sequence[Any] = (),
    ) -> list[tuple[Row, int]]:
        """Prefill `prompts` together and add them to the batch; returns each new row's first token.
        `params` is one for all prompts or one per prompt; prompts given the same seeded params
        object share one generator, as in a single `Engine.stream` call."""
        context = self.engine.config.max_position_embeddings
        per_row = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        tags = list(tags) or [None] * len(prompts)
        if not len(per_row) == len(tags) == len(prompts):
            raise ValueError("join needs one params and one tag per prompt")
        states = row_states(prompts, per_row, self.engine.grammars)  # a bad grammar fails before any work
        logits, cache, pads = self.engine.prefill(prompts, room=0)
        generators: dict[int, torch.Generator] = {}
        rows = []
        for prompt, p, tag, state in zip(prompts, per_row, tags, states):
            generator = None
            if p.seed is not None:
                generator = generators.setdefault(id(p), torch.Generator(self.engine.device).manual_seed(p.seed))
            limit = min(p.max_new_tokens, context - len(prompt))
            rows.append(Row(len(prompt), limit, p, generator, tag, stop_ids=frozenset(p.stop_token_ids),
                            state=state, fed=list(prompt)))
        tokens = self._sample(logits, rows)
        if self.cache is None:
            self.cache = cache
        else:
            self.cache, shift_old, shift_new = KVCache.stack(self.cache, cache)
            self.pads, pads = self.pads + shift_old, pads + shift_new
        self.rows += rows
        self.pads = torch.cat([self.pads, pads])
        self.next_tokens = torch.cat([self.next_tokens, tokens])
        return self._record(rows, tokens)

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, int]]:
        """Decode one token for every live row."""
        if not self.rows:
            return []
        assert self.cache is not None
        if self.engine.refill_at is not None and int(self.cache.length) == self.engine.refill_at:
            logits, self.cache = self.engine.refill([row.fed for row in self.rows], room=1)
            width = max(len(row.fed) for row in self.rows)
            self.pads = torch.tensor([width - len(row.fed) for row in self.rows], device=self.engine.device)
        else:
            self.cache.reserve(1)
            logits = self.engine.decode(self.next_tokens, self.pads, self.cache)
        tokens = self._sample(logits, self.rows)
        self.next_tokens = tokens
        return self._record(self.rows, tokens)

    def leave(self, rows: Sequence[Row]) -> None:
        """Drop `rows` from the batch and trim the cache slots no remaining row needs."""
        gone = {id(r) for r in rows}
        keep = [i for i, r in enumerate(self.rows) if id(r) not in gone]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self.engine.device)
        self.rows = [self.rows[i] for i in keep]
        self.next_tokens = self.next_tokens[index]
        assert self.cache is not None
        self.cache.keep_rows(index)
        self._trim(index)

    def _trim(self, index: Tensor) -> None:
        """Keep the left padding of the rows at `index` and drop the cache slots none of them needs."""
        assert self.cache is not None
        self.pads = self.pads[index]
        trim = int(self.pads.min())
        self.cache.drop_left(trim)
        self.pads = self.pads - trim

    def _sample(self, raw_logits: Tensor, rows: Sequence[Row]) -> Tensor:
        states = [row.state or RowState(row.params) for row in rows]
        logits = process(raw_logits, states, self.engine.grammars)
        tokens = self._draw(logits, rows)
        record(raw_logits, tokens, states)
        return tokens

    def _draw(self, logits: Tensor, rows: Sequence[Row]) -> Tensor:
        groups: dict[Hashable, list[int]] = {}
        for i, row in enumerate(rows):
            groups.setdefault(row.sampling_key, []).append(i)
        if len(groups) == 1:
            p, g = rows[0].params, rows[0].generator
            return sample(logits, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, generator=g)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        for members in groups.values():
            p, g = rows[members[0]].params, rows[members[0]].generator
            index = torch.tensor(members, device=logits.device)
            tokens[index] = sample(logits[index], temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                   generator=g)
        return tokens

    def _record(self, rows: Sequence[Row], tokens: Tensor) -> list[tuple[Row, int]]:
        out = list(zip(rows, tokens.tolist()))
        for row, token in out:
            row.generated += 1
            row.fed.append(token)
            if token in row.stop_ids or (row.state is not None and row.state.grammar_done):
                row.finish = "stop"
            elif row.generated >= row.limit:
                row.finish = "length"
        self.engine.stats.tokens_generated += len(out)
        self.leave([row for row, _ in out if row.finish])
        return out


class Seq2SeqBatch(DecodeBatch):
    """`DecodeBatch`'s interface over an encoder-decoder engine, one group at a time: `join` encodes the
    prompts and feeds the decoder-start token, but only to an empty batch, since T5's decoder computes one
    relative-position bias for the whole batch from the shared cache length (a row cannot start at 0 beside
    rows at step 40); rows still leave the step they finish, and the last to leave empties the batch."""

    joins_running = False

    def __init__(self, engine: Seq2SeqEngine) -> None:
        self.engine = engine  # type: ignore[assignment]  # the same interface for what the batch uses
        self._reset()

    @torch.inference_mode()
    def join(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams],
        tags: Sequence[Any] = (),
    ) -> list[tuple[Row, int]]:
        """Encode `prompts` together into the empty batch; returns each row's first token. Each row stops
        at its stop tokens and the model's end of sequence, or after its `max_new_tokens`."""
        if self.rows:
            raise ValueError("an encoder-decoder batch takes new rows only when it is empty")
        per_row = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        tags = list(tags) or [None] * len(prompts)
        if not len(per_row) == len(tags) == len(prompts):
            raise ValueError("join needs one params and one tag per prompt")
        engine: Seq2SeqEngine = self.engine  # type: ignore[assignment]
        start = [engine.config.decoder_start_token_id]
        states = row_states([start] * len(prompts), per_row, engine.grammars)
        logits, self.cache = engine.prefill(prompts, room=max(p.max_new_tokens for p in per_row))
        generators: dict[int, torch.Generator] = {}
        eos = frozenset(engine.config.eos_token_ids)
        for prompt, p, tag, state in zip(prompts, per_row, tags, states):
            generator = None
            if p.seed is not None:
                generator = generators.setdefault(id(p), torch.Generator(engine.device).manual_seed(p.seed))
            self.rows.append(Row(len(prompt), p.max_new_tokens, p, generator, tag,
                                 stop_ids=frozenset(p.stop_token_ids) | eos, state=state))
        rows = list(self.rows)
        self.next_tokens = self._sample(logits, rows)
        return self._record(rows, self.next_tokens)

    @torch.inference_mode()
    def step(self) -> list[tuple[Row, int]]:
        """Decode one token for every live row."""
        if not self.rows:
            return []
        engine: Seq2SeqEngine = self.engine  # type: ignore[assignment]
        tokens = self._sample(engine.decode(self.next_tokens, self.cache), self.rows)
        self.next_tokens = tokens
        return self._record(self.rows, tokens)

    def _trim(self, index: Tensor) -> None:
        """Nothing to trim: the decoder's rows start together, unpadded."""
