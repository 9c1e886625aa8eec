"""OpenAI's wire format: request bodies (declared pydantic models), errors, and server-sent event chunks."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from lmforge.tokenizer import Message

Number = float  # pydantic accepts ints for floats; strings are rejected (strict below)
MAX_REQUEST_BYTES = 4 * 2**20  # a prompt that fills a 128k-token context is about 0.5 MB of text
# OpenAI parameters this server does not implement: a request that sets one to anything but its
# neutral value (or null/false) is a 400 naming it, never a reply that silently ignores it.
UNSUPPORTED: dict[str, list[Any]] = {
    "functions": [[]], "function_call": ["none", "auto"],
    "best_of": [1], "suffix": [""], "prompt_logprobs": [], "guided_json": [], "guided_regex": [],
    "guided_choice": [], "guided_grammar": [], "structured_outputs": [],
}


class APIError(Exception):
    """An error answered as OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


# ---- request bodies --------------------------------------------------------------------------------


class RequestBody(BaseModel):
    """The fields both completion requests share."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = None
    max_tokens: StrictInt | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None  # extension (vLLM, llama.cpp): pass with the client's extra_body
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    logit_bias: dict[str, Number] | None = None  # token id (as a string) -> bias in [-100, 100]
    presence_penalty: Number | None = None
    frequency_penalty: Number | None = None
    repetition_penalty: Number | None = None  # extension (vLLM)
    min_tokens: StrictInt | None = None  # extension (vLLM)
    response_format: ResponseFormat | None = None  # completions: an extension (vLLM)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    name: str
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: plain text, any JSON object, or JSON valid against a schema."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class MessageBody(BaseModel):
    """One message of a chat request (its content may be a list of text parts); an assistant's may
    carry `tool_calls`, and a `tool` message answers one of them."""

    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""

    def turn(self) -> Message:
        """The chat turn the template renders (OpenAI's `developer` is a system message)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class ChatBody(RequestBody):
    messages: list[MessageBody]
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None


class CompletionBody(RequestBody):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = None
    echo: StrictBool | None = None


# ---- reading requests, writing events ------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to exceed `limit` bytes."""
    too_large = APIError(413, f"the request body is larger than {limit:,} bytes (see --max-request-bytes)",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def json_number(text: str) -> float | int:
    """A JSON number with a fraction or exponent: an int when it is integral (JSON Schema's `integer`
    holds 2.0), else a float."""
    value = float(text)
    return int(value) if value.is_integer() else value


async def parse(request: Request, model: type[BaseModel], max_bytes: int = MAX_REQUEST_BYTES) -> Any:
    """The request body validated against `model`: 413 when too large, 400 for bad JSON or an
    unsupported parameter, 422 for a wrong shape."""
    raw = await read_body(request, max_bytes)
    try:
        data = json.loads(raw, parse_float=json_number)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from e
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(422, "the request body must be a JSON object", code="invalid_type")
    for name, neutral in UNSUPPORTED.items():
        value = data.get(name)
        if not (value is None or value is False or (not isinstance(value, bool) and value in neutral)):
            raise APIError(400, f"'{name}' is not supported by this server", param=name,
                           code="unsupported_parameter")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(x) for x in first["loc"]) or None
        details = "; ".join(f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()[:5])
        raise APIError(422, f"invalid request: {details}", param=param, code=first["type"]) from e


async def sse(events: AsyncIterator[tuple], meta: dict, n: int, chat: bool, usage: dict,
              include_usage: bool, first_extra: dict[str, Any]) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; `first_extra`'s
    fields go into the first chunk."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], **extra: Any) -> str:
        return f"data: {json.dumps({**meta, 'object': kind, 'choices': choices, **extra})}\n\n"

    def choice(index: int, text: str | None, reason: str | None, logprobs: dict | None = None) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"text": text or "", "index": index, "logprobs": logprobs, "finish_reason": reason}

    try:
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(n)], **first_extra)
        async for event in events:
            if event[0] == "delta":
                yield chunk([choice(event[1], event[2], None, event[3])])
            elif event[0] == "tool_calls":
                calls = [{"index": k, **call} for k, call in enumerate(event[2])]
                yield chunk([{"index": event[1], "delta": {"tool_calls": calls}, "logprobs": None,
                              "finish_reason": None}])
            else:
                yield chunk([choice(event[1], None, event[2])])
        if include_usage:
            yield chunk([], usage=usage)
    except APIError as e:
        yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.type, 'param': None, 'code': None}})}\n\n"
    except Exception as e:  # the stream has begun: report in band rather than cutting the connection
        error = {"message": f"{type(e).__name__}: {e}", "type": "server_error", "param": None, "code": None}
        yield f"data: {json.dumps({'error': error})}\n\n"
    finally:
        await events.aclose()
    yield "data: [DONE]\n\n"
