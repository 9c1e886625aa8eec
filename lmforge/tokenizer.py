"""Byte-level BPE tokenizers (and T5-style Unigram ones) in Hugging Face's on-disk format, and chat templates.

A tokenizer directory holds `tokenizer.json` (the `tokenizers` library's format) and
`tokenizer_config.json` (transformers' conventions, including a Jinja `chat_template`), so
`transformers.AutoTokenizer.from_pretrained(dir)` loads what `train_tokenizer` writes, and
`Tokenizer.from_dir` loads any such directory written by transformers.

Special tokens of a tokenizer `train_tokenizer` trains, in id order: `<s>`=0 (BOS), `</s>`=1 (EOS),
`<pad>`=2, `<|im_start|>`=3, `<|im_end|>`=4 (ChatML turn markers); the 256 byte symbols follow.
There is no unknown token: every string is made of bytes. The default chat template is ChatML
prefixed by the BOS token, so a rendered chat already starts with `<s>`.
`train_t5_tokenizer` trains T5's kind instead: Unigram, `<pad>`=0, `</s>`=1, `<unk>`=2, sentinels last.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2 import meta, nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from lmforge.hub import resolve_checkpoint
from lmforge.io import chunks, find_files, read_lines, read_texts

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)  # ids 0..4 after training
UNK_TOKEN = "<unk>"
T5_SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)  # ids 0..2 of a T5 tokenizer (`train_t5_tokenizer`)
Message = dict[str, str]  # one chat turn: {"role": ..., "content": ...}
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus its transformers-style config and chat template."""

    def __init__(self, backend: tokenizers.Tokenizer, config: Mapping[str, Any] | None = None,
                 chat_template: str | None = None) -> None:
        self.backend = backend
        self.config: dict[str, Any] = dict(config or {})
        self.chat_template = chat_template or _pick_template(self.config.get("chat_template"))
        self.special_tokens = {k: _token_str(self.config.get(k))
                               for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self.bos_id, self.eos_id, self.pad_id = (  # None where the config names no such token
            None if (token := self.special_tokens[k]) is None else backend.token_to_id(token)
            for k in ("bos_token", "eos_token", "pad_token"))

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face tokenizer directory (`tokenizer.json` + optional config and template), or the
        tokenizer of a Hub id (`lmforge.hub`)."""
        path = resolve_checkpoint(path)
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        config_file, template_file = path / "tokenizer_config.json", path / "chat_template.jinja"
        config = json.loads(config_file.read_text("utf-8")) if config_file.is_file() else {}
        template = template_file.read_text("utf-8") if template_file.is_file() else None  # wins, as in transformers
        return cls(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")), config, template)

    def save(self, out_dir: str | Path) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (chat template inlined as one string)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        config = {**self.config, "chat_template": self.chat_template}
        if self.chat_template is None:
            config.pop("chat_template")
        elif (out_dir / "chat_template.jinja").is_file():  # it would win over the config: keep it current
            (out_dir / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        self.backend.save(str(out_dir / "tokenizer.json.tmp"))
        os.replace(out_dir / "tokenizer.json.tmp", out_dir / "tokenizer.json")
        tmp = out_dir / "tokenizer_config.json.tmp"
        tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, out_dir / "tokenizer_config.json")

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_bos: bool = False, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; BOS only if `add_bos`. The tokenizer's post-processor adds its special
        tokens only if `add_special_tokens`, as transformers' `tokenizer(text)` does (T5: `</s>` after the text)."""
        return self._with_bos(self.backend.encode(text, add_special_tokens=add_special_tokens).ids, add_bos)

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False, *,
                     add_special_tokens: bool = False) -> list[list[int]]:
        encodings = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [self._with_bos(e.ids, add_bos) for e in encodings]

    def _with_bos(self, ids: list[int], add_bos: bool) -> list[int]:
        if not add_bos:
            return ids
        if self.bos_id is None:
            raise ValueError("add_bos=True but this tokenizer has no bos_token")
        return [self.bos_id, *ids]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                            **extra: Any) -> str:
        """Render `messages` with the chat template, as transformers does (`tokenize=False`)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template")
        _validate_messages(messages)
        specials = {k: v for k, v in self.special_tokens.items() if v is not None}
        variables = {"tools": None, "documents": None, **specials, **extra}
        return _compile(self.chat_template).render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **variables)

    @property
    def chat_template_takes_tools(self) -> bool:
        """Whether the chat template renders a `tools` variable (a tools section, as Qwen2.5's and Llama-3.1's)."""
        return self.chat_template is not None and "tools" in _template_variables(self.chat_template)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], **extra: Any) -> list[int]:
        """Token ids of a chat prompt ready for the assistant's reply (the generation prompt appended);
        `extra` are further template variables, such as `tools`."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=True, **extra))

    def render_chat(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of the rendered chat and a loss mask: 1 on assistant turns, 0 elsewhere.

        Assistant message i spans the characters from the end of `render(messages[:i],
        add_generation_prompt=True)` to the end of `render(messages[:i + 1])`, less trailing
        whitespace (the newline after `<|im_end|>` is never generated). So the mask covers the
        content and the end-of-turn marker for any template whose renders are prefixes of each other.
        """
        text = self.apply_chat_template(messages, add_generation_prompt)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.apply_chat_template(messages[:i], add_generation_prompt=True)
            through = self.apply_chat_template(messages[: i + 1])
            if not (through.startswith(before) and text.startswith(through)):
                raise ValueError(
                    f"chat template is not prefix-stable at message {i}: rendering messages[:{i}] with "
                    f"add_generation_prompt=True is not a prefix of rendering messages[:{i + 1}], "
                    "so the assistant turn cannot be located")
            spans.append((len(before), max(len(before), len(through.rstrip()))))
        encoding = self.backend.encode(text, add_special_tokens=False)
        # A token belongs to a turn if it overlaps it (empty, whitespace-trimmed offsets: if it sits in it).
        mask = [int(any(max(s, a) < min(e, b) or a <= s < b for a, b in spans)) for s, e in encoding.offsets]
        return encoding.ids, mask


def train_tokenizer(paths: str | Path | Sequence[str | Path], vocab_size: int, out_dir: str | Path, *,
                    min_frequency: int = 2, show_progress: bool = True, model_max_length: int = 4096,
                    texts: Iterable[str] | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer on text files and save it to `out_dir` in HF format.

    `paths` are `.txt` files (all text), `.jsonl` (the `text` field of each record), `.parquet`
    (the `text` column; needs pyarrow) or directories searched recursively for those; or, with
    `paths` empty, the documents `texts` (e.g. a Hub dataset's, see `lmforge.data.corpus.corpus_documents`).
    """
    texts = training_texts(paths, texts)
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} (256 bytes + {len(SPECIAL_TOKENS)} specials)")
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "unk_token": None,
        "add_bos_token": False, "add_eos_token": False,  # the chat template (or encode(add_bos=True)) adds BOS
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHATML_TEMPLATE,
    }
    tokenizer = Tokenizer(backend, config)
    tokenizer.save(out_dir)
    return tokenizer


def sentinel_token(index: int) -> str:
    """T5's `index`-th sentinel token, `<extra_id_{index}>` (span corruption's mask for the index-th span)."""
    return f"<extra_id_{index}>"


def train_t5_tokenizer(paths: str | Path | Sequence[str | Path], vocab_size: int, out_dir: str | Path, *,
                       extra_ids: int = 100, model_max_length: int = 512,
                       texts: Iterable[str] | None = None) -> Tokenizer:
    """Train a T5-style Unigram tokenizer (SentencePiece's model, as T5's `spiece.model` converted by
    transformers) on text files and save it to `out_dir` in HF format, loadable as transformers' `T5Tokenizer`.

    Ids as T5's: `<pad>`=0, `</s>`=1, `<unk>`=2, the learned pieces, then the `extra_ids` sentinels in
    reverse, so `<extra_id_0>` is the last id. Whitespace splits words and "▁" marks a word's start
    (T5's `WhitespaceSplit` + `Metaspace`); printable ASCII is always in the vocabulary. The
    post-processor appends `</s>` (T5's `$A </s>`) when special tokens are asked for. `vocab_size`
    counts neither the specials nor the sentinels and is an upper bound: a small corpus yields fewer pieces.
    `paths` and `texts` as `train_tokenizer` reads them.
    """
    texts = training_texts(paths, texts)
    if vocab_size < 128:
        raise ValueError(f"vocab_size must be at least 128 (printable ASCII and word pieces), got {vocab_size}")
    if extra_ids < 0:
        raise ValueError(f"extra_ids must be >= 0, got {extra_ids}")
    pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                             pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    trained = tokenizers.Tokenizer(models.Unigram())
    trained.pre_tokenizer = pre_tokenizer
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size + len(T5_SPECIAL_TOKENS), show_progress=False,
                                      special_tokens=list(T5_SPECIAL_TOKENS), unk_token=UNK_TOKEN,
                                      initial_alphabet=[chr(c) for c in range(33, 127)])
    trained.train_from_iterator(texts, trainer=trainer)
    pieces = [tuple(piece) for piece in json.loads(trained.to_str())["model"]["vocab"]]
    sentinels = [sentinel_token(i) for i in range(extra_ids)]
    backend = tokenizers.Tokenizer(models.Unigram([*pieces, *((s, 0.0) for s in reversed(sentinels))],
                                                  unk_id=T5_SPECIAL_TOKENS.index(UNK_TOKEN), byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.add_special_tokens([*T5_SPECIAL_TOKENS, *sentinels])  # already in the vocabulary: matched whole in text
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}",
        special_tokens=[(EOS_TOKEN, T5_SPECIAL_TOKENS.index(EOS_TOKEN))])
    config = {
        "tokenizer_class": "T5Tokenizer",
        "pad_token": PAD_TOKEN, "eos_token": EOS_TOKEN, "unk_token": UNK_TOKEN,
        "extra_ids": extra_ids, "additional_special_tokens": sentinels,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    tokenizer = Tokenizer(backend, config)
    tokenizer.save(out_dir)
    return tokenizer


def training_texts(paths: str | Path | Sequence[str | Path], texts: Iterable[str] | None) -> Iterable[str]:
    """What a tokenizer trains on: the files of `paths` (checked now, read later) or else `texts`."""
    if texts is not None:
        if paths:
            raise ValueError("give a tokenizer's training text as paths or as texts, not both")
        return texts
    files = find_files(paths)
    return (text for f in files for text in _training_texts(f))


def _training_texts(path: Path) -> Iterator[str]:
    """The training texts of one file: `.txt` in runs of whole lines, records of `.jsonl`/`.parquet`."""
    if path.suffix != ".txt":
        yield from read_texts(path)
        return
    for lines in chunks(read_lines(path), 1 << 20):  # ~1 MB of lines at a time
        yield "".join(lines)


def _token_str(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict with `content`."""
    return value.get("content") if isinstance(value, Mapping) else value


def _pick_template(template: Any) -> str | None:
    """`chat_template` is a string or a list of {name, template}; use the one named "default"."""
    if isinstance(template, list):
        return {t["name"]: t["template"] for t in template}.get("default")
    return template


def _validate_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i}: expected a dict with 'role' and 'content', got {type(message).__name__}")
        for field in ("role", "content"):
            if not isinstance(message.get(field), str):
                raise ValueError(f"message {i}: field '{field}' is missing or not a string")


class _GenerationTag(Extension):
    """Accept transformers' `{% generation %}...{% endgeneration %}` markers and render their body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """transformers' `tojson`: no HTML escaping, unlike Jinja's own."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    """The sandbox transformers renders chat templates in, with the same helpers."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _environment().from_string(template)


@lru_cache(maxsize=16)
def _template_variables(template: str) -> frozenset[str]:
    """The variables a template reads from its caller."""
    return frozenset(meta.find_undeclared_variables(_environment().parse(template)))
