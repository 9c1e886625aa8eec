"""Tool calling's pure parts: reading `tools`, rendering them into a prompt, parsing calls back, and
the schema a constrained call follows. Oracles: transformers' own chat-template rendering with
`tools`, `jsonschema`, and hand-written replies."""

from __future__ import annotations

import json

import jsonschema
import pytest
from transformers import PreTrainedTokenizerFast

from lmforge.serve.tools import (
    call_schema, call_turns, chosen_function, constrained_calls, native_messages, parse_calls, read_tools,
    template_messages,
)
from lmforge.tokenizer import CHATML_TEMPLATE, Tokenizer, train_tokenizer

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                                  "required": ["a", "b"]}}}

# A Qwen2.5-style template with a tools section (Hermes format), written for this test.
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{{ messages[0]['content'] if messages[0]['role'] == 'system' else 'You are a helpful assistant.' }}"
    "\n\n# Tools\n\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{%- elif message.tool_calls %}<|im_start|>assistant\n{{ message.content }}"
    "{%- for call in message.tool_calls %}<tool_call>\n"
    '{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo, and 2 + 3?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees"},
    {"role": "tool", "tool_call_id": "call_2", "content": "5"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    corpus = tmp_path_factory.mktemp("corpus") / "c.txt"
    corpus.write_text("the weather in oslo is cold; two and three make five\n" * 20)
    return train_tokenizer([corpus], 300, tmp_path_factory.mktemp("tok"), show_progress=False)


def conversation_turns() -> list[dict]:
    return [{**m, "tool_calls": call_turns(m["tool_calls"], f"messages[{i}]")} if m.get("tool_calls") else m
            for i, m in enumerate(CONVERSATION)]


def test_a_template_with_a_tools_section_renders_as_transformers_renders_it(tokenizer):
    tokenizer.chat_template = TOOLS_TEMPLATE
    assert tokenizer.chat_template_takes_tools
    messages = native_messages(conversation_turns())
    tools = [f.definition() for f in read_tools([WEATHER, ADD])]
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
    reference = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, chat_template=TOOLS_TEMPLATE)
    assert ours == reference.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert '"name": "get_weather"' in ours and '"arguments": {"a": 2, "b": 3}' in ours


def test_a_template_without_one_gets_the_tools_in_a_system_message(tokenizer):
    tokenizer.chat_template = CHATML_TEMPLATE
    assert not tokenizer.chat_template_takes_tools
    messages = template_messages(conversation_turns(), read_tools([WEATHER, ADD]))
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\nYou may call one or more functions")
    assert json.dumps(read_tools([WEATHER])[0].definition()) in messages[0]["content"]
    calls = [json.loads(block) for block in messages[2]["content"].split("<tool_call>\n")[1:]
             for block in [block.split("\n</tool_call>")[0]]]
    assert calls == [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "add", "arguments": {"a": 2, "b": 3}}]
    assert messages[3]["content"] == "<tool_response>\n4 degrees\n</tool_response>"
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")


def test_calls_are_parsed_from_hermes_blocks_and_from_a_bare_json_call():
    functions = read_tools([WEATHER, ADD])
    reply = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
             '<tool_call>{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}</tool_call>')
    text, calls = parse_calls(reply, functions)
    assert text == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"}),
                                                                   ("add", {"a": 1, "b": 2})]
    assert parse_calls('{"name": "add", "parameters": {"a": 1, "b": 1}}', functions)[1][0].name == "add"  # Llama-3.1
    assert parse_calls("<tool_call>{\"name\": \"nope\", \"arguments\": {}}</tool_call>", functions)[1] == []
    assert parse_calls("<tool_call>{broken</tool_call>", functions) == ("<tool_call>{broken</tool_call>", [])
    assert parse_calls("It is cold.", functions) == ("It is cold.", [])
    api = calls[0].api()
    assert api["type"] == "function" and api["id"].startswith("call_") and api["function"]["name"] == "get_weather"


def test_the_schema_of_a_constrained_call_admits_exactly_well_formed_calls():
    functions = read_tools([WEATHER, ADD])
    one = call_schema(functions, None, parallel=False)
    jsonschema.validate({"name": "add", "arguments": {"a": 1, "b": 2}}, one)
    for bad in ({"name": "add", "arguments": {"a": "x", "b": 2}}, {"name": "sub", "arguments": {}},
                {"name": "get_weather", "arguments": {"unit": "celsius"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, one)
    many = call_schema(functions, None, parallel=True)
    jsonschema.validate([{"name": "add", "arguments": {"a": 1, "b": 2}},
                         {"name": "get_weather", "arguments": {"city": "Oslo"}}], many)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], many)
    named = chosen_function(functions, {"type": "function", "function": {"name": "get_weather"}})
    assert call_schema(functions, named, parallel=True) == WEATHER["function"]["parameters"]
    assert [(c.name, json.loads(c.arguments)) for c in constrained_calls('{"city": "Oslo"}', named)] == \
        [("get_weather", {"city": "Oslo"})]
    assert [c.name for c in constrained_calls('[{"name": "add", "arguments": {"a": 1, "b": 2}}]', None)] == ["add"]


@pytest.mark.parametrize("tools, message", [
    ([{"type": "retrieval"}], "tools[0]: expected"),
    ([{"type": "function", "function": {"name": "has space"}}], "tools[0].function.name"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "tools[0].function.parameters"),
    ([ADD, ADD], "unique"),
])
def test_bad_tools_are_errors_that_name_the_entry(tools, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_tools(tools)


def test_bad_choices_and_arguments_are_errors():
    with pytest.raises(ValueError, match="not among the tools"):
        chosen_function(read_tools([ADD]), {"type": "function", "function": {"name": "mul"}})
    with pytest.raises(ValueError, match=r"messages\[2\].tool_calls\[0\]"):
        call_turns([{"function": {"name": "add", "arguments": "[1, 2]"}}], "messages[2]")
