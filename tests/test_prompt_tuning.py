"""Prompt tuning: the soft prompt against embeddings prepended by hand, padding, training only the
prompt, text initialisation as PEFT does it, and cached generation against a full-forward loop."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.generate.continuous import DecodeBatch
from lmforge.generate.engine import Engine
from lmforge.generate.sampling import SamplingParams
from lmforge.kv_cache import KVCache
from lmforge.model import Transformer
from lmforge.peft import AdapterConfig, PromptTuned, apply_method, disable_adapters, prompt_tuning
from lmforge.peft.prompt_tuning import init_prompt

CONFIG = ModelConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
N = 5


def base_model() -> Transformer:
    model = Transformer(CONFIG)
    model.init_weights(seed=0)
    return model.eval()


def tuned(base: Transformer | None = None) -> PromptTuned:
    return prompt_tuning(base or base_model(), N, "vocab", generator=torch.Generator().manual_seed(0))


def ids(batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, 97, (batch, seq), generator=torch.Generator().manual_seed(1))


def test_forward_is_the_base_on_prepended_embeddings():
    base = base_model()
    model = tuned(copy.deepcopy(base))
    x = ids()
    with torch.no_grad():
        embeds = torch.cat((model.prompt_embeddings.expand(2, N, 32), base.model.embed_tokens(x)), dim=1)
        want = base.lm_head(base.model(x, inputs_embeds=embeds))[:, N:]
        got = model(x)
        assert got.shape == (2, 12, 97)
        assert torch.equal(got, want)
        assert (model(x, last_only=True) - got[:, -1:]).abs().max() < 1e-6
        with disable_adapters(model):
            assert torch.equal(model(x), base(x))
        assert (got - base(x)).abs().max() > 0.1


def test_left_padded_rows_equal_unpadded_ones():
    model = tuned()
    rows = [ids(1, 12)[0], ids(1, 7)[0, :7]]
    batch = torch.zeros(2, 12, dtype=torch.long)
    batch[0], batch[1, 5:] = rows[0], rows[1]
    with torch.no_grad():
        padded = model(batch, pad=torch.tensor([0, 5]))
        for row, (tokens, start) in enumerate(zip(rows, (0, 5))):
            alone = model(tokens[None])[0]
            assert (padded[row, start:] - alone).abs().max() < 1e-5


def test_only_the_soft_prompt_trains_and_the_loss_falls():
    base = base_model()
    model = apply_method(copy.deepcopy(base), AdapterConfig(method="prompt", num_virtual_tokens=8, prompt_init="vocab"))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt.weight"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    seq = ids(1, 17)
    model.train()
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(seq[:, :-1])[0], seq[0, 1:])  # labels need no shifting for the prompt
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    weights = dict(model.named_parameters())
    assert set(weights) == {*dict(base.named_parameters()), "prompt.weight"}
    for name, p in base.named_parameters():
        assert torch.equal(weights[name], p), name
    assert list(map(id, optimizer.state)) == [id(model.prompt_embeddings)]


def test_text_init_repeats_or_cuts_the_text_like_peft():
    model = base_model()
    table = model.model.embed_tokens.weight
    assert torch.equal(init_prompt(model, 5, "text", init_ids=[7, 8]), table[[7, 8, 7, 8, 7]])
    assert torch.equal(init_prompt(model, 2, "text", init_ids=[7, 8, 9]), table[[7, 8]])
    assert init_prompt(model, 5, "random", generator=torch.Generator().manual_seed(0)).std() > 0.5  # N(0, 1)
    with pytest.raises(ValueError, match="text"):
        init_prompt(model, 5, "text", init_ids=[])


def test_text_init_from_config_matches_peft(tmp_path):
    """PEFT's own TEXT init (AutoTokenizer on the same tokenizer directory) gives the same soft prompt."""
    import peft
    from hf_models import tiny_hf_model

    from lmforge.checkpoint import load_model
    from lmforge.tokenizer import Tokenizer, train_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat. the dog sat on the log.\n" * 50)
    train_tokenizer([corpus], 300, tmp_path / "model", show_progress=False)
    hf = tiny_hf_model("llama", vocab_size=300)
    hf.save_pretrained(tmp_path / "model")
    text = "Answer about the cat"
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=9, prompt_tuning_init="TEXT",
                                  prompt_tuning_init_text=text, tokenizer_name_or_path=str(tmp_path / "model"))
    theirs = peft.get_peft_model(hf, cfg).prompt_encoder["default"].embedding.weight
    ours = apply_method(load_model(tmp_path / "model"), AdapterConfig(
        method="prompt", num_virtual_tokens=9, prompt_init="text", prompt_init_text=text),
        tokenizer=Tokenizer.from_dir(tmp_path / "model"))
    assert torch.equal(ours.prompt_embeddings, theirs)


def full_forward_greedy(model: PromptTuned, prompt: list[int], n: int) -> list[int]:
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def test_engine_generation_equals_full_forward_greedy():
    model = tuned()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [20, 21, 22], [30, 31, 32, 33, 34]]
    want = [full_forward_greedy(model, p, 10) for p in prompts]
    engine = Engine(model)
    assert engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0)) == want
    assert [engine.generate([p], SamplingParams(max_new_tokens=10, temperature=0))[0] for p in prompts] == want
    with disable_adapters(model):
        base = engine.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0))
    assert base != want  # the soft prompt changes what is generated


def test_continuous_batch_joiners_match_running_alone():
    engine = Engine(tuned())
    params = SamplingParams(max_new_tokens=8, temperature=0)
    prompts = [[5, 6, 7, 8], [20, 21, 22, 23, 24, 25, 26], [30, 31]]
    alone = [engine.generate([p], params)[0] for p in prompts]
    batch, outputs = DecodeBatch(engine), {i: [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):  # each joins the running rows, whose cache holds the soft prompt
        for row, token in batch.join([prompt], params, tags=[i]) + batch.step():
            outputs[row.tag].append(token)
    while len(batch):
        for row, token in batch.step():
            outputs[row.tag].append(token)
    assert [outputs[i] for i in range(len(prompts))] == alone


def test_cache_takes_a_soft_prompt_once():
    cache = KVCache(CONFIG, 2, 10, dtype=torch.float32, device="cpu")
    assert cache.virtual_tokens is None
    cache.add_virtual_tokens(N)
    assert cache.virtual_tokens == N and cache.max_len == 10 + N and cache.k.shape[3] == cache.v.shape[3] == 10 + N
    with pytest.raises(ValueError, match="already holds"):
        cache.add_virtual_tokens(N)


def test_positions_at_prefill_are_refused():
    with pytest.raises(ValueError, match="positions"):
        tuned()(ids(), positions=torch.arange(12).expand(2, 12))


def test_bf16_base_keeps_an_fp32_prompt_and_generates():
    model = tuned(base_model().to(torch.bfloat16))
    assert model.prompt_embeddings.dtype == torch.float32
    assert model(ids()).dtype == torch.bfloat16
    out = Engine(model).generate([[5, 6, 7], [8, 9]], SamplingParams(max_new_tokens=4, temperature=0))
    assert [len(o) for o in out] == [4, 4]
