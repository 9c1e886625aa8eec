"""Datasets by Hub name (`hf:org/name[:config][@revision]`), read offline from dataset repositories laid out
in a Hub cache, against the same records written by hand; and streamed corpora against token files."""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hub_cache import cache_repo
from lmforge.data.chat import SFTData, read_messages, read_prompts
from lmforge.data.corpus import PackedSequences, corpus_documents, tokenize_corpus
from lmforge.data.hub_datasets import HubDataset, parse_hub_dataset, read_records
from lmforge.data.preference import read_pairs
from lmforge.data.streaming import StreamedSequences
from lmforge.eval.runner import load_task
from lmforge.eval.tasks import ChoiceItem, GenerationItem
from lmforge.tokenizer import Tokenizer, train_tokenizer
from lmforge.world.documents import pretraining_corpus
from lmforge.world.people import make_world

REV1, REV2 = hashlib.sha1(b"one").hexdigest(), hashlib.sha1(b"two").hexdigest()
DOCS = pretraining_corpus(make_world(0, n_people=12, n_companies=3), variants=2)
SHORT = [" ".join(d.split()[:6]) for d in DOCS[:10]]
CHATS = {split: [{"conversations": [{"from": "system", "value": "Be brief."},
                                    {"from": "human", "value": f"Question {split} {i}?"},
                                    {"from": "gpt", "value": f"Answer {i}."}]} for i in range(n)]
         for split, n in (("train", 6), ("test", 3))}
PREFS = [{"question": f"Where was person {i} born?", "good": f"In city {i}.", "bad": "I won't say."} for i in range(5)]
QA = {split: [{"question": f"{i} + 1 =", "label": str(i + 1)} for i in range(first, first + n)]
      for split, first, n in (("train", 0, 4), ("test", 10, 3))}
CONFIGS = """---
configs:
- config_name: bios
  default: true
  data_files:
  - split: train
    path: bios/train-*.parquet
- config_name: short
  data_files:
  - split: train
    path: short/train-*.parquet
---
"""


def parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """A Hub cache with dataset repositories: a corpus (two configurations, a second revision tagged v2),
    ShareGPT chats, preference pairs and a QA task whose field names differ from lmforge's."""
    root, cache = tmp_path_factory.mktemp("hub"), tmp_path_factory.mktemp("hub") / "cache"
    corpus = root / "corpus"
    (corpus / "README.md").parent.mkdir(parents=True)
    (corpus / "README.md").write_text(CONFIGS)
    parquet(corpus / "bios" / "train-00000-of-00001.parquet", [{"content": d, "id": i} for i, d in enumerate(DOCS)])
    parquet(corpus / "short" / "train-00000-of-00001.parquet", [{"content": d} for d in SHORT])
    cache_repo(cache, "org/corpus", corpus, REV1, repo_type="dataset")
    newer = root / "corpus-v2"
    (newer / "README.md").parent.mkdir(parents=True)
    (newer / "README.md").write_text(CONFIGS)
    parquet(newer / "bios" / "train-00000-of-00001.parquet", [{"content": d} for d in DOCS[::-1]])
    parquet(newer / "short" / "train-00000-of-00001.parquet", [{"content": d} for d in SHORT[::-1]])
    cache_repo(cache, "org/corpus", newer, REV2, refs=("v2",), repo_type="dataset")
    for name, splits in (("chats", CHATS), ("prefs", {"train": PREFS}), ("qa", QA)):
        for split, rows in splits.items():
            parquet(root / name / "data" / f"{split}-00000-of-00001.parquet", rows)
        cache_repo(cache, f"org/{name}", root / name, REV1, repo_type="dataset")
    return cache


@pytest.fixture
def offline_hub(hub, tmp_path, monkeypatch) -> Path:
    """The cache as HF_HUB_CACHE with HF_HUB_OFFLINE=1, `datasets`' own cache in tmp_path, no internet."""
    connect = socket.socket.connect

    def refuse(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network access in an offline test: {address}")
        return connect(sock, address)

    import datasets

    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return hub


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text("\n\n".join(DOCS))
    train_tokenizer([root / "corpus.txt"], 300, root / "tok", show_progress=False)
    return root / "tok"


@pytest.fixture(scope="module")
def tokenizer(tok_dir) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


def test_references_name_repository_configuration_and_revision():
    assert parse_hub_dataset("hf:org/name") == HubDataset("org/name")
    assert parse_hub_dataset("hf:org/name:cfg@v1.0") == HubDataset("org/name", "cfg", "v1.0")
    assert str(HubDataset("org/name", "cfg", "main")) == "hf:org/name:cfg@main"
    for bad in ("hf:name", "hf:org/name@", "hf:org/a/b"):
        with pytest.raises(ValueError, match="hf:org/name\\[:config\\]\\[@revision\\]"):
            parse_hub_dataset(bad)


def test_a_corpus_by_name_tokenizes_as_the_same_text_from_a_file(offline_hub, tok_dir, tmp_path):
    assert list(corpus_documents("hf:org/corpus", column="content")) == DOCS
    assert list(corpus_documents("hf:org/corpus:short", column="content")) == SHORT
    assert list(corpus_documents("hf:org/corpus@v2", column="content", streaming=True)) == DOCS[::-1]
    local = tmp_path / "local.jsonl"
    local.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    by_name = tokenize_corpus(["hf:org/corpus"], tok_dir, tmp_path / "hub", column="content",
                              show_progress=False, workers=1)
    by_file = tokenize_corpus([local], tok_dir, tmp_path / "file", show_progress=False, workers=1)
    assert by_name.sources == ["hf:org/corpus"] and by_name.column == "content"
    assert by_name.num_tokens == by_file.num_tokens and by_name.num_tokens["val"] > 0
    for split in ("train", "val"):
        assert (tmp_path / "hub" / f"{split}.bin").read_bytes() == (tmp_path / "file" / f"{split}.bin").read_bytes()
    with pytest.raises(ValueError, match=r"hf:org/corpus\[train\]:1: field 'text': missing \(columns: content, id\)"):
        list(corpus_documents("hf:org/corpus"))


def test_sharegpt_conversations_by_name_read_as_messages(offline_hub, tokenizer):
    expected = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question test {i}?"},
                 {"role": "assistant", "content": f"Answer {i}."}] for i in range(3)]
    assert [m for _, m in read_messages("hf:org/chats", split="test")] == expected
    data = SFTData.load("hf:org/chats", tokenizer, 64, split="train")
    assert data.path == "hf:org/chats[train]" and len(data.examples) == 6
    # the same conversations in a local file, as messages: the same examples
    renamed = [[{"role": m["role"], "content": m["content"]} for m in msgs]
               for _, msgs in read_messages("hf:org/chats", split="train")]
    assert [e.input_ids for e in data.examples] == [tokenizer.render_chat(m)[0][:-1] for m in renamed]


def test_preference_columns_are_mapped_and_bad_rows_named(offline_hub):
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    pairs = read_pairs("hf:org/prefs", columns=columns)
    assert [(p.prompt[0]["content"], p.chosen[0]["content"], p.rejected[0]["content"]) for p in pairs] == [
        (r["question"], r["good"], r["bad"]) for r in PREFS]
    assert pairs[2].path == "hf:org/prefs[train]" and pairs[2].line == 3
    with pytest.raises(ValueError, match=r"hf:org/prefs\[train\]:1: field 'answer': missing \(the column mapping "
                                         r"reads 'chosen' from it\)"):
        read_pairs("hf:org/prefs", columns={**columns, "chosen": "answer"})
    with pytest.raises(ValueError, match=r"hf:org/prefs\[train\]:1: field 'prompt'"):
        read_pairs("hf:org/prefs")


def test_prompts_by_name_are_the_conversations_before_the_reply(offline_hub):
    prompts = read_prompts("hf:org/chats", sft_records=True, split="test")
    assert [p.messages for p in prompts] == [[{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": f"Question test {i}?"}] for i in range(3)]


def test_an_eval_task_by_name_takes_exemplars_from_its_train_split(offline_hub):
    task = load_task("hf:org/qa", split="test", columns={"prompt": "question", "answer": "label"})
    assert task.name == "qa" and all(isinstance(i, GenerationItem) for i in task.items)
    assert [(i.prompt, i.answer) for i in task.items] == [(r["question"], r["label"]) for r in QA["test"]]
    assert [(i.prompt, i.answer) for i in task.exemplars] == [(r["question"], r["label"]) for r in QA["train"]]
    assert task.exemplar_source == "hf:org/qa[train]"
    assert not any(isinstance(i, ChoiceItem) for i in task.items)


def test_what_cannot_be_read_is_one_clear_error(offline_hub):
    with pytest.raises(ValueError, match=r"hf:org/chats.*validation.*(train|test)"):
        list(read_records("hf:org/chats", split="validation"))
    with pytest.raises(FileNotFoundError, match=r"org/absent.*not in the Hub cache.*HF_HUB_OFFLINE"):
        list(read_records("hf:org/absent"))
    with pytest.raises(ValueError, match="not a Hub dataset reference"):
        list(read_records("hf:nothing"))


# ---- streamed corpora ------------------------------------------------------------------------------


def streamed(paths, tokenizer: Tokenizer, seq_len: int, batch: int, **kwargs) -> StreamedSequences:
    return StreamedSequences(lambda: corpus_documents(paths, column="content", streaming=True), tokenizer, seq_len,
                             batch, **kwargs)


def test_stream_batches_are_the_token_file_windows_in_order(offline_hub, tok_dir, tokenizer, tmp_path):
    info = tokenize_corpus(["hf:org/corpus"], tok_dir, tmp_path / "tok", column="content",
                           val_fraction=0.2, seed=3, show_progress=False, workers=1)
    train = PackedSequences.from_corpus(tmp_path / "tok", "train", 16)
    source = streamed(["hf:org/corpus"], tokenizer, 16, 4, seed=3, val_fraction=0.2)
    for k in range(5):
        batch = source.next_batch()
        windows = np.stack([train.window(i) for i in range(4 * k, 4 * k + 4)]).astype(np.int64)
        assert torch.equal(batch["input_ids"], torch.from_numpy(windows[:, :-1]))
        assert torch.equal(batch["labels"], torch.from_numpy(windows[:, 1:]))
    val = np.fromfile(tmp_path / "tok" / "val.bin", dtype=info.dtype).astype(np.int64)
    assert np.array_equal(source.validation_tokens(100), val[:100])


def test_a_stream_resumes_where_it_stopped_across_epochs(offline_hub, tokenizer):
    short_tokens = sum(len(tokenizer.encode(d)) + 1 for d in SHORT)
    assert short_tokens < 8 * 2 * 16 < 2 * short_tokens  # the 8 batches go round the stream once and a part
    straight = streamed(["hf:org/corpus:short"], tokenizer, 16, 2)
    expected = [straight.next_batch() for _ in range(8)]
    assert straight.epoch == 1
    first = streamed(["hf:org/corpus:short"], tokenizer, 16, 2)
    seen = [first.next_batch() for _ in range(3)]
    state = first.state_dict()
    resumed = streamed(["hf:org/corpus:short"], tokenizer, 16, 2)
    resumed.load_state_dict(state)
    seen += [resumed.next_batch() for _ in range(5)]
    for a, b in zip(expected, seen, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    empty = StreamedSequences(lambda: iter(["", "  "]), tokenizer, 8, 2)
    with pytest.raises(ValueError, match="no training documents"):
        empty.next_batch()


def test_lmforge_eval_reads_a_task_by_name_with_its_columns(offline_hub, chat_base, tmp_path, capsys):
    from lmforge.cli import main

    out = tmp_path / "results.json"
    assert main(["eval", "--checkpoint", str(chat_base), "--task", "hf:org/qa", "--columns",
                 "prompt=question,answer=label", "--max-new-tokens", "4", "--out", str(out)]) == 0
    samples = json.loads(out.read_text())["samples"]
    assert [(s["input"], s["answer"]) for s in samples] == [(r["question"], r["label"]) for r in QA["test"]]
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--checkpoint", str(chat_base), "--task", "hf:org/qa", "--columns", "prompt"])
    assert exit_.value.code == 2 and "FIELD=COLUMN" in capsys.readouterr().err
