"""`builtin:facts`: a seeded knowledge corpus of fictional entities, for QA with retrieval.

Why: to tell retrieval apart from memorisation we need facts no pretrained model and no
real-world knowledge can supply. Names are built from invented syllables; attributes
are drawn from a seeded RNG. Every entity's attributes are stated in DOCS_PER_ENTITY
differently worded documents (>= 3 templates per attribute, shuffled sentence order,
filler sentences), so every QA answer appears in >= 2 documents of its entity.

Entities come in three kinds: people (birth year, home city, profession), cities
(river, population, founded year) and organisations (founder, founded year, home city).
A seeded share (`db_only_share`) is "db_only": their documents carry
`Document.db_only=True`, meaning they go into the retrieval database only and never into
LM training data, so a model can answer questions about them only by retrieving. The
rest are "seen" (documents in both).

Doc ids are `facts-{seed}-{entity_index:05d}-{j}`, stable for a seed.

Size: the default (1200 entities, 3 documents each) is about 0.7 MB of text (3600 documents), roughly the
order of builtin:pydocs's smaller end: a cpu-small model learns the template language in
minutes. `qa_pairs()` gives one question per entity attribute (3 per entity).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from retrolm.atomic import atomic_path
from retrolm.errors import RetrolmError

if TYPE_CHECKING:
    from retrolm.corpora.reader import Document

DOCS_PER_ENTITY = 3
DEFAULT_N_ENTITIES = 1200
DEFAULT_DB_ONLY_SHARE = 0.3

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "kl", "tr", "sk", "th", "zh", "gw", "vr", "qu"]  # fmt: skip
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ou", "y"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "x", "m", "nd"]
_PROFESSIONS = ["cartographer", "glassblower", "astronomer", "beekeeper", "shipwright",
                "botanist", "clockmaker", "archivist", "weaver", "surveyor", "potter",
                "linguist", "brewer", "engraver", "falconer", "composer"]  # fmt: skip
_ORG_KINDS = ["guild", "trading company", "library", "observatory", "foundry", "academy",
              "bank", "shipyard"]  # fmt: skip

_FILLER = [
    "Little else is recorded in the older registers.",
    "Travellers mention this in passing in their letters.",
    "The local archive keeps several copies of the records.",
    "Some details remain disputed among historians.",
    "This entry was revised after a later survey.",
    "Visitors often remark on it.",
    "The account below follows the common registers.",
]

# attribute -> list of sentence templates; {name} is the entity, {value} the answer
_TEMPLATES: dict[str, list[str]] = {
    "birth_year": [
        "{name} was born in {value}.",
        "The year of {name}'s birth was {value}.",
        "Records show that {name} came into the world in {value}.",
        "Born in {value}, {name} grew up far from the coast.",
    ],
    "home_city": [
        "{name} lived in the city of {value}.",
        "{name}'s home was {value}.",
        "For most of their life, {name} made a home in {value}.",
        "The city {value} was where {name} lived.",
    ],
    "profession": [
        "{name} worked as a {value}.",
        "By trade, {name} was a {value}.",
        "{name} earned a living as a {value}.",
        "Known to many as a {value}, {name} kept a small workshop.",
    ],
    "river": [
        "{name} lies on the river {value}.",
        "The river {value} flows through {name}.",
        "{name} was built on the banks of the {value}.",
        "Boats on the {value} pass through the middle of {name}.",
    ],
    "population": [
        "{name} has a population of {value}.",
        "About {value} people live in {name}.",
        "The last census counted {value} inhabitants in {name}.",
    ],
    "founded_year": [
        "{name} was founded in {value}.",
        "The founding of {name} dates to {value}.",
        "{name} was established in the year {value}.",
        "Since {value}, when it was founded, {name} has grown steadily.",
    ],
    "founder": [
        "{name} was founded by {value}.",
        "The founder of {name} was {value}.",
        "{value} started {name}.",
        "{name} owes its beginning to its founder, {value}.",
    ],
    "org_city": [
        "{name} is based in {value}.",
        "The headquarters of {name} are in {value}.",
        "{name} has its seat in the city of {value}.",
    ],
}

_QUESTIONS: dict[str, str] = {
    "birth_year": "In what year was {name} born?",
    "home_city": "In which city did {name} live?",
    "profession": "What was {name}'s profession?",
    "river": "On which river does {name} lie?",
    "population": "What is the population of {name}?",
    "founded_year": "In what year was {name} founded?",
    "founder": "Who founded {name}?",
    "org_city": "In which city is {name} based?",
}


@dataclass(frozen=True)
class Entity:
    index: int
    kind: str  # "person" | "city" | "org"
    name: str
    attributes: dict[str, str]
    db_only: bool


def _word(rng: random.Random, syllables: tuple[int, int]) -> str:
    n = rng.randint(*syllables)
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def _unique(rng: random.Random, used: set[str], make) -> str:
    for _ in range(1000):
        w = make()
        if w not in used:
            used.add(w)
            return w
    raise RetrolmError("could not generate unique fictional names; use fewer entities")


def entities(
    seed: int = 0, n_entities: int = DEFAULT_N_ENTITIES, db_only_share: float = DEFAULT_DB_ONLY_SHARE
) -> list[Entity]:
    """The seeded fictional world: ~1/4 cities, ~1/2 people, ~1/4 organisations."""
    if n_entities < 4:
        raise RetrolmError("builtin:facts needs n_entities >= 4")
    if not 0.0 <= db_only_share <= 1.0:
        raise RetrolmError("db_only_share must be within [0, 1]")
    rng = random.Random(f"retrolm-facts-{seed}")
    used: set[str] = set()
    n_cities = max(1, n_entities // 4)
    n_orgs = max(1, n_entities // 4)
    n_people = n_entities - n_cities - n_orgs
    rivers = [_unique(rng, used, lambda: _word(rng, (2, 2))) for _ in range(max(4, n_cities // 5))]
    cities = [_unique(rng, used, lambda: _word(rng, (2, 3))) for _ in range(n_cities)]
    people = [
        _unique(rng, used, lambda: f"{_word(rng, (1, 2))} {_word(rng, (2, 3))}")
        for _ in range(n_people)
    ]
    orgs = [
        _unique(rng, used, lambda: f"the {_word(rng, (2, 2))} {rng.choice(_ORG_KINDS)}")
        for _ in range(n_orgs)
    ]
    out: list[Entity] = []
    db_only_flags = [rng.random() < db_only_share for _ in range(n_entities)]
    for name in cities:
        i = len(out)
        attrs = {
            "river": rng.choice(rivers),
            "population": f"{rng.randint(2, 900) * 100:,}",
            "founded_year": str(rng.randint(900, 1850)),
        }
        out.append(Entity(i, "city", name, attrs, db_only_flags[i]))
    for name in people:
        i = len(out)
        attrs = {
            "birth_year": str(rng.randint(1500, 1990)),
            "home_city": rng.choice(cities),
            "profession": rng.choice(_PROFESSIONS),
        }
        out.append(Entity(i, "person", name, attrs, db_only_flags[i]))
    for name in orgs:
        i = len(out)
        attrs = {
            "founder": rng.choice(people),
            "founded_year": str(rng.randint(1600, 1995)),
            "org_city": rng.choice(cities),
        }
        out.append(Entity(i, "org", name, attrs, db_only_flags[i]))
    return out


def _display(name: str) -> str:
    return name[0].upper() + name[1:]


def _entity_texts(ent: Entity, rng: random.Random) -> list[str]:
    """DOCS_PER_ENTITY texts; each states every attribute with a different template."""
    texts = []
    per_attr = {a: rng.sample(range(len(_TEMPLATES[a])), DOCS_PER_ENTITY) for a in ent.attributes}
    for j in range(DOCS_PER_ENTITY):
        sentences = []
        for attr, value in ent.attributes.items():
            tpl = _TEMPLATES[attr][per_attr[attr][j]]
            s = tpl.format(name=ent.name, value=value)
            sentences.append(_display(s))
        rng.shuffle(sentences)
        for _ in range(rng.randint(0, 2)):
            sentences.insert(rng.randint(0, len(sentences)), rng.choice(_FILLER))
        texts.append(" ".join(sentences))
    return texts


def raw_documents(
    seed: int = 0, n_entities: int = DEFAULT_N_ENTITIES, db_only_share: float = DEFAULT_DB_ONLY_SHARE
) -> list[tuple[str, str, str, bool, int]]:
    """(doc_id, text, title, db_only, entity_index) for every document; no corpus import."""
    rng = random.Random(f"retrolm-facts-docs-{seed}")
    out = []
    for ent in entities(seed, n_entities, db_only_share):
        for j, text in enumerate(_entity_texts(ent, rng)):
            doc_id = f"facts-{seed}-{ent.index:05d}-{j}"
            out.append((doc_id, text, _display(ent.name), ent.db_only, ent.index))
    return out


def documents(
    seed: int = 0, n_entities: int = DEFAULT_N_ENTITIES, db_only_share: float = DEFAULT_DB_ONLY_SHARE
) -> list[Document]:
    """The corpus as `retrolm.corpora.reader.Document`s (db_only entities flagged db_only=True)."""
    from retrolm.corpora.reader import Document

    return [
        Document(doc_id=d, text=t, title=title, db_only=flag)
        for d, t, title, flag, _ in raw_documents(seed, n_entities, db_only_share)
    ]


def qa_pairs(
    seed: int = 0, n_entities: int = DEFAULT_N_ENTITIES, db_only_share: float = DEFAULT_DB_ONLY_SHARE
) -> list[dict]:
    """One QA item per entity attribute: question, answers, entity, kind, attribute, doc_ids."""
    items = []
    for ent in entities(seed, n_entities, db_only_share):
        doc_ids = [f"facts-{seed}-{ent.index:05d}-{j}" for j in range(DOCS_PER_ENTITY)]
        for attr, value in ent.attributes.items():
            answers = [value]
            if attr == "population":
                answers.append(value.replace(",", ""))
            items.append(
                {
                    "question": _display(_QUESTIONS[attr].format(name=ent.name)),
                    "answers": answers,
                    "entity": _display(ent.name),
                    "kind": "db_only" if ent.db_only else "seen",
                    "attribute": attr,
                    "doc_ids": doc_ids,
                }
            )
    return items


def write_qa_jsonl(
    path: str | Path,
    seed: int = 0,
    n_entities: int = DEFAULT_N_ENTITIES,
    db_only_share: float = DEFAULT_DB_ONLY_SHARE,
    kind: str | None = None,
) -> int:
    """Write qa_pairs (optionally only kind "db_only" or "seen") as JSONL; returns the count."""
    if kind not in (None, "db_only", "seen"):
        raise RetrolmError(f"unknown QA kind {kind!r}; use 'db_only' or 'seen'")
    items = [q for q in qa_pairs(seed, n_entities, db_only_share) if kind in (None, q["kind"])]
    with atomic_path(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for q in items:
            f.write(json.dumps(q) + "\n")
    return len(items)
