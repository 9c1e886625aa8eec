"""The T5 family against transformers 5.25: logits, encoder states, checkpoints, cached decoding, greedy
generation, the presets' sizes, and T5's Unigram tokenizer."""

import json

import pytest
import torch
from conftest import SHARPEN

from lmforge.generate.sampling import SamplingParams
from lmforge.generate.seq2seq import Seq2SeqEngine
from lmforge.presets import SEQ2SEQ_PRESETS, seq2seq_preset
from lmforge.seq2seq import Seq2SeqConfig, Seq2SeqEncoder, Seq2SeqLM, relative_position_bucket, shift_right
from lmforge.seq2seq_checkpoint import is_seq2seq, load_seq2seq, save_seq2seq

VARIANTS = {"v1.0": ("relu", True), "v1.1": ("gated-gelu", False)}
# T5 does not scale attention logits, so fp32 rounding grows with the logits: measured 0.0 with AVX-512 kernels
# and up to 1.4e-5 of the largest logit (2.4e-4 at 18) with AVX2 ones, against transformers and cached vs full.
RELATIVE_ROUNDING = 3e-5


def tiny_t5_config(feed_forward_proj: str, tie: bool):
    import transformers as tf

    return tf.T5Config(
        vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj=feed_forward_proj,
        tie_word_embeddings=tie, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_t5(request, tmp_path_factory):
    """(transformers model, its directory): random weights sharpened as conftest's; v1.1's head untied.
    transformers 5.25 ties T5's head whenever a model is built from a config (it forces
    tie_word_embeddings=True and keeps only the v1.0 scaling as `scale_decoder_outputs`), and unties it on
    load when the checkpoint holds a different `lm_head.weight`, as FLAN-T5's do: so the head is replaced here."""
    import transformers as tf

    proj, tie = VARIANTS[request.param]
    torch.manual_seed(0)
    model = tf.T5ForConditionalGeneration(tiny_t5_config(proj, tie)).eval()
    if not tie:
        model.lm_head.weight = torch.nn.Parameter(torch.randn(97, 32) * 0.2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(SHARPEN)
    path = tmp_path_factory.mktemp("t5") / request.param
    model.save_pretrained(path)
    if not tie:  # FLAN-T5's config.json says so
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    return model, path


def inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 97, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 4:] = 0, 0
    decoder = torch.randint(2, 97, (3, 9), generator=g)
    decoder[:, 0] = 0
    return ids.masked_fill(mask == 0, 0), mask, decoder


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            want = T5Attention._relative_position_bucket(relative, bidirectional, buckets, distance)
            got = relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=buckets,
                                           max_distance=distance)
            assert torch.equal(got, want)


def test_logits_match_transformers(hf_t5):
    hf, path = hf_t5
    model = load_seq2seq(path)
    assert isinstance(model, Seq2SeqLM)
    assert (model.lm_head.weight is model.shared.weight) == model.config.tie_word_embeddings
    ids, mask, decoder = inputs()
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
        got = model(ids, decoder, attention_mask=mask)
        scale = want.abs().max().item()
        assert scale > 10  # sharpened: a wrong bias or scale would move these by far more than the bound
        torch.testing.assert_close(got, want, rtol=0, atol=RELATIVE_ROUNDING * scale)
        unpadded = model(ids[2:, :4], decoder[2:])  # padding changes nothing for the real tokens
        torch.testing.assert_close(unpadded, got[2:], rtol=0, atol=RELATIVE_ROUNDING * scale)


def test_encoder_alone_matches_transformers(hf_t5, tmp_path):
    import transformers as tf

    hf, path = hf_t5
    encoder = load_seq2seq(path, encoder_only=True)
    assert isinstance(encoder, Seq2SeqEncoder) and not isinstance(encoder, Seq2SeqLM)
    ids, mask, _ = inputs()
    with torch.no_grad():
        want = tf.T5EncoderModel.from_pretrained(path).eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(encoder.encode(ids, mask), want, rtol=0, atol=1e-4)
        save_seq2seq(encoder, tmp_path / "encoder")
        assert json.loads((tmp_path / "encoder" / "config.json").read_text())["architectures"] == ["T5EncoderModel"]
        reloaded = tf.T5EncoderModel.from_pretrained(tmp_path / "encoder").eval()
        torch.testing.assert_close(reloaded(input_ids=ids, attention_mask=mask).last_hidden_state, want,
                                   rtol=0, atol=1e-4)
        assert isinstance(load_seq2seq(tmp_path / "encoder"), Seq2SeqEncoder)


def test_save_loads_in_transformers(hf_t5, tmp_path):
    import transformers as tf

    from lmforge.checkpoint import load_model

    _, path = hf_t5
    model = load_seq2seq(path)
    out = save_seq2seq(model, tmp_path / "saved", max_shard_size=20_000)  # sharded
    assert (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "generation_config.json").read_text())["decoder_start_token_id"] == 0
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    assert is_seq2seq(out) and not is_seq2seq(tmp_path / "llama")
    reloaded = tf.AutoModelForSeq2SeqLM.from_pretrained(out).eval()
    assert (reloaded.lm_head.weight is reloaded.shared.weight) == model.config.tie_word_embeddings
    ids, mask, decoder = inputs()
    with torch.no_grad():
        want = model(ids, decoder, attention_mask=mask)
        got = reloaded(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert Seq2SeqConfig.from_dir(out) == model.config
    with pytest.raises(ValueError, match="encoder-decoder model.*load_seq2seq"):
        load_model(out)


def test_cached_decoding_equals_full_forward(hf_t5):
    _, path = hf_t5
    model = load_seq2seq(path)
    ids, mask, decoder = inputs()
    with torch.no_grad():
        full = model(ids, decoder, attention_mask=mask)
        cache = model.new_cache(len(ids), decoder.shape[1])
        steps = [model(ids, decoder[:, :3], attention_mask=mask, cache=cache)]  # fills the cross-attention K/V
        steps += [model(None, decoder[:, t : t + 1], cache=cache) for t in range(3, decoder.shape[1])]
        # fp32 rounding through sharpened weights and unscaled attention: transformers' own cached and full passes
        # differ by 1.0e-4 here (v1.0, logits up to 18), ours by up to 2.4e-4 with AVX2 kernels; the bound is
        # relative to the logits' scale (RELATIVE_ROUNDING).
        bound = RELATIVE_ROUNDING * full.abs().max().item()
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=bound)


def hf_greedy(hf, prompts, max_new):
    """transformers' greedy continuations, cut after the first `</s>` (rows that ended are padded)."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    longest = max(map(len, prompts))
    ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts])
    mask = torch.tensor([[1] * len(p) + [0] * (longest - len(p)) for p in prompts])
    # transformers 5.25 sizes generate's own cache by num_layers, the encoder's depth, and fails on a deeper
    # decoder (num_decoder_layers=3): a cache that grows per layer is given instead.
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, num_beams=1, do_sample=False,
                      cache=cache)
    rows = []
    for row in out[:, 1:].tolist():  # after the decoder-start token
        rows.append(row[: row.index(1) + 1] if 1 in row else row)
    return rows


def test_greedy_generation_matches_transformers(hf_t5):
    hf, path = hf_t5
    engine = Seq2SeqEngine(load_seq2seq(path))
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, 97, (n,), generator=g).tolist() for n in (9, 4, 6)]
    params = SamplingParams(max_new_tokens=12, temperature=0)
    want = hf_greedy(hf, prompts, 12)
    assert engine.generate(prompts, params) == want
    assert [engine.generate([p], params)[0] for p in prompts] == want
    top1 = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.7, top_k=1, seed=0))
    assert top1 == want  # top-k 1 sampling is greedy
    sampled = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3)
    assert engine.generate(prompts, sampled) == engine.generate(prompts, sampled)  # seeded


def test_generation_stops_at_end_of_sequence():
    config = Seq2SeqConfig(vocab_size=11, hidden_size=16, head_dim=4, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, tie_word_embeddings=False)
    model = Seq2SeqLM(config)
    model.init_weights(seed=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0, then `</s>` favoured by the logit bias
    params = SamplingParams(max_new_tokens=5, temperature=0, logit_bias={1: 1.0})
    assert list(Seq2SeqEngine(model).stream([[3, 4], [5]], params)) == [[1, 1]]
    params = SamplingParams(max_new_tokens=5, temperature=0, logit_bias={4: 1.0}, stop_token_ids=(4,))
    assert list(Seq2SeqEngine(model).stream([[3, 4], [5]], params)) == [[4, 4]]


def test_shift_right_matches_transformers():
    import transformers as tf

    labels = torch.tensor([[5, 6, 1, -100], [7, 1, -100, -100]])
    hf = tf.T5ForConditionalGeneration(tiny_t5_config("relu", True))
    assert torch.equal(shift_right(labels, Seq2SeqConfig()), hf._shift_right(labels))


# Parameter counts of the published configs (google-t5/t5-small, google/flan-t5-{base,large,xl}):
#   t5-small        60,506,624 (tied head)
#   flan-t5-base   247,577,856
#   flan-t5-large  783,150,080
#   flan-t5-xl   2,849,757,184
# transformers 5.25 builds these on the meta device with the head tied whatever the config says (see
# `hf_t5`): 222,903,552 / 750,251,008 / 2,783,959,040 for FLAN-T5, to which an untied head adds
# vocab_size x d_model (32128 x 768, 1024, 2048), the published totals above. The test builds both.
PUBLISHED = {"t5-small": 60_506_624, "flan-t5-base": 247_577_856, "flan-t5-large": 783_150_080,
             "flan-t5-xl": 2_849_757_184}


def test_preset_sizes_match_transformers():
    import transformers as tf

    assert set(SEQ2SEQ_PRESETS) == set(PUBLISHED)
    for name, count in PUBLISHED.items():
        config = SEQ2SEQ_PRESETS[name]
        hf_config = tf.T5Config(**{k: v for k, v in config.to_hf().items() if k not in ("architectures", "dtype")})
        with torch.device("meta"):
            ours, theirs = Seq2SeqLM(config), tf.T5ForConditionalGeneration(hf_config)
            encoder = Seq2SeqEncoder(config)
        head = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
        assert ours.num_parameters() == theirs.num_parameters() + head == count
        assert encoder.num_parameters() == sum(p.numel() for p in theirs.encoder.parameters())
    assert seq2seq_preset("flan-t5-base", num_hidden_layers=2).num_decoder_layers == 2


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="feed_forward_proj 'gated-tanh'"):
        Seq2SeqConfig.from_hf({"architectures": ["T5ForConditionalGeneration"], "feed_forward_proj": "gated-tanh"})
    with pytest.raises(ValueError, match="LlamaForCausalLM is not an encoder-decoder"):
        Seq2SeqConfig.from_hf({"architectures": ["LlamaForCausalLM"]})


def test_unigram_tokenizer_appends_end_of_sequence(tmp_path):
    """A T5-style tokenizer.json (Unigram over Metaspace pieces, `</s>` appended by the post-processor) loads,
    and encodes as transformers' tokenizer does."""
    import transformers as tf
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    from lmforge.tokenizer import Tokenizer

    backend = Backend(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    texts = ["the quick brown fox jumps over the lazy dog", "summarize: a dog sleeps in the sun"] * 20
    backend.train_from_iterator(texts, trainers.UnigramTrainer(
        vocab_size=60, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                           special_tokens=[("</s>", 1)])
    Tokenizer(backend, {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                        "tokenizer_class": "T5TokenizerFast"}).save(tmp_path)
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id) == (0, 1, None)
    text = "summarize: the lazy fox sleeps"
    ids = tokenizer.encode(text, add_special_tokens=True)
    assert ids[-1] == 1 and ids[:-1] == tokenizer.encode(text)
    assert ids == tf.AutoTokenizer.from_pretrained(tmp_path)(text).input_ids
    assert tokenizer.encode_batch([text], add_special_tokens=True) == [ids]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
