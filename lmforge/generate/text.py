"""Text on top of the token engine: prompts in, streamed text out, with stop strings."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from lmforge.config import ModelConfig
from lmforge.generate.engine import Engine
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.seq2seq import Seq2SeqEngine
from lmforge.generate.speculative import SpeculativeEngine
from lmforge.tokenizer import Tokenizer

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def stop_token_ids(config: ModelConfig, tokenizer: Tokenizer) -> list[int]:
    """Token ids that end a reply: the model's EOS ids, the tokenizer's EOS, and any
    end-of-turn marker the vocabulary has (ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`, ...)."""
    ids = set(config.eos_token_ids)
    if tokenizer.eos_id is not None:
        ids.add(tokenizer.eos_id)
    for token in END_OF_TURN_TOKENS:
        if (token_id := tokenizer.token_to_id(token)) is not None:
            ids.add(token_id)
    return sorted(ids)


@dataclass
class Detokenizer:
    """Turns one sequence's token ids into text deltas: holds back an incomplete UTF-8 character
    and any tail that could still become a stop string, and cuts the text at a stop string (from the
    `min_tokens`-th token on, as vLLM does)."""

    tokenizer: Tokenizer
    stop: Sequence[str] = ()
    min_tokens: int = 0
    ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    stopped: bool = False

    def push(self, token: int) -> str:
        """Add a token; return the text that is now safe to show."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop if len(self.ids) >= self.min_tokens else ():
            at = text.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1:
                text, self.stopped = text[:at], True
        self.text = text
        if self.stopped:
            return self._emit(len(text))
        safe = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character may still complete
        return self._emit(max(safe - self._held_back(text[:safe]), self.emitted))

    def flush(self) -> str:
        """All text not yet shown (at the end of generation)."""
        return self._emit(len(self.text))

    def _held_back(self, text: str) -> int:
        return max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)

    def _emit(self, end: int) -> str:
        delta, self.emitted = self.text[self.emitted : end], end
        return delta


@dataclass
class Completion:
    """One prompt's generated text and how it ended (OpenAI's `finish_reason`)."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    stop_token: int | None = None  # the stop token that ended it (not in `token_ids`), if one did


def stream_completions(
    engine: Engine | Seq2SeqEngine,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    stop: Sequence[str] = (),
) -> Iterator[tuple[int, str]]:
    """Yield (row, text delta) as tokens arrive (`complete` gathers them into `Completion`s instead)."""
    yield from _run(engine, tokenizer, prompts, params, stop, [])


def complete(
    engine: Engine | Seq2SeqEngine | SpeculativeEngine,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    stop: Sequence[str] = (),
) -> list[Completion]:
    """Generate for every prompt in one batch; stop at a stop token or stop string. A speculative engine
    decodes the prompts one after another, a seeded one with the seed counted up per prompt (as a batch's
    rows draw different samples)."""
    if isinstance(engine, SpeculativeEngine) and len(prompts) > 1:
        seeds = [None if params.seed is None else (params.seed + i) % 2**64 for i in range(len(prompts))]
        return [complete(engine, tokenizer, [prompt], params.model_copy(update={"seed": seed}), stop)[0]
                for prompt, seed in zip(prompts, seeds)]
    results: list[Completion] = []
    for _ in _run(engine, tokenizer, prompts, params, stop, results):
        pass
    return results


def _run(
    engine: Engine | Seq2SeqEngine,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    stop: Sequence[str],
    results: list[Completion],
) -> Iterator[tuple[int, str]]:
    rows = [Detokenizer(tokenizer, stop, min_tokens=params.min_tokens) for _ in prompts]
    stop_ids = set(params.stop_token_ids)
    ended = [False] * len(prompts)
    stopped_by: list[int | None] = [None] * len(prompts)
    for step in engine.stream(prompts, params):
        for row, token in enumerate(step):
            if token is None or ended[row]:
                continue
            if token in stop_ids:
                ended[row], stopped_by[row] = True, token
                continue
            delta = rows[row].push(token)
            ended[row] = rows[row].stopped
            if delta:
                yield row, delta
        if all(ended):
            break
    for row, detok in enumerate(rows):
        if delta := detok.flush():
            yield row, delta
        results.append(Completion(detok.text, detok.ids, "stop" if ended[row] else "length", len(prompts[row]),
                                  stopped_by[row]))


@lru_cache(maxsize=1)
def _byte_of_symbol() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable symbol standing for each byte, inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[chr(b)] = b
        else:
            symbols[chr(256 + extra)] = b
            extra += 1
    return symbols


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The bytes one token stands for (a byte-level token may hold part of a UTF-8 character)."""
    text = tokenizer.decode([token_id])
    if "\ufffd" not in text:
        return text.encode()
    piece, table = tokenizer.backend.id_to_token(token_id) or "", _byte_of_symbol()
    if piece and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return text.encode()
