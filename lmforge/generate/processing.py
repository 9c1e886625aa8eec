"""Per-row logits processing between the model and the sampler, shared by `Engine.stream` and the
continuous batch: grammar masks, `min_tokens`, `logit_bias`, repetition / frequency / presence
penalties (vLLM's order), and the log-probs a row reports.

The arithmetic is in small pure functions over (B, V) tensors; `process` gathers the rows that need
any of it and applies each step to them together, so rows without such settings cost nothing, and
the grammar masks of a batch are computed in one call. Log-probs are those of the model's logits
as they come out (before the grammar mask, penalties, temperature and top-k/top-p), as vLLM
reports them by default."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import llguidance
import torch
from torch import Tensor

from lmforge.generate.grammar import GrammarCompiler
from lmforge.generate.sampling import SamplingParams


@dataclass
class TokenLogprob:
    """A chosen token's log-prob and the `top` most likely tokens' (id, log-prob), best first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(eq=False)
class RowState:
    """What processing needs to remember about one row: its prompt, its tokens so far, its grammar
    matcher, and the log-prob of its latest token (when it asked for log-probs)."""

    params: SamplingParams
    prompt: Sequence[int] = ()
    matcher: llguidance.LLMatcher | None = None
    end_ids: frozenset[int] = frozenset()  # the tokens that end the grammar's text
    tokens: list[int] = field(default_factory=list)
    logprob: TokenLogprob | None = None
    ended: bool = False

    @property
    def grammar_done(self) -> bool:
        """The grammar has taken an end token or failed: the row must stop."""
        return self.matcher is not None and (self.ended or self.matcher.is_error())

    def advance(self, token: int) -> None:
        self.tokens.append(token)
        if self.matcher is not None and not self.ended:
            self.ended = token in self.end_ids or self.matcher.is_stopped()
            if not self.matcher.is_stopped():
                self.matcher.consume_token(token)


def row_states(prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
               grammars: GrammarCompiler | None) -> list[RowState]:
    """A fresh state per row; rows with a grammar get a matcher (`grammars` compiles it)."""
    states = []
    end_ids = frozenset(grammars.end_token_ids) if grammars is not None else frozenset()
    for prompt, p in zip(prompts, params):
        matcher = None
        if p.grammar is not None:
            if grammars is None:
                raise ValueError("a grammar needs the tokenizer's vocabulary: generate through a Session, or "
                                 "set the engine's `grammars` to a GrammarCompiler")
            matcher = grammars.compile(p.grammar).matcher()
        states.append(RowState(p, prompt, matcher, end_ids))
    return states


# ---- the pure arithmetic ----------------------------------------------------------------------------


def token_counts(token_lists: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str = "cpu") -> Tensor:
    """(B, V) float counts of each token id in each row's list."""
    counts = torch.zeros(len(token_lists), vocab_size, device=device)
    longest = max((len(t) for t in token_lists), default=0)
    if longest:
        ids = torch.zeros(len(token_lists), longest, dtype=torch.long)
        ones = torch.zeros(len(token_lists), longest)
        for i, tokens in enumerate(token_lists):
            ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            ones[i, : len(tokens)] = 1
        counts.scatter_add_(1, ids.to(device), ones.to(device))
    return counts


def apply_logit_bias(logits: Tensor, biases: Sequence[Mapping[int, float]]) -> Tensor:
    """Add each row's {token id: bias} to its logits (OpenAI's `logit_bias`)."""
    rows = [i for i, b in enumerate(biases) for _ in b]
    if not rows:
        return logits
    cols = [t for b in biases for t in b]
    values = torch.tensor([v for b in biases for v in b.values()], dtype=logits.dtype, device=logits.device)
    return logits.index_put((torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)),
                            values, accumulate=True)


def apply_penalties(logits: Tensor, counts: Tensor, presence: Tensor, frequency: Tensor) -> Tensor:
    """OpenAI's presence and frequency penalties: `logit - count * frequency - (count > 0) * presence`,
    with `counts` (B, V) over the tokens generated so far and one penalty per row (B,)."""
    return logits - counts * frequency[:, None] - (counts > 0).to(logits.dtype) * presence[:, None]


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: Tensor) -> Tensor:
    """HF's / vLLM's repetition penalty: a token seen in the prompt or the output has its logit divided
    by the row's penalty (B,) when positive, multiplied by it when negative."""
    p = penalty[:, None]
    return torch.where(seen, torch.where(logits > 0, logits / p, logits * p), logits)


def mask_tokens(logits: Tensor, mask: Tensor) -> Tensor:
    """A grammar's mask (B, V) of 0 (allowed) and -inf (not) applied: one addition, as a bool
    `masked_fill` was several times slower on CPU."""
    return logits + mask


def logprobs_of(logits: Tensor, tokens: Tensor, top: int) -> tuple[Tensor, Tensor, Tensor]:
    """The log-softmax of `logits` (B, V) at `tokens` (B,), and the `top` best (log-probs, ids) per row."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    best = logprobs.topk(top, dim=-1) if top else (logprobs[:, :0], tokens[:, None][:, :0])
    return chosen, best[0], best[1]


# ---- a batch step -------------------------------------------------------------------------------


def process(logits: Tensor, states: Sequence[RowState], grammars: GrammarCompiler | None) -> Tensor:
    """`logits` (B, V) of the rows `states` after each row's own processing; the input itself when no
    row has any. Rows without processing are neither copied nor touched."""
    active = [i for i, s in enumerate(states) if s.params.processes_logits]
    if not active:
        return logits
    every = len(active) == len(states)
    rows = list(states) if every else [states[i] for i in active]
    index = None if every else torch.tensor(active, device=logits.device)
    sub = logits.float() if every else logits[index].float()
    vocab, device = sub.shape[-1], sub.device
    if grammar_rows := [i for i, s in enumerate(rows) if s.matcher is not None and not s.grammar_done]:
        assert grammars is not None
        mask = grammars.mask([rows[i].matcher for i in grammar_rows], vocab).to(device)
        if len(grammar_rows) == len(rows):
            sub = mask_tokens(sub, mask)
        else:
            sub = sub.clone()
            sub[grammar_rows] = mask_tokens(sub[grammar_rows], mask)
    if early := [i for i, s in enumerate(rows) if len(s.tokens) < s.params.min_tokens]:
        sub = _mask_ends(sub if grammar_rows else sub.clone(), [rows[i] for i in early], early)
    sub = apply_logit_bias(sub, [{t: b for t, b in s.params.logit_bias.items() if t < vocab} for s in rows])
    if any(s.params.repetition_penalty != 1.0 for s in rows):
        seen = token_counts([[*s.prompt, *s.tokens] for s in rows], vocab, device) > 0
        penalty = torch.tensor([s.params.repetition_penalty for s in rows], device=device)
        sub = apply_repetition_penalty(sub, seen, penalty)
    if any(s.params.presence_penalty or s.params.frequency_penalty for s in rows):
        counts = token_counts([s.tokens for s in rows], vocab, device)
        presence = torch.tensor([s.params.presence_penalty for s in rows], device=device)
        frequency = torch.tensor([s.params.frequency_penalty for s in rows], device=device)
        sub = apply_penalties(sub, counts, presence, frequency)
    if every:
        return sub
    out = logits.float().clone()
    out[index] = sub
    return out


def _mask_ends(logits: Tensor, rows: Sequence[RowState], at: Sequence[int]) -> Tensor:
    """`min_tokens`: mask the stop tokens of rows `at` (in place). A row with a grammar that allows
    nothing but an end token keeps its end tokens: the grammar decides."""
    vocab = logits.shape[-1]
    for state, i in zip(rows, at):
        ends = [t for t in state.params.stop_token_ids if t < vocab]
        if not ends:
            continue
        saved = logits[i, ends].clone()
        logits[i, ends] = float("-inf")
        if state.matcher is not None and bool(torch.isneginf(logits[i]).all()):
            logits[i, ends] = saved
    return logits


def record(raw_logits: Tensor, tokens: Tensor, states: Sequence[RowState]) -> None:
    """Advance each row's state past its new token, with its log-prob when it asked for them."""
    wanted = [i for i, s in enumerate(states) if s.params.logprobs is not None]
    if wanted:
        top = max(states[i].params.logprobs or 0 for i in wanted)
        index = torch.tensor(wanted, device=raw_logits.device)
        chosen, best, ids = logprobs_of(raw_logits[index], tokens[index], top)
        chosen, best, ids = chosen.tolist(), best.tolist(), ids.tolist()
        for j, i in enumerate(wanted):
            n = states[i].params.logprobs or 0
            states[i].logprob = TokenLogprob(int(tokens[i]), chosen[j], list(zip(ids[j][:n], best[j][:n])))
    for state, token in zip(states, tokens.tolist()):
        if state.params.processes_logits:  # only processing reads the tokens so far
            state.advance(token)
