"""The generation engine: token ids in, token ids out (nanochat's cut; text lives elsewhere).

Prompts of different lengths are left-padded into one batch, prefilled in one forward pass into
a preallocated KV cache, then decoded one token per step for the whole batch."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.generate.grammar import GrammarCompiler
from lmforge.generate.matvec import compile_options, use_matvec_linears
from lmforge.generate.native_step import NativeStep, native_step
from lmforge.generate.processing import TokenLogprob, logprobs_of, process, record, row_states
from lmforge.generate.sampling import SamplingParams, sample
from lmforge.kv_cache import KVCache, StaticKVCache
from lmforge.model import Transformer


def use_column_major_weights(model: nn.Module) -> None:
    """Store every linear weight transposed in memory (same shapes, names and values). On CPU,
    MKL's fp32 matrix-vector product reads (in, out)-contiguous weights markedly faster, which
    is what a batch-1 decode step spends its time on."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.stride(0) != 1:
            module.weight.data = module.weight.data.t().contiguous().t()


@dataclass
class EngineStats:
    """Counters that show how the work was batched."""

    forward_passes: int = 0
    batches: int = 0
    sequences: int = 0
    max_batch_size: int = 0
    tokens_generated: int = 0


class Engine:
    """Batched prefill + decode with a KV cache over a `Transformer`.

    `compile=True` runs each decode step as one `torch.compile`d graph over a static cache sized
    to the whole context (gpt-fast's recipe; `compile_options`), on CPU with its single-row products written for
    inductor (`lmforge.generate.matvec`): the first step per batch size pays the compilation. On CPU a single
    sequence of a model `native_step` runs is decoded by its C step instead.
    `grammars` compiles the grammars of structured output (it needs the tokenizer: a `Session` sets it)."""

    def __init__(self, model: Transformer, *, compile: bool = False, grammars: GrammarCompiler | None = None) -> None:
        self.model = model.eval()
        self.grammars = grammars
        self.config = model.config
        self.stats = EngineStats()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        torch.set_flush_denormal(True)  # denormal floats slow x86 CPUs several-fold
        self.compiled = compile
        self._decode = self._forward
        self.native: NativeStep | None = None
        if compile:
            if self.device.type == "cpu":
                self.native = native_step(model)
                use_matvec_linears(model)
            self._decode = torch.compile(self._forward, fullgraph=True, dynamic=False, **compile_options(self.device))
        elif self.device.type == "cpu" and self.dtype == torch.float32:
            use_column_major_weights(model)

    def _forward(self, tokens: Tensor, pad: Tensor | None, cache: KVCache) -> Tensor:
        return self.model(tokens, pad=pad, cache=cache, last_only=True)

    def check_prompt(self, prompt: Sequence[int]) -> None:
        """Raise a clear error for an empty prompt or one that leaves no room in the context."""
        limit = self.config.max_position_embeddings - self.model.num_virtual_tokens  # a soft prompt's positions
        if not prompt:
            raise ValueError("empty prompt: give at least one token")
        if len(prompt) >= limit:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the model's context of {limit} tokens")

    def prefill(self, prompts: Sequence[Sequence[int]], room: int) -> tuple[Tensor, KVCache, Tensor]:
        """Left-pad `prompts` into one batch and run it through the model in one forward pass, into
        a fresh cache with `room` free slots after the longest prompt. Returns the last position's
        logits (B, V), the cache and each row's left padding (B,)."""
        for prompt in prompts:
            self.check_prompt(prompt)
        longest = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        pads = torch.tensor([longest - len(p) for p in prompts], device=self.device)
        if self.compiled:
            size = self.config.max_position_embeddings
            cache = StaticKVCache(self.config, len(prompts), size, dtype=self.dtype, device=self.device)
        else:
            cache = KVCache(self.config, len(prompts), longest + room, dtype=self.dtype, device=self.device)
        self._count_batch(len(prompts))
        self.stats.forward_passes += 1
        logits = self.model(ids.to(self.device), pad=pads if pads.any() else None, cache=cache, last_only=True)
        return logits[:, -1], cache, pads

    @property
    def refill_at(self) -> int | None:
        """The cache length at which the next step recomputes the whole batch instead (LongRoPE: see `refill`)."""
        return self.model.model.long_after

    def refill(self, sequences: Sequence[Sequence[int]], room: int) -> tuple[Tensor, KVCache]:
        """Prefill the whole sequences again into a fresh cache: the last position's logits and the cache.
        What transformers 5.25 does for LongRoPE (`Phi3ForCausalLM.prepare_inputs_for_generation`): the
        step whose input reaches past original_max_position_embeddings drops the cache, whose keys were
        rotated with the short factors, and recomputes everything with the long ones."""
        stats = (self.stats.batches, self.stats.sequences)
        logits, cache, _ = self.prefill(sequences, room)
        self.stats.batches, self.stats.sequences = stats  # the same batch, not a new one
        return logits, cache

    def decode(self, tokens: Tensor, pads: Tensor, cache: KVCache) -> Tensor:
        """Logits (B, V) after feeding one more token (B,) per row."""
        self.stats.forward_passes += 1
        self.stats.max_batch_size = max(self.stats.max_batch_size, len(tokens))
        if self.native is not None and len(tokens) == 1 and cache.static:
            return self.native(int(tokens[0]), cache)
        return self._decode(tokens[:, None], pads if pads.any() else None, cache)[:, -1]

    @torch.inference_mode()
    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Iterator[list[int | None]]:
        """Yield, per decoding step, each sequence's new token (None once it has stopped)."""
        longest = max((len(p) for p in prompts), default=0)
        max_new = min(params.max_new_tokens, self.config.max_position_embeddings - longest)
        states = row_states(prompts, [params] * len(prompts), self.grammars)
        logits, cache, pads = self.prefill(prompts, max_new)
        fed: list[list[int]] = [[] for _ in prompts]  # every row's sampled tokens (kept for `refill`)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.device).manual_seed(params.seed)
        stop = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long, device=self.device)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        for step in range(max_new):
            tokens = sample(process(logits, states, self.grammars), temperature=params.temperature,
                            top_k=params.top_k, top_p=params.top_p, generator=generator)
            record(logits, tokens, states)
            out: list[int | None] = [None if d else t for t, d in zip(tokens.tolist(), done.tolist())]
            self.stats.tokens_generated += sum(t is not None for t in out)
            done |= torch.isin(tokens, stop)
            if params.grammar is not None:
                done |= torch.tensor([s.grammar_done for s in states], device=self.device)
            yield out
            if bool(done.all()) or step == max_new - 1:
                return
            for row, token in zip(fed, tokens.tolist()):
                row.append(token)
            if self.refill_at is not None and int(cache.length) == self.refill_at:
                logits, cache = self.refill([list(p) + f for p, f in zip(prompts, fed)], max_new - step - 1)
            else:
                logits = self.decode(tokens, pads, cache)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[int]]:
        """New token ids for each prompt (including a final stop token, if one was produced)."""
        return collect(self.stream(prompts, params), len(prompts))

    @torch.inference_mode()
    def prompt_logprobs(self, prompt: Sequence[int], top: int = 0) -> list[TokenLogprob | None]:
        """Each prompt token's log-prob given the tokens before it (teacher-forced, one forward pass),
        with the `top` most likely tokens at each position; None for the first token."""
        self.check_prompt(prompt)
        self.stats.forward_passes += 1
        ids = torch.tensor([list(prompt)], device=self.device)
        logits = self.model(ids)[0, -len(prompt) :]
        chosen, best, index = logprobs_of(logits[:-1], ids[0, 1:], top)
        rows = zip(ids[0, 1:].tolist(), chosen.tolist(), index.tolist(), best.tolist())
        return [None, *(TokenLogprob(t, c, list(zip(i, b))) for t, c, i, b in rows)]

    def _count_batch(self, size: int) -> None:
        self.stats.batches += 1
        self.stats.sequences += size
        self.stats.max_batch_size = max(self.stats.max_batch_size, size)


def collect(steps: Iterable[Sequence[int | None]], rows: int) -> list[list[int]]:
    """Each row's tokens from a stream of steps (one entry per row a step; None once the row has stopped)."""
    outputs: list[list[int]] = [[] for _ in range(rows)]
    for step in steps:
        for row, token in enumerate(step):
            if token is not None:
                outputs[row].append(token)
    return outputs
