"""The request parameters that shape a row's logits and what it reports (`response_format`, `logit_bias`,
penalties, `min_tokens`, log-probs, `stop`), checked and turned into `SamplingParams` fields; a bad
value is a 400 naming the request's parameter. Also what an encoder-decoder model cannot take."""

from __future__ import annotations

from typing import Any

from lmforge.generate.grammar import Grammar, GrammarError
from lmforge.generate.sampling import MAX_LOGPROBS
from lmforge.generate.session import Session
from lmforge.serve.protocol import APIError, ChatBody, CompletionBody, RequestBody

MAX_STOP = 16  # OpenAI allows 4 stop strings; more are an extension, up to this many
BIAS_LIMIT = 100.0  # OpenAI's range for a logit_bias value


def stop_strings(body: RequestBody) -> list[str]:
    """The request's stop strings (a 400 beyond `MAX_STOP`)."""
    stop = [body.stop] if isinstance(body.stop, str) else [s for s in (body.stop or []) if s]
    if len(stop) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} stop strings, got {len(stop)}", param="stop")
    return stop


def grammar_of(body: RequestBody, session: Session) -> Grammar | None:
    """The grammar `response_format` asks for, compiled once here so that a bad schema is a 400."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        grammar = Grammar.json_object()
    else:
        if fmt.json_schema is None or fmt.json_schema.json_schema is None:
            raise APIError(400, "response_format: a json_schema format needs 'json_schema': {'name', 'schema'}",
                           param="response_format")
        grammar = Grammar.json_schema(fmt.json_schema.json_schema)
    return checked(grammar, session, "response_format")


def checked(grammar: Grammar, session: Session, param: str) -> Grammar:
    """`grammar`, compiled once here (and cached) so that a bad one is a 400 naming `param`."""
    try:
        session.grammars.compile(grammar)
    except GrammarError as e:
        raise APIError(400, f"{param}: the schema cannot be compiled: {e}", param=param) from None
    return grammar


def logprob_counts(body: ChatBody | CompletionBody) -> tuple[int | None, int | None]:
    """(alternatives per generated token, alternatives per prompt token) the request asks for; None: none."""
    if isinstance(body, ChatBody):
        if body.top_logprobs is not None and not body.logprobs:
            if body.top_logprobs:
                raise APIError(400, "top_logprobs: needs logprobs=true", param="top_logprobs")
        top = body.top_logprobs or 0
        _check_count(top, "top_logprobs")
        return (top if body.logprobs else None), None
    if body.logprobs is not None:
        _check_count(body.logprobs, "logprobs")
    return body.logprobs, (body.logprobs or 0) if body.echo and body.logprobs is not None else None


def _check_count(n: int, name: str) -> None:
    if not 0 <= n <= MAX_LOGPROBS:
        raise APIError(400, f"{name}: must be between 0 and {MAX_LOGPROBS}, got {n}", param=name)


def processing_fields(body: ChatBody | CompletionBody, session: Session) -> dict[str, Any]:
    """The `SamplingParams` fields of the request's logits processing and log-probs."""
    fields: dict[str, Any] = {"grammar": grammar_of(body, session), "logprobs": logprob_counts(body)[0]}
    vocab = session.model.config.vocab_size
    bias: dict[int, float] = {}
    for key, value in (body.logit_bias or {}).items():
        if not key.isdigit() or not 0 <= int(key) < vocab:
            raise APIError(400, f"logit_bias: keys must be token ids in [0, {vocab}), got {key!r}", param="logit_bias")
        if not -BIAS_LIMIT <= value <= BIAS_LIMIT:
            raise APIError(400, f"logit_bias: values must be in [-100, 100], got {value}", param="logit_bias")
        bias[int(key)] = float(value)
    fields["logit_bias"] = bias
    for name in ("presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens"):
        if (value := getattr(body, name)) is not None:
            fields[name] = value
    return fields


def check_encoder_decoder(body: ChatBody | CompletionBody, session: Session) -> None:
    """A 400 for what an encoder-decoder model cannot do: tools (no chat template), a chat whose last message is
    not the user's (that message is the model's input), prompt log-probs (its prompt is encoded, not generated)."""
    if not session.encoder_decoder:
        return
    if isinstance(body, ChatBody):
        if body.tools:
            raise APIError(400, "tools are not supported for an encoder-decoder model (no chat template)",
                           param="tools", code="unsupported_parameter")
        if body.messages and body.messages[-1].role != "user":
            raise APIError(400, "an encoder-decoder model answers the last user message; the last message is "
                                f"'{body.messages[-1].role}'", param="messages")
    elif body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs (prompt log-probs) is not supported for an encoder-decoder model: "
                            "its prompt is the encoder's input", param="echo", code="unsupported_parameter")
