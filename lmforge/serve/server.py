"""An OpenAI-compatible HTTP server (FastAPI on uvicorn) over a loaded `Session`.

Endpoints: `GET /` (the chat page), `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`
(both with `stream: true` as server-sent events ending in `data: [DONE]`). Concurrent requests
are decoded together by one `Batcher` worker thread that owns the engine.

With a context store, chat requests are answered with retrieval: the last user message is searched
for, replaced by the grounded prompt over the best chunks, and the response carries a `sources`
list (in the first chunk when streamed) beside OpenAI's fields."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, ValidationError

from lmforge.generate.session import Session
from lmforge.rag.answer import grounded_chat_prompt
from lmforge.rag.store import Store
from lmforge.serve.batcher import Batcher, Job

CHAT_PAGE = Path(__file__).parent / "static" / "index.html"
# The page is self-contained: the browser may fetch nothing but this server.
PAGE_POLICY = ("default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; "
               "img-src 'self' data:")
Number = float  # pydantic accepts ints for floats; strings are rejected (strict below)
MAX_REQUEST_BYTES = 4 * 2**20  # a prompt that fills a 128k-token context is about 0.5 MB of text
SEEDS = range(-2**63, 2**64)  # what torch.Generator.manual_seed takes
# OpenAI parameters this server does not implement: a request that sets one to anything but its
# neutral value (or null/false) is a 400 naming it, never a reply that silently ignores it.
UNSUPPORTED: dict[str, list[Any]] = {
    "logit_bias": [{}], "echo": [], "logprobs": [], "top_logprobs": [0], "response_format": [{"type": "text"}],
    "tools": [[]], "tool_choice": ["none", "auto"], "functions": [[]], "function_call": ["none", "auto"],
    "presence_penalty": [0], "frequency_penalty": [0], "best_of": [1], "suffix": [""],
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


class _Body(BaseModel):
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


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatBody(_Body):
    messages: list[Message]
    max_completion_tokens: StrictInt | None = None


class CompletionBody(_Body):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]


# ---- the app ----------------------------------------------------------------------------------------


def create_app(session: Session, *, api_key: str | None = None, model_name: str = "lmforge",
               max_batch_size: int = 16, store: Store | None = None, rag_k: int = 3,
               max_request_bytes: int = MAX_REQUEST_BYTES) -> FastAPI:
    """The FastAPI app serving `session` under the model id `model_name`; chat answers are grounded
    in the `rag_k` best chunks of `store` when one is given. Bodies over `max_request_bytes` are
    refused unread."""
    batcher = Batcher(session, max_batch_size=max_batch_size)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(batcher.close)

    app = FastAPI(title="lmforge", lifespan=lifespan)
    app.state.session, app.state.batcher = session, batcher

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Exception) -> JSONResponse:
        return APIError(404, f"no route {request.method} {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def _not_allowed(request: Request, exc: Exception) -> JSONResponse:
        return APIError(405, f"method {request.method} not allowed on {request.url.path}").response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return APIError(500, f"{type(exc).__name__}: {exc}", type="server_error").response()

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    @app.get("/", include_in_schema=False)
    async def chat_page() -> FileResponse:
        return FileResponse(CHAT_PAGE, media_type="text/html", headers={"Content-Security-Policy": PAGE_POLICY})

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "lmforge",
                "context_length": session.context}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict[str, Any]:
        authorize(request)
        check_model(model_id)
        return model_card()

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await parse(request, ChatBody, max_request_bytes)
        check_model(body.model)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        check_params(body, max_tokens)
        if not body.messages:
            raise APIError(400, "'messages' must hold at least one message", param="messages")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        extra: dict[str, Any] = {}
        try:
            if store is not None and messages[-1]["role"] == "user":
                hits = await asyncio.to_thread(store.search, messages[-1]["content"], rag_k)
                prompt, hits = grounded_chat_prompt(session, messages, hits, max_tokens or 1)
                extra["sources"] = [{"index": i, "doc_id": h.doc_id, "text": h.text, "score": h.score,
                                     "metadata": h.metadata} for i, h in enumerate(hits, 1)]
            else:
                prompt = session.chat_prompt(messages, reserve=max_tokens or 1)
        except ValueError as e:
            raise APIError(400, f"cannot render the messages with the chat template: {e}", param="messages") from e
        return await respond(request, body, [prompt], max_tokens, chat=True, extra=extra)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = await parse(request, CompletionBody, max_request_bytes)
        check_model(body.model)
        check_params(body, body.max_tokens)
        prompt = body.prompt
        if isinstance(prompt, str):
            prompts = [session.encode(prompt)]
        elif prompt and all(isinstance(p, str) for p in prompt):
            prompts = [session.encode(p) for p in prompt]
        elif prompt and all(isinstance(p, list) for p in prompt):
            prompts = [list(p) for p in prompt]
        else:
            prompts = [list(prompt)]
        vocab = session.model.config.vocab_size
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return await respond(request, body, prompts, body.max_tokens, chat=False)

    def check_params(body: _Body, max_tokens: int | None) -> None:
        if body.temperature is not None and body.temperature < 0:
            raise APIError(400, f"temperature must be >= 0, got {body.temperature}", param="temperature")
        if body.top_p is not None and not 0 < body.top_p <= 1:
            raise APIError(400, f"top_p must be in (0, 1], got {body.top_p}", param="top_p")
        if body.top_k is not None and body.top_k < 0:
            raise APIError(400, f"top_k must be >= 0, got {body.top_k}", param="top_k")
        if body.seed is not None and body.seed not in SEEDS:
            raise APIError(400, f"seed must be in [{SEEDS.start}, {SEEDS.stop - 1}], got {body.seed}", param="seed")
        if not 1 <= body.n <= max_batch_size:
            raise APIError(400, f"n must be between 1 and {max_batch_size}, got {body.n}", param="n")
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"max_tokens must be >= 1, got {max_tokens}", param="max_tokens")
        if max_tokens is not None and max_tokens >= session.context:
            raise APIError(400, f"max_tokens={max_tokens} is beyond the model's context of {session.context} "
                                "tokens", param="max_tokens", code="context_length_exceeded")

    async def respond(request: Request, body: _Body, prompts: list[list[int]], max_tokens: int | None, *, chat: bool,
                      extra: dict[str, Any] | None = None):
        for p in prompts:
            if not p:
                raise APIError(400, "the prompt is empty", param="prompt" if not chat else "messages")
            room = session.context - len(p)
            if room < 1 or (max_tokens is not None and max_tokens > room):
                asked = f" plus max_tokens={max_tokens}" if max_tokens is not None else ""
                raise APIError(400, f"the prompt's {len(p)} tokens{asked} do not fit the model's context of "
                                    f"{session.context} tokens", param="max_tokens" if max_tokens else "messages",
                               code="context_length_exceeded")
        limit = max_tokens or min(session.context - len(p) for p in prompts)
        stop = [body.stop] if isinstance(body.stop, str) else [s for s in (body.stop or []) if s]
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        rows = [p for p in prompts for _ in range(body.n)]

        def emit(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                job.cancelled = True

        job = Job(rows, limit, emit, temperature=1.0 if body.temperature is None else body.temperature,
                  top_k=body.top_k or None, top_p=body.top_p, seed=body.seed, stop=stop)
        batcher.submit(job)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model_name}
        usage = {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": 0, "total_tokens": 0}

        async def results() -> AsyncIterator[tuple]:
            remaining = len(rows)
            try:
                while remaining:
                    event = await events.get()
                    if event[0] == "error":
                        raise APIError(500, event[1], type="server_error")
                    if event[0] == "done":
                        remaining -= 1
                        usage["completion_tokens"] += event[3]
                    yield event
            finally:
                job.cancelled = True  # finished, failed or the client went away: free the rows
                usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]

        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(sse(results(), meta, len(rows), chat, usage, include_usage, extra or {}),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts, reasons = [""] * len(rows), ["length"] * len(rows)
        watcher = asyncio.create_task(cancel_on_disconnect(request, job))
        try:
            async for event in results():
                if event[0] == "delta":
                    texts[event[1]] += event[2]
                else:
                    reasons[event[1]] = event[2]
        finally:
            watcher.cancel()
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                        "finish_reason": r} for i, (t, r) in enumerate(zip(texts, reasons))]
        else:
            choices = [{"text": t, "index": i, "logprobs": None, "finish_reason": r}
                       for i, (t, r) in enumerate(zip(texts, reasons))]
        kind = "chat.completion" if chat else "text_completion"
        return {**meta, "object": kind, "choices": choices, "usage": usage, **(extra or {})}

    return app


async def cancel_on_disconnect(request: Request, job: Job, every: float = 0.05) -> None:
    """Cancel `job` when the client of a non-streamed request hangs up (a stream notices by itself)."""
    while not await request.is_disconnected():
        await asyncio.sleep(every)
    job.cancelled = True


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


async def parse(request: Request, model: type[BaseModel], max_bytes: int = MAX_REQUEST_BYTES) -> Any:
    """The request body validated against `model`: 413 when too large, 400 for bad JSON or an
    unsupported parameter, 422 for a wrong shape."""
    raw = await read_body(request, max_bytes)
    try:
        data = json.loads(raw)
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

    def choice(index: int, text: str | None, reason: str | None) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"text": text or "", "index": index, "logprobs": None, "finish_reason": reason}

    try:
        if chat:
            yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for i in range(n)], **first_extra)
        async for event in events:
            if event[0] == "delta":
                yield chunk([choice(event[1], event[2], None)])
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


def serve(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, dtype: str | None = None, max_batch_size: int = 16,
          store: str | None = None, rag_k: int = 3, max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
    """Load a checkpoint (and a context store) and serve it with uvicorn until interrupted."""
    import uvicorn

    session = Session.load(checkpoint, dtype=dtype)
    name = model_name or Path(checkpoint).resolve().name
    app = create_app(session, api_key=api_key, model_name=name, max_batch_size=max_batch_size,
                     store=Store.open(store) if store else None, rag_k=rag_k, max_request_bytes=max_request_bytes)
    print(f"serving '{name}' on http://{host}:{port}/v1", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
