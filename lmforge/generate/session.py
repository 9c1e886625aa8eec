"""A loaded checkpoint ready to talk: model, tokenizer, engine; prompts, streaming and terminal chat.

`Session.load` is where decoder-only and encoder-decoder checkpoints part: a T5 directory loads as a
`Seq2SeqSession`, which keeps `Session`'s methods with the prompt as the encoder's input."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TextIO

import torch

from lmforge.checkpoint import load_model
from lmforge.generate.continuous import DecodeBatch, Seq2SeqBatch
from lmforge.generate.engine import Engine
from lmforge.generate.grammar import GrammarCompiler
from lmforge.generate.quantize import DECODER_ONLY, Quantization
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.seq2seq import Seq2SeqEngine
from lmforge.generate.text import complete, stop_token_ids, stream_completions
from lmforge.hub import resolve_checkpoint
from lmforge.io import read_json
from lmforge.model import Transformer, fuse_projections
from lmforge.seq2seq import Seq2SeqLM
from lmforge.seq2seq_checkpoint import is_seq2seq, load_seq2seq
from lmforge.tokenizer import Message, Tokenizer


@dataclass
class Session:
    """A model, its tokenizer and an engine over the model; `Session.load` reads them from a directory."""

    model: Transformer
    tokenizer: Tokenizer
    engine: Engine
    encoder_decoder: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.engine.grammars is None:  # structured output compiles against this tokenizer
            self.engine.grammars = GrammarCompiler(self.tokenizer, self.model.config.vocab_size, self.stop_token_ids)

    @property
    def grammars(self) -> GrammarCompiler:
        """The compiler of this session's grammars (`grammars.compile(spec)` checks a spec early)."""
        assert self.engine.grammars is not None
        return self.engine.grammars

    @classmethod
    def load(
        cls, path: str | Path, *, dtype: str | torch.dtype | None = None, device: str = "cpu", compile: bool = False,
        quantize: Quantization | None = None,
    ) -> Session:
        """Load an HF-format model directory and the tokenizer beside its weights, or a PEFT adapter
        directory: its base model with the adapter (LoRA merged in), and the adapter's tokenizer
        if it has one, else the base's. `path` may be a Hub id (`org/name[@revision]`, `lmforge.hub`).
        `quantize` turns a decoder-only model's linear layers into int8/int4 ones, quantized from float32 weights,
        computing in `dtype` (default bfloat16; see `lmforge.generate.quantize`)."""
        from lmforge.peft.adapters import adapter_base, is_adapter_dir, load_with_adapter

        path = resolve_checkpoint(path)
        weights_dtype = dtype if quantize is None else torch.float32
        if is_adapter_dir(path):
            model = load_with_adapter(path, dtype=weights_dtype, device=device, merge=True)
            tokenizer_dir = path if (path / "tokenizer.json").is_file() else adapter_base(path)
        elif (path / "config.json").is_file() and is_seq2seq(path):
            if quantize is not None:
                raise ValueError(f"{path}: {DECODER_ONLY}")
            return Seq2SeqSession.from_dir(path, dtype=dtype, device=device, compile=compile)
        else:
            model, tokenizer_dir = load_model(path, dtype=weights_dtype, device=device), path
        if isinstance(model, Transformer):
            fuse_projections(model)  # this model only serves: one q/k/v and one gate/up product per layer
        if quantize is not None:
            quantize.apply(model, dtype)
        if isinstance(model, Seq2SeqLM):
            return Seq2SeqSession.of(model, Tokenizer.from_dir(tokenizer_dir), adapter_base(path), compile=compile)
        return cls(model, Tokenizer.from_dir(tokenizer_dir), Engine(model, compile=compile))

    @property
    def context(self) -> int:
        return self.model.config.max_position_embeddings

    def room(self, prompt: Sequence[int]) -> int:
        """The most new tokens a reply to `prompt` may have: what the prompt leaves of the context."""
        return self.context - len(prompt)

    def new_batch(self) -> DecodeBatch:
        """An empty running batch over this session's engine (the server's batcher decodes in it)."""
        return DecodeBatch(self.engine)

    @property
    def stop_token_ids(self) -> list[int]:
        """The token ids that end a reply: the model's end-of-sequence and end-of-turn tokens."""
        return stop_token_ids(self.model.config, self.tokenizer)

    def sampling(self, params: SamplingParams) -> SamplingParams:
        """`params` that also stop at the model's end tokens."""
        stops = dict.fromkeys([*params.stop_token_ids, *self.stop_token_ids])
        return params.model_copy(update={"stop_token_ids": tuple(stops)})

    def greedy(self, max_new_tokens: int) -> SamplingParams:
        """Greedy decoding that stops at the model's end tokens."""
        return self.sampling(SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))

    def encode(self, text: str) -> list[int]:
        """Token ids of a raw prompt, with BOS where the tokenizer's config asks for one."""
        return self.tokenizer.encode(text, add_bos=bool(self.tokenizer.config.get("add_bos_token", False)))

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], reserve: int = 0, **template: Any) -> list[int]:
        """Token ids of a conversation ready for the assistant's reply (`template`: further template
        variables, such as `tools`). Oldest turns (after any system message) are dropped until the
        prompt plus `reserve` new tokens fit the context."""
        messages = list(messages)
        while True:
            ids = self.tokenizer.encode_chat(messages, **template)
            first = 1 if messages and messages[0]["role"] == "system" else 0
            if len(ids) + reserve <= self.context or len(messages) - first <= 1:
                return ids
            del messages[first]

    def replies(self, conversations: Sequence[Sequence[Message]], params: SamplingParams, *,
                stop: Sequence[str] = (), batch_size: int = 32) -> list[str]:
        """The assistant's next reply to each conversation (ending at a stop token or `stop` text), generated
        in batches."""
        prompts = [self.chat_prompt(c, reserve=params.max_new_tokens) for c in conversations]
        return [c.text.strip() for start in range(0, len(prompts), batch_size)
                for c in complete(self.engine, self.tokenizer, prompts[start : start + batch_size], params, stop)]

    def stream(self, prompt: list[int], params: SamplingParams, stop: Sequence[str] = ()) -> Iterator[str]:
        """Text deltas of one completion as they are generated."""
        for _, delta in stream_completions(self.engine, self.tokenizer, [prompt], params, stop):
            yield delta

    def chat_loop(
        self, params: SamplingParams, *, system: str | None = None, stop: Sequence[str] = (),
        read: TextIO | None = None, write: TextIO | None = None,
    ) -> None:
        """A terminal conversation: read a line, stream the reply, keep the history in the context.
        `read` and `write` default to the standard streams current at the call."""
        read = sys.stdin if read is None else read
        write = sys.stdout if write is None else write
        history: list[Message] = [{"role": "system", "content": system}] if system else []
        interactive = read.isatty()
        while True:
            if interactive:
                write.write("\nyou> ")
                write.flush()
            line = read.readline()
            if not line or line.strip() == "/exit":
                return
            if line.strip() == "/reset":
                history = history[:1] if system else []
                continue
            if not line.strip():
                continue
            history.append({"role": "user", "content": line.rstrip("\n")})
            prompt = self.chat_prompt(history, reserve=min(params.max_new_tokens, self.context // 2))
            write.write("assistant> " if interactive else "")
            reply = []
            for delta in self.stream(prompt, params, stop):
                reply.append(delta)
                write.write(delta)
                write.flush()
            write.write("\n")
            history.append({"role": "assistant", "content": "".join(reply).strip()})


SEQ2SEQ_POSITIONS = 512  # T5's n_positions: the input and output lengths it was trained on


@dataclass
class Seq2SeqSession(Session):
    """An encoder-decoder model (T5, FLAN-T5) with `Session`'s methods. A prompt is the encoder's input, the
    text with the tokenizer's special tokens (T5's `</s>`), as transformers' `tokenizer(text)` encodes it;
    there is no chat template: a conversation's input is its last user message alone (T5 and FLAN-T5 are
    trained on one input per example, so earlier turns would change the task it states). `context` bounds
    the reply (config.json's `n_positions`, else 512); the input itself has no fixed limit (relative positions)."""

    model: Seq2SeqLM  # type: ignore[assignment]
    engine: Seq2SeqEngine  # type: ignore[assignment]
    positions: int = SEQ2SEQ_POSITIONS
    encoder_decoder: ClassVar[bool] = True

    @classmethod
    def from_dir(cls, path: Path, *, dtype: str | torch.dtype | None = None, device: str = "cpu",
                 compile: bool = False) -> Seq2SeqSession:
        """Load a `T5ForConditionalGeneration` directory and the tokenizer beside it."""
        model = load_seq2seq(path, encoder_only=False, dtype=dtype, device=device)
        return cls.of(model, Tokenizer.from_dir(path), path, compile=compile)

    @classmethod
    def of(cls, model: Seq2SeqLM, tokenizer: Tokenizer, config_dir: Path, *, compile: bool = False) -> Seq2SeqSession:
        """A session over a loaded model (e.g. a base with its adapter merged); `config_dir` holds its config.json."""
        if compile:
            raise ValueError(f"{config_dir}: compile applies to decoder-only models; the encoder-decoder engine runs "
                             "eagerly")
        positions = read_json(config_dir / "config.json").get("n_positions") or SEQ2SEQ_POSITIONS
        return cls(model, tokenizer, Seq2SeqEngine(model), int(positions))

    @property
    def context(self) -> int:
        return self.positions

    def room(self, prompt: Sequence[int]) -> int:
        """The most new tokens a reply may have: the decoder's own length, whatever the input's."""
        return self.context

    def new_batch(self) -> Seq2SeqBatch:
        return Seq2SeqBatch(self.engine)

    def encode(self, text: str) -> list[int]:
        """The encoder's input: the text's token ids with the tokenizer's special tokens (T5: `</s>` last)."""
        return self.tokenizer.encode(text, add_special_tokens=True)

    def chat_prompt(self, messages: Sequence[Mapping[str, Any]], reserve: int = 0, **template: Any) -> list[int]:
        """The encoder's input for a conversation: its last message, which must be the user's; no tools."""
        if template.get("tools"):
            raise ValueError("tools: an encoder-decoder model has no chat template to offer tools with")
        if not messages or messages[-1]["role"] != "user":
            last = messages[-1]["role"] if messages else "nothing"
            raise ValueError(f"an encoder-decoder model answers the last user message; the last message is {last!r}")
        return self.encode(messages[-1]["content"])

    def chat_loop(self, params: SamplingParams, *, system: str | None = None, stop: Sequence[str] = (),
                  read: TextIO | None = None, write: TextIO | None = None) -> None:
        """`Session.chat_loop` with each line the whole input (no history); a system prompt is refused."""
        if system:
            raise ValueError("system prompt: an encoder-decoder model has no chat template; put an instruction "
                             "such as 'summarize: ' in each line instead")
        super().chat_loop(params, stop=stop, read=read, write=write)
