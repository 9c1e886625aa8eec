"""Log-probs in OpenAI's two response shapes: chat's `logprobs.content` entries ({token, logprob, bytes,
top_logprobs}) and the completions API's parallel lists ({tokens, token_logprobs, top_logprobs,
text_offset}, with null for a prompt's first token, as vLLM writes them for `echo`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lmforge.generate.processing import TokenLogprob
from lmforge.generate.text import token_bytes
from lmforge.tokenizer import Tokenizer


class LogprobWriter:
    """Turns `TokenLogprob`s into response fields; `offsets` keeps each completion row's text offset
    across the chunks of a stream."""

    def __init__(self, tokenizer: Tokenizer, rows: int) -> None:
        self.tokenizer = tokenizer
        self.offsets = [0] * rows
        self._text: dict[int, str] = {}

    def text(self, token: int) -> str:
        if token not in self._text:
            self._text[token] = self.tokenizer.decode([token])
        return self._text[token]

    def entry(self, token: int, logprob: float) -> dict[str, Any]:
        return {"token": self.text(token), "logprob": logprob, "bytes": list(token_bytes(self.tokenizer, token))}

    def chat(self, items: Sequence[TokenLogprob]) -> dict[str, Any]:
        """Chat's `choices[i].logprobs` for these tokens."""
        content = [{**self.entry(x.token, x.logprob), "top_logprobs": [self.entry(t, lp) for t, lp in x.top]}
                   for x in items]
        return {"content": content, "refusal": None}

    def completion(self, row: int, items: Sequence[TokenLogprob | None], tokens: Sequence[int] = ()
                   ) -> dict[str, Any]:
        """The completions API's `choices[i].logprobs` for these tokens (None: a prompt's first token,
        whose id comes from `tokens`)."""
        out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, x in enumerate(items):
            token = tokens[i] if x is None else x.token
            out["tokens"].append(self.text(token))
            out["token_logprobs"].append(None if x is None else x.logprob)
            top = None if x is None else {**{self.text(t): lp for t, lp in x.top}, self.text(token): x.logprob}
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offsets[row])
            self.offsets[row] += len(self.text(token))
        return out
