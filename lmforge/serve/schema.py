"""The API's declared responses: OpenAI's response bodies as pydantic models (field names and types as
OpenAI's, `sources` and `context_length` as this server's extensions), the error body, each route's
error statuses, and the OpenAPI document that puts them, with the request bodies, at `/openapi.json`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """Every error status's body, as OpenAI's."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int | None = Field(None, description="extension: the model's context window in tokens")


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Source(BaseModel):
    """A retrieved chunk a grounded chat answer is based on (with `--store`)."""

    index: int
    doc_id: str
    text: str
    score: float
    metadata: dict[str, Any]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int]


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the arguments as a JSON object")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    sources: list[Source] | None = Field(None, description="extension: the retrieved chunks (with --store)")


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    sources: list[Source] | None = Field(None, description="extension: in the first chunk (with --store)")


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChunkChoice(CompletionChoice):
    finish_reason: FinishReason | None  # type: ignore[assignment]  # null until the choice ends


class CompletionChunk(Completion):
    """A streamed completion event: OpenAI sends `text_completion` objects, finish_reason null until the end."""

    choices: list[CompletionChunkChoice]  # type: ignore[assignment]


class Embedding(BaseModel):
    object: Literal["embedding"]
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32 with "
                                                      "encoding_format=base64")
    index: int


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"]
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


# ---- what each route declares -----------------------------------------------------------------------

ERRORS = {
    400: "a parameter is unsupported or out of range, the JSON is malformed, or the prompt does not fit",
    401: "the API key is missing or wrong (with --api-key)",
    404: "no such model",
    405: "method not allowed (the Allow header lists the allowed ones)",
    413: "the request body is larger than --max-request-bytes",
    422: "the request body does not have the declared shape",
    500: "the server failed",
}
READ_ERRORS, MODEL_ERRORS, BODY_ERRORS = (405, 500), (401, 405, 500), (400, 401, 404, 405, 413, 422, 500)


def event_stream(*chunks: type[BaseModel]) -> dict[str, Any]:
    """The `text/event-stream` media type of a streamed reply: each event's `data` is one chunk (or an
    error body) as JSON, and the last one `[DONE]` (the schema describes one event, as before OpenAPI 3.2)."""
    json_data = {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": {"oneOf": [{"$ref": f"#/components/schemas/{c.__name__}"}
                                             for c in (*chunks, ErrorResponse)]}}
    data = {"oneOf": [{"const": "[DONE]"}, json_data]}
    return {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}}}


def responses(ok: type[BaseModel], errors: tuple[int, ...], stream: type[BaseModel] | None = None,
              ) -> dict[int | str, dict[str, Any]]:
    """A route's OpenAPI `responses`: `ok` as 200 (or a `stream` of events), an error body per status."""
    success: dict[str, Any] = {"model": ok, "description": "OK"}
    if stream is not None:
        success["content"] = {"text/event-stream": event_stream(stream)}
        success["description"] = "the reply, or with `stream: true` server-sent events ending in `data: [DONE]`"
    return {200: success, **{status: {"model": ErrorResponse, "description": ERRORS[status]} for status in errors}}


REQUEST_EXAMPLES: dict[str, dict[str, dict[str, Any]]] = {
    "/v1/chat/completions": {
        "chat": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
                 "max_tokens": 16},
        "stream": {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16, "temperature": 0,
                   "stream": True, "stream_options": {"include_usage": True}},
    },
    "/v1/completions": {
        "text": {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.7, "top_p": 0.95, "seed": 1},
        "token ids": {"prompt": [[1, 2, 3], [4, 5]], "max_tokens": 4, "n": 2, "stream": True},
    },
    "/v1/embeddings": {
        "text": {"input": "The food was delicious."},
        "texts, base64": {"input": ["first text", "second text"], "encoding_format": "base64"},
        "token ids": {"input": [101, 7592, 2088, 102]},
        "lists of token ids": {"input": [[101, 7592, 102], [101, 2088, 102]], "encoding_format": "float"},
    },
}


def describe_api(app: FastAPI, bodies: dict[str, type[BaseModel]], components: tuple[type[BaseModel], ...] = (),
                 bearer: bool = False) -> Callable[[], dict[str, Any]]:
    """`app.openapi` with each POST route of `bodies` declaring its JSON request body (with the
    `REQUEST_EXAMPLES`), the stream chunk models among the components, and with `bearer` the API key
    that `/v1` routes require. The routes read their bodies themselves (to refuse an oversized one
    unread, and to name a bad parameter OpenAI's way), so FastAPI cannot see them."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            models = [(m, "validation") for m in bodies.values()] + [(m, "serialization") for m in components]
            refs, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            for path, model in bodies.items():
                examples = {name: {"value": value} for name, value in REQUEST_EXAMPLES.get(path, {}).items()}
                content = {"application/json": {"schema": refs[(model, "validation")], "examples": examples}}
                schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": content}
            if bearer:
                schema["components"]["securitySchemes"] = {"APIKey": {"type": "http", "scheme": "bearer"}}
                for path, operations in schema["paths"].items():
                    for operation in operations.values() if path.startswith("/v1/") else ():
                        operation["security"] = [{"APIKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi
