"""Tiny T5 checkpoints saved by transformers itself (v1.1 / FLAN-T5 style: gated GELU, untied head), with a
T5-style Unigram tokenizer (`</s>` appended by its post-processor), and {"input", "target"} pairs to learn."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = ["red", "green", "blue", "cat", "dog", "bird", "runs", "sleeps", "sings", "big", "small", "old"]


def pairs(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Learnable pairs: the target is the input's last word then its first."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, 4)
        out.append({"input": " ".join(words), "target": f"{words[-1]} {words[0]}"})
    return out


def write_pairs(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def save_unigram_tokenizer(path: Path) -> int:
    """A T5-style tokenizer.json (Unigram over Metaspace pieces; `<pad>` 0, `</s>` 1, `<unk>` 2); its vocab size."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    from lmforge.tokenizer import Tokenizer

    backend = Backend(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    texts = [" ".join(WORDS), "summarize: " + " ".join(reversed(WORDS))] * 20
    backend.train_from_iterator(texts, trainers.UnigramTrainer(
        vocab_size=64, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    Tokenizer(backend, {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                        "tokenizer_class": "T5TokenizerFast"}).save(path)
    return backend.get_vocab_size()


def save_tiny_t5(path: Path, *, sharpen: float = 1.0, dropout: float = 0.1, seed: int = 0) -> Path:
    """A FLAN-T5-style `T5ForConditionalGeneration` directory (untied head) with the Unigram tokenizer.
    transformers 5.25 ties the head of a model built from a config, so an untied one is put in its place
    and config.json says so, as FLAN-T5's does."""
    import transformers as tf

    path.mkdir(parents=True, exist_ok=True)
    vocab = save_unigram_tokenizer(path)
    config = tf.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                         num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                         feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=dropout,
                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = tf.T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(vocab, 32) * 0.2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(sharpen)
    model.save_pretrained(path)
    hf = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**hf, "tie_word_embeddings": False}))
    return path
