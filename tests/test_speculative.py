"""Speculative decoding: prompt-lookup drafts by hand; greedy output equal to the engine's plain greedy
decoding (prompt lookup, a draft model, the model as its own draft); the acceptance rule keeps the model's
distribution (measured over many draws against p)."""

from __future__ import annotations

import pytest
import torch

from lmforge.generate.engine import Engine
from lmforge.generate.sampling import SamplingParams
from lmforge.generate.speculative import (
    DraftModel, PromptLookup, SpeculativeDecoding, SpeculativeEngine, SpeculativeStats, distribution,
    speculative_stream, verify,
)
from lmforge.model import Transformer
from lmforge.presets import preset


def tiny(seed: int, layers: int = 2) -> Transformer:
    model = Transformer(preset("micro", vocab_size=48, num_hidden_layers=layers, max_position_embeddings=96))
    model.init_weights(seed)
    return model.eval()


def test_prompt_lookup_drafts_what_followed_the_last_ngram():
    lookup = PromptLookup(k=3, max_ngram=2)
    params = SamplingParams(temperature=0)
    # The last bigram (7, 8) occurred at 1..2, followed by 9, 4, 7.
    assert lookup.propose([5, 7, 8, 9, 4, 7, 8], 3, params) == ([9, 4, 7], None)
    assert lookup.propose([5, 7, 8, 9, 4, 7, 8], 1, params) == ([9], None)
    # No bigram match: the last unigram's latest earlier occurrence (6 at index 2, followed by 1).
    assert lookup.propose([6, 0, 6, 1, 2, 6], 2, params) == ([1, 2], None)
    assert lookup.propose([1, 2, 3], 3, params) == ([], None)
    with pytest.raises(ValueError):
        PromptLookup(k=0)


def test_prompt_lookup_equals_a_search_of_each_ngram_length():
    """Against the definition, n-gram length by length from the longest, latest occurrence first, on random
    sequences over small vocabularies (many repeats, overlapping occurrences)."""
    def reference(tokens, k, max_ngram):
        for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
            for start in range(len(tokens) - n - 1, -1, -1):
                if tokens[start : start + n] == tokens[-n:]:
                    return tokens[start + n : start + n + k]
        return []

    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0)
    for _ in range(2000):
        length, vocab, max_ngram, k = (int(torch.randint(1, hi, (), generator=g)) for hi in (30, 6, 5, 6))
        tokens = torch.randint(vocab, (length,), generator=g).tolist()
        assert PromptLookup(k, max_ngram).propose(tokens, k, params) == (reference(tokens, k, max_ngram), None)


PROMPTS = [[3, 9, 4, 11, 9, 4, 11, 9], [5], [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4]]


@pytest.mark.parametrize("drafter", ["lookup", "draft", "self"])
def test_greedy_speculative_decoding_equals_plain_greedy(drafter):
    model = tiny(0)
    params = SamplingParams(max_new_tokens=40, temperature=0, stop_token_ids=(47,))
    plain = Engine(model).generate(PROMPTS, params)
    stats = SpeculativeStats()
    for prompt, expected in zip(PROMPTS, plain):
        chosen = {"lookup": PromptLookup(k=4), "draft": DraftModel(tiny(1, layers=1), k=3),
                  "self": DraftModel(tiny(0), k=4)}[drafter]
        assert list(speculative_stream(model, prompt, params, chosen, stats)) == expected
    assert stats.generated == sum(map(len, plain)) and stats.verifications < stats.generated
    if drafter == "self":  # the model drafting for itself: every draft is kept
        assert stats.acceptance_rate == 1.0


def test_the_first_step_returns_the_prefill_prediction_without_a_verification():
    """The prefill predicts the first token (as plain decoding's does): the first step checks no draft."""
    model = tiny(0)
    prompt = PROMPTS[0]
    params = SamplingParams(max_new_tokens=10, temperature=0)
    with torch.inference_mode():
        expected_first = int(model(torch.tensor([prompt]))[0, -1].argmax())
    stats = SpeculativeStats()
    decoding = SpeculativeDecoding(model, prompt, params, PromptLookup(k=4), stats)
    assert decoding.step() == [expected_first]
    assert (stats.verifications, stats.drafted, stats.generated) == (0, 0, 1)
    assert len(decoding.step()) >= 1 and stats.verifications == 1
    one = SamplingParams(max_new_tokens=1, temperature=0)
    stats = SpeculativeStats()
    assert list(speculative_stream(model, prompt, one, PromptLookup(k=4), stats)) == [expected_first]
    assert stats.verifications == 0


class NoDrafts(PromptLookup):
    """Prompt lookup that never finds a match."""

    def propose(self, tokens, k, params):
        return [], None


def test_without_drafts_every_verification_is_a_plain_decoding_step():
    model = tiny(0)
    params = SamplingParams(max_new_tokens=30, temperature=0)
    plain = Engine(model).generate(PROMPTS, params)
    for prompt, expected in zip(PROMPTS, plain):
        stats = SpeculativeStats()
        assert list(speculative_stream(model, prompt, params, NoDrafts(), stats)) == expected
        assert (stats.verifications, stats.drafted) == (len(expected) - 1, 0)  # the prefill predicted the first


def test_the_engine_interface_and_refusals():
    model = tiny(0)
    engine = SpeculativeEngine(model, PromptLookup(k=4))
    params = SamplingParams(max_new_tokens=12, temperature=0)
    assert [s[0] for s in engine.stream([PROMPTS[0]], params)] == Engine(model).generate([PROMPTS[0]], params)[0]
    with pytest.raises(ValueError, match="one prompt at a time"):
        list(engine.stream(PROMPTS[:2], params))
    with pytest.raises(ValueError, match="not grammars, penalties"):
        list(speculative_stream(model, PROMPTS[0], SamplingParams(repetition_penalty=1.3), PromptLookup()))


@pytest.mark.parametrize("with_draft_distribution", [False, True])
def test_the_acceptance_rule_keeps_the_model_distribution(with_draft_distribution):
    """The first token out of `verify` (a drafted token kept, or the one drawn instead) follows p, whatever
    the drafter proposes: over 40,000 draws every token's frequency is within 4.5 standard errors of p."""
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.8, top_k=5)
    logits = torch.randn(2, 8, generator=g) * 2
    p = distribution(logits[0], params)
    q = distribution(torch.randn(8, generator=g) * 2, SamplingParams(temperature=1.0))
    draws, counts = 40_000, torch.zeros(8)
    for _ in range(draws):
        if with_draft_distribution:
            drafted = int(torch.multinomial(q, 1, generator=g))
            kept, token = verify(logits, [drafted], q[None], params, g)
        else:
            drafted = 2  # prompt lookup: a fixed, certain draft
            kept, token = verify(logits, [drafted], None, params, g)
        counts[drafted if kept else token] += 1
    freq = counts / draws
    stderr = (p * (1 - p) / draws).sqrt().clamp(min=1e-4)
    assert ((freq - p).abs() <= 4.5 * stderr).all(), (freq, p)


def test_generate_command_with_prompt_lookup_or_a_draft_prints_the_plain_greedy_text(chat_base, capsys):
    from lmforge.cli import main

    prompt = "Alice Okafor was born in Port Alder. Alice Okafor was born in"
    common = ["generate", "--checkpoint", str(chat_base), "--prompt", prompt, "--temperature", "0",
              "--max-new-tokens", "24"]
    assert main(common) == 0
    plain = capsys.readouterr().out
    for extra in (["--prompt-lookup", "4"], ["--draft", str(chat_base), "--draft-tokens", "3"]):
        assert main([*common, *extra]) == 0
        out = capsys.readouterr()
        assert out.out == plain and "speculative decoding:" in out.err
    assert main([*common, "--prompt-lookup", "4", "--draft", str(chat_base)]) == 2
    assert "choose one" in capsys.readouterr().err
