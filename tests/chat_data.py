"""A micro chat model and helpers for the fine-tuning and alignment tests."""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.checkpoint import save_model
from lmforge.presets import preset
from lmforge.data.chat import IGNORE
from lmforge.model import Transformer
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.world.documents import write_pretraining_corpus
from lmforge.world.people import make_world


def make_chat_base(root: Path, context: int = 128) -> Path:
    """A micro llama (random weights) with a BPE tokenizer and ChatML template, as an HF directory."""
    corpus = write_pretraining_corpus(make_world(0, n_people=20, n_companies=4), root / "corpus.jsonl", variants=1)
    tokenizer = train_tokenizer([corpus], 400, root / "tok", show_progress=False)
    model = Transformer(preset("micro", vocab_size=tokenizer.vocab_size, max_position_embeddings=context,
                               bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
                               pad_token_id=tokenizer.pad_id))
    model.init_weights(seed=0)
    save_model(model, root / "model", tokenizer=tokenizer)
    return root / "model"


def write_jsonl(path: Path, records: list) -> Path:
    """Records as JSONL; a string record is written as it is (to make malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def labelled_text(tokenizer: Tokenizer, example) -> list[str]:
    """The runs of labelled tokens of an example, decoded."""
    runs, current = [], []
    for label in [*example.labels, IGNORE]:
        if label == IGNORE:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(label)
    return runs
