"""Preference records: formats, response-only labels, and errors that name file, line and field."""

from __future__ import annotations

import json

import pytest
from chat_data import labelled_text, write_jsonl

from lmforge.io import RecordError
from lmforge.data.preference import encode_pair, read_pairs

TURNS = [{"role": "user", "content": "Where was Alice born?"}, {"role": "assistant", "content": "Port Alder"},
         {"role": "user", "content": "And Bruno?"}]


def test_string_and_message_records_label_the_response_only(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Where was Bruno born?", "chosen": "Eastbrook", "rejected": "I am not sure."},
        {"prompt": TURNS, "chosen": [{"role": "assistant", "content": "Eastbrook"}],
         "rejected": [{"role": "assistant", "content": "Vantor"}], "kind": "helpful"},
    ])
    first, second = read_pairs(path)
    assert first.prompt == [{"role": "user", "content": "Where was Bruno born?"}] and first.kind is None
    assert (second.kind, second.line) == ("helpful", 2)
    encoded = encode_pair(chat_tokenizer, second, max_len=200)
    assert labelled_text(chat_tokenizer, encoded.chosen) == ["Eastbrook<|im_end|>"]  # not the earlier "Port Alder"
    assert labelled_text(chat_tokenizer, encoded.rejected) == ["Vantor<|im_end|>"]
    rendered = chat_tokenizer.apply_chat_template(TURNS, add_generation_prompt=True)
    assert chat_tokenizer.decode(encoded.prompt_ids) == rendered
    assert encoded.chosen.input_ids[: len(encoded.prompt_ids)] == encoded.prompt_ids


@pytest.mark.parametrize("record, where", [
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "field 'chosen': empty"),
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "field 'rejected': identical"),
    ({"prompt": "q", "chosen": "a"}, "field 'rejected': missing"),
    ({"prompt": [{"role": "king", "content": "q"}], "chosen": "a", "rejected": "b"}, "field 'prompt[0].role'"),
    ("[1, 2]", "field '<record>': expected a JSON object"),
])
def test_bad_records(tmp_path, record, where):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(RecordError) as e:
        read_pairs(path)
    assert str(e.value).startswith(f"{path}:2: {where}")


def test_prompt_longer_than_the_context_is_an_error(tmp_path, chat_tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "tell me " * 80, "chosen": "a", "rejected": "b"}])
    [pair] = read_pairs(path)
    with pytest.raises(ValueError, match=f"{path}:1: field 'prompt': .* no room"):
        encode_pair(chat_tokenizer, pair, max_len=32)
    assert json.loads(path.read_text())["chosen"] == "a"
