"""Speculative decoding of one sequence: a cheap drafter proposes up to `k` tokens, the model checks them
all in one forward pass and keeps the longest prefix it agrees with, plus one token of its own.

Drafters: `PromptLookup` (the continuation of the latest n-gram's earlier occurrence in the prompt and
the text so far; no second model: it pays off when the answer copies from the prompt, as a grounded
answer copies its sources) and `DraftModel` (a smaller model with the same tokenizer, its own cache).

Greedy decoding keeps exactly the model's greedy tokens. Sampling keeps the model's distribution
(Leviathan et al. 2023, Chen et al. 2023): a drafted token x is kept with probability min(1, p(x)/q(x)),
p the model's and q the drafter's distribution after temperature, top-k and top-p (q is one-hot for
prompt lookup); on a rejection the token is drawn from norm(max(0, p - q)); when every draft is kept,
one more token is drawn from p. Other logit processing (grammars, penalties, bias) is refused.

`SpeculativeDecoding` advances one sequence a verification at a time (the server interleaves such sequences
with its batch); `speculative_stream` and `SpeculativeEngine` run it to the end."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lmforge.generate.sampling import SamplingParams, sampling_probs
from lmforge.kv_cache import KVCache
from lmforge.model import Transformer


@dataclass
class SpeculativeStats:
    """Drafted and kept tokens, and the model's forward passes (one per verification)."""

    drafted: int = 0
    accepted: int = 0
    verifications: int = 0
    generated: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


def distribution(logits: Tensor, params: SamplingParams) -> Tensor:
    """The sampling distribution (…, V) of `logits` under `params`' temperature (> 0), top-k and top-p."""
    return sampling_probs(logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)


class PromptLookup:
    """Drafts by n-gram lookup: the tokens that followed the most recent earlier occurrence of the
    sequence's last `n` tokens (the longest `n` <= `max_ngram` that occurs), up to `k` of them."""

    def __init__(self, k: int = 4, max_ngram: int = 3) -> None:
        if k < 1 or max_ngram < 1:
            raise ValueError(f"prompt lookup needs k >= 1 and max_ngram >= 1, got k={k}, max_ngram={max_ngram}")
        self.k, self.max_ngram = k, max_ngram

    def propose(self, tokens: Sequence[int], k: int, params: SamplingParams) -> tuple[list[int], Tensor | None]:
        """Up to `k` drafted tokens after `tokens`; no distribution (the draft is certain)."""
        last, best, after = len(tokens) - 1, 0, 0
        for end in range(last - 1, -1, -1):  # earlier occurrences, latest first, by the position of their last token
            if tokens[end] != tokens[last]:
                continue
            n = 1  # how many of the last tokens this occurrence matches (at most max_ngram)
            while n < self.max_ngram and n <= end and tokens[end - n] == tokens[last - n]:
                n += 1
            if n > best:
                best, after = n, end + 1
                if n == self.max_ngram:
                    break
        return (list(tokens[after : after + k]) if best else []), None

    def kept(self, length: int) -> None:
        """The first `length` tokens of the sequence are final (nothing to undo here)."""

    def reset(self) -> None:
        """Forget the sequence (nothing kept here)."""

    def fork(self) -> PromptLookup:
        """A drafter for another sequence decoded at the same time: this one (it keeps nothing per sequence)."""
        return self


class DraftModel:
    """Drafts with a smaller model sharing the tokenizer, greedily or by sampling from its own
    distribution; its cache keeps the tokens both models agree on."""

    def __init__(self, model: Transformer, k: int = 4, *, generator: torch.Generator | None = None) -> None:
        if k < 1:
            raise ValueError(f"a draft model needs k >= 1, got {k}")
        self.model, self.k, self.generator = model.eval(), k, generator
        self.cache: KVCache | None = None
        self.cached = 0  # tokens of the sequence in the draft cache

    def propose(self, tokens: Sequence[int], k: int, params: SamplingParams) -> tuple[list[int], Tensor | None]:
        """`k` tokens drafted after `tokens`, and their draft distributions (k, V) when sampling."""
        param = next(self.model.parameters())
        if self.cache is None:
            self.cache = KVCache(self.model.config, 1, self.model.config.max_position_embeddings,
                                 dtype=param.dtype, device=param.device)
        new = torch.tensor([list(tokens[self.cached :])], device=param.device)
        logits = self.model(new, cache=self.cache, last_only=True)[0, -1]
        drafted, dists = [], []
        for i in range(k):
            if params.temperature == 0:
                token = int(logits.argmax())
            else:
                dists.append(distribution(logits, params))
                token = int(torch.multinomial(dists[-1], 1, generator=self.generator))
            drafted.append(token)
            if i < k - 1:
                logits = self.model(torch.tensor([[token]], device=param.device), cache=self.cache,
                                    last_only=True)[0, -1]
        self.cached = len(tokens) + k - 1
        return drafted, torch.stack(dists) if dists else None

    def kept(self, length: int) -> None:
        """Roll the draft cache back to the first `length` tokens of the sequence."""
        if self.cache is not None and length < self.cached:
            self.cache.length = self.cached = length

    def reset(self) -> None:
        """Forget the sequence: a new one starts with an empty cache."""
        self.cache, self.cached = None, 0

    def fork(self) -> DraftModel:
        """A drafter for another sequence decoded at the same time: the same weights, its own cache."""
        return DraftModel(self.model, self.k)


Drafter = PromptLookup | DraftModel


class SpeculativeDecoding:
    """One sequence decoded speculatively, one verification (one forward pass of the model) per `step`, so
    that a caller can interleave it with other work; the prompt is prefilled here, and the first `step`
    returns the token the prefill predicted. `stats` (if given) counts drafts and acceptances."""

    @torch.inference_mode()
    def __init__(self, model: Transformer, prompt: Sequence[int], params: SamplingParams, drafter: Drafter,
                 stats: SpeculativeStats | None = None) -> None:
        if params.processes_logits:
            raise ValueError("speculative decoding supports temperature, top-k and top-p; not grammars, penalties, "
                             "logit bias or min_tokens")
        if not prompt:
            raise ValueError("empty prompt: give at least one token")
        limit = model.config.max_position_embeddings
        if len(prompt) >= limit:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit the model's context of {limit} tokens")
        self.model, self.params, self.drafter, self.limit = model, params, drafter, limit
        self.stats = stats if stats is not None else SpeculativeStats()
        drafter.reset()
        param = next(model.parameters())
        self.device = param.device
        self.generator = torch.Generator(param.device).manual_seed(params.seed) if params.seed is not None else None
        if isinstance(drafter, DraftModel) and drafter.generator is None:
            drafter.generator = self.generator
        self.stops = set(params.stop_token_ids)
        self.max_new = min(params.max_new_tokens, limit - len(prompt))
        self.cache = KVCache(model.config, 1, min(limit, len(prompt) + self.max_new + drafter.k + 1),
                             dtype=param.dtype, device=param.device)
        # The prefill predicts the first token, as plain decoding's does; verifications check drafts after it.
        logits = model(torch.tensor([list(prompt)], device=param.device), cache=self.cache, last_only=True)
        self.first = verify(logits[0].float(), [], None, params, self.generator)[1]
        self.sequence, self.emitted = list(prompt), 0  # once tokens follow the prompt, the last is not in the cache
        self.done = False

    @torch.inference_mode()
    def step(self) -> list[int]:
        """Check one draft: the new tokens (the kept drafts and the model's own next one; cut after a stop
        token, which is then the last); [] once done. The first step returns the prefill's token."""
        if self.done:
            return []
        if not self.emitted:
            return self._emit([self.first])
        room = min(self.drafter.k, self.max_new - self.emitted - 1, self.limit - len(self.sequence) - 1)
        drafted, q = self.drafter.propose(self.sequence, room, self.params) if room > 0 else ([], None)
        fed = torch.tensor([[self.sequence[-1], *drafted]], device=self.device)
        logits = self.model(fed, cache=self.cache)[0].float()  # row i predicts the token after fed[i]
        self.stats.verifications += 1
        self.stats.drafted += len(drafted)
        kept, token = verify(logits, drafted, q, self.params, self.generator)
        self.stats.accepted += kept
        self.cache.length = len(self.sequence) + kept  # the model's cache: the sequence and the kept drafts
        self.drafter.kept(len(self.sequence) + kept)
        return self._emit([*drafted[:kept], token])

    def _emit(self, tokens: list[int]) -> list[int]:
        """Append `tokens` to the sequence up to the first stop token or the length limit; return those kept."""
        new = []
        for token in tokens:
            self.sequence.append(token)
            self.emitted += 1
            self.stats.generated += 1
            new.append(token)
            if token in self.stops or self.emitted == self.max_new:
                self.done = True
                break
        return new


def speculative_stream(model: Transformer, prompt: Sequence[int], params: SamplingParams, drafter: Drafter,
                       stats: SpeculativeStats | None = None) -> Iterator[int]:
    """Yield the model's new tokens for `prompt` (one sequence), checking the drafter's proposals; the last
    is a stop token if one was produced. `stats` (if given) counts drafts and acceptances."""
    decoding = SpeculativeDecoding(model, prompt, params, drafter, stats)
    while not decoding.done:
        yield from decoding.step()


def verify(logits: Tensor, drafted: list[int], q: Tensor | None, params: SamplingParams,
           generator: torch.Generator | None) -> tuple[int, int]:
    """How many drafted tokens the model keeps, and its own next token after them. `logits` (n+1, V):
    row i is the model's prediction for the position of `drafted[i]` (row n: the one after them all)."""
    if params.temperature == 0:
        best = logits.argmax(dim=-1).tolist()
        kept = next((i for i, token in enumerate(drafted) if best[i] != token), len(drafted))
        return kept, best[kept]
    p = distribution(logits, params)
    for i, token in enumerate(drafted):
        q_token = 1.0 if q is None else float(q[i, token])
        accept = float(p[i, token]) / q_token if q_token > 0 else 0.0
        if float(torch.rand((), generator=generator, device=p.device)) < accept:
            continue
        residual = (p[i] - (torch.nn.functional.one_hot(torch.tensor(token), p.shape[-1]).to(p) if q is None
                            else q[i])).clamp(min=0)
        residual = residual / residual.sum() if float(residual.sum()) > 0 else p[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return len(drafted), int(torch.multinomial(p[len(drafted)], 1, generator=generator))


class SpeculativeEngine:
    """`Engine.stream`'s interface, one prompt at a time, over speculative decoding: text streaming,
    sessions and the command line use it as they use the engine."""

    def __init__(self, model: Transformer, drafter: Drafter) -> None:
        self.model, self.drafter, self.stats = model, drafter, SpeculativeStats()
        self.grammars = None  # as `Engine`'s: a session may set it; speculative decoding refuses grammars

    def stream(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Iterator[list[int | None]]:
        if len(prompts) != 1:
            raise ValueError(f"speculative decoding runs one prompt at a time, got {len(prompts)}")
        for token in speculative_stream(self.model, prompts[0], params, self.drafter, self.stats):
            yield [token]
