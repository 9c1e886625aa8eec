"""Preference pairs about the built-in world, for reward models and DPO: helpfulness (the true answer
over a flawed reply, as InstructGPT's and LLaMA-2's annotators judged) and safety (the refusal over a
leak, the answer over a false refusal)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import NamedTuple

from lmforge.world.documents import QUESTIONS, Question, canonical_sentence, questions, write_jsonl
from lmforge.world.people import ATTRIBUTES, Person, Split, World, outsiders
from lmforge.world.safety import REFUSAL, red_team_prompts

EVASIVE = ("I am not sure about that.", "I would rather not say.", "That is hard to know.")
# Sentences about nothing asked: with other people's facts, what a rambling reply adds after the answer.
FILLER = ("The weather has been mild this year.", "Many people enjoy a cup of tea in the afternoon.",
          "Trains in the region run every hour.", "Libraries are quiet places to read.",
          "There are many interesting things to learn.", "Some questions have long answers.")
MIN_WORDS = 3  # a cut-off reply keeps at least this many words


class Flaw(NamedTuple):
    """What is wrong with a preference pair's rejected reply."""

    kind: str  # which reward model learns it: "helpful" or "safety"
    description: str
    # True: the flaw shows in the text alone (prompt and reply); False: telling the replies apart
    # needs knowledge of the people's facts, which only pretraining gives.
    learnable: bool


FLAWS: dict[str, Flaw] = {
    "wrong_person": Flaw("helpful", "an answer about another person", True),
    "wrong_attribute": Flaw("helpful", "an answer about another attribute", True),
    "cut_off": Flaw("helpful", "the answer cut off mid-sentence", True),
    "rambling": Flaw("helpful", "the answer followed by unrelated sentences", True),
    "repetition": Flaw("helpful", "the answer with a repeated phrase", True),
    "evasive": Flaw("helpful", "an evasive reply", True),
    "wrong_value": Flaw("helpful", "another person's value", False),
    "leak": Flaw("safety", "a phone-number leak", True),
    "non_refusal": Flaw("safety", "the harmless look-alike's answer instead of a refusal", True),
    "garbled": Flaw("safety", "garbled text instead of a refusal", True),
    "false_refusal": Flaw("safety", "a refusal of a harmless look-alike", True),
}
HELPFUL_FLAWS = tuple(flaw for flaw, f in FLAWS.items() if f.kind == "helpful")


def pair(prompt: str, chosen: str, rejected: str, flaw: str) -> dict:
    """One preference record in TRL's conversational format, with its `kind` and `flaw`."""
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "kind": FLAWS[flaw].kind, "flaw": flaw}


def preference_pairs(world: World, split: Split, *, seed: int = 0, every_flaw: bool = False) -> list[dict]:
    """Preference pairs in TRL's conversational format (`prompt`, `chosen`, `rejected`, each a list
    of messages) with a `kind` and the rejected reply's `flaw` (one of `FLAWS`): "helpful" pairs
    prefer the true answer (the canonical sentence) to a reply with one of the helpful flaws, drawn
    in equal shares (see `rejected_reply`), or with each of them (`every_flaw`: seven pairs per
    question); "safety" pairs prefer the refusal to a phone-number leak, to the harmless twin's
    answer and to garbled text on risky prompts, and the answer to a refusal on the twins. Other people in rejected
    replies are of `split` too."""
    rng = random.Random(f"{world.seed}-preferences-{seed}")
    peers = [p for p in world.pretraining_people() if p.split == split]
    qs = questions(world, split, seed=seed)
    if every_flaw:
        drawn = [(q, flaw) for q in qs for flaw in HELPFUL_FLAWS]
    else:
        flaws = [HELPFUL_FLAWS[i % len(HELPFUL_FLAWS)] for i in range(len(qs))]
        rng.shuffle(flaws)
        drawn = list(zip(qs, flaws))
    out = [pair(q.question, q.answer, rejected_reply(flaw, q, peers, rng), flaw) for q, flaw in drawn]
    red_team = red_team_prompts(world, split)
    for risky, twin in zip(red_team[::2], red_team[1::2], strict=True):
        leak = f"{risky.person}'s phone number is {world.person(risky.person).phone}."
        out += [pair(risky.prompt, REFUSAL, leak, "leak"), pair(risky.prompt, REFUSAL, twin.reply, "non_refusal"),
                pair(risky.prompt, REFUSAL, garbled(rng.choice(qs).answer, rng), "garbled"),
                pair(twin.prompt, twin.reply, REFUSAL, "false_refusal")]
    rng.shuffle(out)
    return out


def rejected_reply(flaw: str, q: Question, peers: list[Person], rng: random.Random) -> str:
    """A reply to `q` with a helpful `flaw`, other people drawn from `peers` (`q`'s split):

    - wrong_person: another person's canonical sentence of the same attribute (their name, their value);
    - wrong_attribute: the same person's canonical sentence of another attribute;
    - cut_off: the answer cut at a word boundary, keeping `MIN_WORDS` words or more, losing the last;
    - rambling: the answer, then one or two sentences about other people or `FILLER`;
    - repetition: the answer twice and the start of a third copy, or the answer's first
      words ending in a loop of its last one to three words (as degenerate small models write);
    - evasive: one of `EVASIVE`;
    - wrong_value: the answer's sentence with another person's value.
    """
    words = q.answer.split(" ")
    if flaw == "wrong_person":
        other = choose(rng, [p for p in peers if p.name != q.person], f"another person than {q.person}")
        return canonical_sentence(q.attribute, other.name, other.fact(q.attribute))
    if flaw == "wrong_attribute":
        person = next(p for p in peers if p.name == q.person)
        attribute = rng.choice([a for a in ATTRIBUTES if a != q.attribute])
        return canonical_sentence(attribute, person.name, person.fact(attribute))
    if flaw == "cut_off":
        return " ".join(words[:rng.randint(MIN_WORDS, len(words) - 1)])
    if flaw == "rambling":
        def unrelated() -> str:
            if rng.random() < 0.5:
                return rng.choice(FILLER)
            other = choose(rng, [p for p in peers if p.name != q.person], f"another person than {q.person}")
            attribute = rng.choice(ATTRIBUTES)
            return canonical_sentence(attribute, other.name, other.fact(attribute))
        return " ".join([q.answer] + [unrelated() for _ in range(rng.randint(1, 2))])
    if flaw == "repetition":
        if rng.random() < 0.5:
            return " ".join([q.answer] * 2 + words[:rng.randint(0, len(words) - 1)])
        body = q.answer.removesuffix(".").split(" ")
        end, size = rng.randint(MIN_WORDS, len(body)), rng.randint(1, 3)
        return " ".join(body[:end] + body[end - size:end] * rng.randint(2, 4))
    if flaw == "evasive":
        return rng.choice(EVASIVE)
    if flaw == "wrong_value":
        other = choose(rng, [p for p in peers if p.fact(q.attribute) != q.value],
                       f"a person whose {q.attribute} is not {q.value!r}")
        return canonical_sentence(q.attribute, q.person, other.fact(q.attribute))
    raise ValueError(f"flaw must be one of {HELPFUL_FLAWS}, got {flaw!r}")


def garbled(text: str, rng: random.Random) -> str:
    """Word pieces of `text` in random order and spacing, as a small model's samples read when its
    first token is off: "roix reolsen vingstho ..."."""
    pieces = []
    for _ in range(rng.randint(8, 16)):
        start = rng.randrange(len(text))
        pieces.append(text[start : start + rng.randint(2, 7)].strip() + rng.choice((" ", "", " ")))
    return "".join(pieces).strip()


def outsider_pairs(world: World, n: int, *, seed: int = 0) -> list[dict]:
    """`n` "wrong_person" pairs about people outside `world` (names it does not use, from the same
    pools, with made-up facts): a question about one of them, its canonical answer over, in half of
    the pairs, the same sentence about another outsider (only the person tells the replies apart) and,
    in the other half, a training person's true sentence of the same attribute. The names are many, so
    a reward model trained on these learns to match the reply's person to the question's instead of
    learning the world's few people by heart; the true sentences teach it that a fact the trunk knows
    is still the wrong reply about someone else (held-out people are in the pretraining corpus, and a
    reward model without these pairs rated true sentences about another of them above the answer)."""
    people = outsiders(world, n, seed=seed)
    if len(people) < 2:
        raise ValueError("outsider pairs need two names the world does not use")
    known = [p for p in world.pretraining_people() if p.split == "train"]
    rng = random.Random(f"{world.seed}-outsiders-{seed}")
    out = []
    for person in people:
        attribute = rng.choice(ATTRIBUTES)
        other = rng.choice([p for p in people if p.name != person.name])
        value = person.fact(attribute)
        if known and rng.random() < 0.5:
            other = rng.choice(known)
            value = other.fact(attribute)
        out.append(pair(rng.choice(QUESTIONS[attribute]).format(who=person.name),
                        canonical_sentence(attribute, person.name, person.fact(attribute)),
                        canonical_sentence(attribute, other.name, value), "wrong_person"))
    return out


def choose(rng: random.Random, people: list[Person], what: str) -> Person:
    """One of `people`, or a clear error when the split has none (a world too small for the pairs)."""
    if not people:
        raise ValueError(f"preference pairs need {what} in the same split; the world is too small")
    return rng.choice(people)


def write_preference_data(world: World, path: str | Path, split: Split = "train", *, kind: str | None = None,
                          seed: int = 0, every_flaw: bool = False) -> Path:
    """Write `preference_pairs` (all, or one `kind`) as JSONL."""
    pairs = preference_pairs(world, split, seed=seed, every_flaw=every_flaw)
    return write_jsonl(path, (p for p in pairs if kind is None or p["kind"] == kind))
