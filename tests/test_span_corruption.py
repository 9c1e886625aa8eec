"""Span corruption against T5's definition: hand-computed counts and masks, the exact distribution of span
lengths, reconstruction of the original from input and target, and T5's published 512 -> 568/114 lengths."""

import random
from collections import Counter
from math import comb

import pytest
import transformers

from lmforge.data.seq2seq import collate
from lmforge.data.span_corruption import (
    corrupt, noise_counts, random_spans_noise_mask, sentinel_ids, span_corruption_examples,
    span_corruption_lengths,
)
from lmforge.tokenizer import Tokenizer, train_t5_tokenizer

TEXTS = ["Alice Okafor was born in Port Alder and works for Bluepeak Systems as a data analyst.",
         "Bruno Tanaka studied physics at Northgate University; his hobby is chess?"] * 30


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    corpus.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp_path_factory.mktemp("t5-tokenizer")
    train_t5_tokenizer(corpus, 200, out, extra_ids=8)
    return out


@pytest.fixture(scope="module")
def tokenizer(t5_dir) -> Tokenizer:
    return Tokenizer.from_dir(t5_dir)


@pytest.mark.parametrize("length, noise, spans", [
    (100, 15, 5),  # 15.0 noise tokens, 15 / 3 = 5 spans
    (20, 3, 1),  # 3.0, round(1.0)
    (30, 4, 1),  # round(4.5) = 4 (half to even, as numpy and tf.round), round(1.33) = 1
    (70, 10, 3),  # round(10.5) = 10, round(3.33) = 3
    (568, 85, 28),  # T5's chunk: round(85.2), round(28.33)
    (2, 1, 1),  # at least one noise token and one kept
    (5, 1, 1),  # round(0.75) = 1
])
def test_noise_and_span_counts_follow_the_definition(length, noise, spans):
    assert noise_counts(length) == (noise, spans)
    mask = random_spans_noise_mask(length, random.Random(7))
    runs = run_lengths(mask)
    assert len(mask) == length and sum(mask) == noise
    assert [value for value, _ in runs] == [False, True] * spans  # alternating, kept first, noise last
    assert all(n > 0 for _, n in runs)


def run_lengths(mask: list[bool]) -> list[tuple[bool, int]]:
    runs: list[tuple[bool, int]] = []
    for value in mask:
        if runs and runs[-1][0] == value:
            runs[-1] = (value, runs[-1][1] + 1)
        else:
            runs.append((value, 1))
    return runs


def test_span_lengths_are_a_uniform_random_composition():
    """With 15 noise tokens in 5 spans every composition of 15 into 5 positive parts is equally likely, so
    the first span is j long with probability C(15 - j - 1, 3) / C(14, 4); likewise for the 85 kept tokens."""
    rng = random.Random(0)
    draws = 4000
    first_noise, first_kept = Counter(), Counter()
    for _ in range(draws):
        runs = run_lengths(random_spans_noise_mask(100, rng))
        first_kept[runs[0][1]] += 1
        first_noise[runs[1][1]] += 1
    for counts, items in ((first_noise, 15), (first_kept, 85)):
        for j in (1, 2, 3, 5):
            p = comb(items - j - 1, 3) / comb(items - 1, 4)
            tolerance = 4 * (p * (1 - p) / draws) ** 0.5  # four standard errors
            assert abs(counts[j] / draws - p) < tolerance, (items, j)
    assert sum(n * c for n, c in first_noise.items()) / draws == pytest.approx(3.0, abs=0.15)  # mean span 15 / 5


def test_corrupt_by_hand():
    tokens = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    mask = [False, False, True, True, False, False, False, True, False, True]
    source, target = corrupt(tokens, mask, sentinels=[99, 98, 97], eos_id=1)
    assert source == [10, 11, 99, 14, 15, 16, 98, 18, 97, 1]
    assert target == [99, 12, 13, 98, 17, 97, 19, 1]
    with pytest.raises(ValueError, match="more noise spans than the 2 sentinel"):
        corrupt(tokens, mask, sentinels=[99, 98], eos_id=1)


def reconstruct(source: list[int], target: list[int], sentinels: list[int]) -> list[int]:
    """Replace each sentinel of the input by what follows it in the target (the definition's inverse)."""
    pieces: dict[int, list[int]] = {}
    current = None
    for token in target[:-1]:
        if token in sentinels:
            current = pieces.setdefault(token, [])
        else:
            current.append(token)
    return [t for token in source[:-1] for t in (pieces[token] if token in sentinels else [token])]


def test_t5_lengths_for_512_token_inputs():
    assert span_corruption_lengths(512) == (568, 114)  # T5's expanded inputs and targets lengths
    def input_length(tokens: int) -> int:  # kept tokens, a sentinel per span, </s>
        noise, spans = noise_counts(tokens)
        return tokens - noise + spans + 1

    tokens, target = span_corruption_lengths(64)
    assert input_length(tokens) <= 64 < input_length(tokens + 1)  # the longest chunk that fits
    noise, spans = noise_counts(tokens)
    assert target == noise + spans + 1  # a sentinel per span, the noise, </s>


def test_tokenizer_is_t5_style_and_transformers_agrees(t5_dir, tokenizer):
    hf = transformers.AutoTokenizer.from_pretrained(t5_dir)
    assert type(hf).__name__ == "T5Tokenizer"
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.token_to_id("<unk>")) == (0, 1, 2)
    assert (hf.pad_token_id, hf.eos_token_id, hf.unk_token_id) == (0, 1, 2)
    # Sentinels last, <extra_id_0> at the very end: T5's "len(tokenizer) - 1 - i".
    assert sentinel_ids(tokenizer, 8) == [tokenizer.vocab_size - 1 - i for i in range(8)] == \
        [hf.convert_tokens_to_ids(f"<extra_id_{i}>") for i in range(8)]
    assert len(hf) == tokenizer.vocab_size
    for text in [*TEXTS[:2], "Where was  Alice Okafor born? In <extra_id_0> Alder.", "zebra ~ 42"]:
        ids = tokenizer.encode(text, add_special_tokens=True)
        assert ids == hf(text).input_ids and ids[-1] == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert tokenizer.token_to_id("<unk>") not in tokenizer.encode("What? 1987: (a) [b] {c} #5 & 10% @x")
    with pytest.raises(ValueError, match="no sentinel token <extra_id_8>"):
        sentinel_ids(tokenizer, 9)


def chunk_documents(documents: list[list[int]], tokens_length: int, eos_id: int) -> list[list[int]]:
    """The Flax example's `group_texts`: documents joined, each followed by </s>, cut into whole chunks."""
    stream = [t for doc in documents for t in (*doc, eos_id)]
    return [stream[i : i + tokens_length] for i in range(0, len(stream) - tokens_length + 1, tokens_length)]


def test_examples_reconstruct_the_corpus_and_are_seeded(tokenizer):
    documents = tokenizer.encode_batch(TEXTS)
    examples = span_corruption_examples(documents, tokenizer, inputs_length=48, seed=3)
    tokens_length, target_length = span_corruption_lengths(48)
    assert noise_counts(tokens_length)[1] > 1  # with one span the mask is fixed (kept run, then noise)
    chunks = chunk_documents(documents, tokens_length, tokenizer.eos_id)
    stream = [t for doc in documents for t in (*doc, tokenizer.eos_id)]
    assert len(examples) == len(chunks) == len(stream) // tokens_length
    assert [t for chunk in chunks for t in chunk] == stream[: len(chunks) * tokens_length]
    sentinels = sentinel_ids(tokenizer, 8)
    for chunk, example in zip(chunks, examples):
        assert len(example.input_ids) <= 48 and len(example.labels) == target_length
        assert example.input_ids[-1] == example.labels[-1] == tokenizer.eos_id
        assert reconstruct(example.input_ids, example.labels, sentinels) == chunk
    again = span_corruption_examples(documents, tokenizer, inputs_length=48, seed=3)
    other = span_corruption_examples(documents, tokenizer, inputs_length=48, seed=4)
    assert [e.input_ids for e in again] == [e.input_ids for e in examples] != [e.input_ids for e in other]
    batch = collate(examples[:4], pad_id=tokenizer.pad_id, decoder_start_id=tokenizer.pad_id)
    assert batch["labels"].shape == (4, target_length)
