"""Shared fixtures: a synthetic English corpus and tiny databases built once per session.

Offline and deterministic: HF_HUB_OFFLINE and TOKENIZERS_PARALLELISM are set at import.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

import pytest  # noqa: E402

ANIMALS = ["otter", "heron", "badger", "falcon", "lynx", "salmon", "beetle", "walrus", "gecko", "raven"]
PLACES = ["river", "forest", "harbour", "valley", "desert", "marsh", "glacier", "meadow", "reef", "canyon"]
FOODS = ["berries", "fish", "seeds", "insects", "roots", "shellfish", "mice", "leaves", "worms", "fruit"]
VERBS = ["hunts", "gathers", "finds", "steals", "hides", "shares", "eats", "stores", "chases", "smells"]
TIMES = ["at dawn", "at night", "in winter", "after rain", "in spring", "at noon", "before storms", "in autumn"]
COLOURS = ["grey", "golden", "striped", "spotted", "black", "silver", "red", "pale"]


def synthetic_documents(n: int = 160, seed: int = 0) -> list[str]:
    """n short English documents over a shared vocabulary, each with a unique name."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        animal, place = rng.choice(ANIMALS), rng.choice(PLACES)
        name = f"{rng.choice(COLOURS).capitalize()} {animal} number {i}"
        sentences = [f"The {name} lives near the {place}."]
        for _ in range(rng.randint(3, 6)):
            sentences.append(
                f"It {rng.choice(VERBS)} {rng.choice(FOODS)} {rng.choice(TIMES)} by the {rng.choice(PLACES)}."
            )
        sentences.append(f"Scientists counted {rng.randint(2, 900)} of them last year.")
        docs.append(" ".join(sentences))
    return docs


def make_corpus_dir(root: Path, n: int = 160, seed: int = 0) -> Path:
    """Write `synthetic_documents(n)` as root/corpus/doc_XXXX.txt (nested in two folders)."""
    corpus = Path(root) / "corpus"
    for i, text in enumerate(synthetic_documents(n, seed)):
        sub = corpus / ("a" if i % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc_{i:04d}.txt").write_text(text + "\n", encoding="utf-8")
    return corpus


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    """Directory of 160 synthetic .txt documents (see `synthetic_documents`)."""
    return make_corpus_dir(tmp_path_factory.mktemp("tiny_corpus"))


@pytest.fixture(scope="session")
def tiny_db_path(tmp_path_factory, tiny_corpus) -> Path:
    """Path of the session's tiny DENSE database (built once; treat as read-only).

    Settings: corpus = `tiny_corpus` (160 synthetic docs), retriever dense (MiniLM, Flat),
    chunk_size=16, vocab_size=512, neighbors=4, split 80/10/10, seed 0.
    """
    from retrolm.db.database import RetrievalDB

    path = tmp_path_factory.getbasetemp() / "tiny_db"
    RetrievalDB.build(str(tiny_corpus), path, chunk_size=16, vocab_size=512, neighbors=4,
                      split=(80, 10, 10), seed=0, progress=False)
    return path


@pytest.fixture(scope="session")
def tiny_db(tiny_db_path):
    """The opened tiny dense database (`RetrievalDB`); settings in `tiny_db_path`."""
    from retrolm.db.database import RetrievalDB

    return RetrievalDB.open(tiny_db_path)


@pytest.fixture(scope="session")
def tiny_bm25_db(tmp_path_factory, tiny_corpus):
    """Same corpus and settings as `tiny_db` but with the BM25 retriever."""
    from retrolm.db.database import RetrievalDB

    path = tmp_path_factory.getbasetemp() / "tiny_bm25_db"
    return RetrievalDB.build(str(tiny_corpus), path, retriever="bm25", chunk_size=16, vocab_size=512,
                             neighbors=4, split=(80, 10, 10), seed=0, progress=False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one intra-op thread, and far faster on a shared 2-core
    machine; modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tiny_retro(**overrides):
    """The `tiny` preset in float64 after a fixed seed; with a copy head, one that copies.

    The copy head's exact-match weights start at 0 and its sentinel takes ~95% of the mass,
    so a fresh model barely copies; tests of causality and caching set them so it does.
    """
    import torch

    from retrolm.model.config import RetroConfig
    from retrolm.model.retro import Retro

    torch.manual_seed(0)
    model = Retro(RetroConfig.from_name("tiny", **overrides)).double().eval()
    if model.copy_head is not None:
        with torch.no_grad():
            model.copy_head.match_weight.copy_(torch.tensor([0.2, 0.3]))
            model.copy_head.sentinel_bias.fill_(0.0)
    return model


def default_sigint() -> None:
    """`preexec_fn` for a child that a test interrupts: SIGINT back to its default action.

    A test run started in the background (`cmd &`, some CI runners) inherits SIGINT as
    ignored, and an ignored signal stays ignored across exec, so Python would never raise
    KeyboardInterrupt in the child and the Ctrl-C tests would test nothing."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
