"""Tests for lmforge.data.corpus (token files, packed samples) and the corpus files it reads
(lmforge.io: documents, bad input)."""

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data import corpus
from lmforge.data.corpus import CorpusInfo, PackedSequences, get_batch, token_dtype, tokenize_corpus
from lmforge.io import iter_texts
from lmforge.tokenizer import Tokenizer, train_tokenizer

WORDS = ["the", "cat", "sat", "on", "mat", "river", "über", "café", "東京", "日本語", "🙂", "42", "3.14", "Привет"]


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Distinct documents, some spanning several lines."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))) for _ in range(rng.randint(1, 3))]
        docs.append(f"doc {i}: " + "\n".join(lines))
    return docs


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok")
    (root / "train.txt").write_text("\n\n".join(make_docs(300, seed=99)), encoding="utf-8")
    train_tokenizer([root / "train.txt"], 400, root / "tok", show_progress=False)
    return root / "tok"


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


def expected_tokens(tok: Tokenizer, docs: list[str]) -> list[int]:
    return [t for doc in docs for t in tok.encode(doc) + [tok.eos_id]]


def split_tokens(out: Path, split: str) -> list[int]:
    return np.fromfile(out / f"{split}.bin", dtype=CorpusInfo.load(out).dtype).tolist()


def documents_of(tokens: list[int], eos: int) -> list[list[int]]:
    docs, current = [], []
    for t in tokens:
        if t == eos:
            docs.append(current)
            current = []
        else:
            current.append(t)
    assert not current, "the token file does not end with EOS"
    return docs


def assert_partition(tok: Tokenizer, docs: list[str], out: Path) -> tuple[int, int]:
    """train.bin and val.bin hold every document once, each split in corpus order; returns their sizes."""
    train = documents_of(split_tokens(out, "train"), tok.eos_id)
    val = documents_of(split_tokens(out, "val"), tok.eos_id)
    i = j = 0
    for doc in docs:
        ids = tok.encode(doc)
        if i < len(train) and train[i] == ids:
            i += 1
        elif j < len(val) and val[j] == ids:
            j += 1
        else:
            pytest.fail(f"document {doc!r} is not next in either split")
    assert (i, j) == (len(train), len(val))
    return i, j


def test_txt_documents_split_on_blank_lines(tmp_path, tok_dir, tok):
    docs = make_docs(6)
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    separators = ["\n\n", "\n\n\n\n", "\n   \n", "\n\t\n\n", "\n\n"]
    (root / "a.txt").write_text("\n\n" + "".join(d + s for d, s in zip(docs[:5], separators)), encoding="utf-8")
    (root / "b.txt").write_bytes(b"first line\r\nsecond line\r\n\r\nthird\r\n")  # Windows line ends
    (root / "sub" / "c.txt").write_text(docs[5] + "\nno blank line here\n", encoding="utf-8")
    (root / "notes.md").write_text("not a corpus file", encoding="utf-8")
    expected_docs = docs[:5] + ["first line\nsecond line", "third", docs[5] + "\nno blank line here"]
    assert list(iter_texts(root)) == expected_docs

    info = tokenize_corpus([root], tok_dir, tmp_path / "out", val_fraction=0, workers=2, show_progress=False)
    assert split_tokens(tmp_path / "out", "train") == expected_tokens(tok, expected_docs)
    assert (tmp_path / "out" / "val.bin").stat().st_size == 0
    assert info.num_documents == {"train": 8, "val": 0}
    assert info.num_tokens["train"] == len(expected_tokens(tok, expected_docs))
    assert info.sources == [str(p.resolve()) for p in (root / "a.txt", root / "b.txt", root / "sub" / "c.txt")]
    assert CorpusInfo.load(tmp_path / "out") == info
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "train.bin", "val.bin"]


def write_jsonl(path: Path, docs: list[str]) -> None:
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)]
    lines.insert(2, "")  # blank lines are skipped
    lines.insert(4, json.dumps({"text": "  \n "}))  # an empty document: skipped and counted
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_parquet(path: Path, docs: list[str]) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=7)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_jsonl_and_parquet_documents(tmp_path, tok_dir, tok, fmt):
    docs = make_docs(30)
    path = tmp_path / f"data.{fmt}"
    (write_jsonl if fmt == "jsonl" else write_parquet)(path, docs)
    info = tokenize_corpus(path, tok_dir, tmp_path / "all", val_fraction=0, show_progress=False)
    assert split_tokens(tmp_path / "all", "train") == expected_tokens(tok, docs)
    assert info.skipped_empty_documents == (1 if fmt == "jsonl" else 0)

    info = tokenize_corpus(path, tok_dir, tmp_path / "split", val_fraction=0.3, show_progress=False)
    assert assert_partition(tok, docs, tmp_path / "split") == (info.num_documents["train"], info.num_documents["val"])
    assert info.num_documents["val"] > 0
    assert sum(info.num_tokens.values()) == len(expected_tokens(tok, docs))


def test_output_does_not_depend_on_worker_count(tmp_path, tok_dir, monkeypatch):
    monkeypatch.setattr(corpus, "CHUNK_CHARS", 200)  # many small chunks, finishing out of order
    (tmp_path / "c.txt").write_text("\n\n".join(make_docs(200)), encoding="utf-8")
    for workers in (1, 2, 3):
        tokenize_corpus(tmp_path / "c.txt", tok_dir, tmp_path / f"w{workers}", workers=workers,
                        val_fraction=0.2, show_progress=False)
    for split in ("train.bin", "val.bin", "meta.json"):
        reference = (tmp_path / "w1" / split).read_bytes()
        assert (tmp_path / "w2" / split).read_bytes() == reference
        assert (tmp_path / "w3" / split).read_bytes() == reference


def test_dtype_follows_vocab_size(tmp_path, tok_dir, tok, monkeypatch):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    docs = make_docs(10)
    (tmp_path / "c.txt").write_text("\n\n".join(docs), encoding="utf-8")
    small = tokenize_corpus(tmp_path / "c.txt", tok_dir, tmp_path / "u16", val_fraction=0, show_progress=False)
    monkeypatch.setattr(corpus, "UINT16_VOCAB_LIMIT", 100)  # pretend 400 tokens need 32 bits
    large = tokenize_corpus(tmp_path / "c.txt", tok_dir, tmp_path / "u32", val_fraction=0, show_progress=False)
    assert (small.dtype, large.dtype) == ("uint16", "uint32")
    n = len(expected_tokens(tok, docs))
    assert (tmp_path / "u16" / "train.bin").stat().st_size == 2 * n
    assert (tmp_path / "u32" / "train.bin").stat().st_size == 4 * n
    assert split_tokens(tmp_path / "u32", "train") == expected_tokens(tok, docs)


def test_validation_split_is_seeded_and_never_empty(tmp_path, tok_dir, tok):
    docs = make_docs(60)
    (tmp_path / "c.txt").write_text("\n\n".join(docs), encoding="utf-8")

    def run(name: str, seed: int, val_fraction: float = 0.2, source: Path = tmp_path / "c.txt") -> CorpusInfo:
        return tokenize_corpus(source, tok_dir, tmp_path / name, val_fraction=val_fraction, seed=seed,
                               show_progress=False)

    run("a", 0), run("b", 0), run("c", 1)
    val = {name: (tmp_path / name / "val.bin").read_bytes() for name in "abc"}
    assert val["a"] == val["b"] and val["a"] != val["c"]
    assert 0 < CorpusInfo.load(tmp_path / "a").num_documents["val"] < 60
    assert_partition(tok, docs, tmp_path / "c")

    for n in (2, 3):  # tiny corpora: both splits get a document whatever the fraction
        (tmp_path / f"{n}.txt").write_text("\n\n".join(docs[:n]), encoding="utf-8")
        for seed in range(4):
            for fraction in (0.01, 0.5, 0.99):
                info = run(f"{n}-{seed}-{fraction}", seed, fraction, tmp_path / f"{n}.txt")
                assert info.num_documents["train"] >= 1 and info.num_documents["val"] >= 1
                assert_partition(tok, docs[:n], tmp_path / f"{n}-{seed}-{fraction}")
    (tmp_path / "1.txt").write_text(docs[0], encoding="utf-8")
    assert run("one", 0, 0.99, tmp_path / "1.txt").num_documents == {"train": 1, "val": 0}


def test_packed_sequences_are_shifted_windows(tmp_path):
    tokens = (np.arange(1024) * 7 % 65536).astype(np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    data = PackedSequences(tmp_path / "t.bin", 16, "uint16")
    assert len(data) == 1023 // 16 == 63  # the last token only ever is a target
    assert not data.tokens.flags.writeable
    for i in (0, 5, 62):
        x, y = data[i]
        assert x.tolist() == tokens[i * 16 : i * 16 + 16].tolist()
        assert y.tolist() == tokens[i * 16 + 1 : i * 16 + 17].tolist()
    with pytest.raises(IndexError):
        data.window(63)

    x, y = get_batch(data, [3, 0, 62])
    assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[1], torch.from_numpy(tokens[:16].astype(np.int64)))
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[2], torch.from_numpy(tokens[62 * 16 + 1 : 63 * 16 + 1].astype(np.int64)))
    clone = pickle.loads(pickle.dumps(data))  # DataLoader workers get the path, not a copy of the tokens
    assert len(pickle.dumps(data)) < 1000 and clone[7][1].tolist() == data[7][1].tolist()


def test_packed_sequences_over_a_tokenized_corpus(tmp_path, tok_dir, tok):
    docs = make_docs(40)
    (tmp_path / "c.txt").write_text("\n\n".join(docs), encoding="utf-8")
    tokenize_corpus(tmp_path / "c.txt", tok_dir, tmp_path / "out", val_fraction=0, show_progress=False)
    flat = np.array(expected_tokens(tok, docs))
    data = PackedSequences.from_corpus(tmp_path / "out", "train", 8)
    assert len(data) == (len(flat) - 1) // 8
    x, y = get_batch(data, list(range(len(data))))
    assert x.flatten().tolist() == flat[: len(data) * 8].tolist()
    assert y.flatten().tolist() == flat[1 : len(data) * 8 + 1].tolist()


def test_split_too_short_for_one_sample(tmp_path):
    np.arange(16, dtype=np.uint16).tofile(tmp_path / "t.bin")
    with pytest.raises(ValueError, match=r"16 tokens.*seq_len 16 needs at least 17"):
        PackedSequences(tmp_path / "t.bin", 16, "uint16")
    assert len(PackedSequences(tmp_path / "t.bin", 15, "uint16")) == 1
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="0 tokens"):
        PackedSequences(tmp_path / "empty.bin", 4, "uint16")


def test_empty_corpus(tmp_path, tok_dir):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match=r"empty corpus.*nothing"):
        tokenize_corpus(tmp_path / "nothing", tok_dir, tmp_path / "out", show_progress=False)
    (tmp_path / "blank.txt").write_text("\n\n  \n", encoding="utf-8")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty corpus: no non-empty documents.*blank.jsonl.*blank.txt"):
        tokenize_corpus([tmp_path / "blank.jsonl", tmp_path / "blank.txt"], tok_dir, tmp_path / "out",
                        show_progress=False)
    assert list((tmp_path / "out").iterdir()) == []  # temporary files are removed


@pytest.mark.parametrize("line", ['{"text": broken', '{"txt": "x"}', '{"text": 3}', '["text"]', "null"])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, tok_dir, line):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + '\n{"text": "later"}\n', encoding="utf-8")
    with pytest.raises(ValueError) as info:
        tokenize_corpus(path, tok_dir, tmp_path / "out", show_progress=False)
    message = str(info.value)
    assert "bad.jsonl" in message and "line 3" in message and "'text'" in message


def test_failed_run_leaves_previous_output_intact(tmp_path, tok_dir):
    (tmp_path / "good.txt").write_text("\n\n".join(make_docs(20)), encoding="utf-8")
    tokenize_corpus(tmp_path / "good.txt", tok_dir, tmp_path / "out", show_progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2"):
        tokenize_corpus([tmp_path / "good.txt", tmp_path / "bad.jsonl"], tok_dir, tmp_path / "out",
                        show_progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_invalid_utf8_names_the_file(tmp_path, tok_dir, suffix):
    path = tmp_path / f"latin1{suffix}"
    text = "caf\xe9 au lait" if suffix == ".txt" else '{"text": "caf\xe9"}'
    path.write_bytes(b"ok\n\n" if suffix == ".txt" else b'{"text": "ok"}\n')
    with path.open("ab") as f:
        f.write(text.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"latin1\{suffix}.*UTF-8"):
        tokenize_corpus(path, tok_dir, tmp_path / "out", show_progress=False)


def test_unreadable_parquet_names_the_file(tmp_path, tok_dir):
    pytest.importorskip("pyarrow")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="broken.parquet"):
        tokenize_corpus(tmp_path / "broken.parquet", tok_dir, tmp_path / "out", show_progress=False)


def test_tokenizer_without_eos(tmp_path, tok_dir):
    shutil.copytree(tok_dir, tmp_path / "tok")
    config_path = tmp_path / "tok" / "tokenizer_config.json"
    config = json.loads(config_path.read_text("utf-8"))
    config["eos_token"] = None
    config_path.write_text(json.dumps(config), encoding="utf-8")
    (tmp_path / "c.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(ValueError, match="eos_token"):
        tokenize_corpus(tmp_path / "c.txt", tmp_path / "tok", tmp_path / "out", show_progress=False)
