"""Tool calling as the OpenAI API has it: function definitions in, `tool_calls` out.

The tools reach the model through its own chat template when the template renders a `tools`
variable (Qwen2.5, Llama-3.1, Hermes); otherwise through a Hermes-style system message (the
definitions in `<tools>`, calls asked for as `<tool_call>{"name": ..., "arguments": ...}</tool_call>`),
with earlier calls and tool results rewritten into turns such a template renders. Calls are parsed
back from the reply: `<tool_call>` blocks (Hermes, Qwen2.5), or a reply that is one JSON object
with a `name` and `arguments` or `parameters` (Llama-3.1). With `tool_choice` "required" or a named
function the reply is decoded under `call_schema`, so it is always a well-formed call."""

from __future__ import annotations

import json
import re
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
OPEN_TAG = "<tool_call>"

SYSTEM_PROMPT = (
    "You may call one or more functions to assist with the user query. The function signatures are "
    "in <tools></tools> tags:\n<tools>\n{tools}\n</tools>\n\nFor each function call, return a JSON object "
    "with the function name and arguments within <tool_call></tool_call> tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(frozen=True)
class Function:
    """A function the model may call: its name, description and JSON schema of its arguments."""

    name: str
    description: str
    parameters: Mapping[str, Any]

    def definition(self) -> dict[str, Any]:
        """The OpenAI `tools` entry, as chat templates expect it."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": dict(self.parameters)}}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as the API sends it
    id: str = ""

    def api(self) -> dict[str, Any]:
        return {"id": self.id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolUse:
    """What a chat request asks of tools: the functions, whether the reply is constrained to a call
    ("required", or a named function), which function, and whether several calls may come at once."""

    functions: tuple[Function, ...]
    chosen: Function | None = None
    required: bool = False
    parallel: bool = True

    @classmethod
    def of_request(cls, tools: Sequence[Mapping[str, Any]] | None, tool_choice: Any,
                   parallel: bool | None) -> ToolUse | None:
        """The request's tool use; None when it offers no tools or `tool_choice` is "none"."""
        if not tools or tool_choice == "none":
            if isinstance(tool_choice, Mapping) or tool_choice == "required":
                raise ValueError("tool_choice asks for a call but the request offers no tools")
            return None
        functions = tuple(read_tools(tools))
        chosen = chosen_function(functions, tool_choice)
        return cls(functions, chosen, required=chosen is not None or tool_choice == "required",
                   parallel=parallel is not False)

    def schema(self) -> dict[str, Any]:
        """The JSON schema a constrained reply follows."""
        return call_schema(self.functions, self.chosen, self.parallel)

    def reply(self, reply: str) -> tuple[str | None, list[ToolCall]]:
        """A finished reply's text (None if only calls) and its calls, at most one unless `parallel`."""
        if self.required:
            try:
                text, calls = None, constrained_calls(reply, self.chosen)
            except (json.JSONDecodeError, KeyError, TypeError):  # unfinished: cut by a stop string
                text, calls = reply, []
        else:
            text, calls = parse_calls(reply, self.functions)
        return text, calls if self.parallel else calls[:1]


def conversation(turns: Sequence[Mapping[str, Any]], use: ToolUse | None,
                 takes_tools: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages to render and the template variables: the tools through the template's own
    tools section when it has one (`takes_tools`), else written into the messages."""
    functions = use.functions if use else ()
    if takes_tools:
        return native_messages(turns), ({"tools": [f.definition() for f in functions]} if functions else {})
    if functions or any(t["role"] == "tool" or t.get("tool_calls") for t in turns):
        return template_messages(turns, functions), {}
    return [dict(t) for t in turns], {}


def read_tools(tools: Sequence[Mapping[str, Any]]) -> list[Function]:
    """The `tools` of a request as `Function`s; a malformed entry is a ValueError naming it."""
    functions = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(function, Mapping):
            raise ValueError(f"tools[{i}]: expected {{'type': 'function', 'function': {{...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise ValueError(f"tools[{i}].function.name: 1 to 64 letters, digits, '_' or '-', got {name!r}")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, Mapping):
            raise ValueError(f"tools[{i}].function.parameters: expected a JSON schema object")
        functions.append(Function(name, str(function.get("description") or ""), parameters))
    if len({f.name for f in functions}) < len(functions):
        raise ValueError("tools: function names must be unique")
    return functions


def chosen_function(functions: Sequence[Function], tool_choice: Any) -> Function | None:
    """The function `tool_choice` names (`{"type": "function", "function": {"name": ...}}`), if any."""
    if not isinstance(tool_choice, Mapping):
        return None
    name = (tool_choice.get("function") or {}).get("name")
    for function in functions:
        if function.name == name:
            return function
    raise ValueError(f"tool_choice names {name!r}, which is not among the tools")


def call_schema(functions: Sequence[Function], chosen: Function | None, parallel: bool) -> dict[str, Any]:
    """The JSON schema a constrained reply follows: the chosen function's arguments, or (for
    "required") a call `{"name", "arguments"}` of any function, a list of them when `parallel`."""
    if chosen is not None:
        return dict(chosen.parameters)
    one = {"anyOf": [{"type": "object", "properties": {"name": {"const": f.name}, "arguments": dict(f.parameters)},
                      "required": ["name", "arguments"], "additionalProperties": False} for f in functions]}
    return {"type": "array", "items": one, "minItems": 1} if parallel else one


def constrained_calls(reply: str, chosen: Function | None) -> list[ToolCall]:
    """The calls of a reply decoded under `call_schema`."""
    if chosen is not None:
        return [ToolCall(chosen.name, json.dumps(json.loads(reply)))]
    value = json.loads(reply)
    return [ToolCall(c["name"], json.dumps(c["arguments"])) for c in (value if isinstance(value, list) else [value])]


def parse_calls(reply: str, functions: Sequence[Function]) -> tuple[str | None, list[ToolCall]]:
    """The reply's text outside tool calls (None when nothing is left) and the calls it makes to
    known functions. Text that only looks like a call stays text."""
    known = {f.name for f in functions}
    calls = [call for block in TOOL_CALL.findall(reply) if (call := _call(block, known))]
    if calls:
        text = TOOL_CALL.sub("", reply).strip()
        return text or None, calls
    if call := _call(reply.strip(), known):  # Llama-3.1: the whole reply is one call
        return None, [call]
    return reply, []


def _call(text: str, known: set[str]) -> ToolCall | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or value.get("name") not in known:
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return ToolCall(value["name"], json.dumps(arguments)) if isinstance(arguments, dict) else None


def template_messages(messages: Sequence[Mapping[str, Any]], functions: Sequence[Function]) -> list[dict[str, Any]]:
    """Messages for a chat template without a tools section: the tools in a (leading) system
    message, assistant calls written as `<tool_call>` blocks, tool results as user turns in
    `<tool_response>` tags."""
    out: list[dict[str, Any]] = []
    if functions:
        listing = "\n".join(json.dumps(f.definition()) for f in functions)
        system = SYSTEM_PROMPT.format(tools=listing)
        if messages and messages[0]["role"] == "system":
            system = f"{messages[0]['content']}\n\n{system}"
            messages = messages[1:]
        out.append({"role": "system", "content": system})
    for message in messages:
        if message["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        elif message.get("tool_calls"):
            blocks = [f"{OPEN_TAG}\n{json.dumps({'name': c['name'], 'arguments': c['arguments']})}\n</tool_call>"
                      for c in message["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(filter(None, [message.get("content"), *blocks]))})
        else:
            out.append({"role": message["role"], "content": message.get("content") or ""})
    return out


def native_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a chat template with a tools section, in the shape transformers' templates
    read: calls as `{"name", "arguments"}` with the arguments as an object, content never None."""
    return [{**m, "content": m.get("content") or "",
             **({"tool_calls": [{"type": "function", "function": c} for c in m["tool_calls"]]}
                if m.get("tool_calls") else {})} for m in messages]


def call_turns(calls: Sequence[Mapping[str, Any]], where: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls` (the API's shape) as `{"id", "name", "arguments"}` with
    the arguments parsed; arguments that are not a JSON object are a ValueError naming `where`."""
    turns = []
    for i, call in enumerate(calls):
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except (TypeError, json.JSONDecodeError):
            arguments = None
        if not isinstance(function.get("name"), str) or not isinstance(arguments, dict):
            raise ValueError(f"{where}.tool_calls[{i}]: expected a function name and JSON-object arguments")
        turns.append({"id": call.get("id"), "name": function["name"], "arguments": arguments})
    return turns


async def with_tool_calls(events: AsyncIterator[tuple], use: ToolUse) -> AsyncIterator[tuple]:
    """A chat job's events with each row's reply held back until it ends, then given as text
    and ("tool_calls", row, [call, ...]) events, finishing with "tool_calls" when it made any."""
    texts: dict[int, list[str]] = defaultdict(list)
    logprobs: dict[int, list[dict[str, Any]]] = defaultdict(list)
    async for event in events:
        if event[0] == "delta":
            texts[event[1]].append(event[2])
            if event[3]:
                logprobs[event[1]] += event[3]["content"]
            continue
        if event[0] != "done":
            yield event
            continue
        row, reason = event[1], event[2]
        reply = "".join(texts.pop(row, []))
        content, calls = use.reply(reply) if reason == "stop" else (reply, [])
        lp = {"content": logprobs.pop(row), "refusal": None} if row in logprobs else None
        if content or lp:
            yield ("delta", row, content or "", lp)
        if calls:
            yield ("tool_calls", row, [call.api() for call in calls])
        yield ("done", row, "tool_calls" if calls else reason, *event[3:])
