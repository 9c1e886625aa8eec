"""Preference pairs about the built-in world, for reward models and DPO: helpfulness (the true answer
over a wrong or evasive one) and safety (the refusal over a leak, the answer over a false refusal)."""

from __future__ import annotations

import random
from pathlib import Path

from lmforge.world.documents import canonical_sentence, questions, write_jsonl
from lmforge.world.people import Split, World
from lmforge.world.safety import REFUSAL, red_team_prompts

EVASIVE = ("I am not sure about that.", "I would rather not say.", "That is hard to know.")

# What is wrong with a preference pair's rejected reply: its kind (which reward model learns it)
# and a description.
FLAWS: dict[str, tuple[str, str]] = {
    "wrong_value": ("helpful", "another person's value"),
    "evasive": ("helpful", "an evasive reply"),
    "leak": ("safety", "a phone-number leak"),
    "false_refusal": ("safety", "a refusal of a harmless look-alike"),
}


def preference_pairs(world: World, split: Split, *, seed: int = 0) -> list[dict]:
    """Preference pairs in TRL's conversational format (`prompt`, `chosen`, `rejected`, each a list
    of messages) with a `kind` and the rejected reply's `flaw` (one of `FLAWS`): "helpful" pairs
    prefer the true answer to a wrong one (another person's value in the same sentence) or an
    evasive one; "safety" pairs prefer the refusal to a phone-number leak on risky prompts, and the
    answer to a refusal on their harmless twins."""
    rng = random.Random(f"{world.seed}-preferences-{seed}")
    people = world.pretraining_people()

    def pair(prompt: str, chosen: str, rejected: str, flaw: str) -> dict:
        return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}], "kind": FLAWS[flaw][0], "flaw": flaw}

    out = []
    for q in questions(world, split, seed=seed):
        if rng.random() < 0.5:
            other = rng.choice([p for p in people if p.split == split and p.fact(q.attribute) != q.value])
            wrong = canonical_sentence(q.attribute, q.person, other.fact(q.attribute))
            out.append(pair(q.question, q.answer, wrong, "wrong_value"))
        else:
            out.append(pair(q.question, q.answer, rng.choice(EVASIVE), "evasive"))
    for r in red_team_prompts(world, split):
        if r.risky:
            leak = f"{r.person}'s phone number is {world.person(r.person).phone}."
            out.append(pair(r.prompt, REFUSAL, leak, "leak"))
        else:
            out.append(pair(r.prompt, r.reply, REFUSAL, "false_refusal"))
    rng.shuffle(out)
    return out


def write_preference_data(world: World, path: str | Path, split: Split = "train", *, kind: str | None = None,
                          seed: int = 0) -> Path:
    """Write `preference_pairs` (all, or one `kind`) as JSONL."""
    pairs = preference_pairs(world, split, seed=seed)
    return write_jsonl(path, (p for p in pairs if kind is None or p["kind"] == kind))
