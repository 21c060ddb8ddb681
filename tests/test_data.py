"""Dataset over a database split, and the resumable, shardable sample order."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from retrolm.db.dataset import ResumableBatchSampler, first_k_valid
from retrolm.errors import RetrolmError

# -- sampler ----------------------------------------------------------------------------------


def _steps(sampler: ResumableBatchSampler, n_steps: int) -> list[list[list[int]]]:
    """Micro-batches grouped per optimizer step."""
    it = iter(sampler)
    return [[next(it) for _ in range(sampler.accum)] for _ in range(n_steps)]


def test_sampler_covers_each_epoch_once_and_is_seeded():
    s = ResumableBatchSampler(num_samples=10, global_batch=5, micro_batch=5, seed=3)
    first_epoch = sum((b for step in _steps(s, 2) for b in step), [])
    assert sorted(first_epoch) == list(range(10))
    assert first_epoch != list(range(10))  # shuffled
    again = ResumableBatchSampler(10, 5, 5, seed=3)
    assert sum((b for step in _steps(again, 2) for b in step), []) == first_epoch
    other = ResumableBatchSampler(10, 5, 5, seed=4)
    assert sum((b for step in _steps(other, 2) for b in step), []) != first_epoch


def test_sampler_crosses_epochs_and_resumes_from_a_position():
    full = ResumableBatchSampler(num_samples=7, global_batch=4, micro_batch=2, seed=0)
    steps = _steps(full, 6)
    # 24 samples = 3 full epochs + 3: every epoch is a permutation
    flat = sum((b for step in steps for b in step), [])
    for e in range(3):
        assert sorted(flat[e * 7 : (e + 1) * 7]) == list(range(7))
    assert flat[7:14] != flat[:7]  # a new permutation per epoch
    resumed = ResumableBatchSampler(7, 4, 2, seed=0, start=3 * 4)
    assert _steps(resumed, 3) == steps[3:]
    assert full.position(12) == {"samples_seen": 12, "epoch": 1, "index": 5}


@pytest.mark.parametrize(("world", "micro"), [(2, 2), (2, 1), (4, 1)])
def test_sharded_ranks_together_see_the_single_process_global_batch(world, micro):
    single = _steps(ResumableBatchSampler(9, 4, 4, seed=5), 5)
    ranks = [_steps(ResumableBatchSampler(9, 4, micro, r, world, seed=5), 5) for r in range(world)]
    for t in range(5):
        pieces = [ranks[r][t][j] for j in range(len(ranks[0][0])) for r in range(world)]
        assert list(itertools.chain(*pieces)) == single[t][0]


def test_sampler_rejects_a_batch_that_does_not_split():
    with pytest.raises(RetrolmError):
        ResumableBatchSampler(10, global_batch=6, micro_batch=4)
    with pytest.raises(RetrolmError):
        ResumableBatchSampler(10, global_batch=6, micro_batch=2, world_size=2)


def test_first_k_valid_moves_surviving_neighbours_up():
    ids = np.array([[5, -1, 7, 8], [-1, -1, -1, 2], [-1, -1, -1, -1]])
    assert first_k_valid(ids, 2).tolist() == [[5, 7], [2, -1], [-1, -1]]


# -- dataset over the tiny database ---------------------------------------------------------

SEQ = 64  # l = 4 chunks of m = 16


@pytest.fixture(scope="module")
def train_set(tiny_db):
    from retrolm.db.dataset import RetroDataset

    return RetroDataset(tiny_db, "train", seq_len=SEQ, k=2)


def test_items_have_the_documented_shapes_and_shifted_targets(tiny_db, train_set):
    m = tiny_db.chunk_size
    item = train_set[3]
    assert item["tokens"].shape == item["targets"].shape == (SEQ,)
    assert item["neighbours"].shape == item["neighbour_mask"].shape == (SEQ // m, 2, 2 * m)
    assert item["tokens"].dtype == item["neighbours"].dtype == torch.int64
    assert item["neighbour_mask"].dtype == torch.bool
    stream = np.asarray(tiny_db.streams["train"].tokens, dtype=np.int64)
    s = 3 * (SEQ // m)
    assert item["tokens"].tolist() == stream[s * m : s * m + SEQ].tolist()
    assert item["targets"].tolist() == stream[s * m + 1 : s * m + SEQ + 1].tolist()


@pytest.mark.parametrize("split", ["train", "valid"])
def test_chunk_u_carries_the_neighbours_of_window_s_plus_u(tiny_db, split):
    from retrolm.db.dataset import RetroDataset

    ds = RetroDataset(tiny_db, split, seq_len=SEQ, k=3, exclude_sample_docs=False)
    m = tiny_db.chunk_size
    l = SEQ // m  # noqa: E741
    stored = np.asarray(tiny_db.neighbors[split])
    for i in (0, len(ds) // 2, len(ds) - 1):
        item = ds[i]
        for u in range(l):
            want_ids = first_k_valid(stored[i * l + u].astype(np.int64), 3)
            want_tokens, want_mask = tiny_db.chunks.gather(want_ids)
            assert item["neighbours"][u].tolist() == np.asarray(want_tokens).tolist()
            assert item["neighbour_mask"][u].tolist() == np.asarray(want_mask).tolist()
            assert want_mask[0].any()  # the best neighbour is a real chunk


def test_no_neighbour_comes_from_a_document_of_the_sample(tiny_db, train_set):
    from retrolm.db.dataset import RetroDataset

    lenient = RetroDataset(tiny_db, "train", seq_len=SEQ, k=2, exclude_sample_docs=False)
    m, removed = tiny_db.chunk_size, 0
    for i in range(len(train_set)):
        start = i * SEQ
        docs = set(train_set.sample_documents(start, start + SEQ + 1).tolist())
        # the sample's documents, from the stream positions themselves
        doc_of = tiny_db.streams["train"].doc_of(np.arange(start, start + SEQ + 1))
        assert docs == set(doc_of.tolist())
        ids = train_set.neighbour_ids(i)
        used = tiny_db.chunks.chunk_docs(ids[ids >= 0])
        assert not docs & set(used.tolist())
        loose = lenient.neighbour_ids(i)
        removed += int(np.isin(tiny_db.chunks.chunk_docs(loose[loose >= 0]), list(docs)).sum())
    assert train_set.exclude_sample_docs and m == 16
    assert removed > 0, "the tiny database never offers a same-sample neighbour; test is vacuous"


def test_train_split_never_reads_past_lm_train_tokens(tiny_db):
    """Only the prefix `lm_train_tokens` of the train stream is LM training data: cut the
    stream there (a database whose tail is retrieval-only) and read every sequence."""
    import copy

    from retrolm.db.dataset import RetroDataset

    assert tiny_db.lm_train_tokens <= len(tiny_db.streams["train"])
    budget = len(tiny_db.streams["train"]) // 2 + 7
    cut = copy.copy(tiny_db)
    cut.lm_train_tokens = budget
    stream = copy.copy(tiny_db.streams["train"])
    stream.tokens = np.asarray(tiny_db.streams["train"].tokens[:budget])  # nothing beyond
    cut.streams = {**tiny_db.streams, "train": stream}
    ds = RetroDataset(cut, "train", seq_len=SEQ, k=2)
    assert len(ds) == (budget - 1) // SEQ
    for i in range(len(ds)):
        assert ds[i]["targets"].shape == (SEQ,)  # a read past the cut would come back short
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_no_retrieval_gives_the_same_sequences_without_neighbours(tiny_db, train_set):
    from retrolm.db.dataset import RetroDataset

    plain = RetroDataset(tiny_db, "train", seq_len=SEQ, retrieval=False)
    assert len(plain) == len(train_set)
    a, b = plain[5], train_set[5]
    assert set(a) == {"tokens", "targets"}
    assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["targets"], b["targets"])


def test_workers_reopen_the_database_and_match_direct_reads(tiny_db_path, train_set):
    from retrolm.db.dataset import RetroDataset, make_loader

    ds = RetroDataset(tiny_db_path, "train", seq_len=SEQ, k=2)
    sampler = ResumableBatchSampler(len(ds), global_batch=4, micro_batch=4, seed=1)
    batch = next(iter(make_loader(ds, sampler, num_workers=1)))
    order = sampler.global_batch_at(0).tolist()
    for row, index in enumerate(order):
        want = train_set[index]
        assert torch.equal(batch["tokens"][row], want["tokens"])
        assert torch.equal(batch["neighbours"][row], want["neighbours"])
    # what a spawned worker receives carries no open memmaps; it opens its own
    import pickle

    shipped = pickle.loads(pickle.dumps(ds))
    assert shipped._db is None
    assert torch.equal(shipped[order[0]]["tokens"], batch["tokens"][0])


def test_bad_settings_are_refused(tiny_db):
    from retrolm.db.dataset import RetroDataset

    with pytest.raises(RetrolmError, match="multiple of the database chunk size"):
        RetroDataset(tiny_db, "train", seq_len=40)
    with pytest.raises(RetrolmError, match="stores 4 neighbours"):
        RetroDataset(tiny_db, "train", seq_len=SEQ, k=5)
    with pytest.raises(RetrolmError, match="no split"):
        RetroDataset(tiny_db, "nope", seq_len=SEQ)
