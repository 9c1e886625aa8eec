"""An OpenAI-compatible HTTP server (FastAPI on uvicorn) over a loaded `Session`.

Endpoints: `GET /` (the chat page), `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`
(both with `stream: true` as server-sent events ending in `data: [DONE]`). Concurrent requests
are decoded together by one `Batcher` worker thread that owns the engine (with a drafter, those speculative
decoding serves are decoded speculatively there; `GET /metrics` counts them). `POST /v1/embeddings`
embeds with the retrieval encoder (`embeddings.py`). Every route's bodies and error statuses are
declared (`schema.py`) in `/openapi.json`, which `/docs` shows.

With a context store, chat requests are answered with retrieval: the last user message is searched
for, replaced by the grounded prompt over the best chunks, and the response carries a `sources`
list (in the first chunk when streamed) beside OpenAI's fields.

An encoder-decoder session (T5) is served one batch at a time (`Seq2SeqBatch`): a completion's prompt is
the encoder's input, a chat's is its last user message; tools and prompt log-probs (`echo` with `logprobs`)
are refused with a 400 naming them."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import ValidationError

from lmforge.generate.grammar import Grammar
from lmforge.generate.quantize import Quantization
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.session import Session
from lmforge.generate.speculative import Drafter
from lmforge.hub import hub_id
from lmforge.rag.answer import grounded_chat_prompt
from lmforge.rag.store import Store
from lmforge.rag.embed import Embedder, load_embedder
from lmforge.serve.batcher import Batcher, Job
from lmforge.serve.embeddings import EmbeddingBody, Embeddings, EncoderSource
from lmforge.serve.logprobs import LogprobWriter
from lmforge.serve.metrics import metrics_route
from lmforge.serve.options import check_encoder_decoder, checked, logprob_counts, processing_fields, stop_strings
from lmforge.serve.protocol import MAX_REQUEST_BYTES, APIError, ChatBody, CompletionBody, parse, sse
from lmforge.serve.schema import (
    BODY_ERRORS, MODEL_ERRORS, READ_ERRORS, ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk,
    EmbeddingList, Health, Model, ModelList, describe_api, responses,
)
from lmforge.serve.tools import ToolUse, call_turns, conversation, with_tool_calls
from lmforge.tokenizer import Tokenizer

CHAT_PAGE = Path(__file__).parent / "static" / "index.html"
# The page is self-contained: the browser may fetch nothing but this server.
PAGE_POLICY = ("default-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self'; "
               "img-src 'self' data:")
REQUEST_PARAMS = {"max_new_tokens": "max_tokens"}  # SamplingParams' fields named otherwise in a request
API_DESCRIPTION = ("OpenAI's API over one model (`/v1/chat/completions`, `/v1/completions`, `/v1/models`) and the "
                   "retrieval encoder (`/v1/embeddings`). Errors are OpenAI's `{\"error\": {message, type, param, "
                   "code}}`.")


# ---- the app ----------------------------------------------------------------------------------------


def create_app(session: Session, *, api_key: str | None = None, model_name: str = "lmforge",
               max_batch_size: int = 16, store: Store | None = None, rag_k: int = 3,
               max_request_bytes: int = MAX_REQUEST_BYTES, embedder: Embedder | None = None,
               drafter: Drafter | None = None) -> FastAPI:
    """The FastAPI app serving `session` under the model id `model_name`; chat answers are grounded
    in the `rag_k` best chunks of `store` when one is given. Bodies over `max_request_bytes` are
    refused unread. `/v1/embeddings` uses `embedder`, else the store's, else the default encoder
    (loaded on its first request). With `drafter`, requests speculative decoding serves are decoded
    speculatively (see `Batcher`)."""
    api = Endpoints(session, Batcher(session, max_batch_size=max_batch_size, drafter=drafter), api_key=api_key,
                    model_name=model_name, store=store, rag_k=rag_k, max_request_bytes=max_request_bytes)
    encoder = EncoderSource(embedder or (store.embedder if store is not None else None))
    embeddings = Embeddings(encoder, authorize=api.authorize, served_model=model_name,
                            max_request_bytes=max_request_bytes)
    app = FastAPI(title="lmforge", lifespan=api.lifespan, description=API_DESCRIPTION)
    app.state.session, app.state.batcher = session, api.batcher
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(404, not_found)
    app.add_exception_handler(405, not_allowed)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, internal_error)
    app.add_api_route("/", chat_page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/health", health, methods=["GET"], response_model=None,
                      responses=responses(Health, READ_ERRORS))
    app.add_api_route("/metrics", metrics_route(api.batcher, model_name), methods=["GET"], include_in_schema=False)
    app.add_api_route("/v1/models", api.models, methods=["GET"], response_model=None,
                      responses=responses(ModelList, MODEL_ERRORS))
    app.add_api_route("/v1/models/{model_id:path}", api.model, methods=["GET"], response_model=None,
                      responses=responses(Model, (404, 422, *MODEL_ERRORS)))
    app.add_api_route("/v1/chat/completions", api.chat_completions, methods=["POST"], response_model=None,
                      responses=responses(ChatCompletion, BODY_ERRORS, stream=ChatCompletionChunk))
    app.add_api_route("/v1/completions", api.completions, methods=["POST"], response_model=None,
                      responses=responses(Completion, BODY_ERRORS, stream=CompletionChunk))
    app.add_api_route("/v1/embeddings", embeddings.__call__, methods=["POST"], response_model=None,
                      responses=responses(EmbeddingList, BODY_ERRORS))
    app.openapi = describe_api(app, {"/v1/chat/completions": ChatBody, "/v1/completions": CompletionBody,
                                     "/v1/embeddings": EmbeddingBody}, (ChatCompletionChunk, CompletionChunk),
                               bearer=api_key is not None)
    return app


async def api_error(request: Request, exc: APIError) -> JSONResponse:
    return exc.response()


async def not_found(request: Request, exc: Exception) -> JSONResponse:
    return APIError(404, f"no route {request.method} {request.url.path}", code="not_found").response()


async def not_allowed(request: Request, exc: Exception) -> JSONResponse:
    response = APIError(405, f"method {request.method} not allowed on {request.url.path}").response()
    response.headers.update(getattr(exc, "headers", None) or {})  # Allow: the methods the route takes
    return response


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
    return APIError(422, f"invalid request: {first.get('msg', exc)}", param=param).response()


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    return APIError(500, f"{type(exc).__name__}: {exc}", type="server_error").response()


async def chat_page() -> FileResponse:
    return FileResponse(CHAT_PAGE, media_type="text/html", headers={"Content-Security-Policy": PAGE_POLICY})


async def health() -> dict[str, str]:
    return {"status": "ok"}


class Endpoints:
    """The model endpoints over one session: authorization, request checks, and replies from the
    batcher (streamed or whole)."""

    def __init__(self, session: Session, batcher: Batcher, *, api_key: str | None, model_name: str,
                 store: Store | None, rag_k: int, max_request_bytes: int) -> None:
        self.session, self.batcher = session, batcher
        self.api_key, self.model_name = api_key, model_name
        self.store, self.rag_k = store, rag_k
        self.max_request_bytes = max_request_bytes
        self.created = int(time.time())

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        self.batcher.start()
        try:
            yield
        finally:
            await asyncio.to_thread(self.batcher.close)

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "lmforge",
                "context_length": self.session.context}

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")

    async def models(self, request: Request) -> dict[str, Any]:
        self.authorize(request)
        return {"object": "list", "data": [self.model_card()]}

    async def model(self, model_id: str, request: Request) -> dict[str, Any]:
        self.authorize(request)
        self.check_model(model_id)
        return self.model_card()

    async def chat_completions(self, request: Request) -> dict[str, Any] | StreamingResponse:
        self.authorize(request)
        body = await parse(request, ChatBody, self.max_request_bytes)
        self.check_model(body.model)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = self.sampling(body, max_tokens)
        if not body.messages:
            raise APIError(400, "'messages' must hold at least one message", param="messages")
        check_encoder_decoder(body, self.session)
        tools = self.tool_use(body)
        if tools is not None and tools.required:  # the reply is decoded as a call: always well formed
            params = params.model_copy(update={"grammar": self.call_grammar(tools)})
        prompt, extra = await self.chat_prompt(self.turns(body), max_tokens or 1, tools)
        return await self.respond(request, body, [prompt], params, max_tokens, chat=True, extra=extra, tools=tools)

    def tool_use(self, body: ChatBody) -> ToolUse | None:
        try:
            return ToolUse.of_request(body.tools, body.tool_choice, body.parallel_tool_calls)
        except ValueError as e:
            raise APIError(400, str(e), param="tool_choice" if "tool_choice" in str(e) else "tools") from None

    def call_grammar(self, tools: ToolUse) -> Grammar:
        return checked(Grammar.json_schema(tools.schema()), self.session, "tools")

    @staticmethod
    def turns(body: ChatBody) -> list[dict[str, Any]]:
        """The request's messages as chat turns, with assistants' tool calls and tool results."""
        turns: list[dict[str, Any]] = []
        for i, message in enumerate(body.messages):
            turn: dict[str, Any] = dict(message.turn())
            try:
                if message.tool_calls:
                    turn["tool_calls"] = call_turns(message.tool_calls, f"messages[{i}]")
            except ValueError as e:
                raise APIError(400, str(e), param=f"messages[{i}].tool_calls") from None
            if message.role == "tool":
                turn["tool_call_id"] = message.tool_call_id
            turns.append(turn)
        return turns

    async def completions(self, request: Request) -> dict[str, Any] | StreamingResponse:
        self.authorize(request)
        body = await parse(request, CompletionBody, self.max_request_bytes)
        self.check_model(body.model)
        check_encoder_decoder(body, self.session)
        score_only = bool(body.echo) and body.max_tokens == 0  # lm-eval's loglikelihood: prompt log-probs only
        max_tokens = 1 if score_only else body.max_tokens
        params = self.sampling(body, max_tokens)
        return await self.respond(request, body, self.completion_prompts(body.prompt), params, max_tokens,
                                  chat=False, score_only=score_only)

    def sampling(self, body: ChatBody | CompletionBody, max_tokens: int | None) -> SamplingParams:
        """The request's sampling parameters (up to the whole context when it sets no `max_tokens`);
        a bad value is a 400 naming the request's parameter."""
        if not 1 <= body.n <= self.batcher.max_batch_size:
            raise APIError(400, f"n must be between 1 and {self.batcher.max_batch_size}, got {body.n}", param="n")
        if max_tokens is not None and max_tokens >= self.session.context:
            raise APIError(400, f"max_tokens={max_tokens} is beyond the model's context of {self.session.context} "
                                "tokens", param="max_tokens", code="context_length_exceeded")
        try:
            return SamplingParams(max_new_tokens=self.session.context if max_tokens is None else max_tokens,
                                  temperature=1.0 if body.temperature is None else body.temperature,
                                  top_k=body.top_k or None, top_p=body.top_p, seed=body.seed,
                                  **processing_fields(body, self.session))
        except ValidationError as e:
            error = e.errors()[0]
            param = REQUEST_PARAMS.get(str(error["loc"][0]), str(error["loc"][0]))
            raise APIError(400, f"{param}: {error['msg']} (got {error['input']!r})", param=param) from None

    async def chat_prompt(self, turns: list[dict[str, Any]], reserve: int,
                          tools: ToolUse | None = None) -> tuple[list[int], dict[str, Any]]:
        """The prompt of a conversation (with the tools it may call), grounded in the store's best
        chunks for its last user message when there is a store; and the response's extra fields
        (`sources`)."""
        try:
            messages, template = conversation(turns, tools, self.session.tokenizer.chat_template_takes_tools)
            if self.store is None or messages[-1]["role"] != "user":
                return self.session.chat_prompt(messages, reserve=reserve, **template), {}
            hits = await asyncio.to_thread(self.store.search, messages[-1]["content"], self.rag_k)
            prompt, hits = grounded_chat_prompt(self.session, messages, hits, reserve)
        except ValueError as e:
            raise APIError(400, f"cannot render the messages with the chat template: {e}", param="messages") from e
        sources = [{"index": i, "doc_id": h.doc_id, "text": h.text, "score": h.score, "metadata": h.metadata}
                   for i, h in enumerate(hits, 1)]
        return prompt, {"sources": sources}

    def completion_prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
        """Token ids of each prompt of a completion request (text or token ids, one or many)."""
        if isinstance(prompt, str):
            prompts = [self.session.encode(prompt)]
        elif prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self.session.encode(p) for p in prompt]
        elif prompt and all(isinstance(p, list) for p in prompt):
            prompts = [list(p) for p in prompt]
        else:
            prompts = [list(prompt)]
        vocab = self.session.model.config.vocab_size
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return prompts

    def check_fit(self, prompts: list[list[int]], max_tokens: int | None, chat: bool) -> None:
        """A 400 for an empty prompt, or one that leaves no room (or not `max_tokens`) in the context."""
        context = self.session.context
        for p in prompts:
            if not p:
                raise APIError(400, "the prompt is empty", param="prompt" if not chat else "messages")
            room = self.session.room(p)
            if room < 1 or (max_tokens is not None and max_tokens > room):
                asked = f" plus max_tokens={max_tokens}" if max_tokens is not None else ""
                raise APIError(400, f"the prompt's {len(p)} tokens{asked} do not fit the model's context of "
                                    f"{context} tokens", param="max_tokens" if max_tokens else "messages",
                               code="context_length_exceeded")

    async def respond(self, request: Request, body: ChatBody | CompletionBody, prompts: list[list[int]],
                      params: SamplingParams, max_tokens: int | None, *, chat: bool, score_only: bool = False,
                      extra: dict[str, Any] | None = None,
                      tools: ToolUse | None = None) -> dict[str, Any] | StreamingResponse:
        """Decode `body.n` choices per prompt in the batcher; stream them or answer when all are done.
        Without `max_tokens`, every row may fill what the longest prompt leaves of the context."""
        self.check_fit(prompts, max_tokens, chat)
        if max_tokens is None:
            params = params.model_copy(update={"max_new_tokens": min(self.session.room(p) for p in prompts)})
        job, events = self.submit(Job([p for p in prompts for _ in range(body.n)], params, lambda e: None,
                                      stop=stop_strings(body), prompt_logprobs=logprob_counts(body)[1],
                                      score_only=score_only))
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.model_name}
        usage = {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": 0, "total_tokens": 0}
        writer = LogprobWriter(self.session.tokenizer, len(job.prompts))
        echo = self.session.tokenizer if isinstance(body, CompletionBody) and body.echo else None
        results = shaped(job, job_events(job, events, usage), writer, chat, echo)
        if body.stream:
            if tools is not None:
                results = with_tool_calls(results, tools)
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(sse(results, meta, len(job.prompts), chat, usage, include_usage, extra or {}),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts, reasons, logprobs = await gather(request, job, results)
        if chat:
            choices = [chat_choice(i, t, r, lp, tools) for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))]
        else:
            choices = [{"text": t, "index": i, "logprobs": lp, "finish_reason": r}
                       for i, (t, r, lp) in enumerate(zip(texts, reasons, logprobs))]
        kind = "chat.completion" if chat else "text_completion"
        return {**meta, "object": kind, "choices": choices, "usage": usage, **(extra or {})}

    def submit(self, job: Job) -> tuple[Job, asyncio.Queue]:
        """Hand the job to the batcher; its events arrive on the returned queue, on this event loop."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                job.cancelled = True

        job.emit = emit
        self.batcher.submit(job)
        return job, events


def chat_choice(index: int, text: str, reason: str, logprobs: dict[str, Any] | None,
                tools: ToolUse | None) -> dict[str, Any]:
    """One choice of a chat completion: the reply, or the tool calls it makes (finish reason "tool_calls")."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tools is not None and reason == "stop":
        content, calls = tools.reply(text)
        if calls:
            message = {"role": "assistant", "content": content, "tool_calls": [c.api() for c in calls]}
            reason = "tool_calls"
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason}


async def job_events(job: Job, events: asyncio.Queue, usage: dict[str, int]) -> AsyncIterator[tuple]:
    """The job's events until every row is done (an error event raises a 500), counting completion
    tokens into `usage`; the job is cancelled when this ends, however it ends."""
    remaining = len(job.prompts)
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


async def shaped(job: Job, results: AsyncIterator[tuple], writer: LogprobWriter, chat: bool,
                 echo: Tokenizer | None) -> AsyncIterator[tuple]:
    """The job's events as replies write them: ("delta", row, text, logprobs field or None) and
    ("done", row, reason, tokens); with `echo` (the tokenizer), each row's prompt text comes first."""
    if echo is not None and job.prompt_logprobs is None:
        for i, prompt in enumerate(job.prompts):
            yield ("delta", i, echo.decode(prompt, skip_special_tokens=True), None)
    async for event in results:
        if event[0] == "prompt":
            i, prompt = event[1], job.prompts[event[1]]
            text = echo.decode(prompt, skip_special_tokens=True) if echo is not None else ""
            yield ("delta", i, text, writer.completion(i, event[2], prompt))
        elif event[0] == "delta" and job.params.logprobs is not None:
            yield (*event[:3], writer.chat(event[3]) if chat else writer.completion(event[1], event[3]))
        elif event[0] == "delta":
            yield (*event[:3], None)
        else:
            yield event


async def gather(request: Request, job: Job, results: AsyncIterator[tuple]
                 ) -> tuple[list[str], list[str], list[dict[str, Any] | None]]:
    """Each row's whole text, finish reason and log-probs, for a non-streamed reply."""
    texts, reasons = [""] * len(job.prompts), ["length"] * len(job.prompts)
    logprobs: list[dict[str, Any] | None] = [None] * len(job.prompts)
    watcher = asyncio.create_task(cancel_on_disconnect(request, job))
    try:
        async for event in results:
            if event[0] == "delta":
                texts[event[1]] += event[2]
                if (new := event[3]) is not None:
                    old = logprobs[event[1]]
                    logprobs[event[1]] = new if old is None else {k: old[k] + v if isinstance(v, list) else v
                                                                  for k, v in new.items()}
            else:
                reasons[event[1]] = event[2]
    finally:
        watcher.cancel()
    return texts, reasons, logprobs


async def cancel_on_disconnect(request: Request, job: Job, every: float = 0.05) -> None:
    """Cancel `job` when the client of a non-streamed request hangs up (a stream notices by itself)."""
    while not await request.is_disconnected():
        await asyncio.sleep(every)
    job.cancelled = True


def serve(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, dtype: str | None = None, quantize: Quantization | None = None,
          max_batch_size: int = 16, store: str | None = None, rag_k: int = 3,
          max_request_bytes: int = MAX_REQUEST_BYTES, embedding_model: str | None = None,
          drafter: Callable[[Session], Drafter | None] | None = None) -> None:
    """Load a checkpoint (and a context store, and an embedding model) and serve it with uvicorn until
    interrupted (`quantize`: weight-only int8/int4 linear layers; `drafter`: the speculative drafter for
    the loaded session, or None). The default encoder is loaded by the first embeddings request, not here."""
    import uvicorn

    session = Session.load(checkpoint, dtype=dtype, quantize=quantize)
    draft = drafter(session) if drafter is not None else None
    hub = hub_id(checkpoint)
    name = model_name or (hub[0] if hub else Path(checkpoint).resolve().name)
    embedder = load_embedder(embedding_model) if embedding_model else None
    app = create_app(session, api_key=api_key, model_name=name, max_batch_size=max_batch_size,
                     store=Store.open(store, embedder) if store else None, rag_k=rag_k,
                     max_request_bytes=max_request_bytes, embedder=embedder, drafter=draft)
    print(f"serving '{name}' on http://{host}:{port}/v1", flush=True)
    if draft is not None:
        print(f"speculative decoding ({type(draft).__name__}, k={draft.k}): figures at /metrics", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info")
