"""Encoder-decoder models through the commands: `lmforge generate`, `chat`, `serve` (the official `openai`
client) and `eval` on a tiny sharpened T5 with a Unigram tokenizer, against transformers' `generate`, its
teacher-forced log-probs, and `rouge_score` over its generations."""

from __future__ import annotations

import io
import json
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import SHARPEN

from lmforge.cli import main
from lmforge.generate.session import Seq2SeqSession, Session

TEXTS = ["summarize: the quick brown fox jumps over the lazy dog", "translate: a dog sleeps in the sun",
         'answer in json: {"answer": "yes", "score": 3}', "question: where does the cat sleep today"]
# Inputs of different lengths; transformers' greedy reply to the first ends at `</s>` after 13 tokens.
PROMPTS = ["brown dog in translate", "does the a in dog", "sleeps json summarize answer cat dog jumps",
           "question does"]
MAX_NEW = 16


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A T5 directory as transformers saves it: a v1.0 model (relu, tied head) over a Unigram tokenizer's
    vocabulary with `</s>` appended by the post-processor, its matrices sharpened as conftest's."""
    import transformers as tf
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    from lmforge.tokenizer import Tokenizer

    path = tmp_path_factory.mktemp("t5-cli")
    backend = Backend(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(TEXTS * 20, trainers.UnigramTrainer(
        vocab_size=90, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    Tokenizer(backend, {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                        "tokenizer_class": "T5TokenizerFast", "extra_ids": 0,
                        "clean_up_tokenization_spaces": False}).save(path)
    torch.manual_seed(0)
    hf = tf.T5ForConditionalGeneration(tf.T5Config(
        vocab_size=backend.get_vocab_size(), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="relu",
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.mul_(SHARPEN)
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def oracle(t5_dir):
    """transformers' model and tokenizer over the directory."""
    import transformers as tf

    return tf.T5ForConditionalGeneration.from_pretrained(t5_dir).eval(), tf.AutoTokenizer.from_pretrained(t5_dir)


def hf_generate(oracle, text: str, max_new: int = MAX_NEW) -> list[int]:
    """transformers' greedy reply to one input: its tokens after the decoder-start token, with the final `</s>`."""
    model, tokenizer = oracle
    ids = torch.tensor([tokenizer(text).input_ids])
    out = model.generate(input_ids=ids, max_new_tokens=max_new, num_beams=1, do_sample=False)[0, 1:].tolist()
    return out[: out.index(1) + 1] if 1 in out else out


def hf_text(oracle, text: str, max_new: int = MAX_NEW) -> str:
    return oracle[1].decode(hf_generate(oracle, text, max_new), skip_special_tokens=True)


def test_session_load_dispatches_to_seq2seq(t5_dir, oracle):
    session = Session.load(t5_dir)
    assert isinstance(session, Seq2SeqSession) and session.encoder_decoder
    assert session.encode(PROMPTS[0]) == oracle[1](PROMPTS[0]).input_ids  # `</s>` appended
    replies = [hf_text(oracle, p) for p in PROMPTS]
    assert hf_generate(oracle, PROMPTS[0])[-1] == 1 and len(hf_generate(oracle, PROMPTS[0])) < MAX_NEW
    assert session.replies([[{"role": "user", "content": p}] for p in PROMPTS], session.greedy(MAX_NEW)) == \
        [r.strip() for r in replies]
    with pytest.raises(ValueError, match="compile applies to decoder-only"):
        Session.load(t5_dir, compile=True)
