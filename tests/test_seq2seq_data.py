"""Seq2seq (T5) fine-tuning data: the record formats mapped to input/target pairs, bad records,
tokens and batches against transformers' `DataCollatorForSeq2Seq` and the loss against
`T5ForConditionalGeneration`'s own, task prefixes and mixtures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from chat_data import write_jsonl

from lmforge.data.chat import IGNORE
from lmforge.data.seq2seq import (
    Pair, Seq2SeqDataConfig, collate, encode_pairs, load_data, mixture_source, read_pairs, shift_right,
    validation_batches,
)
from lmforge.io import RecordError
from lmforge.tokenizer import Tokenizer
from lmforge.train.losses import seq2seq_lm_loss, seq2seq_loss, validation_loss

transformers = pytest.importorskip("transformers")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where was Alice born?"},
        {"role": "assistant", "content": "Port Alder"}, {"role": "user", "content": "And Bruno?"},
        {"role": "assistant", "content": "Eastbrook"}]
WORDS = "the of summarize translate where was born city port alder eastbrook alice bruno river wide".split()


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory) -> Path:
    """A T5-like Unigram tokenizer: <pad>=0, </s>=1, <unk>=2, and T5's `$A </s>` post-processor."""
    texts = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 9)) + "." for i in range(300)]
    texts += ["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,:;?!'-"] * 3  # no <unk> in tests
    backend = Backend(models.Unigram())
    backend.normalizer = normalizers.NFKC()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.train_from_iterator(texts, trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "pad_token": "<pad>",
              "unk_token": "<unk>"}
    out = tmp_path_factory.mktemp("t5tok")
    Tokenizer(backend, config).save(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(t5_dir) -> Tokenizer:
    tok = Tokenizer.from_dir(t5_dir)
    assert (tok.pad_id, tok.eos_id, tok.token_to_id("<unk>")) == (0, 1, 2)
    return tok


@pytest.fixture(scope="module")
def t5(tokenizer):
    config = transformers.T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config).eval()


@pytest.mark.parametrize("record, expected", [
    ({"input": "summarize: a long text", "target": "a text"}, ("summarize: a long text", "a text")),
    ({"messages": CHAT[1:3]}, ("Where was Alice born?", "Port Alder")),
    ({"messages": CHAT}, ("System: Be brief.\nUser: Where was Alice born?\nAssistant: Port Alder\nUser: And Bruno?",
                          "Eastbrook")),
    ({"messages": [*CHAT[1:3], {"role": "user", "content": "thanks"}]}, ("Where was Alice born?", "Port Alder")),
    ({"prompt": "Where was Alice born?", "completion": "Port Alder"}, ("Where was Alice born?", "Port Alder")),
    ({"prompt": CHAT[:2], "completion": CHAT[2:3]}, ("System: Be brief.\nUser: Where was Alice born?", "Port Alder")),
    ({"instruction": "Translate.", "input": "bonjour", "output": "hello"}, ("Translate.\n\nbonjour", "hello")),
    ({"instruction": "Name a city.", "input": "", "output": "Vantor"}, ("Name a city.", "Vantor")),
    ({"instruction": "Name a city.", "output": "Vantor"}, ("Name a city.", "Vantor")),
])
def test_each_format_maps_to_an_input_and_a_target(tmp_path, record, expected):
    [pair] = read_pairs(write_jsonl(tmp_path / "d.jsonl", ["", record]))
    assert (pair.input, pair.target, pair.line) == (*expected, 2)
    [prefixed] = read_pairs(tmp_path / "d.jsonl", prefix="task: ")
    assert (prefixed.input, prefixed.target) == ("task: " + expected[0], expected[1])


@pytest.mark.parametrize("record, where", [
    ({"input": "x"}, "field 'target'"),
    ({"input": 3, "target": "y"}, "field 'input'"),
    ({"input": "x", "target": ["y"]}, "field 'target'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "field 'messages': no assistant turn"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "field 'messages': no turn before"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "field 'messages[0].role'"),
    ({"prompt": CHAT[:2], "completion": [{"role": "user", "content": "hm"}]}, "field 'completion': no assistant"),
    ({"instruction": "x"}, "field 'output'"),
    ({"instruction": "x", "input": 3, "output": "y"}, "field 'input'"),
    ({"text": "plain"}, "field '<record>': expected 'input'/'target'"),
    ("{not json", "field '<record>': not valid JSON"),
])
def test_bad_records_name_file_line_and_field(tmp_path, record, where):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"input": "a", "target": "b"}, "", record])
    with pytest.raises(RecordError) as e:
        read_pairs(path)
    assert str(e.value).startswith(f"{path}:3: {where}")


PAIRS = [Pair("summarize: the river was wide.", "wide river"), Pair("translate: where was alice born?", "port alder"),
         Pair("the city of bruno " * 6, "eastbrook " * 8), Pair("", "the")]


def test_tokens_and_batch_equal_transformers_seq2seq_collator(t5_dir, tokenizer, t5):
    """Features as transformers' summarization example makes them (truncation keeps `</s>` last),
    padded by `DataCollatorForSeq2Seq` with T5's `prepare_decoder_input_ids_from_labels`."""
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(t5_dir)
    examples = encode_pairs(tokenizer, PAIRS, max_source_len=12, max_target_len=6)
    features = hf_tokenizer([p.input for p in PAIRS], max_length=12, truncation=True)
    targets = hf_tokenizer(text_target=[p.target for p in PAIRS], max_length=6, truncation=True)
    assert [e.input_ids for e in examples] == features["input_ids"]
    assert [e.labels for e in examples] == targets["input_ids"]
    assert [e.truncated for e in examples] == [False, False, True, False]
    assert examples[3].input_ids == [1]  # an empty input is </s> alone

    batch = collate(examples, pad_id=0, decoder_start_id=0)
    rows = [{"input_ids": i, "attention_mask": m, "labels": t}
            for i, m, t in zip(features["input_ids"], features["attention_mask"], targets["input_ids"])]
    expected = transformers.DataCollatorForSeq2Seq(hf_tokenizer, model=t5)(rows)
    assert sorted(batch) == sorted(expected) == ["attention_mask", "decoder_input_ids", "input_ids", "labels"]
    for key in batch:
        assert torch.equal(batch[key], expected[key]), key
    assert (batch["labels"] == IGNORE).any() and (batch["attention_mask"] == 0).any()  # both were padded
    assert torch.equal(shift_right(batch["labels"], 0, 0), t5._shift_right(batch["labels"]))


def test_loss_equals_t5_own_loss(tokenizer, t5):
    batch = collate(encode_pairs(tokenizer, PAIRS, 12, 6), pad_id=0, decoder_start_id=0)
    with torch.no_grad():
        expected = t5(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        logits = t5(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    decoder_input_ids=batch["decoder_input_ids"]).logits
    loss, tokens = seq2seq_loss(logits, batch["labels"])
    torch.testing.assert_close(loss, expected)
    assert int(tokens) == int((batch["labels"] != IGNORE).sum()) == sum(len(e.labels) for e in
                                                                       encode_pairs(tokenizer, PAIRS, 12, 6))

    class LmforgeSignature(torch.nn.Module):  # forward(input_ids, decoder_input_ids, *, attention_mask) -> logits
        def __init__(self) -> None:
            super().__init__()
            self.t5 = t5

        def forward(self, input_ids, decoder_input_ids, *, attention_mask=None):
            return self.t5(input_ids=input_ids, attention_mask=attention_mask,
                           decoder_input_ids=decoder_input_ids).logits

    with torch.no_grad():
        total, count = seq2seq_lm_loss(LmforgeSignature(), batch)
    torch.testing.assert_close(total / count, expected)
    halves = [collate(encode_pairs(tokenizer, PAIRS[i : i + 2], 12, 6), 0, 0) for i in (0, 2)]
    scores = validation_loss(halves, torch.device("cpu"), seq2seq_lm_loss)(LmforgeSignature())
    assert scores["val_loss"] == pytest.approx(float(expected), rel=1e-5)  # token-weighted over batches


def test_prefixes_holdout_and_mixture_proportions(tmp_path, tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"input": f"text {i}", "target": "summary"} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"where {i}?", "completion": "port"} for i in range(7)])
    config = Seq2SeqDataConfig.model_validate({
        "datasets": [{"path": str(a), "weight": 3, "prefix": "summarize: "}, {"path": str(b), "prefix": "translate: "}],
        "val_fraction": 0.25, "max_source_len": 16, "max_target_len": 8})
    train, val = load_data(config, tokenizer, seed=0)
    assert [len(t) for t in train] == [15, 7] and len(val) == 5
    def text(ids) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    assert all(text(e.input_ids).startswith("summarize: text ") for e in train[0] + val)
    assert all(text(e.input_ids).startswith("translate: where ") for e in train[1])
    assert {text(e.input_ids) for e in val} < {f"summarize: text {i}" for i in range(20)}

    source = mixture_source(train, config, pad_id=0, decoder_start_id=0, global_batch=8, seed=0)
    rows = [text(row) for _ in range(100) for row in source.next_batch()["input_ids"].tolist()]
    assert abs(sum(row.startswith("summarize: ") for row in rows) / len(rows) - 0.75) < 0.05
    state = json.loads(json.dumps(source.state_dict()))
    expected = [source.next_batch() for _ in range(3)]
    resumed = mixture_source(train, config, pad_id=0, decoder_start_id=0, global_batch=8, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(x["decoder_input_ids"], resumed.next_batch()["decoder_input_ids"]) for x in expected)

    assert [len(v["input_ids"]) for v in validation_batches(val, 2, 2, pad_id=0, decoder_start_id=0)] == [2, 2]
    config.val_path = b
    assert text(load_data(config, tokenizer, seed=0)[1][0].input_ids) == "summarize: where 0?"  # the first prefix


def test_a_tokenizer_without_eos_is_an_error(t5_dir):
    no_eos = Tokenizer.from_dir(t5_dir)
    no_eos.eos_id = None
    with pytest.raises(ValueError, match="eos_token"):
        encode_pairs(no_eos, PAIRS, 8, 8)
