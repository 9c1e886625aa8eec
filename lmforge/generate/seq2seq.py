"""Generation with an encoder-decoder model (T5): token ids in, token ids out.

The encoder runs once over the batch of prompts (right-padded, with a padding mask); each decoder layer's
cross-attention keys and values over its output are computed once and kept in the cache, beside the
decoder's self-attention keys and values. Every row starts from the decoder-start token, so all rows
decode in step, one token per forward pass, through the same sampling and logits processing as the
decoder-only `Engine`. A row stops at its stop tokens and the model's end-of-sequence token (`</s>`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from lmforge.generate.engine import EngineStats, collect
from lmforge.generate.grammar import GrammarCompiler
from lmforge.generate.processing import process, record, row_states
from lmforge.generate.sampling import SamplingParams, sample
from lmforge.seq2seq import Seq2SeqCache, Seq2SeqLM


class Seq2SeqEngine:
    """Batched encode-then-decode over a `Seq2SeqLM`. `grammars` compiles structured-output grammars."""

    def __init__(self, model: Seq2SeqLM, *, grammars: GrammarCompiler | None = None) -> None:
        self.model = model.eval()
        self.config = model.config
        self.grammars = grammars
        self.device = model.shared.weight.device
        self.stats = EngineStats()

    @property
    def forward_passes(self) -> int:
        return self.stats.forward_passes

    def batch(self, prompts: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor | None]:
        """The prompts right-padded with the pad token into (B, S) ids, and their padding mask (None: no padding)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: give at least one token per prompt")
        longest = max(len(p) for p in prompts)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
        mask = torch.zeros(len(prompts), longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = torch.tensor(list(prompt))
            mask[row, : len(prompt)] = 1
        return ids.to(self.device), None if bool(mask.all()) else mask.to(self.device)

    def stop_ids(self, params: SamplingParams) -> Tensor:
        """The tokens that end a row: the sampling parameters' stop tokens and the model's end of sequence."""
        stop = set(params.stop_token_ids) | set(self.config.eos_token_ids)
        return torch.tensor(sorted(stop), dtype=torch.long, device=self.device)

    def prefill(self, prompts: Sequence[Sequence[int]], room: int) -> tuple[Tensor, Seq2SeqCache]:
        """Encode the prompts and feed every row the decoder-start token: its logits (B, V), and a cache
        holding the cross-attention keys and values with room for `room` decoder tokens."""
        ids, mask = self.batch(prompts)
        start = torch.full((len(prompts), 1), self.config.decoder_start_token_id, dtype=torch.long, device=self.device)
        cache = self.model.new_cache(len(prompts), room)
        self.stats.forward_passes += 1
        self.stats.batches += 1
        self.stats.sequences += len(prompts)
        self.stats.max_batch_size = max(self.stats.max_batch_size, len(prompts))
        return self.model(ids, start, attention_mask=mask, cache=cache)[:, -1], cache

    def decode(self, tokens: Tensor, cache: Seq2SeqCache) -> Tensor:
        """Logits (B, V) after feeding one more decoder token (B,) per row."""
        self.stats.forward_passes += 1
        return self.model(None, tokens[:, None], cache=cache)[:, -1]

    @torch.inference_mode()
    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Iterator[list[int | None]]:
        """Yield, per decoding step, each prompt's new token (None once its row has stopped)."""
        states = row_states([[self.config.decoder_start_token_id]] * len(prompts), [params] * len(prompts),
                            self.grammars)
        logits, cache = self.prefill(prompts, params.max_new_tokens)
        generator = None if params.seed is None else torch.Generator(self.device).manual_seed(params.seed)
        stop = self.stop_ids(params)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        for step in range(params.max_new_tokens):
            tokens = sample(process(logits, states, self.grammars), temperature=params.temperature,
                            top_k=params.top_k, top_p=params.top_p, generator=generator)
            record(logits, tokens, states)
            out: list[int | None] = [None if d else t for t, d in zip(tokens.tolist(), done.tolist())]
            self.stats.tokens_generated += sum(t is not None for t in out)
            yield out
            done |= torch.isin(tokens, stop)
            if params.grammar is not None:
                done |= torch.tensor([s.grammar_done for s in states], device=self.device)
            if bool(done.all()) or step == params.max_new_tokens - 1:
                return
            logits = self.decode(tokens, cache)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """New token ids for each prompt (with the final stop token, if one was produced)."""
        return collect(self.stream(prompts, params), len(prompts))
