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

NUMBER = {"type": "integer", "minimum": -999, "maximum": 999}  # bounded, so that a random model's call ends
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                   "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": NUMBER, "b": NUMBER}, "required": ["a", "b"]}}}

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


# ---- through the server, with the official client ------------------------------------------------------------------

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from live_server import LiveServer, make_chat_checkpoint

    from lmforge.generate.session import Session
    from lmforge.serve.server import create_app

    session = Session.load(make_chat_checkpoint(tmp_path_factory.mktemp("ckpt"), tmp_path_factory.mktemp("corpus"),
                                                context=2048))  # the tools prompt: ~800 tokens
    with LiveServer(create_app(session, model_name="tiny")) as live:
        live.session = session
        yield live


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, seed: int, **kwargs):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "weather in oslo"}],
                                          max_tokens=200, temperature=1.0, seed=seed, **kwargs)


def test_a_named_tool_choice_returns_a_call_whose_arguments_validate(client):
    for seed in range(4):
        reply = ask(client, seed, tools=[WEATHER, ADD],
                    tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_calls_validate_one_at_a_time_or_in_parallel(client):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
    for seed, parallel in ((0, False), (1, True), (2, True)):
        reply = ask(client, seed, tools=[WEATHER, ADD], tool_choice="required", parallel_tool_calls=parallel)
        calls = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls" and calls and (parallel or len(calls) == 1)
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_a_streamed_call_arrives_as_tool_call_deltas_equal_to_the_whole_reply(client):
    kwargs = dict(tools=[ADD], tool_choice={"type": "function", "function": {"name": "add"}})
    whole = ask(client, 7, **kwargs).choices[0].message.tool_calls[0]
    calls, reasons = {}, []
    for chunk in ask(client, 7, stream=True, **kwargs):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                calls.setdefault(delta.index, {"name": "", "arguments": ""})
                calls[delta.index]["name"] += delta.function.name or ""
                calls[delta.index]["arguments"] += delta.function.arguments or ""
            reasons.append(choice.finish_reason)
    assert reasons[-1] == "tool_calls"
    assert calls == {0: {"name": "add", "arguments": whole.function.arguments}}


def test_tool_results_are_accepted_back_and_rendered_as_the_template_has_them(client, served):
    messages = CONVERSATION[1:]
    reply = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER, ADD], max_tokens=4,
                                           temperature=0)
    tokenizer = served.session.tokenizer
    expected = tokenizer.encode_chat(template_messages(conversation_turns()[1:], read_tools([WEATHER, ADD])))
    assert reply.usage.prompt_tokens == len(expected)
    none = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], tool_choice="none",
                                          max_tokens=4, temperature=0)
    assert none.usage.prompt_tokens == len(tokenizer.encode_chat(template_messages(conversation_turns()[1:], [])))


@pytest.mark.parametrize("kwargs, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "mul"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
      "tool_choice": "required"}, "tools"),
])
def test_bad_tool_requests_are_400s_naming_the_parameter(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, 0, **kwargs)
    assert caught.value.body["param"] == param


def test_a_tool_choice_outside_the_schema_is_a_422(client):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        ask(client, 0, tools=[ADD], tool_choice="sometimes")
    assert caught.value.body["param"].startswith("tool_choice")


def test_a_bad_call_in_the_history_is_a_400(client):
    messages = [{"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                      "function": {"name": "add", "arguments": "not json"}}]}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
    assert caught.value.body["param"] == "messages[1].tool_calls"


def test_auto_replies_are_parsed_for_calls_and_streamed_as_tool_call_events():
    import asyncio

    from lmforge.serve.server import chat_choice
    from lmforge.serve.tools import ToolUse, with_tool_calls

    use = ToolUse.of_request([WEATHER, ADD], "auto", None)
    reply = 'Sure.<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    choice = chat_choice(0, reply, "stop", None, use)
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Sure."
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert chat_choice(0, reply, "length", None, use)["message"] == {"role": "assistant", "content": reply}
    assert chat_choice(0, "It is cold.", "stop", None, use)["finish_reason"] == "stop"

    async def events():
        for piece in ("Sure.<tool_", "call>", '{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'):
            yield ("delta", 0, piece, None)
        yield ("done", 0, "stop", 9)

    async def collect():
        return [event async for event in with_tool_calls(events(), use)]

    out = asyncio.run(collect())
    assert [e[0] for e in out] == ["delta", "tool_calls", "done"]
    assert out[0][2] == "Sure." and out[1][2][0]["function"]["name"] == "add" and out[2] == ("done", 0, "tool_calls", 9)


def test_the_react_agent_runs_through_tool_calls_with_its_traces_as_before(client):
    """`lmforge.rag.agent` over the API's tool calling: every step a call of one of its tools (tool_choice
    "required"), written into the trace as the text agent writes it, with that tool's output observed."""
    from lmforge.rag.agent import (
        TOOL_ARGUMENT, calculator_tool, format_observation, function_definitions, parse_step, run_agents, step_text,
        tool_calling_completer,
    )

    asked: list[str] = []

    def search(query: str) -> str:
        """Search the documents."""
        asked.append(query)
        return f"results for {query}"

    tools = {"search": search, "calculator": calculator_tool}
    assert [f.name for f in read_tools(function_definitions(tools))] == ["search", "calculator"]
    def chat(**request):  # the official client, its reply's message as a dict
        return client.chat.completions.create(**request).choices[0].message.model_dump()

    complete = tool_calling_completer(chat, tools, model="tiny", tool_choice="required",
                                      parallel_tool_calls=False, max_tokens=300, temperature=1.0, seed=3)
    [trace] = run_agents(["Where was Ann Lee born?"], complete, tools, max_steps=2)
    assert [m["role"] for m in trace.messages] == ["user", "assistant", "user", "assistant"]
    step = parse_step(trace.messages[1]["content"])
    assert step.tool in tools and trace.steps[0] == step
    if step.tool == "search":
        assert trace.messages[2]["content"] == format_observation(f"results for {step.argument}")
        assert asked == [step.argument]
    assert trace.stopped == "max_steps" and trace.render().startswith("Question: Where was Ann Lee born?\nThought:")

    call = {"function": {"name": "search", "arguments": json.dumps({TOOL_ARGUMENT: "Ann Lee"})}}
    assert step_text({"content": "Thought: look it up", "tool_calls": [call]}) == \
        "Thought: look it up\nAction: search[Ann Lee]"
    assert step_text({"content": "Thought: done\nFinal Answer: Vantor", "tool_calls": None}) == "Thought: done\nFinal Answer: Vantor"
