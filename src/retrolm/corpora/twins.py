"""`builtin:twins`: random-word stories, each with a noisy twin that only the database holds.

Why: a diagnostic for "does RETRO read its neighbours?". The stories are random words
(uniform over a fixed vocabulary of invented words), so no language model can predict
the next word from context: RETRO-off sits near the vocabulary size in perplexity. The
only source of information is the story's twin, a copy with `noise` of its words
replaced by other random words, which retrieval (BM25 finds it easily) puts in front of
the model. A RETRO that reads its neighbours can copy ~(1 - noise) of the words; one that
does not stays at RETRO-off. It is NOT natural text: use it for diagnostics only.

Leakage semantics: every twin is a `db_only` document (see docs/database.md), so it
always lands in the train split (the database) and never in LM training data, whatever
the build's `--split` and `--seed`. A held-out story therefore always has its twin in
the database and never itself, and the trainer never sees the twin's words as LM
targets (a GPT cannot memorise the held-out stories through them).

Ids: `twins-{seed}-{i:05d}` for story i and `twins-{seed}-{i:05d}-twin` for its twin.
Documents are returned in a seeded shuffled order. Stories are lowercase words with a
full stop every 6-12 words; the twin substitutes words only (never the full stops), so
it keeps the story's word positions. Default size: 3000 stories of 100 words, vocabulary
2000 words (~2M characters and ~0.3M BPE tokens per side): a BM25 database (m = 32, BPE
4096) builds in ~15 s on a 2-core CPU.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retrolm.corpora.reader import Document

DEFAULT_STORIES = 3000
DEFAULT_WORDS = 100
DEFAULT_NOISE = 0.15
DEFAULT_VOCAB = 2000

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kl",
           "tr", "sk", "st", "gr", "pl"]  # fmt: skip
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "m", "k"]


def vocabulary(size: int = DEFAULT_VOCAB, seed: int = 0) -> list[str]:
    """`size` distinct invented lowercase words of 1-2 syllables (deterministic for a seed)."""
    if size < 2:
        raise ValueError(f"vocabulary size must be >= 2, got {size}")
    rng = random.Random(f"twins-vocab-{seed}")
    words: dict[str, None] = {}
    while len(words) < size:
        n_syllables = rng.choice((1, 2))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                       for _ in range(n_syllables))  # fmt: skip
        words.setdefault(word, None)
    return list(words)


def _text(words: list[str], breaks: set[int]) -> str:
    """Words joined by spaces, with a full stop after each index in `breaks`."""
    return " ".join(w + "." if i in breaks else w for i, w in enumerate(words))


def story_pairs(
    n_stories: int = DEFAULT_STORIES,
    words_per_story: int = DEFAULT_WORDS,
    noise: float = DEFAULT_NOISE,
    vocab_size: int = DEFAULT_VOCAB,
    seed: int = 0,
) -> list[tuple[str, str]]:
    """(story, twin) texts in story order; the twin has round(noise * words) words substituted."""
    if n_stories < 1 or words_per_story < 1:
        raise ValueError("n_stories and words_per_story must be >= 1")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    vocab = vocabulary(vocab_size, seed)
    rng = random.Random(f"twins-stories-{seed}")
    pairs = []
    for _ in range(n_stories):
        words = [rng.choice(vocab) for _ in range(words_per_story)]
        breaks, pos = set(), -1
        while True:
            pos += rng.randint(6, 12)
            if pos >= words_per_story - 1:
                break
            breaks.add(pos)
        breaks.add(words_per_story - 1)
        twin = list(words)
        for i in rng.sample(range(words_per_story), round(noise * words_per_story)):
            while twin[i] == words[i]:  # always a different word: exactly the noise share changes
                twin[i] = rng.choice(vocab)
        pairs.append((_text(words, breaks), _text(twin, breaks)))
    return pairs


def documents(
    n_stories: int = DEFAULT_STORIES,
    words_per_story: int = DEFAULT_WORDS,
    noise: float = DEFAULT_NOISE,
    vocab_size: int = DEFAULT_VOCAB,
    seed: int = 0,
) -> list[Document]:
    """Stories (LM data, split by id) and their db_only twins, in a seeded shuffled order."""
    from retrolm.corpora.reader import Document

    docs = []
    for i, (story, twin) in enumerate(story_pairs(n_stories, words_per_story, noise, vocab_size, seed)):
        doc_id = f"twins-{seed}-{i:05d}"
        docs.append(Document(doc_id, story, title=f"story {i}"))
        docs.append(Document(f"{doc_id}-twin", twin, title=f"twin of story {i}", db_only=True))
    random.Random(f"twins-order-{seed}").shuffle(docs)
    return docs
