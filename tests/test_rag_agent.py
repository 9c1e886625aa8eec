import pytest

from lmforge.rag.agent import (
    MAX_OBSERVATION_CHARS, Step, calculator_tool, format_action, format_final, format_observation, parse_step,
    run_agents,
)
from lmforge.rag.calculator import CalculatorError
from lmforge.rag.prompts import INSTRUCTION, cite, grounded_messages, parse_citations

DOCS = {
    "Ann Lee": "Ann Lee works for Acme Labs. Ann Lee was born in Vantor.",
    "Bo Kim": "Bo Kim works for Zeta Foods.",
    "headquarters of Acme Labs": "The headquarters of Acme Labs are in Port Alder.",
}


def search(query: str) -> str:
    return DOCS.get(query, "no document found")


TOOLS = {"search": search, "calculator": calculator_tool}


class Scripted:
    """A fake model: the reply depends on the conversation's last message (its state), so a wrong
    observation fed back by the loop derails the script. Records every batch it is called with."""

    def __init__(self, replies: dict[str, str]) -> None:
        self.replies = replies
        self.batches: list[list[list[dict]]] = []

    def __call__(self, conversations: list[list[dict]]) -> list[str]:
        self.batches.append([list(c) for c in conversations])
        for conversation in conversations:
            assert conversation[-1]["role"] == "user"
            assert [m["role"] for m in conversation] == ["user", "assistant"] * (len(conversation) // 2) + ["user"]
        return [self.replies[c[-1]["content"]] for c in conversations]


TWO_HOP = {
    "Where is the headquarters of the company Ann Lee works for?":
        format_action("I need to find the company Ann Lee works for.", "search", "Ann Lee"),
    f"Observation: {DOCS['Ann Lee']}":
        format_action("Ann Lee works for Acme Labs. I need the headquarters of Acme Labs.", "search",
                      "headquarters of Acme Labs"),
    f"Observation: {DOCS['headquarters of Acme Labs']}":
        format_final("The headquarters of Acme Labs are in Port Alder.",
                     "The headquarters of Acme Labs are in Port Alder."),
}


def test_two_hop_question_answered_with_two_searches():
    complete = Scripted(TWO_HOP)
    [trace] = run_agents(["Where is the headquarters of the company Ann Lee works for?"], complete, TOOLS)
    assert trace.stopped == "answer" and trace.answer == "The headquarters of Acme Labs are in Port Alder."
    assert [(s.tool, s.argument) for s in trace.steps] == [("search", "Ann Lee"),
                                                          ("search", "headquarters of Acme Labs"), (None, None)]
    assert [m["role"] for m in trace.messages] == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert trace.messages[2]["content"] == f"Observation: {DOCS['Ann Lee']}"
    assert len(complete.batches) == 3
    rendered = trace.render().splitlines()
    assert rendered[0] == "Question: Where is the headquarters of the company Ann Lee works for?"
    assert [line.split(":")[0] for line in rendered[1:]] == [
        "Thought", "Action", "Observation", "Thought", "Action", "Observation", "Thought", "Final Answer"]
    assert rendered[2] == "Action: search[Ann Lee]"


def test_loop_stops_at_max_steps_without_running_the_last_action():
    calls = []

    def counting_search(query: str) -> str:
        calls.append(query)
        return "nothing useful"

    complete = Scripted({"Who is Zed?": format_action("Search.", "search", "Zed"),
                         "Observation: nothing useful": format_action("Search again.", "search", "Zed")})
    [trace] = run_agents(["Who is Zed?"], complete, {"search": counting_search}, max_steps=3)
    assert trace.stopped == "max_steps" and trace.answer is None
    assert len(trace.steps) == 3 and len(complete.batches) == 3 and len(calls) == 2
    assert trace.messages[-1]["role"] == "assistant"
    assert "stopped after 3 steps" in trace.render()
    with pytest.raises(ValueError, match="max_steps"):
        run_agents(["Who is Zed?"], complete, TOOLS, max_steps=0)


def test_malformed_output_gets_an_error_observation_and_the_loop_continues():
    error = "Observation: could not parse an action; use search[...] or calculator[...] or Final Answer: ..."
    complete = Scripted({"What is 2+2?": "I think the answer is four", error: format_final("Easy.", "4")})
    [trace] = run_agents(["What is 2+2?"], complete, TOOLS)
    assert trace.steps[0].malformed and trace.steps[0].thought == "I think the answer is four"
    assert trace.messages[1] == {"role": "assistant", "content": "I think the answer is four"}
    assert trace.messages[2] == {"role": "user", "content": error}
    assert trace.answer == "4" and trace.stopped == "answer"


def test_calculator_tool_and_its_errors():
    complete = Scripted({
        "What is (3 + 4) * 2 divided by zero, and then by 4?": format_action("Divide.", "calculator", "(3+4)*2/0"),
        "Observation: calculator failed: division by zero": format_action("Try /4.", "calculator", "(3 + 4) * 2 / 4"),
        "Observation: 3.5": format_final("Done.", "3.5"),
    })
    [trace] = run_agents(["What is (3 + 4) * 2 divided by zero, and then by 4?"], complete, TOOLS)
    assert trace.answer == "3.5"
    assert calculator_tool("6 / 3") == "2" and calculator_tool("2 ** 100") == str(2 ** 100)
    assert calculator_tool("1 / 3") == "0.333333333333"
    with pytest.raises(CalculatorError):
        calculator_tool("__import__('os')")


def test_tool_exceptions_and_unknown_tools_become_observations():
    def broken(query: str) -> str:
        raise RuntimeError("index offline")

    complete = Scripted({
        "Q?": format_action("Look it up.", "search", "x"),
        "Observation: search failed: index offline": format_action("Try the wiki.", "wiki", "x"),
        "Observation: unknown tool 'wiki'; use search[...] or Final Answer: ...": format_final("Give up.", "unknown"),
    })
    [trace] = run_agents(["Q?"], complete, {"search": broken})
    assert trace.answer == "unknown" and len(trace.steps) == 3


def test_batch_of_questions_finishing_at_different_steps():
    replies = dict(TWO_HOP)
    replies.update({
        "Say hi.": format_final("Trivial.", "hi"),
        "Where does Bo Kim work?": format_action("Look up Bo Kim.", "search", "Bo Kim"),
        f"Observation: {DOCS['Bo Kim']}": format_final("Bo Kim works for Zeta Foods.", "Bo Kim works for Zeta Foods."),
    })
    complete = Scripted(replies)
    questions = ["Where is the headquarters of the company Ann Lee works for?", "Say hi.", "Where does Bo Kim work?"]
    traces = run_agents(questions, complete, TOOLS)
    assert [t.question for t in traces] == questions
    assert [t.answer for t in traces] == ["The headquarters of Acme Labs are in Port Alder.", "hi",
                                          "Bo Kim works for Zeta Foods."]
    assert [len(t.steps) for t in traces] == [3, 1, 2]
    assert [len(batch) for batch in complete.batches] == [3, 2, 1]  # finished conversations leave the batch
    with pytest.raises(ValueError, match="2 replies for 3 conversations"):
        run_agents(questions, lambda conversations: ["a", "b"], TOOLS)


def test_observations_are_truncated():
    complete = Scripted({"Q?": format_action("Look.", "search", "long"),
                         "Observation: " + "w" * 50 + " ...": format_final("Long.", "done")})
    [trace] = run_agents(["Q?"], complete, {"search": lambda q: "w" * 500}, max_observation_chars=50)
    assert trace.answer == "done"
    assert format_observation("x" * 5000) == "Observation: " + "x" * MAX_OBSERVATION_CHARS + " ..."
    assert format_observation("  short \n") == "Observation: short"


@pytest.mark.parametrize("thought, tool, argument", [
    ("I need the company Ann Lee works for.", "search", "Ann Lee"),
    ("Compute it.", "calculator", "(1 + 2) * [3]"),
    ("", "search", ""),
])
def test_parse_format_round_trip(thought, tool, argument):
    assert parse_step(format_action(thought, tool, argument)) == Step(thought, tool, argument)
    assert parse_step(format_final(thought, "An answer.")) == Step(thought, final_answer="An answer.")


@pytest.mark.parametrize("text, step", [
    ("Thought: a\nAction: search[x]\nObservation: invented\nFinal Answer: no", Step("a", "search", "x")),
    ("Thought: a\nFinal Answer: yes\nAction: search[x]", Step("a", final_answer="yes\nAction: search[x]")),
    ("  Thought:  a b \n  Action:  search [ x y ]  \n", Step("a b", "search", "x y")),
    ("Action: search[x]", Step("", "search", "x")),
    ("Final Answer: 42", Step("", final_answer="42")),
    ("Thought: a\nFinal Answer:   ", Step("Thought: a\nFinal Answer:")),
    ("Thought: a\nAction: search x", Step("Thought: a\nAction: search x")),
    ("Thought: a\nAction: [x]", Step("Thought: a\nAction: [x]")),
    ("", Step("")),
])
def test_parse_step_cases(text, step):
    assert parse_step(text) == step


def test_grounded_messages_and_citations():
    sources = ["Ann Lee works for\nAcme Labs.", "Bo Kim works for Zeta."]
    messages = grounded_messages(" Where does Ann Lee work? ", sources)
    assert messages == [{"role": "user", "content": "\n".join([
        INSTRUCTION, "[1] Ann Lee works for Acme Labs.", "[2] Bo Kim works for Zeta.",
        "Question: Where does Ann Lee work?"])}]
    with pytest.raises(ValueError, match="at least one source"):
        grounded_messages("Q?", [])
    reply = cite("Ann Lee works for Acme Labs.", 1)
    assert reply == "Ann Lee works for Acme Labs. [1]"
    assert parse_citations(reply) == ("Ann Lee works for Acme Labs.", [1])
    assert parse_citations("Ann [2] and Bo [1, 2] work [2][3].") == ("Ann and Bo work.", [2, 1, 3])
    assert parse_citations("No sources here.") == ("No sources here.", [])
    assert parse_citations("See [a] or [ 1 ].") == ("See [a] or [ 1 ].", [])
