"""A ReAct agent (reason, act, observe) in chat form.

The conversation starts with the question as the user's message. Each assistant turn is either
`Thought: ...\\nAction: tool[argument]`, answered by a user turn `Observation: ...` holding the
tool's output, or `Thought: ...\\nFinal Answer: ...`, which ends it. Because observations are user
turns, supervised fine-tuning's assistant-only loss trains the thoughts and actions but not the
observations, and generation stops at the end-of-turn token instead of inventing an observation.

The same loop runs through an OpenAI-compatible tool-calling API (`tool_calling_completer`): the
tools are offered as functions, a reply's first tool call becomes the step's action, and the trace
is written exactly as above.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from lmforge.rag.calculator import calculate

MAX_OBSERVATION_CHARS = 800
TOOL_ARGUMENT = "input"  # the one string parameter each tool takes as a function
MAX_INPUT_CHARS = 100  # a search query or an arithmetic expression

_ACTION = re.compile(r"^[ \t]*Action:[ \t]*([A-Za-z_]\w*)[ \t]*\[(.*)\][ \t]*$", re.M)
_FINAL = re.compile(r"Final Answer:[ \t]*")
_THOUGHT = re.compile(r"^\s*Thought:\s*")


@dataclass(frozen=True)
class Step:
    """One parsed assistant turn: an action (`tool` and `argument`), a final answer, or neither (malformed)."""

    thought: str
    tool: str | None = None
    argument: str | None = None
    final_answer: str | None = None

    @property
    def malformed(self) -> bool:
        return self.tool is None and self.final_answer is None


def format_action(thought: str, tool: str, argument: str) -> str:
    return f"Thought: {thought}\nAction: {tool}[{argument}]"


def format_final(thought: str, answer: str) -> str:
    return f"Thought: {thought}\nFinal Answer: {answer}"


def format_observation(text: str, max_chars: int = MAX_OBSERVATION_CHARS) -> str:
    """The user turn holding a tool's output, cut to `max_chars` characters (marked with "...")."""
    text = text.strip()
    if len(text) > max_chars:
        text = text[:max_chars].rstrip() + " ..."
    return f"Observation: {text}"


def parse_step(text: str) -> Step:
    """Parse an assistant turn. The first `Action: tool[argument]` line or `Final Answer:` decides
    the step (text after an action line is ignored); output with neither gives a malformed `Step`."""
    action, final = _ACTION.search(text), _FINAL.search(text)
    if final and (action is None or final.start() < action.start()):
        answer = text[final.end():].strip()
        thought = _THOUGHT.sub("", text[:final.start()]).strip()
        return Step(thought, final_answer=answer) if answer else Step(text.strip())
    if action:
        return Step(_THOUGHT.sub("", text[:action.start()]).strip(), action.group(1), action.group(2).strip())
    return Step(text.strip())


@dataclass
class Trace:
    """One question's run: the conversation, its parsed steps, and how it ended."""

    question: str
    messages: list[dict[str, str]]
    steps: list[Step] = field(default_factory=list)
    answer: str | None = None
    stopped: Literal["answer", "max_steps"] | None = None

    def render(self) -> str:
        """The run as `Question:/Thought:/Action:/Observation:/Final Answer:` lines."""
        lines = [f"Question: {self.question}", *(m["content"] for m in self.messages[1:])]
        if self.stopped == "max_steps":
            lines.append(f"(stopped after {len(self.steps)} steps without a final answer)")
        return "\n".join(lines)


def calculator_tool(expression: str) -> str:
    """The calculator as an agent tool: the value of an arithmetic expression, as text
    (raises `CalculatorError`, which the loop turns into an observation)."""
    value = calculate(expression)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return format(value, ".12g") if isinstance(value, float) else str(value)


def run_agents(questions: list[str], complete: Callable[[list[list[dict[str, str]]]], list[str]],
               tools: Mapping[str, Callable[[str], str]], max_steps: int = 4, *,
               max_observation_chars: int = MAX_OBSERVATION_CHARS) -> list[Trace]:
    """Run the ReAct loop for all `questions` in lock-step.

    Each step calls `complete` once with the conversations still running (a batch) and expects
    one assistant reply per conversation. An action runs the named tool on its argument; its
    output, an unknown tool, a tool's exception or unparseable output becomes the next
    observation, so the model may correct itself. A conversation ends at a final answer or after
    `max_steps` replies (an action in the last reply is not run)."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    usage = " or ".join([f"{name}[...]" for name in tools] + ["Final Answer: ..."])
    traces = [Trace(q, [{"role": "user", "content": q}]) for q in questions]
    running = list(traces)
    for step_no in range(1, max_steps + 1):
        if not running:
            break
        replies = complete([t.messages for t in running])
        if len(replies) != len(running):
            raise ValueError(f"complete returned {len(replies)} replies for {len(running)} conversations")
        still_running = []
        for trace, reply in zip(running, replies):
            step = parse_step(reply)
            trace.steps.append(step)
            if step.final_answer is not None:
                trace.messages.append({"role": "assistant", "content": format_final(step.thought, step.final_answer)})
                trace.answer, trace.stopped = step.final_answer, "answer"
                continue
            content = reply.strip() if step.malformed else format_action(step.thought, step.tool, step.argument)
            trace.messages.append({"role": "assistant", "content": content})
            if step_no == max_steps:
                trace.stopped = "max_steps"
                continue
            observation = _observe(step, tools, usage)
            trace.messages.append({"role": "user", "content": format_observation(observation, max_observation_chars)})
            still_running.append(trace)
        running = still_running
    return traces


def _observe(step: Step, tools: Mapping[str, Callable[[str], str]], usage: str) -> str:
    if step.malformed:
        return f"could not parse an action; use {usage}"
    if step.tool not in tools:
        return f"unknown tool {step.tool!r}; use {usage}"
    try:
        return str(tools[step.tool](step.argument)) or "(no output)"
    except Exception as e:  # any tool failure is shown to the model, not raised
        return f"{step.tool} failed: {e}"


def function_definitions(tools: Mapping[str, Callable[[str], str]]) -> list[dict[str, Any]]:
    """The tools as OpenAI `tools` entries: each a function of one string, its docstring's first line
    as the description."""
    return [{"type": "function", "function": {
        "name": name, "description": (tool.__doc__ or name).strip().splitlines()[0],
        "parameters": {"type": "object",
                       "properties": {TOOL_ARGUMENT: {"type": "string", "maxLength": MAX_INPUT_CHARS}},
                       "required": [TOOL_ARGUMENT], "additionalProperties": False}}} for name, tool in tools.items()]


def step_text(message: Mapping[str, Any]) -> str:
    """An API reply's message (OpenAI's fields, as a dict) as the assistant turn the loop reads: its
    first tool call as `Action: tool[input]` (the reply's text as the thought), or its text."""
    content, tool_calls = message.get("content") or "", message.get("tool_calls")
    if not tool_calls:
        return content
    call = tool_calls[0]["function"]
    try:
        argument = json.loads(call["arguments"]).get(TOOL_ARGUMENT, "")
    except (json.JSONDecodeError, AttributeError):
        argument = call["arguments"]
    return format_action(_THOUGHT.sub("", content).strip(), call["name"], str(argument))


ChatAPI = Callable[..., Mapping[str, Any]]  # a chat completions request's fields in, the first choice's message out


def api_chat(base_url: str, api_key: str | None = None, timeout: float = 600.0) -> ChatAPI:
    """`POST {base_url}/chat/completions` (any OpenAI-compatible server, `lmforge serve` among them)
    with the standard library; an error answer or an unreachable server is a `ValueError` naming it."""
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {api_key}"} if api_key else {})

    def chat(**fields: Any) -> Mapping[str, Any]:
        request = urllib.request.Request(url, json.dumps(fields).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.load(response)["choices"][0]["message"]
        except urllib.error.HTTPError as e:
            raise ValueError(f"{url} answered {e.code}: {_error_message(e.read())}") from None
        except (urllib.error.URLError, TimeoutError) as e:
            raise ValueError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None

    return chat


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:300]


def tool_calling_completer(chat: ChatAPI, tools: Mapping[str, Callable[[str], str]],
                           **request: Any) -> Callable[[list[list[dict[str, str]]]], list[str]]:
    """A `complete` for `run_agents` over an OpenAI-compatible chat API: `chat` (`api_chat`, or a
    client's create returning the message as a dict) is called once per conversation with the tools as
    functions and `request`'s fields (model, tool_choice, max_tokens, ...)."""
    definitions = function_definitions(tools)
    return lambda conversations: [step_text(chat(messages=c, tools=definitions, **request)) for c in conversations]
