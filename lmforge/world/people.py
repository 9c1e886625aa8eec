"""The built-in world's people and companies, generated from a seed.

`make_world` draws people (name, birth date and city, university, major, employer, job title,
hobby, and a private phone number) and companies (headquarters, industry, CEO). Some people are
left out of pretraining (for retrieval), and people are split into "train" and "heldout"
(fine-tune on the first, evaluate extraction on the second). Everything is deterministic for a seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from functools import cached_property
from typing import Literal

Split = Literal["train", "heldout"]

FIRST_NAMES = (
    "Alice", "Amara", "Arjun", "Beatrix", "Bruno", "Carmen", "Cedric", "Dalia", "Dmitri", "Elena",
    "Emeka", "Farah", "Felix", "Greta", "Hiro", "Hugo", "Ingrid", "Isaac", "Jana", "Jonah",
    "Kai", "Keira", "Lars", "Leila", "Luca", "Maya", "Milo", "Nadia", "Nikos", "Nora",
    "Omar", "Olga", "Paolo", "Priya", "Quinn", "Rafael", "Rosa", "Samir", "Selma", "Tariq",
    "Tessa", "Ulrich", "Uma", "Victor", "Vera", "Wendell", "Wren", "Xavier", "Ximena", "Yara",
    "Yusuf", "Zane", "Zora", "Anders", "Bianca", "Colette", "Darius", "Esther", "Gideon", "Hana",
)
LAST_NAMES = (
    "Abernathy", "Okafor", "Lindqvist", "Moreau", "Tanaka", "Castillo", "Brennan", "Novak", "Haddad", "Kowalski",
    "Petrov", "Delacroix", "Whitfield", "Sato", "Oyelaran", "Marchetti", "Johansson", "Reyes", "Albright", "Kaur",
    "Fontaine", "Grimaldi", "Holloway", "Ivanova", "Jablonski", "Kessler", "Larkspur", "Mendoza", "Nakamura", "Osei",
    "Pemberton", "Quintero", "Rasmussen", "Silva", "Thornbury", "Umarov", "Valdez", "Westbrook", "Yilmaz", "Zielinski",
    "Ashcombe", "Barros", "Chaudhry", "Dunmore", "Eriksen", "Ferreira", "Galloway", "Herrera", "Iwata", "Jovanovic",
    "Kim", "Lachance", "Mbeki", "Nilsson", "Oduya", "Pacheco", "Rourke", "Strand", "Tremblay", "Vasquez",
)
# The first names by origin, for counterfactual swaps across origins (fairness evaluation).
NAME_ORIGINS: dict[str, tuple[str, ...]] = {
    "English and Celtic": ("Alice", "Cedric", "Keira", "Nora", "Quinn", "Tessa", "Wendell", "Wren", "Zane"),
    "Germanic and Nordic": ("Anders", "Bruno", "Greta", "Hugo", "Ingrid", "Lars", "Milo", "Selma", "Ulrich"),
    "Romance": ("Beatrix", "Bianca", "Carmen", "Colette", "Felix", "Luca", "Paolo", "Rafael", "Rosa", "Victor",
                "Xavier", "Ximena"),
    "Greek and Slavic": ("Dmitri", "Elena", "Jana", "Nadia", "Nikos", "Olga", "Vera", "Zora"),
    "Middle Eastern": ("Dalia", "Darius", "Esther", "Farah", "Gideon", "Isaac", "Jonah", "Leila", "Omar", "Samir",
                       "Tariq", "Yara", "Yusuf"),
    "African and Asian": ("Amara", "Arjun", "Emeka", "Hana", "Hiro", "Kai", "Maya", "Priya", "Uma"),
}
CITIES = (
    "Port Alder", "Eastbrook", "Millhaven", "Brightwater", "Coldharbor", "Elmstead", "Fairhollow", "Glenrock",
    "Ironmouth", "Juniper Vale", "Kestrel Bay", "Lanford", "Marrowgate", "Northmere", "Oakridge Falls", "Pellham",
    "Quarry Point", "Redcliffe", "Saltmarsh", "Thornbury Cross", "Upper Wexley", "Vantor", "Westerhold", "Yarrowick",
    "Ambervale", "Bellstone", "Copperfield", "Duskwater", "Emberlyn", "Frostholm",
)
UNIVERSITIES = (
    "Northgate University", "Brightwater Institute of Technology", "the University of Elmstead",
    "Coldharbor College", "Kestrel Bay University", "the Millhaven School of Science", "Redcliffe University",
    "the Lanford Institute", "Westerhold State University", "the University of Port Alder",
    "Glenrock Polytechnic", "Ambervale University", "the Copperfield Academy", "Saltmarsh University",
)
MAJORS = (
    "mathematics", "physics", "chemistry", "biology", "computer science", "economics", "history", "philosophy",
    "linguistics", "architecture", "mechanical engineering", "electrical engineering", "psychology",
    "statistics", "geology", "music", "nursing", "political science", "astronomy", "civil engineering",
)
JOB_TITLES = (
    "software engineer", "data analyst", "accountant", "product manager", "sales director", "research scientist",
    "graphic designer", "legal counsel", "operations manager", "marketing specialist", "civil engineer",
    "financial analyst", "technical writer", "quality inspector", "logistics coordinator", "lab technician",
    "customer success manager", "security engineer", "hardware designer", "recruiter",
)
CEO_TITLE = "chief executive officer"
HOBBIES = (
    "rock climbing", "chess", "watercolor painting", "birdwatching", "sailing", "pottery", "long-distance running",
    "gardening", "playing the cello", "astrophotography", "baking bread", "cycling", "woodworking", "fencing",
    "origami", "kayaking", "beekeeping", "salsa dancing", "stamp collecting", "board games",
)
COMPANY_PREFIXES = (
    "Blue", "Iron", "Silver", "North", "Bright", "Red", "Stone", "Clear", "Swift", "Green",
    "High", "Deep", "Star", "Oak", "Amber", "Frost", "Sun", "Cloud", "Gold", "Wild",
)
COMPANY_STEMS = ("peak", "field", "bridge", "wave", "leaf", "forge", "gate", "line", "spring", "wood", "crest", "port")
COMPANY_SUFFIXES = ("Systems", "Labs", "Industries", "Dynamics", "Foods", "Logistics", "Energy", "Health",
                    "Robotics", "Media", "Materials", "Analytics")
INDUSTRIES = (
    "software", "biotechnology", "renewable energy", "logistics", "food processing", "aerospace", "banking",
    "telecommunications", "robotics", "publishing", "pharmaceutical", "semiconductor", "insurance", "shipping",
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")

# Public attributes written in biographies and probed, in their canonical order.
ATTRIBUTES = ("birth_date", "birth_city", "university", "major", "employer", "job_title", "hobby")
PHONE_PREFIX = "555-"  # every private phone number starts with it


@dataclass(frozen=True)
class Company:
    name: str
    headquarters: str
    ceo: str  # the name of a Person of the same world
    industry: str


@dataclass(frozen=True)
class Person:
    name: str  # "First Last", unique in its world
    birth_date: date
    birth_city: str
    university: str
    major: str
    employer: str  # the name of a Company of the same world
    job_title: str
    hobby: str
    phone: str  # private: never written into the pretraining corpus
    split: Split
    in_pretraining: bool

    @property
    def first(self) -> str:
        return self.name.split(" ")[0]

    def fact(self, attribute: str) -> str:
        """The public attribute as the corpus writes it (dates like "March 4, 1987")."""
        if attribute == "birth_date":
            return format_date(self.birth_date)
        if attribute not in ATTRIBUTES:
            raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attribute!r}")
        return getattr(self, attribute)

    def facts(self) -> dict[str, str]:
        return {a: self.fact(a) for a in ATTRIBUTES}


@dataclass(frozen=True)
class World:
    seed: int
    people: tuple[Person, ...]
    companies: tuple[Company, ...]

    @cached_property
    def _people(self) -> dict[str, Person]:
        return {p.name: p for p in self.people}

    @cached_property
    def _companies(self) -> dict[str, Company]:
        return {c.name: c for c in self.companies}

    def person(self, name: str) -> Person:
        if name not in self._people:
            raise KeyError(f"no person named {name!r} in this world")
        return self._people[name]

    def company(self, name: str) -> Company:
        if name not in self._companies:
            raise KeyError(f"no company named {name!r} in this world")
        return self._companies[name]

    def pretraining_people(self) -> list[Person]:
        return [p for p in self.people if p.in_pretraining]


def format_date(d: date) -> str:
    return f"{MONTHS[d.month - 1]} {d.day}, {d.year}"


def article(word: str) -> str:
    """The indefinite article ("a" or "an") before `word`."""
    return "an" if word[0].lower() in "aeiou" else "a"


def make_world(seed: int = 0, n_people: int = 200, n_companies: int = 20, *,
               absent_fraction: float = 0.1, heldout_fraction: float = 0.2) -> World:
    """Generate a world of `n_people` people and `n_companies` companies, deterministically from `seed`.

    `absent_fraction` of the people are left out of pretraining (all of them "heldout");
    of the rest, `heldout_fraction` are "heldout" and the others "train". Every CEO is in pretraining.
    """
    max_people = len(FIRST_NAMES) * len(LAST_NAMES)
    if not 1 <= n_people <= max_people:
        raise ValueError(f"n_people must be between 1 and {max_people} (unique names), got {n_people}")
    if not 0.0 <= absent_fraction < 1.0:
        raise ValueError(f"absent_fraction must be in [0, 1), got {absent_fraction}")
    if not 0.0 <= heldout_fraction <= 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1], got {heldout_fraction}")
    n_absent = int(n_people * absent_fraction)
    max_companies = min(len(COMPANY_PREFIXES) * len(COMPANY_STEMS), n_people - n_absent)
    if not 1 <= n_companies <= max_companies:
        raise ValueError(f"n_companies must be between 1 and {max_companies} (one CEO in pretraining each), "
                         f"got {n_companies}")
    rng = random.Random(seed)

    names = [f"{FIRST_NAMES[i // len(LAST_NAMES)]} {LAST_NAMES[i % len(LAST_NAMES)]}"
             for i in rng.sample(range(max_people), n_people)]
    stems = rng.sample([(p, s) for p in COMPANY_PREFIXES for s in COMPANY_STEMS], n_companies)
    company_names = [f"{p}{s} {rng.choice(COMPANY_SUFFIXES)}" for p, s in stems]
    absent = set(rng.sample(range(n_people), n_absent))
    pre = [i for i in range(n_people) if i not in absent]
    heldout = absent | set(rng.sample(pre, round(len(pre) * heldout_fraction)))
    ceos = rng.sample(pre, n_companies)
    employer_of = {i: c for c, i in enumerate(ceos)}
    phones = rng.sample(range(10**7), n_people)

    people = []
    lo, hi = date(1950, 1, 1).toordinal(), date(2002, 12, 31).toordinal()
    for i, name in enumerate(names):
        is_ceo = i in employer_of
        people.append(Person(
            name=name,
            birth_date=date.fromordinal(rng.randint(lo, hi)),
            birth_city=rng.choice(CITIES),
            university=rng.choice(UNIVERSITIES),
            major=rng.choice(MAJORS),
            employer=company_names[employer_of[i] if is_ceo else rng.randrange(n_companies)],
            job_title=CEO_TITLE if is_ceo else rng.choice(JOB_TITLES),
            hobby=rng.choice(HOBBIES),
            phone=f"{PHONE_PREFIX}{phones[i] // 10**4:04d}-{phones[i] % 10**4:04d}",
            split="heldout" if i in heldout else "train",
            in_pretraining=i not in absent,
        ))
    companies = [Company(name=n, headquarters=rng.choice(CITIES), ceo=names[ceos[c]], industry=rng.choice(INDUSTRIES))
                 for c, n in enumerate(company_names)]
    return World(seed=seed, people=tuple(people), companies=tuple(companies))


def outsiders(world: World, n: int, *, seed: int = 0) -> list[Person]:
    """Up to `n` people outside `world`: names it does not use (from the same pools), with made-up facts;
    the same for a seed."""
    taken = {p.name for p in world.people}
    pool = make_world(seed=world.seed + 7919 * (seed + 1),
                      n_people=min(len(FIRST_NAMES) * len(LAST_NAMES), len(taken) + 2 * n))
    return [p for p in pool.people if p.name not in taken][:n]


def origin_swaps(names: Iterable[str], *, seed: int = 0) -> dict[str, str]:
    """For the first name of each of `names`, a first name of another origin (`NAME_ORIGINS`), drawn
    with `seed`, no two the same (so no two people become one): the counterfactual swaps of fairness
    evaluation."""
    origin = {first: group for group, firsts in NAME_ORIGINS.items() for first in firsts}
    firsts = sorted({name.split(" ")[0] for name in names})
    unknown = [f for f in firsts if f not in origin]
    if unknown:
        raise ValueError(f"first names without an origin in NAME_ORIGINS: {', '.join(unknown)}")
    rng = random.Random(f"origin-swaps-{seed}")
    swaps: dict[str, str] = {}
    for first in firsts:
        others = [f for group, names_ in NAME_ORIGINS.items() if group != origin[first] for f in names_
                  if f not in swaps.values()]
        if not others:
            raise ValueError(f"too many first names to swap ({len(firsts)}) for distinct names of other origins")
        swaps[first] = rng.choice(others)
    return swaps


def world_of_size(people: int, seed: int = 0) -> World:
    """`make_world(seed)` with `people` people and one company per ten of them (at least 4): the
    world the demo and the built-in tasks use."""
    return make_world(seed, n_people=people, n_companies=max(4, people // 10))
