"""`POST /v1/embeddings`: sentence embeddings from the retrieval encoder, in OpenAI's format.

`input` takes OpenAI's four forms: a string, a list of strings, a list of token ids, or a list of
such lists. Token ids are the encoder's own tokenizer's, special tokens included, used as given (as
vLLM does): `tokenizer(text)["input_ids"]` embeds equal to `text`. An input longer than the encoder
reads is a 400, never silently cut. Vectors are unit length; `encoding_format: "base64"` sends each as
little-endian float32 bytes, as OpenAI does. The encoder has a fixed size, so `dimensions` is
accepted only when it equals it."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from lmforge.rag.embed import DEFAULT_MODEL_NAME, Embedder, load_embedder
from lmforge.serve.protocol import MAX_REQUEST_BYTES, APIError, parse
from lmforge.serve.schema import Embedding, EmbeddingList, EmbeddingUsage

MAX_INPUTS = 2048  # OpenAI's limit on the inputs of one request
Text = Annotated[StrictStr, Field(min_length=1)]
TokenId = Annotated[StrictInt, Field(ge=0)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class EmbeddingBody(BaseModel):
    """OpenAI's embeddings request."""

    model_config = ConfigDict(extra="ignore", strict=True)

    input: (Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)] | TokenIds
            | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_INPUTS)])
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(None, description="accepted only when equal to the encoder's size")
    user: str | None = None


class EncoderSource:
    """The encoder: one given (a store's, or `--embedding-model`'s, loaded at start), or the default
    one, loaded on the first request that needs it."""

    def __init__(self, embedder: Embedder | None = None, path: str | Path | None = None) -> None:
        self._embedder, self._path = embedder, path
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        if self._embedder is not None:
            return self._embedder.name
        return Path(self._path).name if self._path is not None else DEFAULT_MODEL_NAME

    def get(self) -> Embedder:
        with self._lock:
            if self._embedder is None:
                self._embedder = load_embedder(self._path)
            return self._embedder


class Embeddings:
    """The route: authorization by `authorize`, the model by name (the served model's or the encoder's),
    the body checked, the encoding done off the event loop."""

    def __init__(self, source: EncoderSource, *, authorize: Callable[[Request], None], served_model: str,
                 max_request_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.source, self.authorize, self.served_model = source, authorize, served_model
        self.max_request_bytes = max_request_bytes

    async def __call__(self, request: Request) -> EmbeddingList:
        self.authorize(request)
        body: EmbeddingBody = await parse(request, EmbeddingBody, self.max_request_bytes)
        if body.model is not None and body.model not in (self.served_model, self.source.name):
            raise APIError(404, f"the model '{body.model}' does not exist; this server embeds with "
                                f"'{self.source.name}' (or name '{self.served_model}')",
                           param="model", code="model_not_found")
        embedder = await asyncio.to_thread(self.source.get)
        if body.dimensions is not None and body.dimensions != embedder.dim:
            raise APIError(400, f"dimensions={body.dimensions} is not supported: {embedder.name} gives "
                                f"{embedder.dim} dimensions", param="dimensions", code="unsupported_value")
        ids = await asyncio.to_thread(input_ids, embedder, body.input)
        vectors = await asyncio.to_thread(embedder.encode_ids, ids)
        data = [Embedding(object="embedding", embedding=encode(v, body.encoding_format), index=i)
                for i, v in enumerate(vectors)]
        tokens = sum(len(row) for row in ids)
        return EmbeddingList(object="list", data=data, model=embedder.name,
                             usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens))


def input_ids(embedder: Embedder, value: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    """The token ids of each input, checked against the encoder's vocabulary and input limit."""
    if isinstance(value, str):
        rows = embedder.token_ids([value])
    elif isinstance(value[0], str):
        rows = embedder.token_ids(value)  # type: ignore[arg-type]
    elif isinstance(value[0], int):
        rows = [list(value)]  # type: ignore[arg-type]
    else:
        rows = [list(row) for row in value]  # type: ignore[union-attr]
    vocab = embedder.vocab_size
    for i, row in enumerate(rows):
        if len(row) > embedder.max_tokens:
            raise APIError(400, f"input {i} is {len(row)} tokens long; {embedder.name} reads at most "
                                f"{embedder.max_tokens} (special tokens included)", param="input",
                           code="context_length_exceeded")
        if any(t >= vocab for t in row):
            raise APIError(400, f"input {i} has token ids outside [0, {vocab})", param="input")
    return rows


def encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """A vector as floats, or as base64 of its little-endian float32 bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
