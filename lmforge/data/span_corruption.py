"""T5's pretraining objective, span corruption (Raffel et al. 2020, section 3.1.4; `t5.data.preprocessors.
span_corruption`, and transformers' `run_t5_mlm_flax.py`), on token sequences.

The documents' ids, each followed by `</s>`, are concatenated and cut into chunks of `tokens_length`
(the remainder dropped), as the Flax example groups texts. In each chunk round(length x noise_density)
tokens are noise (at least one, at most length - 1), in round(noise / mean_noise_span_length) spans (at
least one, at most the number of non-noise tokens); the noise and the non-noise tokens are each cut into
that many non-empty runs at uniformly random places, and the runs alternate, non-noise first (so a
chunk ends in noise). The input keeps the non-noise runs and puts a sentinel where each noise run was;
the target is the noise runs, each after its sentinel; both end in `</s>`:

    tokens  Thank you for inviting me to your party last week .
    input   Thank you <extra_id_0> me to your party <extra_id_1> </s>
    target  <extra_id_0> for inviting <extra_id_1> last week . </s>

The i-th sentinel is the token `<extra_id_i>`, looked up by name in the tokenizer (T5's vocabulary
stores them last, `<extra_id_0>` at the very end, so this is the "vocabulary size - 1 - i" of T5's code).
`span_corruption_lengths` is T5's `random_spans_helper`: the chunk length whose input is at most a given
length (568 tokens for T5's 512-token inputs, with 114-token targets). Seeded with `random.Random`:
the same seed gives the same examples on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from lmforge.data.seq2seq import Seq2SeqExample
from lmforge.tokenizer import Tokenizer, sentinel_token

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


def noise_counts(length: int, noise_density: float = NOISE_DENSITY,
                 mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
    """(noise tokens, noise spans) of a sequence of `length` tokens, with T5's rounding and bounds."""
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
    if mean_noise_span_length < 1.0:
        raise ValueError(f"mean_noise_span_length must be at least 1, got {mean_noise_span_length}")
    noise = min(max(round(length * noise_density), 1), length - 1)
    spans = min(max(round(noise / mean_noise_span_length), 1), length - noise)
    return noise, spans


def random_segmentation(items: int, segments: int, rng: random.Random) -> list[int]:
    """`items` cut into `segments` non-empty runs at uniformly random places: the runs' lengths."""
    cuts = sorted(rng.sample(range(1, items), segments - 1))
    bounds = [0, *cuts, items]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def random_spans_noise_mask(length: int, rng: random.Random, noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> list[bool]:
    """Which of `length` tokens are noise: alternating non-noise and noise runs, non-noise first."""
    noise, spans = noise_counts(length, noise_density, mean_noise_span_length)
    noise_runs = random_segmentation(noise, spans, rng)
    keep_runs = random_segmentation(length - noise, spans, rng)
    mask: list[bool] = []
    for keep, drop in zip(keep_runs, noise_runs):
        mask += [False] * keep + [True] * drop
    return mask


def corrupt(tokens: Sequence[int], mask: Sequence[bool], sentinels: Sequence[int],
            eos_id: int) -> tuple[list[int], list[int]]:
    """(input, target) of `tokens` under a noise `mask`: the i-th noise run replaced by `sentinels[i]` in the
    input, and written after it in the target; both end in `eos_id`."""
    if len(tokens) != len(mask):
        raise ValueError(f"{len(tokens)} tokens but a mask of {len(mask)}")
    source: list[int] = []
    target: list[int] = []
    spans = 0
    for i, (token, noise) in enumerate(zip(tokens, mask)):
        if noise and (i == 0 or not mask[i - 1]):
            if spans == len(sentinels):
                raise ValueError(f"more noise spans than the {len(sentinels)} sentinel tokens given")
            source.append(sentinels[spans])
            target.append(sentinels[spans])
            spans += 1
        (target if noise else source).append(token)
    return [*source, eos_id], [*target, eos_id]


def span_corruption_lengths(inputs_length: int, noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
    """(tokens per chunk, target length) such that a corrupted chunk's input, `</s>` included, is at most
    `inputs_length` tokens: the longest chunk that fits (T5's `random_spans_helper`)."""

    def lengths(tokens: int) -> tuple[int, int]:
        noise, spans = noise_counts(tokens, noise_density, mean_noise_span_length)
        return tokens - noise + spans + 1, noise + spans + 1

    if inputs_length < 3:
        raise ValueError(f"inputs_length must be at least 3 (a token, a sentinel and </s>), got {inputs_length}")
    tokens = 2
    while lengths(tokens + 1)[0] <= inputs_length:
        tokens += 1
    return tokens, lengths(tokens)[1]


def sentinel_ids(tokenizer: Tokenizer, count: int) -> list[int]:
    """The ids of `<extra_id_0>` ... `<extra_id_{count-1}>` in `tokenizer`."""
    ids = [tokenizer.token_to_id(sentinel_token(i)) for i in range(count)]
    missing = [sentinel_token(i) for i, token_id in enumerate(ids) if token_id is None]
    if missing:
        raise ValueError(f"the tokenizer has no sentinel token {missing[0]} (span corruption needs {count}); "
                         "train it with lmforge.tokenizer.train_t5_tokenizer(extra_ids=...)")
    return [int(i) for i in ids]


class SpanCorruptedChunks:
    """A token stream (documents back to back, each ending in `</s>`, as `lmforge.data.corpus` writes
    them) cut into chunks whose span-corrupted input is at most `inputs_length` tokens. Chunk i is
    corrupted on demand with a generator seeded by (`seed`, i): the same example whichever order, process
    or resumed run asks for it, and a stream larger than memory stays on disk."""

    def __init__(self, tokens: Sequence[int], tokenizer: Tokenizer, *, inputs_length: int, seed: int,
                 noise_density: float = NOISE_DENSITY, mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> None:
        if tokenizer.eos_id is None:
            raise ValueError("span corruption needs a tokenizer with an eos_token (T5's '</s>')")
        self.tokens, self.seed, self.eos_id = tokens, seed, tokenizer.eos_id
        self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
        self.tokens_length, self.target_length = span_corruption_lengths(inputs_length, noise_density,
                                                                         mean_noise_span_length)
        self.sentinels = sentinel_ids(tokenizer, noise_counts(self.tokens_length, noise_density,
                                                              mean_noise_span_length)[1])

    def __len__(self) -> int:
        return len(self.tokens) // self.tokens_length

    def chunk(self, index: int) -> list[int]:
        start = index * self.tokens_length
        return [int(t) for t in self.tokens[start : start + self.tokens_length]]

    def __getitem__(self, index: int) -> Seq2SeqExample:
        if not 0 <= index < len(self):
            raise IndexError(f"chunk {index} of {len(self)}")
        rng = random.Random(f"span-corruption:{self.seed}:{index}")
        mask = random_spans_noise_mask(self.tokens_length, rng, self.noise_density, self.mean_noise_span_length)
        return Seq2SeqExample(*corrupt(self.chunk(index), mask, self.sentinels, self.eos_id))


def span_corruption_examples(documents: Sequence[Sequence[int]], tokenizer: Tokenizer, *, inputs_length: int,
                             seed: int, noise_density: float = NOISE_DENSITY,
                             mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> list[Seq2SeqExample]:
    """Span-corrupted chunks of the token sequences `documents` (without `</s>`), each input exactly
    `inputs_length` tokens at most, as seq2seq examples (`input_ids`, `labels`) ready for `collate`."""
    if tokenizer.eos_id is None:
        raise ValueError("span corruption needs a tokenizer with an eos_token (T5's '</s>')")
    stream = [token for doc in documents for token in (*doc, tokenizer.eos_id)]
    chunks = SpanCorruptedChunks(stream, tokenizer, inputs_length=inputs_length, seed=seed,
                                 noise_density=noise_density, mean_noise_span_length=mean_noise_span_length)
    return [chunks[i] for i in range(len(chunks))]
