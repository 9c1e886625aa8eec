"""Structured output: a grammar spec (JSON schema, any JSON object, regular expression, choice, Lark)
compiled with llguidance into per-row matchers that give a token mask before each sampling step.

llguidance rather than xgrammar, by measurement on this CPU (one thread, byte-level BPE of 300 and
8,000 tokens, three schemas): compiling a schema into a matcher takes 0.5-1.4 ms (xgrammar 0.6-4.5 ms)
and a mask 10-42 us per token (xgrammar 6-31 us), both far below a decode step; llguidance reads
`tokenizer.json` as it is and is one dependency-free wheel, where xgrammar pulls in triton and
transformers. A `GrammarCompiler` holds the tokenizer's token strings once and caches compiled
grammars, so a schema sent again costs a copy of its matcher."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import llguidance
import torch
from llguidance._tokenizer import TokenizerWrapper
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from lmforge.tokenizer import Tokenizer

# Below this many rows, computing the masks one after another beat llguidance's thread pool on two
# cores (8 rows, 8k vocabulary: 15-20 us against 90 us).
PARALLEL_ROWS = 16
# Byte value -> its 8 bits (least significant first, as llguidance packs them) as 0 (set) or -inf (clear).
_BYTE_BIAS = torch.tensor([[0.0 if (b >> i) & 1 else float("-inf") for i in range(8)] for b in range(256)])
# Compact JSON laid out as `json.dumps` writes it: no free whitespace, which a model could repeat forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar spec the library cannot compile (a bad schema, regex or Lark text)."""


class Grammar(BaseModel):
    """What a row's text must match: build one with `Grammar.json_schema(schema)`, `json_object()`,
    `regex(pattern)`, `choice(options)` or `lark(text)`. Plain data: `SamplingParams(grammar=...)`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["json_schema", "json_object", "regex", "choice", "lark"]
    value: Any = None

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> Grammar:
        """Any JSON document valid against `schema` (a dict or its JSON text)."""
        return cls(kind="json_schema", value=json.loads(schema) if isinstance(schema, str) else schema)

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        return cls(kind="json_object")

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        return cls(kind="regex", value=pattern)

    @classmethod
    def choice(cls, options: Sequence[str]) -> Grammar:
        """Exactly one of `options`."""
        return cls(kind="choice", value=tuple(options))

    @classmethod
    def lark(cls, text: str) -> Grammar:
        """A Lark grammar in llguidance's dialect (its `start` rule)."""
        return cls(kind="lark", value=text)

    def key(self) -> str:
        """A canonical text of the spec (the compile cache's key)."""
        return json.dumps([self.kind, self.value], sort_keys=True, separators=(",", ":"))

    def source(self) -> str:
        """The spec as llguidance's grammar text; `GrammarError` when it cannot be translated."""
        try:
            if self.kind in ("json_schema", "json_object"):
                schema = self.value if self.kind == "json_schema" else {"type": "object"}
                return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            if self.kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(self.value)
            if self.kind == "choice":
                if not self.value:
                    raise GrammarError("a choice needs at least one option")
                return llguidance.LLMatcher.grammar_from_lark(
                    "start: " + " | ".join(json.dumps(str(option)) for option in self.value))
            return llguidance.LLMatcher.grammar_from_lark(self.value)
        except (ValueError, TypeError, RuntimeError) as e:
            raise GrammarError(str(e)) from None


class CompiledGrammar:
    """A grammar compiled against one tokenizer; `matcher()` starts a fresh row on it."""

    def __init__(self, prototype: llguidance.LLMatcher) -> None:
        self._prototype = prototype

    def matcher(self) -> llguidance.LLMatcher:
        return self._prototype.deep_copy()


class TokenTable:
    """A tokenizer as llguidance's `TokenizerWrapper` reads one, for a `tokenizer.json` whose decoder llguidance
    cannot interpret (sentencepiece's Metaspace, as T5's): each token's bytes, a piece's `\u2581` read as a space and
    `<0xNN>` as the byte NN, special tokens marked by a leading 0xFF (as llguidance's llama.cpp reader marks them)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, end_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = end_token_ids[0] if end_token_ids else None
        self.bos_token_id = tokenizer.bos_id
        special = {i for i, t in tokenizer.backend.get_added_tokens_decoder().items() if t.special}
        self.special_token_ids = sorted(special)
        self.tokens = [self.token_bytes(i, i in special) for i in range(vocab_size)]
        self.by_bytes: dict[bytes, int] = {}
        for i, spelled in enumerate(self.tokens):
            if spelled and i not in special:
                self.by_bytes.setdefault(spelled, i)
        self.longest = max(map(len, self.by_bytes), default=1)

    def token_bytes(self, token_id: int, special: bool) -> bytes:
        piece = self.tokenizer.backend.id_to_token(token_id)
        if piece is None:
            return b""
        if special:
            return b"\xff" + piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode()

    def __call__(self, text: str) -> list[int]:
        """Token ids whose bytes are `text`'s, longest match first (the tokenizer's own encoding would add the
        word-initial space Metaspace prepends); a byte no token spells is skipped."""
        data, ids, at = text.encode(), [], 0
        while at < len(data):
            for end in range(min(len(data), at + self.longest), at, -1):
                if (token := self.by_bytes.get(data[at:end])) is not None:
                    ids.append(token)
                    at = end
                    break
            else:
                at += 1
        return ids


class GrammarCompiler:
    """Compiles `Grammar`s against a tokenizer for logits of `vocab_size`; `end_token_ids` are the
    tokens that end a row once its grammar accepts (the model's end-of-sequence and end-of-turn
    tokens). The token table is built on first use; the last `cache_size` grammars are kept."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, end_token_ids: Sequence[int], *,
                 cache_size: int = 128) -> None:
        self.tokenizer, self.end_token_ids = tokenizer, list(end_token_ids)
        self.vocab_size = max(vocab_size, tokenizer.vocab_size)
        self.cache_size = cache_size
        self._tokens: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()

    @property
    def tokens(self) -> llguidance.LLTokenizer:
        if self._tokens is None:
            eos = self.end_token_ids or None
            try:
                self._tokens = llguidance.LLTokenizer(self.tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                                      eos_token=eos)
            except ValueError:  # a decoder llguidance cannot read from tokenizer.json (T5's Metaspace)
                table = TokenizerWrapper(TokenTable(self.tokenizer, self.vocab_size, self.end_token_ids))
                self._tokens = llguidance.LLTokenizer(table, n_vocab=self.vocab_size, eos_token=eos)
        return self._tokens

    def compile(self, grammar: Grammar) -> CompiledGrammar:
        """The compiled grammar (cached); `GrammarError` naming the problem when it does not compile."""
        key = grammar.key()
        if (hit := self._cache.get(key)) is not None:
            self._cache.move_to_end(key)
            return hit
        matcher = llguidance.LLMatcher(self.tokens, grammar.source(), log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        self._cache[key] = compiled = CompiledGrammar(matcher)
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return compiled

    def mask(self, matchers: Sequence[llguidance.LLMatcher], vocab_size: int) -> Tensor:
        """(len(matchers), vocab_size) float32: 0 where each matcher allows the token next, -inf elsewhere
        (to add to the logits). Computed for the whole batch in one call and unpacked by a table lookup
        per byte of the bitmask, with no Python loop over the vocabulary."""
        words = (self.vocab_size + 31) // 32
        bitmask = torch.zeros(len(matchers), words, dtype=torch.int32)
        if len(matchers) < PARALLEL_ROWS:
            for i, matcher in enumerate(matchers):
                matcher.unsafe_compute_mask_ptr(bitmask[i].data_ptr(), words * 4)
        else:
            if self._executor is None:
                self._executor = llguidance.LLExecutor()
            self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                                   words * 4, len(matchers))
        bias = _BYTE_BIAS.index_select(0, bitmask.view(torch.uint8).view(-1).long()).view(len(matchers), -1)
        bias = bias[:, :vocab_size]
        if bias.shape[1] < vocab_size:  # logits wider than the tokenizer: the extra ids are never allowed
            bias = torch.nn.functional.pad(bias, (0, vocab_size - bias.shape[1]), value=float("-inf"))
        return bias
