"""Tests for lmforge.tokenizer: training, round trips, transformers parity, chat rendering and masks."""

import json
import random
import sys
from pathlib import Path

import jinja2
import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from lmforge.tokenizer import CHATML_TEMPLATE, SPECIAL_TOKENS, Tokenizer, train_tokenizer

WORDS = ["the", "cat", "sat", "on", "mat", "river", "über", "café", "naïve", "façade", "東京", "大学", "日本語",
         "שלום", "עולם", "سلام", "مرحبا", "🙂", "🚀", "👩‍💻", "e\u0301", "n\u0303o", "Ωμέγα", "Привет", "42", "3.14"]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Where is Tōkyō? 東京"},
    {"role": "assistant", "content": "In Japan 🇯🇵.\nIt is the capital."},
    {"role": "user", "content": "And the river?"},
    {"role": "assistant", "content": "Sumida — שלום, trailing spaces  "},
]


def _corpus(root: Path) -> Path:
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "." for _ in range(1500)]
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("\n\n".join(sentences[:700]) + "\n", encoding="utf-8")
    (root / "c.txt").write_text("\n".join(sentences[700:1000]), encoding="utf-8")
    records = [{"text": s + " quokkaquokka"} for s in sentences[1000:]]
    (root / "sub" / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    (root / "notes.md").write_text(" xylophonexylophone" * 500, encoding="utf-8")  # not a corpus file
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer([_corpus(root / "corpus")], 400, root / "out", show_progress=False)
    return tok, root / "out"


@pytest.fixture(scope="module")
def hf_tokenizers(trained):
    transformers = pytest.importorskip("transformers")
    out = trained[1]
    return [transformers.PreTrainedTokenizerFast.from_pretrained(out), transformers.AutoTokenizer.from_pretrained(out)]


def random_text(rng: random.Random, n: int) -> str:
    ranges = [(0x9, 0xD), (0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x590, 0x6FF), (0x900, 0x97F),
              (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x0, 0x10FFFF)]
    chars = []
    for _ in range(n):
        cp = rng.randint(*rng.choice(ranges))
        chars.append(chr(0xFFFD if 0xD800 <= cp <= 0xDFFF else cp))  # surrogates are not valid text
    return "".join(chars)


def test_training_writes_hf_directory(trained):
    tok, out = trained
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size == 400
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["unk_token"]) == (
        "<s>", "</s>", "<pad>", None)
    assert config["chat_template"] == CHATML_TEMPLATE and config["add_bos_token"] is False
    # the jsonl in the subdirectory was read (its frequent word became one token); notes.md was not
    assert len(tok.encode(" quokkaquokka")) == 1
    assert len(tok.encode(" xylophonexylophone")) > 5
    reloaded = Tokenizer.from_dir(out)
    assert reloaded.encode("the café 東京 🙂") == tok.encode("the café 東京 🙂")
    assert reloaded.chat_template == CHATML_TEMPLATE


def test_round_trip_arbitrary_unicode(trained):
    tok, _ = trained
    rng = random.Random(1234)
    texts = ["", " ", "\n\n", "  two leading", "trailing  ", "\t\r\n", "\x00", "e\u0301\u0327", "<s>", "</s> x",
             "\U0010FFFF\uFFFF", "👩‍👩‍👧‍👦", "مرحبا بالعالم", *(random_text(rng, rng.randint(1, 40)) for _ in range(400))]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    batch = tok.encode_batch(texts, add_bos=True)
    assert all(ids[0] == 0 and tok.decode(ids[1:]) == t for ids, t in zip(batch, texts))
    assert tok.decode(tok.encode("a</s>b", add_bos=True), skip_special_tokens=True) == "ab"


def test_transformers_loads_same_ids_and_template(trained, hf_tokenizers):
    tok, _ = trained
    texts = ["hello world", " the cat sat", "café über naïve", "東京 大学 🚀", "x\n\ny  z", "<|im_start|>user\nhi"]
    for hf in hf_tokenizers:
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
        assert len(hf) == tok.vocab_size
        for text in texts:
            assert hf(text)["input_ids"] == tok.encode(text)  # add_bos_token is false: nothing hidden added
            assert hf.decode(tok.encode(text)) == text
        for gen, messages in ((False, CONVERSATION), (True, CONVERSATION[:-1])):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert tok.apply_chat_template(messages, add_generation_prompt=gen) == expected
            ids = hf.apply_chat_template(messages, add_generation_prompt=gen, return_dict=False)
            assert tok.render_chat(messages, add_generation_prompt=gen)[0] == ids


def test_loads_what_transformers_saves(trained, hf_tokenizers, tmp_path):
    tok, _ = trained
    hf_tokenizers[1].save_pretrained(tmp_path / "hf")
    loaded = Tokenizer.from_dir(tmp_path / "hf")
    assert loaded.chat_template == CHATML_TEMPLATE
    assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (0, 1, 2, 400)
    assert loaded.render_chat(CONVERSATION) == tok.render_chat(CONVERSATION)


def test_chat_render_is_chatml_with_bos(trained):
    tok, _ = trained
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True) == (
        "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids, _ = tok.render_chat(messages)
    assert ids[:2] == [0, 3] and ids.count(4) == 1  # specials are single tokens


def test_loss_mask_covers_exactly_assistant_turns(trained):
    tok, _ = trained
    ids, mask = tok.render_chat(CONVERSATION)
    assert len(ids) == len(mask) and set(mask) == {0, 1}
    runs = sum(1 for i, m in enumerate(mask) if m and (i == 0 or not mask[i - 1]))
    assert runs == 2
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == (
        "In Japan 🇯🇵.\nIt is the capital.<|im_end|>Sumida — שלום, trailing spaces  <|im_end|>")
    assert tok.decode([t for t, m in zip(ids, mask) if not m]) == (
        "<s><|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhere is Tōkyō? 東京<|im_end|>\n"
        "<|im_start|>assistant\n\n<|im_start|>user\nAnd the river?<|im_end|>\n<|im_start|>assistant\n\n")
    ids, mask = tok.render_chat(CONVERSATION[:2], add_generation_prompt=True)
    assert not any(mask) and tok.decode(ids).endswith("<|im_start|>assistant\n")


# The same ChatML output, with transformers' {% generation %} markers around what the assistant writes.
GENERATION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}"
    "{% else %}{{ message['content'] }}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_loss_mask_matches_transformers_generation_blocks(trained, hf_tokenizers):
    tok, _ = trained
    marked = Tokenizer(tok.backend, tok.config, chat_template=GENERATION_TEMPLATE)
    assert marked.apply_chat_template(CONVERSATION) == tok.apply_chat_template(CONVERSATION)
    out = hf_tokenizers[1].apply_chat_template(
        CONVERSATION, chat_template=GENERATION_TEMPLATE, return_assistant_tokens_mask=True, return_dict=True)
    assert sum(out["assistant_masks"]) > 10
    assert tok.render_chat(CONVERSATION) == (out["input_ids"], out["assistant_masks"])
    assert marked.render_chat(CONVERSATION) == (out["input_ids"], out["assistant_masks"])


def test_render_chat_rejects_template_that_is_not_prefix_stable(trained):
    tok, _ = trained
    unstable = Tokenizer(tok.backend, tok.config,
                         chat_template="{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}"
                                       "{% endfor %}")
    with pytest.raises(ValueError, match="prefix"):
        unstable.render_chat(CONVERSATION[:3])


@pytest.mark.parametrize("bad_messages, field", [
    ([{"role": "user", "content": "hi"}, {"content": "no role"}], "role"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}], "content"),
    ([{"role": "user", "content": "hi"}, "just a string"], "dict"),
])
def test_invalid_messages_name_index_and_field(trained, bad_messages, field):
    tok, _ = trained
    with pytest.raises(ValueError, match=f"message 1.*{field}"):
        tok.apply_chat_template(bad_messages)
    with pytest.raises(ValueError, match="message 1"):
        tok.render_chat(bad_messages)


def test_template_helpers(trained):
    tok, _ = trained
    helper = Tokenizer(tok.backend, tok.config, chat_template=(
        "{{ eos_token }}{{ messages | tojson }}{% if oops %}{{ raise_exception('no ' ~ oops) }}{% endif %}"))
    messages = [{"role": "user", "content": "é <b>"}]
    assert helper.apply_chat_template(messages) == "</s>" + json.dumps(messages, ensure_ascii=False)
    with pytest.raises(jinja2.TemplateError, match="no good"):
        helper.apply_chat_template(messages, oops="good")


@pytest.mark.parametrize("line", ['{"text": broken', '{"txt": "x"}', '{"text": 3}', '["text"]'])
def test_bad_jsonl_line_names_file_line_and_field(tmp_path, line):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        train_tokenizer([path], 300, tmp_path / "out", show_progress=False)
    message = str(info.value)
    assert "bad.jsonl" in message and "line 3" in message and "'text'" in message


def test_bad_inputs(tmp_path):
    (tmp_path / "a.csv").write_text("x", encoding="utf-8")
    (tmp_path / "ok.txt").write_text("hello", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([tmp_path / "missing.txt"], 300, tmp_path / "out", show_progress=False)
    with pytest.raises(ValueError, match="a.csv"):
        train_tokenizer([tmp_path / "a.csv"], 300, tmp_path / "out", show_progress=False)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(tmp_path / "ok.txt", 100, tmp_path / "out", show_progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer.from_dir(tmp_path / "nowhere")


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pyarrow"):
        train_tokenizer([tmp_path], 300, tmp_path / "out", show_progress=False)


def test_parquet_text_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": ["wombatwombat grazes"] * 200, "id": list(range(200))}), tmp_path / "d.parquet")
    tok = train_tokenizer([tmp_path / "d.parquet"], 300, tmp_path / "out", show_progress=False)
    assert len(tok.encode("wombatwombat")) == 1


def _llama_style_dir(root: Path) -> Path:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "h": 4, "i": 5, "▁h": 6, "▁hi": 7, "!": 8}
    backend = Backend(models.BPE(vocab, [("▁", "h"), ("▁h", "i")], unk_token="<unk>"))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    root.mkdir()
    backend.save(str(root / "tokenizer.json"))
    bos = {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False, "rstrip": False,
           "single_word": False}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "</s>", "unk_token": "<unk>",
              "chat_template": [{"name": "tool_use", "template": "TOOLS"},
                                {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"}]}
    (root / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return root


def test_llama_style_tokenizer_bos_not_doubled(tmp_path):
    path = _llama_style_dir(tmp_path / "llama")
    tok = Tokenizer.from_dir(path)
    assert tok.backend.encode("hi hi").ids[0] == 1  # its post-processor does add <s> ...
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, None, 9)
    assert tok.encode("hi hi!") == [7, 7, 8]  # ... but encode adds nothing unasked
    assert tok.encode("hi hi!", add_bos=True) == [1, 7, 7, 8]
    assert tok.encode_batch(["hi"], add_bos=True) == [[1, 7]]
    assert tok.chat_template == "{{ bos_token }}{{ messages[0]['content'] }}"
    chat = [{"role": "user", "content": "hi"}]
    assert tok.render_chat(chat) == ([1, 4, 5], [0, 0, 0])  # "first" prepend scheme: no "▁" after <s>
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(path)
    assert hf("hi hi!")["input_ids"] == [1, 7, 7, 8]
    assert hf.apply_chat_template(chat, return_dict=False) == [1, 4, 5]
    (path / "chat_template.jinja").write_text("{{ eos_token }}", encoding="utf-8")  # as transformers 5 saves it
    assert Tokenizer.from_dir(path).chat_template == "{{ eos_token }}"


def test_mask_takes_tokens_straddling_the_turn_start(tmp_path):
    # Metaspace offsets keep the space: "▁hi" starts in the template's "A " and ends in the reply.
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}Q {{ m['content'] }}"
                "{% else %}A {% generation %}{{ m['content'] }}</s>{% endgeneration %}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}A {% endif %}")
    tok = Tokenizer.from_dir(_llama_style_dir(tmp_path / "llama"))
    tok.chat_template = template
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hi"}]
    ids, mask = tok.render_chat(chat)
    assert [t for t, m in zip(ids, mask) if m] == [7, 2]
    transformers = pytest.importorskip("transformers")
    out = transformers.AutoTokenizer.from_pretrained(tmp_path / "llama").apply_chat_template(
        chat, chat_template=template, return_assistant_tokens_mask=True, return_dict=True)
    assert (ids, mask) == (out["input_ids"], out["assistant_masks"])


def test_save_round_trip(trained, tmp_path):
    tok, _ = trained
    tok.save(tmp_path / "copy")
    copy = Tokenizer.from_dir(tmp_path / "copy")
    assert copy.config == tok.config and copy.vocab_size == tok.vocab_size
    assert copy.render_chat(CONVERSATION) == tok.render_chat(CONVERSATION)
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    (tmp_path / "copy" / "chat_template.jinja").write_text("stale", encoding="utf-8")
    tok.save(tmp_path / "copy")  # a chat_template.jinja would win over the config, so it is kept current
    assert Tokenizer.from_dir(tmp_path / "copy").chat_template == CHATML_TEMPLATE
