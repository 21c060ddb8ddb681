"""Retrieval-draft speculative decoding: the drafter, exactness against plain greedy, and
speculative sampling's output distribution against plain sampling's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retrolm.generation.decode import generate
from retrolm.generation.speculative import DraftBudget, propose_draft
from test_generate import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_draft_from_neighbour_continuation():
    neighbour = np.array([9, 9, 1, 2, 3, 4, 5, 6, 7])
    draft, origin = propose_draft([5, 8, 1, 2, 3], [neighbour], max_len=3)
    assert (draft, origin) == ([4, 5, 6], "neighbours")
    # the longest suffix match wins: [2, 3] occurs in both, but only the second has 1 before it
    other = np.array([2, 3, 40, 41])
    draft, _ = propose_draft([1, 2, 3], [other, neighbour], max_len=2)
    assert draft == [4, 5]


def test_draft_falls_back_to_history_then_nothing():
    context = [7, 1, 2, 8, 8, 3, 1, 2]  # [1, 2] occurred before, followed by 8 8 3
    draft, origin = propose_draft(context, [np.array([50, 51])], max_len=10)
    assert (draft, origin) == ([8, 8, 3, 1, 2], "history")
    assert propose_draft([4, 5, 6], [], max_len=4) == ([], "")
    assert propose_draft([1, 2, 1, 2], [], max_len=0) == ([], "")
    # single-token matches only when asked for, and never in the history
    assert propose_draft([3, 1], [np.array([1, 9])], max_len=4)[0] == []
    assert propose_draft([3, 1], [np.array([1, 9])], max_len=4, min_ngram=1)[0] == [9]
    assert propose_draft([1, 5, 3, 1], [], max_len=4, min_ngram=1)[0] == []


def test_draft_budget_shrinks_after_rejections_and_recovers():
    budget = DraftBudget(8)
    assert budget.limit("neighbours") == 8
    for _ in range(6):
        budget.update("neighbours", 0)
    assert budget.limit("neighbours") <= 2 and budget.limit("history") == 8
    for _ in range(10):
        budget.update("neighbours", 0)
    limits = [budget.limit("neighbours") for _ in range(16)]
    assert limits.count(0) == 14 and all(0 < n <= 2 for n in limits if n)  # starved: only probes
    for _ in range(6):
        budget.update("neighbours", 8)
    assert budget.limit("neighbours") == 8


PROMPTS = [
    "The grey otter number 3 lives near the river.",
    "It hunts fish at dawn by the marsh. It gathers berries",
    "Scientists counted",
    "The golden heron lives near the harbour. It steals seeds after rain by the forest. It",
    "",
    "badger",
    "It chases worms before storms by the reef. It smells fruit in autumn by the canyon.",
    "The Striped lynx number 40 lives near the glacier. It stores mice at night by the",
]


@pytest.fixture(scope="module")
def trained(tiny_db_path, tmp_path_factory):
    """Tiny RETRO and GPT trained 60 steps: they write the corpus' sentence templates, so
    their greedy output depends on the context and drafts are sometimes accepted, sometimes
    cut short (an untrained model loops on one token whatever the cache holds)."""
    from retrolm.checkpoints import load_checkpoint
    from retrolm.model.config import RetroConfig
    from retrolm.training.trainer import TrainConfig, train

    root = tmp_path_factory.mktemp("spec_train")
    cfg = RetroConfig.from_name("tiny", vocab_size=512, chunk_size=16, max_seq_len=64)
    out = {}
    for name, retro in (("retro", True), ("gpt", False)):
        final = train(tiny_db_path, cfg if retro else cfg.as_gpt(), root / name, TrainConfig(
            tokens=64 * 8 * 60, batch_size=8, seq_len=64, lr=3e-3, retrieval=retro, progress=False,
            checkpoint_every=0))  # fmt: skip
        out[name] = load_checkpoint(final).eval()
    return out


@pytest.mark.parametrize("retro", [False, True], ids=["gpt", "retro"])
def test_speculative_greedy_equals_plain_greedy(tiny_db, trained, retro):
    tok = tiny_db.tokenizer
    total_accepted = 0
    partial = 0
    for model in (trained["retro" if retro else "gpt"], tiny_model(tiny_db.vocab_size, retro=retro)):
        db = tiny_db if retro else None
        plain = generate(model, tok, PROMPTS, db=db, max_new_tokens=48, greedy=True)
        spec = generate(model, tok, PROMPTS, db=db, max_new_tokens=48, greedy=True, speculative=True,
                        return_retrieval=retro)
        for p, s in zip(plain, spec, strict=True):
            assert s.token_ids == p.token_ids and s.text == p.text
            assert s.finish_reason == p.finish_reason
            total_accepted += sum(s.stats["accepted_lengths"])
            partial += sum(0 < a < 8 for a in s.stats["accepted_lengths"])
            # every verification step emits 1 + accepted tokens (the last may stop early)
            assert s.stats["model_steps"] <= p.stats["model_steps"]
            if retro:  # chunks retrieved for the final text only, as in plain decoding
                assert [r.chunk_index for r in s.retrieval] == [r.chunk_index for r in p.retrieval]
                assert [r.chunk_ids for r in s.retrieval] == [r.chunk_ids for r in p.retrieval]
    assert total_accepted > 0
    assert partial > 0  # some drafts were cut short: the rollback path ran


def test_speculative_with_repetition_penalty_and_stop(tiny_db, trained):
    model = trained["retro"]
    tok = tiny_db.tokenizer
    kw = dict(db=tiny_db, max_new_tokens=40, greedy=True, repetition_penalty=1.3)
    plain = generate(model, tok, PROMPTS[:4], **kw)
    spec = generate(model, tok, PROMPTS[:4], speculative=True, **kw)
    assert [r.token_ids for r in plain] == [r.token_ids for r in spec]
    text = plain[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    a = generate(model, tok, PROMPTS[0], stop=[stop], **kw)[0]
    b = generate(model, tok, PROMPTS[0], stop=[stop], speculative=True, **kw)[0]
    assert a.finish_reason == b.finish_reason == "stop" and a.text == b.text and a.token_ids == b.token_ids


def test_speculative_sampling_runs_on_retro_with_retrieval(tiny_db, trained):
    """Sampled speculative decoding with online retrieval: seeded, and drafts are accepted."""
    model, tok = trained["retro"], tiny_db.tokenizer
    kw = dict(db=tiny_db, max_new_tokens=40, temperature=0.7, top_p=0.9, speculative=True,
              return_retrieval=True)
    a = generate(model, tok, PROMPTS[:4], seed=3, **kw)
    b = generate(model, tok, PROMPTS[:4], seed=3, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert sum(sum(r.stats["accepted_lengths"]) for r in a) > 0
    # chunks retrieved for the final text only (rejected drafts leave no record)
    m = tiny_db.chunk_size
    for r in a:
        fed = len(r.prompt_ids) + len(r.token_ids) - 1
        assert [c.chunk_index for c in r.retrieval] == list(range(fed // m))


def test_retrieved_continuations_are_accepted_as_drafts(tiny_db, trained):
    """With history drafts off, tokens still come from the neighbours' continuations."""
    model, tok = trained["retro"], tiny_db.tokenizer
    plain = generate(model, tok, PROMPTS, db=tiny_db, max_new_tokens=40, greedy=True)
    spec = generate(model, tok, PROMPTS, db=tiny_db, max_new_tokens=40, greedy=True, speculative=True,
                    draft_history=False)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert all(r.stats["accepted_from"]["history"] == 0 for r in spec)
    assert sum(r.stats["accepted_from"]["neighbours"] for r in spec) > 0


# ------------------------------------------------------------- speculative sampling


class _DigitTokenizer:
    """Tokenizer stand-in for a vocabulary of 8 ids (no EOS ever sampled)."""

    eos_id = -1

    def decode(self, ids):
        return "".join(str(int(t)) for t in ids)


# every bigram (5, x) occurs in the prompt, so after any first token x the history drafts
# what followed (5, x) there: arbitrary tokens, some inside the top-k, some outside
_SPEC_PROMPT = [3, 5, 0, 2, 6, 5, 1, 7, 4, 5, 2, 2, 0, 5, 3, 6, 1, 5, 4, 4, 7, 5, 5, 1, 3, 5, 6, 0, 0,
                5, 7, 2, 1, 5]
_SPEC_KW = dict(temperature=0.8, top_k=4, repetition_penalty=1.2)


@torch.no_grad()
def _exact_joint(model, n_new: int) -> dict[tuple[int, ...], float]:
    """P(first n_new tokens) under plain sampling, from full forward passes."""
    from retrolm.generation.sampling import SamplingParams, sampling_probs

    params = SamplingParams(**_SPEC_KW)
    joint = {(): 1.0}
    for _ in range(n_new):
        nxt = {}
        for prefix, p in joint.items():
            seq = torch.tensor([_SPEC_PROMPT + list(prefix)])
            logits, _ = model(seq)
            probs = sampling_probs(logits[:, -1], seq, params)[0].double()
            for t in torch.nonzero(probs).flatten().tolist():
                nxt[(*prefix, t)] = p * float(probs[t])
        joint = nxt
    return joint


def _chi_square_p(counts: dict, joint: dict, n: int) -> float:
    """Goodness-of-fit p-value of sampled sequences against the exact joint distribution."""
    assert set(counts) <= set(joint), "a sequence with probability 0 was sampled"
    stat = sum((counts.get(c, 0) - n * p) ** 2 / (n * p) for c, p in joint.items())
    df = len(joint) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def _sample_counts(model, n: int, n_new: int, speculative: bool) -> tuple[dict, int, int]:
    """Outcome counts of n samples (prompt i samples with seed i; plain ones as one batch)."""
    results = generate(model, _DigitTokenizer(), ["p"] * n, prompt_ids=[_SPEC_PROMPT] * n,
                       max_new_tokens=n_new, seed=0, speculative=speculative, batch_size=n,
                       **_SPEC_KW)  # fmt: skip
    counts: dict[tuple[int, ...], int] = {}
    for res in results:
        counts[tuple(res.token_ids)] = counts.get(tuple(res.token_ids), 0) + 1
    accepted = sum(sum(r.stats["accepted_lengths"]) for r in results)
    return counts, accepted, sum(r.stats["drafted"] for r in results)


@pytest.fixture(scope="module")
def digit_model():
    from retrolm.model.config import RetroConfig
    from retrolm.model.retro import Retro

    torch.manual_seed(4)
    cfg = RetroConfig.from_name("tiny", vocab_size=8, chunk_size=16, max_seq_len=64, n_layers=2).as_gpt()
    return Retro(cfg).eval()


N_SAMPLES, N_NEW = 1000, 3


def test_speculative_sampling_has_the_plain_sampling_distribution(digit_model):
    """Joint distribution of the first 3 tokens (4^3 = 64 outcomes with top-k 4): speculative
    and plain sampling both fit the exact one; drafts were both accepted and rejected."""
    joint = _exact_joint(digit_model, N_NEW)
    assert len(joint) == 64 and abs(sum(joint.values()) - 1) < 1e-6
    plain, _, _ = _sample_counts(digit_model, N_SAMPLES, N_NEW, speculative=False)
    spec, accepted, drafted = _sample_counts(digit_model, N_SAMPLES, N_NEW, speculative=True)
    assert 0.1 * drafted < accepted < 0.9 * drafted, (accepted, drafted)  # both paths ran
    p_plain, p_spec = _chi_square_p(plain, joint, N_SAMPLES), _chi_square_p(spec, joint, N_SAMPLES)
    print(f"chi-square p: plain {p_plain:.3g}, speculative {p_spec:.3g}")
    assert p_plain > 1e-3 and p_spec > 1e-3
    # seeded: the same seed gives the same tokens again
    again, _, _ = _sample_counts(digit_model, 50, N_NEW, speculative=True)
    first, _, _ = _sample_counts(digit_model, 50, N_NEW, speculative=True)
    assert again == first


def test_the_distribution_check_catches_a_wrong_acceptance_rule(digit_model, monkeypatch):
    """Resampling from p itself (x not removed) on rejection over-weights drafts: detected."""
    import retrolm.generation.speculative as spec_mod

    def biased(probs, draft_token, generator):
        if float(torch.rand((), generator=generator)) < float(probs[draft_token]):
            return True, draft_token
        return False, int(torch.multinomial(probs, 1, generator=generator))

    monkeypatch.setattr(spec_mod, "_accept_sampled", biased)
    joint = _exact_joint(digit_model, N_NEW)
    counts, _, _ = _sample_counts(digit_model, N_SAMPLES, N_NEW, speculative=True)
    p_value = _chi_square_p(counts, joint, N_SAMPLES)
    print(f"chi-square p with the wrong rule: {p_value:.3g}")
    assert p_value < 1e-6
