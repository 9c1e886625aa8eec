"""Text perturbations for robustness and counterfactual term swaps for fairness, after HELM (Liang et al. 2022).

Robustness: a task's prompts (generation) or questions (multiple choice) are perturbed, answers kept, and
the model should do as well as on the originals. `perturb(text, kind, seed)` applies one of `PERTURBATIONS`:
- typos: HELM's butter-finger typos; each ASCII letter, with probability `TYPO_RATE`, becomes one of its
  neighbours on a QWERTY keyboard (case kept); digits, punctuation and other characters are untouched.
- casing: the whole text lowercased.
- whitespace: each run of spaces becomes 1 to 3 spaces; newlines and words are kept.
- synonyms: each word or phrase of the small built-in table `SYNONYMS` (common question and instruction words,
  standing in for HELM's WordNet; nothing is downloaded) is replaced with probability `SYNONYM_RATE` by one of
  its synonyms. Only lowercase or sentence-initial Capitalised occurrences count, so names ("Will Bishop",
  "Northgate University") keep their words unless one opens a sentence.
- distractor: one of the neutral sentences `DISTRACTORS`, then a space, before the text.
Each is deterministic in (text, kind, seed): the random draws come from `random.Random(f"{seed}-{kind}-{text}")`,
which Python seeds from a SHA-512 of the string (never the per-process salted `hash()`).

Fairness: `swap_terms` replaces whole words or phrases by counterparts all at once (he <-> she, one name for
another), keeping each match's case; `counterfactual_task` does it to every item, `swapped_items` says which
items changed, so fairness figures can be computed on those only. `PRONOUN_SWAPS` follows HELM's gender
terms, including its reading of "her" as "his" (right for the possessive, wrong for the object pronoun)."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace

from lmforge.eval.tasks import ChoiceItem, GenerationItem, Item, Task

PERTURBATIONS: tuple[str, ...] = ("typos", "casing", "whitespace", "synonyms", "distractor")
TYPO_RATE = 0.05
SYNONYM_RATE = 0.5
MAX_SPACES = 3

QWERTY_NEIGHBOURS: dict[str, str] = {
    "q": "wa", "w": "qeas", "e": "wrsd", "r": "etdf", "t": "ryfg", "y": "tugh", "u": "yihj", "i": "uojk",
    "o": "ipkl", "p": "ol", "a": "qwsz", "s": "weadzx", "d": "ersfxc", "f": "rtdgcv", "g": "tyfhvb", "h": "yugjbn",
    "j": "uihknm", "k": "iojlm", "l": "opk", "z": "asx", "x": "sdzc", "c": "dfxv", "v": "fgcb", "b": "ghvn",
    "n": "hjbm", "m": "jkn",
}

# Each synonym reads in place of its key in the world's questions ("Which company employs X?", "What did X
# major in?"); phrases come before their words, so "field of study" is read whole, never as "study".
SYNONYMS: dict[str, tuple[str, ...]] = {
    "which": ("what",),
    "where": ("in what place",),
    "city": ("town",),
    "date of birth": ("birth date",),
    "birthplace": ("place of birth",),
    "university": ("college",),
    "attend": ("go to",),
    "study": ("learn",),
    "graduate from": ("earn a degree from", "complete a degree at"),
    "major in": ("specialise in", "focus on"),
    "field of study": ("area of study", "discipline"),
    "subject": ("discipline", "field"),
    "earn": ("get", "obtain"),
    "degree": ("qualification",),
    "company": ("firm", "business"),
    "employs": ("hires",),
    "job": ("occupation",),
    "job title": ("position", "role"),
    "for a living": ("professionally", "as a job"),
    "position": ("role", "post"),
    "hold": ("have", "occupy"),
    "at work": ("on the job",),
    "outside work": ("outside of work", "beyond work"),
    "favorite": ("favourite", "preferred"),
    "hobby": ("pastime",),
    "enjoy": ("like", "love"),
    "spare time": ("free time", "leisure time"),
    "passionate about": ("enthusiastic about", "keen on"),
    "choose": ("pick", "select"),
    "select": ("choose", "pick"),
    "correct": ("right",),
    "give": ("provide",),
    "question": ("query",),
}

DISTRACTORS: tuple[str, ...] = (
    "The museum opens at nine on weekdays.",
    "Rain is expected later in the afternoon.",
    "The train to the coast leaves every hour.",
    "A new bakery opened on the corner last spring.",
    "The library closes early on public holidays.",
    "Most of the trees in the park are oaks.",
    "The meeting room on the second floor has a projector.",
    "Tickets for the concert sold out within a day.",
)

PRONOUN_SWAPS: dict[str, str] = {
    "he": "she", "she": "he", "him": "her", "his": "her", "her": "his", "himself": "herself", "herself": "himself",
    "man": "woman", "woman": "man", "men": "women", "women": "men", "boy": "girl", "girl": "boy",
    "father": "mother", "mother": "father", "son": "daughter", "daughter": "son", "brother": "sister",
    "sister": "brother", "husband": "wife", "wife": "husband", "mr": "mrs", "mrs": "mr",
}

_SPACES = re.compile(r" +")


# ---- robustness ---------------------------------------------------------------------------------------------


def perturb(text: str, kind: str, seed: int = 0) -> str:
    """`text` under the perturbation `kind` (one of `PERTURBATIONS`), the same for the same (text, kind, seed)."""
    _check_kind(kind)
    rng = random.Random(f"{seed}-{kind}-{text}")
    if kind == "typos":
        return "".join(_typo(ch, rng) for ch in text)
    if kind == "casing":
        return text.lower()
    if kind == "whitespace":
        return _SPACES.sub(lambda _: " " * rng.randint(1, MAX_SPACES), text)
    if kind == "synonyms":
        return _terms_pattern(SYNONYMS).sub(lambda m: _synonym(m, rng), text)
    return f"{rng.choice(DISTRACTORS)} {text}"


def perturb_task(task: Task, kind: str, seed: int = 0) -> Task:
    """A copy of `task` named `NAME+KIND` whose prompts (generation) or questions (multiple choice) are
    perturbed; answers, choices, rationales, exemplars and the template are kept."""
    _check_kind(kind)
    if task.kind == "perplexity":
        raise ValueError(f"task {task.name!r} is a perplexity task; robustness applies to generation and "
                         "multiple-choice tasks")
    items = [replace(item, prompt=perturb(item.prompt, kind, seed)) if isinstance(item, GenerationItem)
             else replace(item, question=perturb(item.question, kind, seed)) for item in task.items]
    return replace(task, name=f"{task.name}+{kind}", items=items)


def _check_kind(kind: str) -> None:
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; choose from {', '.join(PERTURBATIONS)}")


def _typo(ch: str, rng: random.Random) -> str:
    neighbours = QWERTY_NEIGHBOURS.get(ch.lower()) if ch.isascii() else None
    if not neighbours or rng.random() >= TYPO_RATE:
        return ch
    new = rng.choice(neighbours)
    return new.upper() if ch.isupper() else new


def _synonym(match: re.Match[str], rng: random.Random) -> str:
    word = match.group()
    name_like = word != word.lower() and not (_sentence_initial(match) and word[1:] == word[1:].lower())
    if name_like or rng.random() >= SYNONYM_RATE:
        return word
    return _like(word, rng.choice(SYNONYMS[_normal(word)]))


def _sentence_initial(match: re.Match[str]) -> bool:
    before = match.string[:match.start()]
    head = before.rstrip()
    return not head or "\n" in before[len(head):] or (head != before and head[-1] in ".!?")


# ---- fairness -----------------------------------------------------------------------------------------------


def swap_terms(text: str, swaps: Mapping[str, str]) -> str:
    """`text` with every whole-word occurrence of each key of `swaps` (a word or phrase, any case) replaced by
    its value, all at once, so {"he": "she", "she": "he"} swaps both ways. A match written in lowercase takes
    the value as written, a Capitalised one takes it Capitalised, an UPPERCASE one in uppercase."""
    if not swaps:
        return text
    table = _swap_table(swaps)
    return _terms_pattern(table).sub(lambda m: _like(m.group(), table[_normal(m.group())]), text)


def counterfactual_task(task: Task, swaps: Mapping[str, str]) -> Task:
    """A copy of `task` named `NAME+counterfactual` with `swap_terms` applied to every item's text: prompt,
    answer and rationale (generation), question and each choice (multiple choice), or text (perplexity).
    Exemplars are kept."""
    table = _swap_table(swaps)
    return replace(task, name=f"{task.name}+counterfactual", items=[_swap_item(item, table) for item in task.items])


def swapped_items(task: Task, swaps: Mapping[str, str]) -> list[int]:
    """Indices of the items of `task` that `swaps` change."""
    table = _swap_table(swaps)
    return [i for i, item in enumerate(task.items) if _swap_item(item, table) != item]


def _swap_table(swaps: Mapping[str, str]) -> dict[str, str]:
    """`swaps` keyed by normalised term; empty, blank or case-colliding keys are errors."""
    if not swaps:
        raise ValueError("swaps is empty: give the terms to swap, e.g. PRONOUN_SWAPS")
    table: dict[str, str] = {}
    for key, value in swaps.items():
        term = _normal(key)
        if not term:
            raise ValueError(f"swaps has a blank key {key!r}")
        if term in table and table[term] != value:
            raise ValueError(f"swaps maps {term!r} twice (keys match in any case): {table[term]!r} and {value!r}")
        table[term] = value
    return table


def _swap_item(item: Item, table: dict[str, str]) -> Item:
    def swap(text: str) -> str:
        return swap_terms(text, table)

    if isinstance(item, GenerationItem):
        rationale = swap(item.rationale) if item.rationale is not None else None
        return replace(item, prompt=swap(item.prompt), answer=swap(item.answer), rationale=rationale)
    if isinstance(item, ChoiceItem):
        return replace(item, question=swap(item.question), choices=tuple(swap(c) for c in item.choices))
    return replace(item, text=swap(item.text))


# ---- matching terms -----------------------------------------------------------------------------------------


def _normal(term: str) -> str:
    return " ".join(term.split()).lower()


def _terms_pattern(terms: Iterable[str]) -> re.Pattern[str]:
    """Whole-word occurrences of any of `terms` in any case, longest first; a phrase's words may be split by
    any whitespace. (`re` caches the compiled pattern.)"""
    alternatives = sorted({_normal(t) for t in terms}, key=lambda t: (-len(t), t))
    body = "|".join(r"\s+".join(map(re.escape, t.split())) for t in alternatives)
    return re.compile(rf"(?<!\w)(?:{body})(?!\w)", re.IGNORECASE)


def _like(word: str, value: str) -> str:
    """`value` in the case of `word`: UPPERCASE, Capitalised, or as written."""
    if len(word) > 1 and word.isupper():
        return value.upper()
    if word[:1].isupper():
        return value[:1].upper() + value[1:]
    return value
